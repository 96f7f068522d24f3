"""Merge LoRA adapters in PEFT's format (ours, or trained with PEFT) into one PEFT adapter.

    python merge_adapters.py --method svd --rank 8 --out merged/ adapters/smollm2-135m/qa adapters/smollm2-135m/nli
    python merge_adapters.py --method ties --density 0.3 --lam 1.0 --out ties/ path/to/a path/to/b path/to/c
    python merge_adapters.py --method weight_sum --weights 0.5,0.5 --out avg/ path/to/a path/to/b
    python merge_adapters.py --method ties --model Qwen/Qwen2-0.5B --rows a.jsonl,b.jsonl --out ties/ path/to/a path/to/b
    python merge_adapters.py --method cat --rows a.jsonl,b.jsonl --save-merged-model full/ --out cat/ path/to/a path/to/b

The result loads with `peft.PeftModel.from_pretrained(base_model, "merged/")` or with src.peft_files.load_adapter, and
merge.json beside it says how it was made (method, parameters, the candidates tried, the rows read). With
--save-merged-model DIR the merge is also folded into the base model's weights (--model) and saved as a model folder
(safetensors, tokenizer beside it) that transformers loads alone: AutoModelForCausalLM.from_pretrained("DIR").

Without --rows the merge is data-free: each parameter is its flag or the method's default. With --rows (one entry per
adapter, in adapter order: a JSON-lines file of {"prompt": ..., "target": ...} objects, or a task name of src/tasks.py
for its shipped train rows after those the adapter trained on, as its training.json says), every grid parameter not
given as a flag is chosen by the mean target-token loss of the merged model on those rows, with the grid and its
extension past the edges that full_evaluation.py uses (src/merge_fit.build); CAT and LoraHub learn their weights on
them. A row is its prompt's tokens, then its target's and EOS (nothing is cut: a row longer than the model's window
is refused); the loss of an adapter's rows is the mean cross-entropy over all their target tokens and EOS, and a
merge's loss the mean of those over the adapters.
"""
import argparse
import json
from pathlib import Path

from src import peft_files
from src import cli
from src import lora
from src import merge_fit
from src import merges
from src import provenance
from src import registry
from src.errors import BadInput, MissingFile
from src.files import write_folders
from src.models import EMBEDDED
from src.tasks import TASKS, get_task

DEFAULT_TASK_ROWS = 32   # rows per task for a grid when --rows names tasks (full_evaluation.py's paper preset)
GENERAL = ("adapters", "method", "out", "weights", "seed", "rank", "rows", "select_rows", "model", "save_merged_model")


def parser() -> argparse.ArgumentParser:
    lines = [f"  {n:16} {m.formula} [{m.paper}]" + (f"; {', '.join(f'{k}={p.default}' for k, p in m.params.items())}"
                                                  if m.params else "") + (" (needs --rows)" if m.space == "data" else "")
             for n, m in registry.METHODS.items()]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="methods:\n" + "\n".join(lines) + "\n\n" + merges.ZERO_UPDATE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", help="adapter folders (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--method", required=True, choices=list(registry.METHODS))
    p.add_argument("--out", required=True, help="output folder (a PEFT adapter and merge.json)")
    p.add_argument("--weights", default=None, help="comma-separated, one per adapter (default: 1, or 1/N for svd)")
    p.add_argument("--seed", type=int, default=None,
                   help="DARE's random masks, CAT's batch order, LoraHub's search (default 0; other methods draw nothing)")
    p.add_argument("--rank", type=int, default=None,
                   help="the merge as one LoRA of at most this rank: svd's and ctm's own rank (default 8; ctm: the "
                        "largest adapter rank), RegMean's best rank-k LoRA in its objective, for every other method "
                        "the truncated SVD of its merge")
    p.add_argument("--rows", default=None, metavar="FILE[,FILE...]",
                   help="one per adapter, in order: a JSON-lines file of {\"prompt\", \"target\"} rows, or a task name "
                        f"({', '.join(TASKS)}: its train rows after those the adapter trained on); chooses the "
                        "parameters not given on these rows (CAT and LoraHub learn on them)")
    p.add_argument("--select-rows", type=int, default=None, metavar="N",
                   help="rows per adapter that --rows reads: a file's first N (default: all of every file) or N train "
                        f"rows of a task (default {DEFAULT_TASK_ROWS}; LoraHub 5; RegMean's Grams 128); the rows a grid "
                        "parameter is chosen on, CAT's and LoraHub's rows, and RegMean's: with files, each adapter's "
                        "Gram matrices and the choice of alpha both use its file's first N rows (with a task name, the "
                        "Grams use the first N rows the adapter trained on and alpha the rows after them)")
    p.add_argument("--model", default=EMBEDDED, help="the base model, for --rows and --save-merged-model: hub id, "
                                                     "local folder, or the embedded default")
    p.add_argument("--save-merged-model", default=None, metavar="DIR",
                   help="also fold the merge into the base model and save it there (transformers' save_pretrained)")
    params = {}   # one flag per parameter name; what it does, for each method that takes it (alpha means four things)
    for n, m in registry.METHODS.items():
        for k, prm in m.params.items():
            if k not in ("rank", "rows"):  # --rank is the truncation flag; the data methods' rows: --select-rows
                params.setdefault(k, []).append((n, prm))
    for name, users in params.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=None, help="; ".join(
            f"{n}: {prm.help}, default {prm.default}" + (f", else chosen on --rows from {list(prm.grid)}" if prm.grid
                                                         else "") for n, prm in users).replace("%", "%%"))
    return p


def check_flags(method: registry.Method, args: argparse.Namespace) -> tuple[dict, dict]:
    """(the method's parameters given as flags, further arguments of merges.merge): every flag checked against
    the method before an adapter or the model is read."""
    given = {k: v for k, v in vars(args).items() if k in method.params and v is not None}
    other = [k for k, v in vars(args).items() if v is not None and k not in method.params and k not in GENERAL]
    if other:
        raise BadInput(f"--{other[0].replace('_', '-')} is not a parameter of {args.method} (it takes "
                       f"{', '.join(k for k in method.params if k != 'rows') or 'none'})")
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        raise BadInput(f"--weights {args.weights!r}: give comma-separated numbers, one per adapter") from None
    if weights is not None and len(weights) != len(args.adapters):
        raise BadInput(f"--weights has {len(weights)} values for {len(args.adapters)} adapters: give one per adapter")
    options = {"rank": args.rank} if args.rank is not None and "rank" not in method.params else {}
    registry.check_rank(args.rank)   # svd, ctm, regmean: --rank is their own parameter (in `given`)
    if method.space == "data":
        if args.weights is not None:
            raise BadInput(f"{args.method} learns its own weights: it takes no --weights")
        if args.rows is None:
            raise BadInput(f"{args.method} learns its merge from rows: give --rows (one JSON-lines file of prompt/"
                           "target rows, or a task name, per adapter)")
        return given, options
    if weights is not None:
        options["weights"] = weights
    merges.check_arguments(method, args.seed, options.get("rank"))
    registry.resolve_params(method, given)
    return given, options


def row_sources(args: argparse.Namespace) -> dict:
    """{name: where its rows come from}, one per adapter in order, from --rows: a task name (its train rows after
    those the adapter trained on: the adapter's training record must say which, and be of that task and of the
    shipped data) or a row file (read and checked here, before the model loads)."""
    entries = [e.strip() for e in args.rows.split(",")]
    if len(entries) != len(args.adapters):
        raise BadInput(f"--rows has {len(entries)} entries for {len(args.adapters)} adapters: give one row file (or "
                       "task name) per adapter, in adapter order")
    repeated = sorted({e for e in entries if entries.count(e) > 1})
    if repeated:
        raise BadInput(f"--rows names {repeated[0]} for several adapters: give each adapter its own rows")
    sources = {}
    for entry, folder in zip(entries, args.adapters):
        if entry not in TASKS:  # a task name means the task; a file of that name is ./name
            sources[entry] = merge_fit.FileRows.read(entry)
            continue
        record = provenance.find_record(folder)
        if record is None:
            raise MissingFile(f"--rows {entry}: adapter {folder} has no {provenance.RECORD} (which rows it trained "
                              f"on), so no {entry} rows it did not train on can be chosen: give your own rows as a "
                              "JSON-lines file of prompt/target objects")
        if record.get("task") != entry:
            raise BadInput(f"--rows {entry}: adapter {folder} was trained on {record.get('task')}, not {entry}: give "
                           "the rows in adapter order")
        provenance.check_source(record, get_task(entry), "local")
        sources[entry] = merge_fit.TaskRows(entry, record, "local")
    return sources


def rows_per_adapter(args: argparse.Namespace, sources: dict) -> int | None:
    """--select-rows; by default every row of every file, or None (the method's default) when a task is named."""
    if args.select_rows is not None:
        if args.select_rows < 1:
            raise BadInput(f"--select-rows {args.select_rows}: give a whole number >= 1")
        return args.select_rows
    if sources and all(isinstance(s, merge_fit.FileRows) for s in sources.values()):
        return max(len(s.file.rows) for s in sources.values())
    return None


def describe(name: str, info: dict) -> list[str]:
    """What was chosen or learned, and on which rows, for the terminal."""
    lines = [f"{name}: one LoRA of rank {info['rank']} (truncated)"] if info.get("rank") else []
    if "selection" in info:
        grid = [k for k in info["params"] if any(c["params"][k] != info["selection"]["candidates"][0]["params"][k]
                                                 for c in info["selection"]["candidates"])]
        lines.append(f"{name}: mean target-token loss of each candidate on the rows:")
        for c in info["selection"]["candidates"]:
            mark = "  <- chosen" if c["params"] == info["params"] else ""
            values = ", ".join(f"{k}={c['params'][k]:g}" for k in grid)
            lines.append(f"  {values}: {c['val_loss']:.6f}{mark}")
        where = info["selection"]["rows"]
    elif "alphas" in info:
        lines.append(f"{name}: alphas learned, mean loss on the rows {_mean(info['loss_before']):.6f} -> "
                     f"{_mean(info['loss_after']):.6f}")
        where = info["rows"]
    elif "weights" in info:
        lines.append(f"{name}: weights {info['weights']}, mean loss on the rows {info['loss_start']:.6f} (w = 0) -> "
                     f"{info['loss_best']:.6f}")
        where = info["rows"]
    else:
        return lines + [f"{name}: {', '.join(f'{k}={v}' for k, v in info['params'].items()) or 'no parameters'}"]
    lines.append(f"{'chosen' if 'selection' in info else 'parameters'}: "
                 f"{', '.join(f'{k}={v}' for k, v in info['params'].items())}")
    lines += [f"  rows of {n}: " + (f"{w['rows']} of {w['of']} (lines {w['lines'][0]}-{w['lines'][1]}, sha256 "
                                    f"{w['sha256'][:16]})" if isinstance(w, dict) else f"train rows [{w[0]}, {w[1]})")
              for n, w in where.items()]
    return lines


def _mean(losses: dict) -> float:
    return sum(losses.values()) / len(losses)


def main(argv=None):
    args = parser().parse_args(argv)
    method = registry.get_method(args.method)
    given, options = check_flags(method, args)
    out, full = Path(args.out), Path(args.save_merged_model) if args.save_merged_model else None
    if full is not None and full.resolve() == out.resolve():
        raise BadInput("--save-merged-model needs another folder than --out (a model folder holding an adapter "
                       "would load as the adapter)")
    if args.rows is None and args.select_rows is not None:
        raise BadInput("--select-rows counts the rows of --rows: give --rows too")
    adapters = [peft_files.load_adapter(a) for a in args.adapters]
    union, shared = set().union(*(a.modules for a in adapters)), set.intersection(*(set(a.modules) for a in adapters))
    if union != shared:
        print(f"note: the adapters adapt different modules ({len(shared)} adapted by all, {len(union)} by any): "
              "merged over all of them, a module an adapter lacks being a zero update of it (--help says how)")
    sources = row_sources(args) if args.rows is not None else {}
    n = rows_per_adapter(args, sources)
    if method.space == "data":
        given["rows"] = n
    elif sources and not merge_fit.needs_rows(args.method, n or DEFAULT_TASK_ROWS, given):
        raise BadInput(f"--rows: {args.method} has no parameter left to choose on rows "
                       f"({'all given as flags' if method.params else 'it has none'}): drop --rows")
    model = tokenizer = data = None
    if sources or full is not None:
        from src.models import load_model
        from src.train import make_accelerator

        model, tokenizer = load_model(args.model)
        for folder, adapter in zip(args.adapters, adapters):  # before any work: an adapter of another base model
            try:
                lora.fold_targets(model, adapter)
            except BadInput as e:
                raise BadInput(f"{folder} does not fit --model {args.model} ({e}): give the base model the adapters "
                               "were trained on") from None
    if sources:
        data = merge_fit.FitData(model, tokenizer, list(sources), seed=args.seed or 0, accelerator=make_accelerator(),
                                 sources=sources)
    merged, info = merge_fit.build(args.method, adapters, data, n or DEFAULT_TASK_ROWS, given, args.seed or 0, options)
    for line in describe(args.method, info):
        print(line)
    record = {"method": args.method, "adapters": [str(a) for a in args.adapters], "options": options,
              "model": args.model if model is not None else None, "merged_model": str(full) if full else None, **info}

    def write_adapter(folder: Path):
        peft_files.save_adapter(merged, folder)
        (folder / "merge.json").write_text(json.dumps(record, indent=2))

    def write_model(folder: Path):
        lora.fold(model, merged)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_folders({out: write_adapter, **({full: write_model} if full is not None else {})})
    print(f"{args.method} of {len(adapters)} adapters ({len(merged.modules)} modules) -> {out}"
          + (f"; the base model with it folded in -> {full}" if full is not None else ""))


if __name__ == "__main__":
    cli.run(main)
