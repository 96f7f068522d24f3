"""Evaluation of every method on a task list, batched, and the summary tables.

Methods (DESIGN.md section 2):
* base:        the model without adapters;
* majority:    no model: every test row gets the most frequent class of the train split (classification tasks only;
               the baseline a classifier must beat, beside chance = 1 / classes);
* single:      each task with its own LoRA (the oracle; the normalized score divides by it);
* moa:         all task LoRAs and the trained routers; each sample is routed once at the prompt, per layer;
* every merge of src/merges.py (the paper's concat, weight_sum, svd; task arithmetic, TIES, DARE, magnitude
  pruning, KnOTS, TSV-M, Iso-C/CTS; the learned CAT and LoraHub): built by src/merge_fit.py (a hyperparameter with
  a grid is chosen on validation rows of the train split), then folded into W, so it runs at the base model's cost.
  weighted_avg and ties_dense are evaluated on request only.

Generation is greedy, left-padded, in batches of one task sorted by prompt length, stopping at EOS or at the
task's token budget. For each method, `<method>.json` (metrics, each row's metric statistics, timing, MoA routing)
and `<method>.predictions.jsonl` are written atomically, then `summary.md` / `summary.csv` are rebuilt from every
method file present that was computed on single's adapters and test prompts (the others are named, not tabled),
beside the paper's numbers, with 95% paired bootstrap intervals (`metrics.paired_bootstrap`:
the same resampled rows for a method and for single), the single-task checks, and each method's paired
difference from MoA and from the SVD merge.
"""
import collections
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
from . import merge_fit
from . import merges as M
from . import provenance
from .data import fit_prompt, load_rows, pad_batch
from .errors import BadInput, MissingFile
from .metrics import example_stats, normalized_score, paired_bootstrap, score
from .models import load_model, model_slug
from .settings import DATA, SEED, Setting, check_config
from .tasks import FIVE_TASKS, SEVEN_TASKS, get_task

MODEL_METHODS = ["base", "majority", "single", "moa"]
PAPER_METHODS = MODEL_METHODS + ["concat", "weight_sum", "svd"]  # --methods paper: the thesis's table
METHODS = MODEL_METHODS + M.DEFAULT_MERGES                      # the default --methods
ALL_METHODS = MODEL_METHODS + list(M.METHODS)
MERGE_METHODS = set(M.METHODS)
PAPER_NAMES = {"base": "base", "single": "single", "moa": "moa", "concat": "concat", "weight_sum": "weighted",
               "svd": "svd", "weighted_avg": "weighted_avg"}
PAIRED_WITH = ("moa", "svd")  # every method's normalized score is also compared to these, on the same resamples
MAJORITY_TRAIN_ROWS = 1000   # the majority class is counted on the first rows of the train split
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
    select_rows: int = 32        # validation rows per task that choose a merge's lambda / alpha (train split)
    seed: int = 0                # DARE's masks, CAT's batches, LoraHub's optimiser
    merge_params: dict = None    # {method: {parameter: value}} fixed from the command line (--set)


EVAL_PRESETS = {
    "paper": {},
    "cpu": dict(rows=100, batch_size=20, max_prompt=192, max_new_tokens=48, select_rows=8),
}


# What each EvalConfig field accepts (src/settings.py); make_eval_config checks every one before any model loads.
EVAL_SETTINGS = {
    "model": Setting(str),
    "data": DATA,
    "preset": Setting(str, choices=tuple(EVAL_PRESETS)),
    "rows": Setting(int, low=1),             # load_rows(n=0) would read every test row
    "batch_size": Setting(int, low=1),
    "max_prompt": Setting(int, low=1),
    "max_new_tokens": Setting(int, low=1),
    "select_rows": Setting(int, low=0, note="0: each merge's defaults, no search on validation rows"),
    "seed": SEED,
    "merge_params": Setting(dict, none_ok=True),  # its values are checked when parsed (parse_merge_params)
}


def make_eval_config(preset: str, overrides: dict | None = None) -> EvalConfig:
    if preset not in EVAL_PRESETS:
        raise BadInput(f"unknown preset {preset!r}: choose from {', '.join(EVAL_PRESETS)}")
    known = {f.name for f in fields(EvalConfig)} - {"preset"}
    unknown = sorted(set(overrides or {}) - known - {"preset"})
    if unknown:  # a misspelt setting would otherwise evaluate with the preset's value
        raise BadInput(f"unknown evaluation setting(s) {', '.join(unknown)}: EvalConfig has {', '.join(sorted(known))}")
    cfg = EvalConfig(preset=preset, **{**EVAL_PRESETS[preset],
                                       **{k: v for k, v in (overrides or {}).items() if v is not None and k in known}})
    return check_config(cfg, EVAL_SETTINGS)


def parse_merge_params(items) -> dict:
    """`--set method.param=value` items -> {method: {param: value}}, checked against the registry."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        method, dot, param = key.partition(".")
        if not sep or not dot:
            raise BadInput(f"--set {item!r}: write method.param=value, e.g. --set ties.density=0.5")
        if param not in M.get_method(method).params:
            raise BadInput(f"--set {item!r}: {method} has no parameter {param!r} (it takes "
                           f"{', '.join(M.get_method(method).params) or 'none'})")
        out.setdefault(method, {})[param] = M.get_method(method).params[param].check(method, param, value)
    return out


def parse_methods(names) -> list[str]:
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    names = [m for n in names for m in (PAPER_METHODS if n == "paper" else [n])]
    for n in names:
        if n not in ALL_METHODS:
            raise BadInput(f"unknown method {n!r}: choose from paper, {', '.join(ALL_METHODS)}")
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
            raise MissingFile(f"missing MoA routers {moa_dir(root, cfg.model, tasks) / f}: "
                              f"create them with `{moa_command(cfg.model, cfg.preset, tasks)}`")


def fingerprint(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]


def _inputs_hash(prompts: list[list[int]], references: list) -> str:
    return hashlib.sha256(json.dumps([prompts, references]).encode()).hexdigest()[:16]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             route: bool = False, desc: str = "", accelerator=None) -> tuple[list[str], list | None]:
    """Greedy generations for `prompts` (token ids), in batches of similar length, longest first; with `route`,
    also the MoA decisions. Under several processes each takes every N-th batch of that same batching and the
    results are gathered to all, so every batch has the shape it has in one process (the same predictions)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    done = []  # (prompt index, text, routes)
    for idx in tqdm(batches[rank::world], desc=desc, unit="batch", leave=False, disable=rank != 0):
        batch = pad_batch([prompts[i] for i in idx], tokenizer.eos_token_id, left=True)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with L.routing(model) if route else nullcontext():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
            decisions = L.route_decisions(model).tolist() if route else [None] * len(idx)
        new = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        done += [(i, new[j].strip(), decisions[j]) for j, i in enumerate(idx)]
    if world > 1:
        from accelerate.utils import gather_object

        done = gather_object(done)
    texts, routes = [None] * len(prompts), [None] * len(prompts)
    for i, text, decision in done:
        texts[i], routes[i] = text, decision
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
    of `method` with identical settings, the same test prompts and references (data files, prompts, tokenizer) and,
    for single, the same adapter file."""
    found = {}
    per_task = ("adapters", "inputs")
    same = {k: v for k, v in settings.items() if k not in per_task}
    for path in sorted(out_root.glob(f"*-task/{method}.json")):
        old = json.loads(path.read_text())
        if {k: v for k, v in old["settings"].items() if k not in per_task} != same:
            continue
        tasks = [t for t in old["metrics"] if t not in found and t in settings["inputs"]
                 and old["settings"].get("inputs", {}).get(t) == settings["inputs"][t]
                 and (method == "base" or old["settings"].get("adapters", {}).get(t) == settings["adapters"].get(t))]
        if tasks:
            preds = [json.loads(l) for l in path.with_suffix(".predictions.jsonl").read_text().splitlines()]
            found.update({t: (old["metrics"][t], [p for p in preds if p["task"] == t], old["stats"][t]) for t in tasks})
    return found


def majority_class(task, data: str) -> int:
    """The most frequent class among the first MAJORITY_TRAIN_ROWS rows of the train split (ties: lowest index)."""
    counts = collections.Counter(r["label"] for r in load_rows(task, "train", data, n=MAJORITY_TRAIN_ROWS))
    return max(sorted(counts), key=counts.get)


def evaluate(cfg: EvalConfig, tasks: list[str], methods: list[str], root: Path = ROOT, reuse: bool = True,
             accelerator=None) -> dict:
    """Run every method on every task and write the results (the main process); returns {method: result dict}.
    Under several processes (`accelerate launch`) the generation batches are shared out (see `generate`)."""
    root = Path(root)
    adapters = {}  # loaded before the model: a missing or corrupt adapter fails at once, naming the command
    if set(methods) - {"base", "majority"}:
        adapters = {t: L.load_adapter(adapter_dir(root, cfg.model, t), hint=train_command(cfg.model, cfg.preset, t))
                    for t in tasks}
    if "moa" in methods:
        check_routers(root, cfg, tasks)
    # which rows each adapter trained on: the merges that read rows take them after those (a merge that reads none
    # needs no record; one that does fails here, before any work, for an adapter without one)
    records = {t: provenance.find_record(adapter_dir(root, cfg.model, t)) for t in adapters}
    for m in methods:
        if m in MERGE_METHODS and merge_fit.needs_rows(m, cfg.select_rows, (cfg.merge_params or {}).get(m)):
            for t in tasks:
                provenance.read_record(adapter_dir(root, cfg.model, t), hint=train_command(cfg.model, cfg.preset, t))
    main = accelerator is None or accelerator.is_main_process
    model, tokenizer = load_model(cfg.model, device=accelerator.device if accelerator else None)
    rows = {t: load_rows(get_task(t), "eval", cfg.data, n=cfg.rows) for t in tasks}
    prompts = {t: [fit_prompt(get_task(t), r, tokenizer, cfg.max_prompt, strict=False) for r in rows[t]] for t in tasks}
    # what a result depends on besides the settings: the adapters, and the test prompts and references as this
    # tokenizer and these data files make them (so reuse never mixes two data files, prompts or models)
    settings = {**asdict(cfg), "adapters": {t: fingerprint(adapter_dir(root, cfg.model, t)) for t in adapters},
                "inputs": {t: _inputs_hash(prompts[t], [get_task(t).references(r) for r in rows[t]]) for t in tasks}}
    out = results_dir(root, cfg.model, tasks)
    results = {}
    for method in methods:
        results[method] = run_method(method, cfg, tasks, model, tokenizer, adapters, rows, prompts, root, settings,
                                     reuse, accelerator, records)
        if main:
            out.mkdir(parents=True, exist_ok=True)
            write_method(out, method, results[method])
            write_summary(out)
    return results


def run_method(method, cfg, tasks, model, tokenizer, adapters, rows, prompts, root, settings, reuse,
               accelerator=None, records=None) -> dict:
    started = time.perf_counter()
    metrics, seconds, predictions, routes, reused, stats = {}, {}, [], {}, [], {}
    merged, merge_info = None, None
    if method in MERGE_METHODS:
        data = merge_fit.FitData(model, tokenizer, tasks, records, cfg.data, cfg.seed, accelerator=accelerator)
        merged, merge_info = merge_fit.build(method, [adapters[t] for t in tasks], data, cfg.select_rows,
                                             (cfg.merge_params or {}).get(method), cfg.seed)
    reusable = _reusable(results_dir(root, cfg.model, tasks).parent, method, settings) \
        if reuse and method in ("base", "single") else {}
    with L.folded(model, merged) if merged is not None else nullcontext():
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
                    metrics[t], preds, stats[t] = reusable[t]
                    predictions += preds
                    reused.append(t)
                    continue
                if method == "majority" and not task.classes:
                    continue  # no classes, no majority baseline
                t0 = time.perf_counter()
                if method == "majority":
                    label = majority_class(task, cfg.data)
                    texts, task_routes = [task.answer(r, label) for r in rows[t]], None
                else:
                    gate = F.one_hot(torch.tensor(k), len(tasks)).float().to(model.device) if method == "single" else None
                    with L.gated(model, gate) if gate is not None else nullcontext():
                        texts, task_routes = generate(model, tokenizer, prompts[t],
                                                      min(task.max_new_tokens, cfg.max_new_tokens), cfg.batch_size,
                                                      route=method == "moa", desc=f"{method} {t}",
                                                      accelerator=accelerator)
                refs = [task.references(r) for r in rows[t]]
                metrics[t] = score(task, texts, refs)
                stats[t] = example_stats(task, texts, refs)
                seconds[t] = round(time.perf_counter() - t0, 2)
                routes[t] = task_routes
                predictions += [{"task": t, "index": i, "prediction": p, "references": ref,
                                 **({"routes": task_routes[i]} if task_routes else {})}
                                for i, (p, ref) in enumerate(zip(texts, refs))]
            layer_names = list(L.lora_layers(model))
        finally:
            L.remove(model)
    result = {"method": method, "model": cfg.model, "tasks": tasks, "metrics": metrics,
              "primary": {t: metrics[t][get_task(t).primary] for t in metrics},
              "seconds": seconds, "total_seconds": round(time.perf_counter() - started, 2),
              "rows": {t: len(rows[t]) for t in metrics}, "reused": reused, "settings": settings,
              "stats": stats, "predictions": predictions}
    if merge_info is not None:
        result["merge"] = merge_info
        # the three sets of rows, for the check that they are disjoint: train-split rows the adapters trained on,
        # train-split rows the merge chose or learned on, and the evaluation split's rows it is scored on
        chosen = merge_info.get("rows") or merge_info.get("selection", {}).get("rows") or {}
        result["rows_used"] = {"train": {t: records[t] and records[t]["rows"]["train"] for t in tasks}, "selection": chosen,
                               "test": {t: [0, len(rows[t])] for t in tasks}, "test_split": "eval"}
    if method == "majority":
        result["majority_class"] = {t: get_task(t).answer(rows[t][0], majority_class(get_task(t), cfg.data))
                                    for t in metrics if get_task(t).metric == "label"}
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


def load_method_results(out: Path) -> dict:
    """{method: result} for every method file in a results folder, in table order."""
    return {m: json.loads((out / f"{m}.json").read_text()) for m in ALL_METHODS if (out / f"{m}.json").exists()}


def intervals(found: dict, n_boot: int = 1000) -> dict:
    """95% paired bootstrap intervals of every method's per-task metric, ratio to single, and normalized score
    (a result file written before intervals existed has no per-row statistics: no interval for it)."""
    tasks = [get_task(t) for t in next(iter(found.values()))["tasks"]]
    ci = paired_bootstrap(tasks, {m: r["stats"] for m, r in found.items() if "stats" in r}, reference="single",
                          n_boot=n_boot, compare=PAIRED_WITH)
    empty = {"per_task": {}, "diff": {}, "ratio": {}, "normalized": None, "normalized_diff": {}}
    return {m: ci.get(m, empty) for m in found}


def paired_gaps(found: dict, ci: dict) -> str:
    """Each method's normalized score minus MoA's and the SVD merge's, with the paired 95% interval (the same
    resampled rows for both): whether a merge is distinguishable from MoA is read here, not from two intervals."""
    points = normalized_points(found)
    others = [o for o in PAIRED_WITH if o in found and points[o] is not None]
    rows = []
    for m in found:
        if m in others or m == "single" or points[m] is None:
            continue
        cells = []
        for o in others:
            lo_hi = ci[m]["normalized_diff"].get(o)
            gap = f"{points[m] - points[o]:+.3f}"
            cells.append(gap if lo_hi is None else f"{gap} [{lo_hi[0]:+.3f}, {lo_hi[1]:+.3f}]")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    if not others or not rows:
        return ""
    return ("\n**Paired differences of the normalized score** (method - other on the same resampled rows, 95%)\n\n"
            "| method | " + " | ".join(f"- {o}" for o in others) + " |\n|---|" + "---|" * len(others) + "\n"
            + "\n".join(rows) + "\n")


def single_check(found: dict, ci: dict) -> str:
    """Did each single-task LoRA learn its task? Its score against the base model and, for a classification task,
    against the majority class and chance, with the paired 95% interval of the difference (the same resampled
    rows on both sides, `ci` from `intervals`): 'yes' when the whole interval is above 0."""
    if "single" not in found or "base" not in found:
        return ""
    rows = []
    for t in found["single"]["tasks"]:
        task, single = get_task(t), found["single"]["primary"][t]
        num = (lambda x: f"{x:.1f}") if abs(single) >= 10 else (lambda x: f"{x:.3f}")

        def versus(m):
            lo_hi = ci[m]["diff"].get(t)
            if lo_hi is None:
                return "n/a", "n/a"
            gap = f"{num(single - found[m]['primary'][t])} [{num(-lo_hi[1])}, {num(-lo_hi[0])}]"
            return gap, "yes" if lo_hi[1] < 0 else "**no**"

        base_gap, base_ok = versus("base")
        maj = found.get("majority", {}).get("primary", {}).get(t)
        maj_gap, maj_ok = versus("majority") if maj is not None else ("n/a", "n/a")
        chance = f"{task.chance:.2f}" if task.chance else "n/a"
        chance_ok = "n/a"
        if task.chance:
            lo = ci["single"]["per_task"].get(t, (None,))[0]
            chance_ok = "n/a" if lo is None else ("yes" if lo > task.chance else "**no**")
        rows.append(f"| {t} | {num(single)} | {base_gap} | {base_ok} | {maj_gap} | {maj_ok} | {chance} | {chance_ok} |")
    return ("\n**Did the single-task LoRAs learn their tasks?** (single - baseline on the same resampled rows, 95%; "
            "above chance: the single's interval above the chance level)\n\n"
            "| task | single | single - base | above base | single - majority | above majority | chance | above chance |"
            "\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def normalized_points(found: dict) -> dict:
    """{method: normalized score (mean over tasks of method / single)}, None where a method lacks a task."""
    tasks = next(iter(found.values()))["tasks"]
    primary = {t: get_task(t).primary for t in tasks}
    if "single" not in found:
        return {m: None for m in found}
    single = found["single"]["metrics"]
    return {m: normalized_score(r["metrics"], single, primary)["mean"] if set(r["metrics"]) == set(single) == set(tasks)
            else None for m, r in found.items()}


def summary_table(found: dict, ci: dict) -> tuple[list[str], list[list]]:
    """One row per method of `found` (from `load_method_results`): per task the primary metric and its interval,
    then the normalized score and its interval, then the paper's normalized scores. Cells are (value, (lo, hi))
    or None."""
    tasks = next(iter(found.values()))["tasks"]
    primary = {t: get_task(t).primary for t in tasks}
    paper = paper_normalized(tasks)
    header = ["method"] + [f"{t} ({primary[t]})" for t in tasks] + ["normalized"] + [f"paper {m}" for m in paper]
    rows = []
    points = normalized_points(found)
    for m, res in found.items():
        norm = points[m]
        cells = [(res["primary"][t], ci[m]["per_task"].get(t)) if t in res["primary"] else None for t in tasks]
        rows.append([m] + cells + [(norm, ci[m]["normalized"]) if norm is not None else None]
                    + [paper[p].get(m) for p in paper])
    return header, rows


def _big(v) -> bool:
    return isinstance(v, tuple) and max(abs(v[0]), abs((v[1] or (0, 0))[1])) >= 10


def _fmt(v, big: bool = False) -> str:
    """`big`: the column is on 0-100 (QA's F1), one decimal in every row, a collapsed method's 0.5 included."""
    if v is None:
        return "n/a"
    if isinstance(v, tuple):
        value, (lo, hi) = v[0], v[1] if v[1] is not None else (None, None)
        f = (lambda x: f"{x:.1f}") if big else (lambda x: f"{x:.3f}")
        return f(value) + (f" [{f(lo)}, {f(hi)}]" if lo is not None else "")
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _csv_cells(v) -> list:
    if isinstance(v, tuple):
        lo, hi = v[1] if v[1] is not None else (None, None)
        return [v[0], lo, hi]
    return [v, None, None]


def same_inputs(found: dict) -> tuple[dict, dict]:
    """(results that can share a table, {left-out method: why}): a normalized score divides a method's score by
    single's, and a paired interval resamples the same rows, so every row must come from the same adapters
    (fingerprints) and the same test prompts as single's. Base and majority use no adapter; a file from before
    these were recorded is compared on what it has."""
    ref = found.get("single") or next(iter(found.values()))
    ref_adapters, ref_inputs = ref["settings"].get("adapters", {}), ref["settings"].get("inputs")
    kept, left_out = {}, {}
    for m, r in found.items():
        adapters, inputs = r["settings"].get("adapters", {}), r["settings"].get("inputs")
        differ = [t for t in adapters if ref_adapters.get(t) not in (None, adapters[t])]
        if differ:
            left_out[m] = f"other adapters than single's ({', '.join(differ)})"
        elif inputs and ref_inputs and any(inputs.get(t) != ref_inputs.get(t) for t in ref_inputs):
            left_out[m] = "other test prompts or references than single's"
        else:
            kept[m] = r
    return kept, left_out


def write_summary(out: Path):
    found = load_method_results(out)
    if not found:
        return
    found, left_out = same_inputs(found)
    ci = intervals(found)   # one bootstrap, shared by the table and the single-task check
    header, rows = summary_table(found, ci)
    tasks = [h.split(" (")[0] for h in header[1:] if " (" in h]
    n_scored = len(tasks) + 1  # the per-task cells and the normalized score carry intervals
    scored = [c for h in header[1:1 + n_scored] for c in (h, f"{h} lo", f"{h} hi")]
    csv_header = ["method"] + scored + header[1 + n_scored:]
    buf = io.StringIO()
    csv.writer(buf).writerows([csv_header] + [[row[0]] + [c for v in row[1:1 + n_scored] for c in _csv_cells(v)]
                                              + row[1 + n_scored:] for row in rows])
    L.atomic_write(out / "summary.csv", lambda p: p.write_text(buf.getvalue()))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    big = [any(_big(row[k]) for row in rows) for k in range(len(header))]
    lines += ["| " + " | ".join(_fmt(v, b) for v, b in zip(row, big)) + " |" for row in rows]
    n_rows = sorted({n for r in found.values() for n in r["rows"].values()})
    chance = ", ".join(f"{t} {get_task(t).chance:.2f}" for t in tasks if get_task(t).chance)
    majority = found.get("majority", {}).get("majority_class", {})
    note = (f"\nPrimary metric per task (QA F1 on 0-100, the rest on 0-1) on {'/'.join(map(str, n_rows))} test rows "
            "per task; normalized = mean over tasks of method / single. [lo, hi]: 95% paired bootstrap interval "
            "(1,000 resamples of the test rows, the same rows for a method and for single; corpus BLEU recomputed "
            "per resample). majority: the most frequent class of the train split"
            + (f" ({', '.join(f'{t}: {c}' for t, c in majority.items())})" if majority else "")
            + (f"; chance level (1 / classes): {chance}" if chance else "")
            + ". Paper columns: the thesis logs' normalized score for the same task set.\n"
            + "".join(f"\n**Left out of this table** (computed on {why}; rerun them): "
                      f"{', '.join(m for m, w in left_out.items() if w == why)}.\n"
                      for why in dict.fromkeys(left_out.values())))
    text = "\n".join(lines) + "\n" + note + single_check(found, ci) + paired_gaps(found, ci) + merge_table(found)
    L.atomic_write(out / "summary.md", lambda p: p.write_text(text))


def merge_table(found: dict) -> str:
    """How each merge was made: its parameters, how they were chosen (grid on validation loss, learned on train
    rows, or defaults), and the time it took (selection or fitting included)."""
    rows = []
    for m, res in found.items():
        info = res.get("merge")
        if info is None:
            continue
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in info["params"].items())
        if "selection" in info:
            grid = info["selection"]["candidates"]
            edge = info["selection"].get("at_edge")
            how = (f"lowest validation loss of {len(grid)} candidates ({info['selection']['rows_per_task']} train-split "
                   f"rows per task after the training rows): {min(c['val_loss'] for c in grid):.3f}"
                   + (f"; **at the edge** of the values tried for {', '.join(edge)}" if edge else ""))
        elif "loss_after" in info:
            how = (f"learned on {sum(info['rows_per_task'].values())} train-split rows after the training rows: loss "
                   f"{sum(info['loss_before'].values()) / len(info['loss_before']):.3f} -> "
                   f"{sum(info['loss_after'].values()) / len(info['loss_after']):.3f}")
        elif "objective_best" in info:
            weights = ", ".join(f"{w:.2f}" for w in info["weights"])
            how = (f"NGOpt, {info['evaluations']} evaluations on {sum(info['rows_per_task'].values())} train-split rows "
                   "after the training rows: "
                   f"loss {info['loss_start']:.3f} -> {info['loss_best']:.3f}, w = {weights}")
        else:
            how = "the method's defaults"
        rows.append(f"| {m} | {params or '-'} | {how} | {info['seconds']:.1f} |")
    if not rows:
        return ""
    return ("\n**Merges: parameters and how they were chosen** (never on test rows)\n\n"
            "| method | parameters | chosen by | seconds |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
