"""Evaluation of every method on a task list, batched; the reports are src/reporting.py's.

Methods (the thesis's, and those added since; README "The methods"):
* base:        the model without adapters;
* majority:    no model: every test row gets the most frequent class of the train split (classification tasks only;
               the baseline a classifier must beat, beside chance = 1 / classes);
* single:      each task with its own LoRA (the oracle; the normalized score divides by it);
* moa:         all task LoRAs and the trained routers; each sample is routed once at the prompt, per layer;
* arrow:       all task LoRAs, routed per token and layer without training (arrow.Arrow; top_k and temperature
               chosen on validation rows of the train split);
* every merge of src/merges.py (the paper's concat, weight_sum, svd; task arithmetic, TIES, DARE, magnitude
  pruning, KnOTS, TSV-M, Iso-C/CTS; the data-fitted CAT, LoraHub and RegMean): built by src/merge_fit.py (a
  hyperparameter with a grid is chosen on validation rows of the train split), then folded into W, so it runs at
  the base model's cost. With `loras="random"` the merges take random LoRAs of the trained ones' norms instead (a
  control, written to <N>-task/random-loras/).
  weighted_avg, ties_dense and ctm (Compress then Merge) are evaluated on request only, as is any merge's rank
  variant `<merge>_r<k>` (one LoRA of rank k: merge_fit.build).

Generation is greedy, left-padded, in batches of one task sorted by prompt length, stopping at EOS or at the
task's token budget. For each method, `<method>.json` (metrics, each row's metric statistics, timing, MoA routing)
and `<method>.predictions.jsonl` are written atomically, then `summary.md` / `summary.csv` are rebuilt
(`reporting.write_summary`).
"""
import collections
import hashlib
import json
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import arrow, control, peft_files
from . import lora, merge_fit, provenance, registry
from .data import fit_prompt, load_rows, pad_batch
from .errors import BadInput, MissingFile
from .files import atomic_write
from .layout import (ALL_METHODS, PAPER_METHODS, ROOT, adapter_dir, control_dir, moa_command,
                     moa_dir, results_dir, train_command)
from .metrics import example_stats, grouped_mean_interval, score
from .models import load_model
from .reporting import write_summary
from .settings import DATA, SEED, Setting, check_config, setting, settings_of
from .tasks import get_task

MAJORITY_TRAIN_ROWS = 1000   # the majority class is counted on the first rows of the train split


EVAL_PRESETS = {
    "paper": {},
    "cpu": dict(rows=100, batch_size=20, max_prompt=192, max_new_tokens=48, select_rows=8),
}


@dataclass
class EvalConfig:
    """Every evaluation setting, declared once: default (the paper preset's), what it accepts (checked by
    make_eval_config before any model loads), and its flag's help; EVAL_PRESETS holds the other presets' values."""
    model: str = setting("smollm2-135m", Setting(str), "hub id or folder")
    data: str = setting("local", DATA, "shipped samples or the hub datasets")
    preset: str = setting("paper", Setting(str, choices=tuple(EVAL_PRESETS)), "the preset the other values start from")
    rows: int = setting(500, Setting(int, low=1), "evaluation rows per task")   # load_rows(n=0) would read them all
    batch_size: int = setting(16, Setting(int, low=1), "generation batch size")
    max_prompt: int = setting(400, Setting(int, low=1),
                              "prompt budget in tokens (the content field is cut, never the template)")
    max_new_tokens: int = setting(128, Setting(int, low=1), "cap on every task's own generation budget")
    select_rows: int = setting(32, Setting(int, low=0, note="0: each merge's defaults, no search on validation rows"),
                               "validation rows per task that choose a merge's parameters (train split; 0: defaults)")
    seed: int = setting(0, SEED, "DARE's masks, CAT's batches, LoraHub's optimiser")
    merge_params: dict = setting(None, Setting(dict, none_ok=True),   # its values are checked when parsed
                                 "{method: {parameter: value}} fixed from the command line (--set)")
    loras: str = setting("trained", Setting(str, choices=("trained", "random")),
                         "random: merge random LoRAs with the trained ones' per-module norms instead, a control for "
                         "the merges that fit on data (results in <N>-task/random-loras/)")


EVAL_SETTINGS = settings_of(EvalConfig)


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
        known = registry.get_method(method).params
        if param not in known and param != "rank":   # any merge can be truncated to a rank (parse_methods)
            raise BadInput(f"--set {item!r}: {method} has no parameter {param!r} (it takes "
                           f"{', '.join(known) or 'none'}, or rank)")
        if param in out.get(method, {}):
            raise BadInput(f"--set {item!r}: {method}.{param} is set twice: give it once")
        spec = known.get(param) or registry.Param(None, "rank", low=1, kind=int)
        out.setdefault(method, {})[param] = spec.check(method, param, value)
    return out


def parse_methods(names, rank: int | None = None, merge_params: dict | None = None) -> list[str]:
    """--methods: names of ALL_METHODS, `paper` for the thesis's, and rank variants of the merges (`regmean_r8`: the
    merge as one LoRA of rank 8, merge_fit.build). A rank given otherwise makes the variant, so that its results
    are never written under the exact merge's name: `rank` (--rank: every merge of the list) and a `rank` in
    `merge_params` (--set ties.rank=8, taken out of them). Two different ranks for one merge are refused."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    names = [m for n in names for m in (PAPER_METHODS if n == "paper" else [n])]
    for n in names:
        if n not in ALL_METHODS and not registry.is_merge(n):
            raise BadInput(f"unknown method {n!r}: choose from paper, {', '.join(ALL_METHODS)} (a merge truncated to "
                           "rank k: <merge>_r<k>, e.g. regmean_r8)")
    registry.check_rank(rank)
    if rank is not None and not any(registry.is_merge(n) for n in names):
        raise BadInput(f"--rank {rank} truncates merges: --methods has none")
    out = []
    for n in names:
        base, suffix = registry.split_rank(n) if registry.is_merge(n) else (n, None)
        k = registry.one_rank(base, {f"--methods {n}": suffix, f"--rank {rank}": rank if registry.is_merge(n) else None,
                                     f"--set {base}.rank": (merge_params or {}).get(base, {}).get("rank")})
        out.append(n if k is None else f"{base}_r{k}")
    for params in (merge_params or {}).values():
        params.pop("rank", None)
    return list(dict.fromkeys(out))


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


def _has_routers(model) -> bool:
    layers = lora.lora_layers(model).values()
    return bool(layers) and all(layer.router is not None or layer.arrow is not None for layer in layers)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, desc: str = "",
             accelerator=None) -> tuple[list[str], list | None]:
    """Greedy generations for `prompts` (token ids), in batches of similar length, longest first; when the model's
    LoRA layers carry MoA routers, also the routing decisions (else None). Under several processes each takes every
    N-th batch of that same batching and the results are gathered to all, so every batch has the shape it has in
    one process (the same predictions)."""
    route = _has_routers(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    done = []  # (prompt index, text, routes)
    for idx in tqdm(batches[rank::world], desc=desc, unit="batch", leave=False, disable=rank != 0):
        batch = pad_batch([prompts[i] for i in idx], tokenizer.eos_token_id, left=True)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with lora.routing(model) if route else nullcontext():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
            decisions = lora.route_decisions(model).tolist() if route else [None] * len(idx)
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
    return {"accuracy": right.mean().item(), "interval": grouped_mean_interval(right.mean(1), gold),
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
    added_later = asdict(EvalConfig())  # a setting missing from an older file had the value its default gives now
    for path in sorted(out_root.glob(f"*-task/{method}.json")):
        old = json.loads(path.read_text())
        old_settings = {**added_later, **old["settings"]}
        if {k: v for k, v in old_settings.items() if k not in per_task} != same:
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


@dataclass
class Run:
    """What every method of one evaluation shares: the settings, the loaded model and adapters, the adapters'
    training records, the test rows and their prompts, and what a result depends on (`settings`)."""
    cfg: EvalConfig
    tasks: list[str]
    model: object
    tokenizer: object
    adapters: dict       # {task: Adapter}; empty when only base / majority run
    records: dict        # {task: training record or None}
    rows: dict           # {task: test rows}
    prompts: dict        # {task: [token ids]}
    settings: dict       # asdict(cfg) + adapter fingerprints + test-input hashes
    root: Path
    reuse: bool = True
    accelerator: object = None


def evaluate(cfg: EvalConfig, tasks: list[str], methods: list[str], root: Path = ROOT, reuse: bool = True,
             accelerator=None) -> dict:
    """Run every method on every task and write the results (the main process); returns {method: result dict}.
    Under several processes (`accelerate launch`) the generation batches are shared out (see `generate`)."""
    root = Path(root)
    if cfg.loras == "random" and not all(registry.is_merge(m) for m in methods):
        raise BadInput(f"--loras random is a control for the merges: drop "
                       f"{', '.join(m for m in methods if not registry.is_merge(m))} from --methods")
    adapters = {}  # loaded before the model: a missing or corrupt adapter fails at once, naming the command
    if set(methods) - {"base", "majority"}:
        adapters = {t: peft_files.load_adapter(adapter_dir(root, cfg.model, t), hint=train_command(cfg.model, cfg.preset, t))
                    for t in tasks}
    if cfg.loras == "random":  # each task's noise from the seed and its name, whatever the order of the tasks
        adapters = {t: control.random_like(a, torch.Generator().manual_seed(
                        int(hashlib.sha256(f"{cfg.seed}:{t}".encode()).hexdigest()[:15], 16)))
                    for t, a in adapters.items()}
    if "moa" in methods:
        check_routers(root, cfg, tasks)
    # which rows each adapter trained on: the merges that read rows take them after those (a merge that reads none
    # needs no record; one that does fails here, before any work, for an adapter without one)
    records = {t: provenance.find_record(adapter_dir(root, cfg.model, t)) for t in adapters}
    for m in methods:
        if (registry.is_merge(m) and merge_fit.needs_rows(m, cfg.select_rows,
                                                          (cfg.merge_params or {}).get(registry.split_rank(m)[0]))
                or m == "arrow" and cfg.select_rows > 0):
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
    run = Run(cfg, tasks, model, tokenizer, adapters, records, rows, prompts, settings, root, reuse, accelerator)
    out = results_dir(root, cfg.model, tasks)
    results = {}
    for method in methods:
        results[method] = run_method(method, run)
        if main:
            where = control_dir(root, cfg.model, tasks) if cfg.loras == "random" else out
            where.mkdir(parents=True, exist_ok=True)
            write_method(where, method, results[method])
            write_summary(out)  # the control's table is part of the trained results' summary
    return results


def served_parameters(model, merged: lora.Adapter | None) -> int:
    """What a method holds besides the base model's weights: the merged LoRA's factors for a merge (folded into W to
    run, but a LoRA of that size to ship), else every adapter in the LoRA layers (single, MoA, Arrow: all task
    LoRAs) and MoA's routers; 0 for base and majority."""
    if merged is not None:
        return sum(f.A.numel() + f.B.numel() for f in merged.modules.values())
    return sum(p.numel() for layer in lora.lora_layers(model).values()
               for p in [*layer.A, *layer.B, *(layer.router.parameters() if layer.router is not None else ())])


def run_method(method: str, run: Run) -> dict:
    """One method on every task of the run: its result dict (metrics, per-row statistics, predictions, timing, and
    the merge's choices or MoA's routing)."""
    started = time.perf_counter()
    cfg, tasks, model, tokenizer, adapters = run.cfg, run.tasks, run.model, run.tokenizer, run.adapters
    rows, prompts, root, records, accelerator = run.rows, run.prompts, run.root, run.records, run.accelerator
    metrics, seconds, predictions, routes, reused, stats = {}, {}, [], {}, [], {}
    merged, merge_info, arrow_info = None, None, None
    if registry.is_merge(method) or method == "arrow":
        data = merge_fit.FitData(model, tokenizer, tasks, records, cfg.data, cfg.seed, accelerator=accelerator)
    if registry.is_merge(method):   # a rank variant takes its method's --set parameters
        merged, merge_info = merge_fit.build(method, [adapters[t] for t in tasks], data, cfg.select_rows,
                                             (cfg.merge_params or {}).get(registry.split_rank(method)[0]), cfg.seed)
    reusable = _reusable(results_dir(root, cfg.model, tasks).parent, method, run.settings) \
        if run.reuse and method in ("base", "single") else {}
    with ExitStack() as stack:
        if merged is not None:
            stack.enter_context(lora.folded(model, merged))
        stack.callback(lora.remove, model)  # runs first on the way out: the LoRA layers go, then W is restored
        if method in ("single", "moa", "arrow"):
            lora.inject(model, sorted({n.rpartition(".")[2] for n in adapters[tasks[0]].modules}))
            for t in tasks:
                lora.add_adapter(model, adapters[t], name=t)
            if method == "moa":
                routers = moa_dir(root, cfg.model, tasks)
                meta = lora.load_routers(model, routers, tasks, hint=moa_command(cfg.model, cfg.preset, tasks))
                # which routers: the files' hash and how they were trained (a result names its routers, as it
                # names its adapters, so two router settings on the same adapters are never confused)
                router_origin = {"fingerprint": hashlib.sha256((routers / "routers.safetensors").read_bytes())
                                 .hexdigest()[:16], **{k: v for k, v in meta.get("config", {}).items()
                                                      if k.startswith("router_") or k == "seed"},
                                 **({"router_rows_chosen": meta["router_rows_chosen"]["rows"]}
                                    if "router_rows_chosen" in meta else {})}
            if method == "arrow":
                prototypes = arrow.model_prototypes(model)  # once, for the grid and the evaluation
                arrow_info = choose_arrow(model, data, cfg.select_rows, prototypes)
                stack.enter_context(arrow.arrow_routing(model, **arrow_info["params"], prototypes=prototypes))
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
                gate = lora.one_hot(model, t) if method == "single" else None
                with lora.gated(model, gate):
                    texts, task_routes = generate(model, tokenizer, prompts[t],
                                                  min(task.max_new_tokens, cfg.max_new_tokens), cfg.batch_size,
                                                  desc=f"{method} {t}", accelerator=accelerator)
            refs = [task.references(r) for r in rows[t]]
            metrics[t] = score(task, texts, refs)
            stats[t] = example_stats(task, texts, refs)
            seconds[t] = round(time.perf_counter() - t0, 2)
            routes[t] = task_routes
            predictions += [{"task": t, "index": i, "prediction": p, "references": ref,
                             **({"routes": task_routes[i]} if task_routes else {})}
                            for i, (p, ref) in enumerate(zip(texts, refs))]
        layer_names = list(lora.lora_layers(model))
        served = served_parameters(model, merged)
    result = {"method": method, "model": cfg.model, "tasks": tasks, "metrics": metrics,
              "primary": {t: metrics[t][get_task(t).primary] for t in metrics},
              "seconds": seconds, "total_seconds": round(time.perf_counter() - started, 2),
              "rows": {t: len(rows[t]) for t in metrics}, "reused": reused, "settings": run.settings,
              "stats": stats, "predictions": predictions, "parameters": served}
    if merge_info is not None:
        result["merge"] = merge_info
    if merge_info is not None or arrow_info is not None:
        # the three sets of rows, for the check that they are disjoint: train-split rows the adapters trained on,
        # train-split rows the merge (or Arrow) chose or learned on, and the evaluation split's rows it is scored on
        info = merge_info or arrow_info
        chosen = info.get("rows") or info.get("selection", {}).get("rows") or {}
        result["rows_used"] = {"train": {t: records[t] and records[t]["rows"]["train"] for t in tasks}, "selection": chosen,
                               "test": {t: [0, len(rows[t])] for t in tasks}, "test_split": "eval"}
    if method == "majority":
        result["majority_class"] = {t: get_task(t).answer(rows[t][0], majority_class(get_task(t), cfg.data))
                                    for t in metrics if get_task(t).metric == "label"}
    if method in ("moa", "arrow"):
        result["router"] = router_report(tasks, routes, layer_names)
    if method == "moa":
        result["router"]["trained"] = router_origin
    if arrow_info is not None:
        result["arrow"] = arrow_info
    return result


# Arrow's two parameters, chosen on validation rows like a merge's grid (never on test rows)
ARROW_PARAMS = {"top_k": registry.Param(3, "adapters mixed per token", grid=(1, 2, 3), low=1, kind=int),
                "temperature": registry.Param(1.0, "softmax temperature of the |x . v_i| scores",
                                            grid=(0.5, 1.0, 2.0, 4.0), low=0.0, open="low")}


def choose_arrow(model, data: merge_fit.FitData, select_rows: int, prototypes: list) -> dict:
    """Arrow's top_k and temperature: the lowest mean target-token loss on the validation rows (the train-split
    rows after each adapter's training rows), the model holding every adapter; PEFT's defaults (3, 1.0) when
    select_rows is 0."""
    started = time.perf_counter()
    if select_rows <= 0:
        return {"params": {k: p.default for k, p in ARROW_PARAMS.items()}, "seconds": 0.0}
    # top_k past the number of adapters mixes the same adapters: the range ends there, and so does the grid
    n = len(next(iter(lora.lora_layers(model).values())).A)
    top_k = ARROW_PARAMS["top_k"]
    specs = {**ARROW_PARAMS, "top_k": replace(top_k, high=n, grid=tuple(k for k in top_k.grid if k <= n))}
    params, selection = merge_fit.choose("arrow", specs, {},
                                         lambda p: arrow.arrow_routing(model, **p, prototypes=prototypes), data,
                                         select_rows)
    return {"params": params, "selection": selection, "seconds": round(time.perf_counter() - started, 1)}


def write_method(out: Path, method: str, result: dict):
    result = dict(result)
    predictions = result.pop("predictions")
    atomic_write(out / f"{method}.predictions.jsonl",
                   lambda p: p.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in predictions)))
    atomic_write(out / f"{method}.json", lambda p: p.write_text(json.dumps(result, indent=2)))


