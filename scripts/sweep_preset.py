"""Choose the cpu preset on validation rows: train every task's LoRA under a few settings, score each on held-out
rows of the train split, and write the table to results/<model>/preset_sweep.{json,md}.

    python scripts/sweep_preset.py                 # every setting below (resumes: finished (setting, task) pairs are kept)
    python scripts/sweep_preset.py --settings B,C  # some of them
    python scripts/sweep_preset.py --settings D,F --rescore   # redo the validation metric of adapters already trained

Rows, per task, all from the train split (the test files are never read):
    [0, train_rows)                          training rows of the setting
    [train_rows, train_rows + 32)            validation loss for early stopping (as in the preset)
    [VAL_OFFSET, VAL_OFFSET + VAL_ROWS)      the validation metric that chooses the setting (the same rows for all)

The chosen setting maximises the mean over tasks of (validation metric / the best any setting reached on that task)
among the settings within the training budget (TRAIN_BUDGET sequences per task).
Where the per-row statistics are stored, each setting also gets the mean over tasks of (its metric / the chosen
setting's) with a 95% paired bootstrap interval over the validation rows.
Training time per setting is measured here, but it varies by a third between sessions of the same machine, so the
budget counts training sequences (max_steps * batch_size, at max length 192), which is what the time scales with.
"""
import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from src import peft_files  # noqa: E402
from src import lora  # noqa: E402
from src.data import fit_prompt, load_rows  # noqa: E402
from src.files import atomic_write  # noqa: E402
from src.evaluation import EVAL_PRESETS, generate  # noqa: E402
from src.layout import model_results_dir  # noqa: E402
from src.metrics import example_stats, normalized_score, paired_bootstrap, score  # noqa: E402
from src.layout import model_slug  # noqa: E402
from src.models import EMBEDDED, load_model  # noqa: E402
from src.tasks import SEVEN_TASKS, get_task  # noqa: E402
from src.train import make_config, train_lora  # noqa: E402

VAL_OFFSET, VAL_ROWS = 432, 64
# `make reproduce METHODS=paper` from a fresh clone on a slow day of the 2-core machine (5c99bb5, setting D):
# 1,905 s outside training and 1,933 s training 7 x 560 sequences. 60 minutes less a 10% margin leaves 1,335 s of
# training, 387 sequences per task at that rate; 384 = 96 steps of 4.
TRAIN_BUDGET = 384
COMMON = dict(val_rows=32, max_target=64, epochs=100, patience=3)
SETTINGS = {  # name -> overrides of the cpu preset; A is the preset of the first version
    "A": dict(lr=1e-3, max_steps=30, batch_size=8, train_rows=240, max_len=192, eval_every=10),
    "B": dict(lr=3e-4, max_steps=70, batch_size=8, train_rows=400, max_len=192, eval_every=20),
    "C": dict(lr=1e-3, max_steps=70, batch_size=8, train_rows=400, max_len=192, eval_every=20),
    "D": dict(lr=1e-3, max_steps=140, batch_size=4, train_rows=400, max_len=192, eval_every=40),
    "E": dict(lr=1e-3, max_steps=100, batch_size=8, train_rows=400, max_len=128, eval_every=25),
    # within the training budget, added after D (over it) had been chosen: D cut to 90 steps, and the same at twice
    # the learning rate
    "F": dict(lr=1e-3, max_steps=90, batch_size=4, train_rows=400, max_len=192, eval_every=30),
    "G": dict(lr=2e-3, max_steps=90, batch_size=4, train_rows=400, max_len=192, eval_every=30),
}


def sequences(overrides: dict) -> int:
    """Training sequences per task: what a setting's training time scales with (at max length 192 or less)."""
    return overrides["max_steps"] * overrides["batch_size"]


@torch.no_grad()
def validation_metric(model, tokenizer, task_name: str, adapter_folder: Path) -> tuple[dict, list]:
    """The task's metrics on the validation block, generating as the cpu evaluation preset does, and each row's
    statistics for the paired bootstrap."""
    task, ev = get_task(task_name), EVAL_PRESETS["cpu"]
    rows = load_rows(task, "train", n=VAL_ROWS, offset=VAL_OFFSET)
    prompts = [fit_prompt(task, r, tokenizer, ev["max_prompt"], strict=False) for r in rows]
    adapter = peft_files.load_adapter(adapter_folder)
    lora.inject(model, sorted({n.rpartition(".")[2] for n in adapter.modules}))
    try:
        lora.add_adapter(model, adapter)
        texts, _ = generate(model, tokenizer, prompts, min(task.max_new_tokens, ev["max_new_tokens"]),
                            ev["batch_size"], desc=f"validate {task_name}")
    finally:
        lora.remove(model)
    references = [task.references(r) for r in rows]
    return score(task, texts, references), example_stats(task, texts, references)


def choose(results: dict, tasks: list[str], budget: int = TRAIN_BUDGET) -> dict:
    """relative: mean over tasks of metric / best metric of that task over the finished settings; chosen: the
    highest relative among the settings within the training budget."""
    done = {s: r for s, r in results.items() if all(t in r["tasks"] for t in tasks)}
    best = {t: max(r["tasks"][t]["val_metric"] for r in done.values()) for t in tasks} if done else {}
    rel = {s: sum(r["tasks"][t]["val_metric"] / best[t] if best[t] else 1.0 for t in tasks) / len(tasks)
           for s, r in done.items()}
    within = [s for s in rel if sequences(done[s]["overrides"]) <= budget]
    chosen = max(within, key=rel.get) if within else None
    stats = {s: {t: r["tasks"][t]["stats"] for t in tasks} for s, r in done.items()
             if all("stats" in r["tasks"][t] for t in tasks)}
    vs_chosen = {}
    if chosen in stats and len(stats) > 1:
        ci = paired_bootstrap([get_task(t) for t in tasks], stats, reference=chosen)
        # the normalized score with the chosen setting as the reference (a task it scores 0 on leaves the mean)
        entries = {s: {t: done[s]["tasks"][t] for t in tasks} for s in stats}
        vs_chosen = {s: (normalized_score(entries[s], entries[chosen], {t: "val_metric" for t in tasks})["mean"],
                         ci[s]["normalized"]) for s in stats if s != chosen}
    return {"relative": rel, "within_budget": within, "chosen": chosen, "vs_chosen": vs_chosen}


def write_report(results: dict, tasks: list[str], out: Path):
    choice = choose(results, tasks)
    payload = {"val_offset": VAL_OFFSET, "val_rows": VAL_ROWS, "common": COMMON, "settings": SETTINGS,
               "train_budget_sequences": TRAIN_BUDGET, "results": results, **choice}
    atomic_write(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(payload, indent=2)))
    keys = ["lr", "max_steps", "batch_size", "train_rows", "max_len"]
    header = ["setting", *keys, "sequences"] + [f"{t} ({get_task(t).primary})" for t in tasks] + [
        "relative", "vs chosen [95%]", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s, r in results.items():
        n = sequences(r["overrides"])
        cells = [s + (" (chosen)" if s == choice["chosen"] else "")] + [str(r["overrides"][k]) for k in keys]
        cells += [f"{n}" + ("" if n <= TRAIN_BUDGET else " (over budget)")]
        cells += [f"{r['tasks'][t]['val_metric']:.3f}" if t in r["tasks"] else "" for t in tasks]
        rel = choice["relative"].get(s)
        vs = choice["vs_chosen"].get(s)
        cells += [f"{rel:.3f}" if rel is not None else "",
                  f"{vs[0]:.3f} [{vs[1][0]:.3f}, {vs[1][1]:.3f}]" if vs and vs[1] else "",
                  f"{sum(x['train_s'] for x in r['tasks'].values()):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nValidation metric: the task's primary metric on train-split rows {VAL_OFFSET}-{VAL_OFFSET + VAL_ROWS - 1} "
            "(never trained on, never test rows), greedy, as the cpu evaluation preset. sequences = max_steps x batch_size "
            f"per task; the training budget is {TRAIN_BUDGET} (`make reproduce METHODS=paper` under 60 minutes less a "
            "10% margin on a slow day of the 2-core machine), and the chosen setting has the highest relative score "
            "within it. relative = mean over tasks of "
            "metric / best metric of that task over the settings; vs chosen = mean over tasks of metric / the chosen "
            "setting's, with a 95% paired bootstrap interval over the validation rows (1,000 resamples), where the "
            "rows' statistics are stored. Common to all: "
            + ", ".join(f"{k} {v}" for k, v in COMMON.items()) + ".\n")
    atomic_write(out.with_suffix(".md"), lambda p: p.write_text("\n".join(lines) + "\n" + note))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--tasks", default=",".join(SEVEN_TASKS))
    p.add_argument("--root", default=str(REPO))
    p.add_argument("--rescore", action="store_true",
                   help="recompute the validation metric and row statistics of finished (setting, task) pairs from "
                        "their adapters under adapters/sweep/ (no training)")
    args = p.parse_args()
    tasks = args.tasks.split(",")
    out = model_results_dir(args.root, args.model) / "preset_sweep"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.with_suffix(".json").read_text())["results"] if out.with_suffix(".json").exists() else {}
    model, tokenizer = load_model(args.model)
    for name in args.settings.split(","):
        entry = results.setdefault(name, {"overrides": SETTINGS[name], "tasks": {}})
        for t in tasks:
            folder = Path(args.root) / "adapters" / "sweep" / model_slug(args.model) / name / t
            if t in entry["tasks"]:
                if args.rescore:
                    metrics, stats = validation_metric(model, tokenizer, t, folder)
                    if metrics != entry["tasks"][t]["metrics"]:
                        raise SystemExit(f"{name} {t}: the adapter in {folder} is not the one that was scored")
                    entry["tasks"][t]["stats"] = stats
                    write_report(results, tasks, out)
                continue
            cfg = make_config("cpu", {**COMMON, **SETTINGS[name], "task": t, "model": args.model})
            start = time.perf_counter()
            summary = train_lora(cfg, model, tokenizer, folder)
            train_s = time.perf_counter() - start
            metrics, stats = validation_metric(model, tokenizer, t, folder)
            entry["tasks"][t] = {"val_metric": metrics[get_task(t).primary], "metrics": metrics, "stats": stats,
                                 "train_s": round(train_s, 1), "steps": summary["steps"],
                                 "best_val_loss": summary["best_val_loss"], "skipped_rows": summary["skipped_rows"]}
            print(f"{name} {t}: {get_task(t).primary} {entry['tasks'][t]['val_metric']:.3f}, {train_s:.0f} s", flush=True)
            write_report(results, tasks, out)
    write_report(results, tasks, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
