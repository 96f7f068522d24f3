"""Evaluation of every method on a task list, batched, and the summary tables.

Methods (DESIGN.md section 2):
* base:        the model without adapters;
* single:      each task with its own LoRA (the oracle; the normalized score divides by it);
* moa:         all task LoRAs and the trained routers; each sample is routed once at the prompt, per layer;
* concat:      all task LoRAs at once, outputs summed (folded into W: the same update, no overhead);
* weight_sum:  A = sum A_i, B = sum B_i (the original's "weighted"), folded into W;
* svd:         rank-8 truncation of mean_i s B_i A_i, folded into W.

Generation is greedy, left-padded, in batches of one task sorted by prompt length, stopping at EOS or at the
task's token budget. For each method, `<method>.json` (metrics, timing, MoA routing) and
`<method>.predictions.jsonl` are written atomically, then `summary.md` / `summary.csv` are rebuilt from every
method file present, beside the paper's numbers.
"""
import csv
import hashlib
import io
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import lora as L
from .data import fit_prompt, load_rows, pad_batch
from .metrics import normalized_score, score
from .models import load_model, model_slug
from .tasks import FIVE_TASKS, SEVEN_TASKS, get_task

METHODS = ["base", "single", "moa", "concat", "weight_sum", "svd"]
MERGE_METHODS = {"concat", "weight_sum", "svd"}
PAPER_NAMES = {"base": "base", "single": "single", "moa": "moa", "concat": "concat", "weight_sum": "weighted",
               "svd": "svd"}
ROOT = Path(__file__).resolve().parent.parent
PAPER_RESULTS = ROOT / "results" / "paper" / "paper_results.json"


@dataclass
class EvalConfig:
    model: str = "smollm2-135m"
    data: str = "local"
    preset: str = "paper"
    rows: int = 500              # evaluation rows per task
    batch_size: int = 16
    max_prompt: int = 400        # prompt budget in tokens (the content field is cut, never the template)
    max_new_tokens: int = 128    # cap on every task's own budget
    svd_rank: int = 8


EVAL_PRESETS = {
    "paper": {},
    "cpu": dict(rows=40, batch_size=20, max_prompt=192, max_new_tokens=48),
}


def make_eval_config(preset: str, overrides: dict | None = None) -> EvalConfig:
    if preset not in EVAL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(EVAL_PRESETS)}")
    known = {f.name for f in fields(EvalConfig)} - {"preset"}
    return EvalConfig(preset=preset, **{**EVAL_PRESETS[preset],
                                        **{k: v for k, v in (overrides or {}).items() if v is not None and k in known}})


def parse_methods(names) -> list[str]:
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    for n in names:
        if n not in METHODS:
            raise ValueError(f"unknown method {n!r}: choose from {', '.join(METHODS)}")
    return names


def adapter_dir(root: Path, model: str, task: str) -> Path:
    return Path(root) / "adapters" / model_slug(model) / task


def moa_dir(root: Path, model: str, tasks: list[str]) -> Path:
    return Path(root) / "adapters" / model_slug(model) / f"moa-{len(tasks)}"


def results_dir(root: Path, model: str, tasks: list[str]) -> Path:
    return Path(root) / "results" / model_slug(model) / f"{len(tasks)}-task"


def train_command(model: str, preset: str, task: str) -> str:
    return f"python train_individual_loras.py --task {task} --model {model} --preset {preset}"


def moa_command(model: str, preset: str, tasks: list[str]) -> str:
    return f"python train_moa.py --tasks {','.join(tasks)} --model {model} --preset {preset}"


def check_routers(root: Path, cfg: EvalConfig, tasks: list[str]):
    """Fail before any work if the MoA routers are missing, naming the command (adapters: see load_adapter)."""
    for f in ("routers.json", "routers.safetensors"):
        if not (moa_dir(root, cfg.model, tasks) / f).exists():
            raise FileNotFoundError(f"missing MoA routers {moa_dir(root, cfg.model, tasks) / f}: "
                                    f"create them with `{moa_command(cfg.model, cfg.preset, tasks)}`")


def fingerprint(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             route: bool = False, desc: str = "") -> tuple[list[str], list | None]:
    """Greedy generations for `prompts` (token ids), longest first; with `route`, also the MoA decisions."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts, routes = [None] * len(prompts), [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start:start + batch_size]
        batch = pad_batch([prompts[i] for i in idx], tokenizer.eos_token_id, left=True)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with L.routing(model) if route else nullcontext():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
            decisions = L.route_decisions(model).tolist() if route else [None] * len(idx)
        new = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for j, i in enumerate(idx):
            texts[i], routes[i] = new[j].strip(), decisions[j]
    return texts, (routes if route else None)


def router_report(tasks: list[str], routes: dict, layer_names: list[str]) -> dict:
    """Routing accuracy over (sample, layer) decisions, per task and per layer, and the task confusion matrix."""
    gold = torch.cat([torch.full((len(routes[t]),), k) for k, t in enumerate(tasks)])
    decisions = torch.cat([torch.tensor(routes[t]) for t in tasks])          # (samples, layers)
    right = (decisions == gold[:, None]).float()
    confusion = F.one_hot(decisions, len(tasks)).sum(1)                       # (samples, tasks)
    matrix = torch.stack([confusion[gold == k].sum(0) for k in range(len(tasks))])
    return {"accuracy": right.mean().item(),
            "per_task": {t: right[gold == k].mean().item() for k, t in enumerate(tasks)},
            "per_layer": dict(zip(layer_names, right.mean(0).tolist())),
            "confusion": {"rows_true_cols_routed": tasks, "counts": matrix.tolist()}}


def _reusable(out_root: Path, method: str, settings: dict) -> dict:
    """base and single on a task do not depend on the task set: {task: (metrics, predictions)} from finished runs
    of `method` with identical settings (and, for single, the same adapter file)."""
    found = {}
    same = {k: v for k, v in settings.items() if k != "adapters"}
    for path in sorted(out_root.glob(f"*-task/{method}.json")):
        old = json.loads(path.read_text())
        if {k: v for k, v in old["settings"].items() if k != "adapters"} != same:
            continue
        tasks = [t for t in old["metrics"] if t not in found and (method == "base" or
                 old["settings"].get("adapters", {}).get(t) == settings["adapters"].get(t))]
        if tasks:
            preds = [json.loads(l) for l in path.with_suffix(".predictions.jsonl").read_text().splitlines()]
            found.update({t: (old["metrics"][t], [p for p in preds if p["task"] == t]) for t in tasks})
    return found


def evaluate(cfg: EvalConfig, tasks: list[str], methods: list[str], root: Path = ROOT, reuse: bool = True) -> dict:
    """Run every method on every task and write the results; returns {method: result dict}."""
    root = Path(root)
    adapters = {}  # loaded before the model: a missing or corrupt adapter fails at once, naming the command
    if set(methods) - {"base"}:
        adapters = {t: L.load_adapter(adapter_dir(root, cfg.model, t), hint=train_command(cfg.model, cfg.preset, t))
                    for t in tasks}
    if "moa" in methods:
        check_routers(root, cfg, tasks)
    settings = {**asdict(cfg), "adapters": {t: fingerprint(adapter_dir(root, cfg.model, t)) for t in adapters}}
    model, tokenizer = load_model(cfg.model)
    rows = {t: load_rows(get_task(t), "eval", cfg.data, n=cfg.rows) for t in tasks}
    prompts = {t: [fit_prompt(get_task(t), r, tokenizer, cfg.max_prompt, strict=False) for r in rows[t]] for t in tasks}
    out = results_dir(root, cfg.model, tasks)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in methods:
        results[method] = run_method(method, cfg, tasks, model, tokenizer, adapters, rows, prompts, root, settings,
                                     reuse)
        write_method(out, method, results[method])
        write_summary(out)
    return results


def run_method(method, cfg, tasks, model, tokenizer, adapters, rows, prompts, root, settings, reuse) -> dict:
    started = time.perf_counter()
    metrics, seconds, predictions, routes, reused = {}, {}, [], {}, []
    merged = L.merge([adapters[t] for t in tasks], method, **({"rank": cfg.svd_rank} if method == "svd" else {})) \
        if method in MERGE_METHODS else None
    reusable = _reusable(results_dir(root, cfg.model, tasks).parent, method, settings) \
        if reuse and method in ("base", "single") else {}
    if merged is not None:
        L.fold(model, merged)  # checks every shape before changing W, so the finally below may unfold
    try:
        if method in ("single", "moa"):
            L.inject(model, sorted({n.rpartition(".")[2] for n in adapters[tasks[0]].modules}))
            for t in tasks:
                L.add_adapter(model, adapters[t])
            if method == "moa":
                L.load_routers(model, moa_dir(root, cfg.model, tasks), tasks,
                               hint=moa_command(cfg.model, cfg.preset, tasks))
        for k, t in enumerate(tasks):
            task = get_task(t)
            if t in reusable:
                metrics[t], preds = reusable[t]
                predictions += preds
                reused.append(t)
                continue
            t0 = time.perf_counter()
            gate = F.one_hot(torch.tensor(k), len(tasks)).float().to(model.device) if method == "single" else None
            with L.gated(model, gate) if gate is not None else nullcontext():
                texts, task_routes = generate(model, tokenizer, prompts[t], min(task.max_new_tokens, cfg.max_new_tokens),
                                              cfg.batch_size, route=method == "moa", desc=f"{method} {t}")
            refs = [task.references(r) for r in rows[t]]
            metrics[t] = score(task, texts, refs)
            seconds[t] = round(time.perf_counter() - t0, 2)
            routes[t] = task_routes
            predictions += [{"task": t, "index": i, "prediction": p, "references": ref,
                             **({"routes": task_routes[i]} if task_routes else {})}
                            for i, (p, ref) in enumerate(zip(texts, refs))]
        layer_names = list(L.lora_layers(model))
    finally:
        if merged is not None:
            L.unfold(model, merged)
        L.remove(model)
    result = {"method": method, "model": cfg.model, "tasks": tasks, "metrics": metrics,
              "primary": {t: metrics[t][get_task(t).primary] for t in tasks},
              "seconds": seconds, "total_seconds": round(time.perf_counter() - started, 2),
              "rows": {t: len(rows[t]) for t in tasks}, "reused": reused, "settings": settings,
              "predictions": predictions}
    if method == "moa":
        result["router"] = router_report(tasks, routes, layer_names)
    return result


def write_method(out: Path, method: str, result: dict):
    result = dict(result)
    predictions = result.pop("predictions")
    L.atomic_write(out / f"{method}.predictions.jsonl",
                   lambda p: p.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in predictions)))
    L.atomic_write(out / f"{method}.json", lambda p: p.write_text(json.dumps(result, indent=2)))


# --------------------------------------------------------------------------------------------------- summary
def paper_normalized(tasks: list[str]) -> dict:
    """{model: {method: normalized score}} from the thesis logs, when the task list is the paper's 5 or 7 set."""
    if not PAPER_RESULTS.exists() or sorted(tasks) not in (sorted(FIVE_TASKS), sorted(SEVEN_TASKS)):
        return {}
    paper = json.loads(PAPER_RESULTS.read_text())
    key = f"{len(tasks)}-task"
    out = {}
    for model, sets in paper["results"].items():
        if key not in sets:
            continue
        res = sets[key]
        primary = paper["primary_metric"]
        out[model] = {ours: normalized_score(res[theirs], res["single"], primary)["mean"]
                      for ours, theirs in PAPER_NAMES.items() if theirs in res}
    return out


def summary_table(out: Path) -> tuple[list[str], list[list]]:
    found = {m: json.loads((out / f"{m}.json").read_text()) for m in METHODS if (out / f"{m}.json").exists()}
    if not found:
        return [], []
    tasks = next(iter(found.values()))["tasks"]
    primary = {t: get_task(t).primary for t in tasks}
    paper = paper_normalized(tasks)
    header = ["method"] + [f"{t} ({primary[t]})" for t in tasks] + ["normalized"] + [f"paper {m}" for m in paper]
    rows = []
    for m, res in found.items():
        norm = normalized_score(res["metrics"], found["single"]["metrics"], primary)["mean"] \
            if "single" in found and set(res["metrics"]) == set(found["single"]["metrics"]) else None
        rows.append([m] + [res["primary"][t] for t in tasks] + [norm] + [paper[p].get(m) for p in paper])
    return header, rows


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def write_summary(out: Path):
    header, rows = summary_table(out)
    if not header:
        return
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + rows)
    L.atomic_write(out / "summary.csv", lambda p: p.write_text(buf.getvalue()))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    note = ("\nPrimary metric per task (QA F1 on 0-100, the rest on 0-1); normalized = mean over tasks of "
            "method / single. Paper columns: the thesis logs' normalized score for the same task set.\n")
    L.atomic_write(out / "summary.md", lambda p: p.write_text("\n".join(lines) + "\n" + note))
