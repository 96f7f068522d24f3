"""Reports of finished runs, from the result files alone: the summary tables (`summary.md`, `summary.csv`) with 95%
paired bootstrap intervals (`metrics.paired_bootstrap`: the same resampled rows for a method and for single), the
paper's normalized scores beside ours, the single-task checks, each method's paired difference from MoA and from
the SVD merge, how each merge was made, and the README's method table. Only results computed on single's adapters
and test prompts share a table; the others are named."""
import csv
import io
import json
import math
import re
from collections import defaultdict
from pathlib import Path

from . import registry
from .layout import PAPER_RESULTS, ROOT, ordered, router_log
from .files import atomic_write
from .metrics import normalized_score, paired_bootstrap
from .tasks import FIVE_TASKS, SEVEN_TASKS, get_task

PAPER_NAMES = {"base": "base", "single": "single", "moa": "moa", "concat": "concat", "weight_sum": "weighted",
               "svd": "svd", "weighted_avg": "weighted_avg"}
PAIRED_WITH = ("moa", "svd")  # every method's normalized score is also compared to these, on the same resamples


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
    return {m: json.loads((out / f"{m}.json").read_text()) for m in ordered(f.stem for f in Path(out).glob("*.json"))}


def intervals(found: dict, n_boot: int = 1000) -> dict:
    """95% paired bootstrap intervals of every method's per-task metric, ratio to single, and normalized score
    (a result file written before intervals existed has no per-row statistics: no interval for it)."""
    tasks = [get_task(t) for t in next(iter(found.values()))["tasks"]]
    stats = {m: r["stats"] for m, r in found.items() if "stats" in r}
    # each rank variant is also compared with its exact merge, on the same resamples (rank_gaps)
    # (and with RegMean's LoRA of the same rank: seeds_table's pairs)
    ranked = [registry.split_rank(m) for m in found if registry.split_rank(m)[1]]
    exact = tuple(sorted(({b for b, _ in ranked} | {f"regmean_r{k}" for _, k in ranked}) & set(found)))
    ci = paired_bootstrap(tasks, stats, reference="single", n_boot=n_boot,
                          compare=PAIRED_WITH + tuple(m for m in exact if m not in PAIRED_WITH)) if stats else {}
    empty = {"per_task": {}, "diff": {}, "ratio": {}, "normalized": None, "normalized_diff": {}}
    return {m: ci.get(m, empty) for m in found}


class Analyses:
    """Each results folder read, filtered (`same_inputs`) and bootstrapped once, however many tables show it: a
    refill of the README and REPORT.md shows a folder up to three times."""

    def __init__(self):
        self._done = {}

    def __call__(self, out: Path) -> tuple[dict, dict, dict] | None:
        """(found, left_out, ci) of a results folder; None if it has no method file."""
        key = Path(out).resolve()
        if key not in self._done:
            found = load_method_results(out)
            if found:
                found, left_out = same_inputs(found)
                self._done[key] = (found, left_out, intervals(found))
            else:
                self._done[key] = None
        return self._done[key]


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


def rank_gaps(found: dict, ci: dict) -> str:
    """Each rank variant (`<merge>_r<k>`: one LoRA of rank k) against its exact merge: both normalized scores and the
    paired difference with its 95% interval (the same resampled rows), whether the rank budget costs anything
    measurable on these rows. Empty without variants."""
    points = normalized_points(found)
    rows = []
    for m in found:
        base, rank = registry.split_rank(m)
        if rank is None or base not in found or points[m] is None or points[base] is None:
            continue
        lo_hi, own = paired_interval(ci, m, base), ci[m]["normalized"]
        gap = f"{points[m] - points[base]:+.3f}" + (f" [{lo_hi[0]:+.3f}, {lo_hi[1]:+.3f}]" if lo_hi else "")
        rows.append(f"| {m} | {rank} | {_fmt((points[m], own))} | {base} | {_fmt((points[base], ci[base]['normalized']))} "
                    f"| {gap} |")
    if not rows:
        return ""
    return ("\n**One LoRA of rank k** (each rank variant against its exact merge; paired difference on the same "
            "resampled rows, 95%)\n\n| variant | rank | normalized [95%] | exact merge | its normalized [95%] | "
            "variant - exact [95%] |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


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


def summary_files(out: Path, analyses: Analyses | None = None) -> tuple[str, str] | None:
    """(summary.md, summary.csv) of a results folder, from its method files alone (None if it has none)."""
    analysis = (analyses or Analyses())(out)   # one bootstrap, shared by the table and the single-task check
    if analysis is None:
        return None
    found, left_out, ci = analysis
    header, rows = summary_table(found, ci)
    tasks = [h.split(" (")[0] for h in header[1:] if " (" in h]
    n_scored = len(tasks) + 1  # the per-task cells and the normalized score carry intervals
    scored = [c for h in header[1:1 + n_scored] for c in (h, f"{h} lo", f"{h} hi")]
    csv_header = ["method"] + scored + header[1 + n_scored:]
    buf = io.StringIO()
    csv.writer(buf).writerows([csv_header] + [[row[0]] + [c for v in row[1:1 + n_scored] for c in _csv_cells(v)]
                                              + row[1 + n_scored:] for row in rows])
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
    text = ("\n".join(lines) + "\n" + note + single_check(found, ci) + paired_gaps(found, ci) + rank_gaps(found, ci) + merge_table(found)
            + routing_table(found) + control_table(out, found))
    return text, buf.getvalue()


def csv_rounding_equal(a: str, b: str, rel: float = 1e-10, abs_: float = 1e-12) -> bool:
    """Two summary.csv texts with the same cells, numbers equal to float rounding. The bootstrap's sums run in an
    order set by the CPU's vector width, so an AMD and an Intel machine differ in the last bits (0.015497061269112910
    against ...907). Two orders of a sum of n non-negative terms agree within about 2 (n - 1) u relative (u = 1.1e-16),
    2.2e-14 for 100 rows (a mean, a ratio of two, a percentile of 1,000 or corpus BLEU's log and exp add a few u),
    so `rel` leaves a margin of 10^3 and still sees a change in the 9th significant digit of any cell above 0.01;
    `abs_` covers cells at or near 0."""
    rows_a, rows_b = list(csv.reader(io.StringIO(a, newline=""))), list(csv.reader(io.StringIO(b, newline="")))
    if len(rows_a) != len(rows_b) or a.count("\r\n") != b.count("\r\n"):
        return False
    for row_a, row_b in zip(rows_a, rows_b):
        if len(row_a) != len(row_b):
            return False
        for x, y in zip(row_a, row_b):
            if x != y and not _close_numbers(x, y, rel, abs_):
                return False
    return True


def _close_numbers(x: str, y: str, rel: float, abs_: float) -> bool:
    try:
        return math.isclose(float(x), float(y), rel_tol=rel, abs_tol=abs_)
    except ValueError:   # a cell that is not a number must be equal
        return False


def write_summary(out: Path, analyses: Analyses | None = None):
    """Rebuild `summary.md` and `summary.csv` of a results folder (after every method a run finishes). A csv equal to
    the one there up to float rounding (`csv_rounding_equal`) is left as it is, so that `make report` on another CPU
    changes no file."""
    files = summary_files(out, analyses)
    if files is not None:
        atomic_write(out / "summary.md", lambda p: p.write_text(files[0]))
        old = out / "summary.csv"
        if not (old.exists() and csv_rounding_equal(old.read_bytes().decode(), files[1])):
            atomic_write(old, lambda p: p.write_text(files[1]))


def control_table(out: Path, found: dict) -> str:
    """Each merge of random LoRAs (`<N>-task/random-loras/`, control.random_like) beside the same merge of the trained
    LoRAs: normalized to the trained single, and the paired difference, on the same resampled rows."""
    single = found.get("single")
    if single is None or "stats" not in single:
        return ""
    control = {m: r for m, r in load_method_results(out / "random-loras").items()
               if m in found and "stats" in r and "stats" in found[m]
               and r["settings"]["inputs"] == single["settings"]["inputs"]}
    rows = []
    for m, r in control.items():
        both = {"single": single, m: found[m], f"{m} random": r}
        ci = paired_bootstrap([get_task(t) for t in single["tasks"]],
                              {k: v["stats"] for k, v in both.items()}, reference="single", compare=(m,))
        points = normalized_points(both)
        if points[m] is None or points[f"{m} random"] is None or m not in ci[f"{m} random"]["normalized_diff"]:
            continue  # a merge without every task has no normalized score
        lo, hi = ci[f"{m} random"]["normalized_diff"][m]
        rows.append(f"| {m} | {_fmt((points[m], ci[m]['normalized']))} | "
                    f"{_fmt((points[f'{m} random'], ci[f'{m} random']['normalized']))} | "
                    f"{points[f'{m} random'] - points[m]:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    if not rows:
        return ""
    return ("\n**Control: the same merge of random LoRAs** (each module's A and update of the trained LoRA's "
            "Frobenius norm, Gaussian directions; normalized to the trained single; 95% paired intervals). A method "
            "whose score does not drop owes its gain to the procedure, not to the task LoRAs.\n\n"
            "| method | trained LoRAs | random LoRAs | random - trained |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


SEED_FOLDER = re.compile(r"seed([1-9][0-9]*)")   # scripts/seeds.sh writes seeds/seed<N>, N >= 1 (0 is the committed run)
# adapters retrained in a later session (other bytes): <model>/retrained-seed<N> (the README's table), and the same
# adapters under other router settings, <model>/retrained-seed<N>-<label> (their README says which)
RETRAINED_FOLDER = re.compile(r"retrained-seed(0|[1-9][0-9]*)(?:-([A-Za-z0-9_-]+))?")


def retrained_folders(model_dir: Path, n_tasks: int = 7) -> dict:
    """{seed: {label: results folder}} of the retrained runs: label "" for `retrained-seed<N>/<n>-task` (the cpu
    preset's routers), the label itself for `retrained-seed<N>-<label>/<n>-task`; other folders are skipped."""
    out = defaultdict(dict)
    for folder in Path(model_dir).glob(f"retrained-seed*/{n_tasks}-task"):
        match = RETRAINED_FOLDER.fullmatch(folder.parent.name)
        if match:
            out[int(match.group(1))][match.group(2) or ""] = folder
    return dict(sorted(out.items()))


def seed_runs(model_dir: Path, n_tasks: int = 7, retrained: bool = False) -> dict:
    """{training seed: results folder} of one model, for the seeds with a single result: the committed run is seed 0
    (`<model>/<n>-task`), each other seed's run is `<model>/seeds/seed<N>/<n>-task` (scripts/seeds.sh,
    layout.seed_dir); other folders under seeds/ are not seeds' runs and are skipped. retrained: the retrained
    seeds instead, `<model>/retrained-seed<N>/<n>-task`, which compare with each other and not with the committed
    ones."""
    if retrained:
        runs = {seed: by_label[""] for seed, by_label in retrained_folders(model_dir, n_tasks).items() if "" in by_label}
    else:
        runs = {0: Path(model_dir) / f"{n_tasks}-task"}
        for folder in Path(model_dir).glob(f"seeds/*/{n_tasks}-task"):
            match = SEED_FOLDER.fullmatch(folder.parent.name)
            if match:
                runs[int(match.group(1))] = folder
    return {seed: runs[seed] for seed in sorted(runs) if (runs[seed] / "single.json").exists()}


def seed_spread(model_dir: Path, analyses: Analyses | None = None, n_tasks: int = 7, retrained: bool = False) -> dict:
    """Per method evaluated on the adapters of at least two training seeds, each seed normalized to its own single:
    {"points": {seed: normalized score, for the seeds it ran on}, "ci": {seed: its 95% row-bootstrap interval or
    None}, "gap": {seed: (method - MoA, its paired 95% interval or None)}, "mean", "sd" (sample standard deviation
    over its seeds), "min", "max", "rank": {seed: place by normalized score among the methods run on every seed,
    single left out, ties in table order; empty for a method missing on some seed, whose places would compare
    different fields}}."""
    analyses = analyses or Analyses()
    per_seed = {}
    for seed, folder in seed_runs(model_dir, n_tasks, retrained).items():
        found, _, ci = analyses(folder)
        per_seed[seed] = (normalized_points(found), ci)
    out = {}
    for m in ordered(m for p, _ in per_seed.values() for m in p):
        ran = {seed: (p, ci) for seed, (p, ci) in per_seed.items() if p.get(m) is not None}
        if len(ran) < 2:
            continue
        points = {seed: p[m] for seed, (p, _) in ran.items()}
        values = list(points.values())
        mean = sum(values) / len(values)
        sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        gap = {seed: (p[m] - p["moa"], ci[m]["normalized_diff"].get("moa")) for seed, (p, ci) in ran.items()
               if m != "moa" and p.get("moa") is not None}
        out[m] = {"points": points, "ci": {seed: ci[m]["normalized"] for seed, (_, ci) in ran.items()},
                  "gap": gap, "mean": mean, "sd": sd, "min": min(values), "max": max(values), "rank": {}}
    everywhere = [m for m in out if m != "single" and len(out[m]["points"]) == len(per_seed)]
    for seed in per_seed:
        for place, m in enumerate(sorted(everywhere, key=lambda m: -out[m]["points"][seed]), 1):
            out[m]["rank"][seed] = place
    return out


def seeds_table(model_dir: Path, analyses: Analyses | None = None, n_tasks: int = 7, retrained: bool = False) -> str:
    """The normalized score of each method on every training seed, with the mean, spread and places, the paired gap
    to MoA per seed, each rank variant's paired gap to its exact merge per seed, whether the order of the
    routing-free merges holds, and single's own scores per seed; for the retrained seeds (`seed_runs`), also MoA
    under each other router setting of the same adapters (`router_settings`)."""
    analyses = analyses or Analyses()
    runs = seed_runs(model_dir, n_tasks, retrained)
    spread = seed_spread(model_dir, analyses, n_tasks, retrained)
    if len(runs) < 2:
        return ((f"Only retrained seed {next(iter(runs))} has" if runs else "No retrained seed has")
                + f" results on {n_tasks} tasks." if retrained else
                f"Only seed 0 has results on {n_tasks} tasks: `make seeds` trains and evaluates seeds 1 and 2.")
    if not spread:
        return (f"Seeds {', '.join(map(str, runs))} have results on {n_tasks} tasks, but no method has a normalized "
                "score on two of them (a single that scores 0 on every task leaves no ratio).")
    seeds = list(runs)
    rows = {m: sp for m, sp in spread.items() if m != "single"}   # single is 1 on every seed, by definition
    found_ci = {s: analyses(runs[s]) for s in seeds}   # (found, left_out, ci) per seed
    # parameters held besides the base model, as the result files record them (the same on every seed)
    held = {m: r["parameters"] for found, _, _ in found_ci.values() for m, r in found.items() if "parameters" in r}
    lines = ["| method | " + " | ".join(f"seed {s} [95% rows]" for s in seeds)
             + f" | mean | SD | min - max | place on seeds {'/'.join(map(str, seeds))} |" + (" parameters |" if held else ""),
             "|" + "---|" * (len(seeds) + 5 + bool(held))]
    partial = [m for m, sp in rows.items() if len(sp["points"]) < len(seeds)]
    for m, sp in rows.items():
        lines.append(f"| {m} | " + " | ".join(_fmt((sp["points"][s], sp["ci"][s])) if s in sp["points"] else "no score"
                                              for s in seeds)
                     + f" | {sp['mean']:.3f}" + (f" ({len(sp['points'])} seeds)" if m in partial else "")
                     + f" | {sp['sd']:.3f} | {sp['min']:.3f} - {sp['max']:.3f} | "
                     + ("-" if m in partial else "/".join(str(sp["rank"][s]) for s in seeds)) + " |"
                     + (f" {held[m]:,} |" if m in held else " n/a |" if held else ""))
    scored = [normalized_points(found_ci[s][0]) for s in seeds]
    one_seed = [m for m in ordered(m for p in scored for m in p) if m not in spread
                and any(p.get(m) is not None for p in scored)]
    gaps = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | seeds whose interval includes 0 |",
            "|" + "---|" * (len(seeds) + 3)]
    for m, sp in rows.items():
        if not sp["gap"]:
            continue
        cells = []
        for s in seeds:
            g, lo_hi = sp["gap"].get(s, (None, None))
            cells.append("no score" if s not in sp["points"] else "MoA n/a" if g is None
                         else f"{g:+.3f}" + (f" [{lo_hi[0]:+.3f}, {lo_hi[1]:+.3f}]" if lo_hi else ""))
        with_ci = [lo_hi for _, lo_hi in sp["gap"].values() if lo_hi]
        holds = sum(1 for lo, hi in with_ci if lo <= 0 <= hi)
        mean_gap = sum(g for g, _ in sp["gap"].values()) / len(sp["gap"])
        gaps.append(f"| {m} | " + " | ".join(cells) + f" | {mean_gap:+.3f}"
                    + (f" ({len(sp['gap'])} seed{'s' * (len(sp['gap']) > 1)})" if len(sp["gap"]) < len(seeds) else "") + f" | {holds} of {len(with_ci)} |")
    merged = [m for m in rows if registry.is_merge(m) and m not in partial]
    partial_merges = [m for m in partial if registry.is_merge(m)]
    verdict = ("\n\nFewer than two routing-free merges have a score on every seed: no order of the merges to compare."
               if len(merged) < 2 and partial_merges else "")
    if len(merged) >= 2:
        orders = {s: sorted(merged, key=lambda m: -spread[m]["points"][s]) for s in seeds}
        order_text = "; ".join(f"seed {s}: " + " > ".join(o) for s, o in orders.items())
        verdict = ("\n\nBy point estimates (a difference narrower than the intervals above is not resolved by these test "
                   "rows), the order of the routing-free merges" + (" scored on every seed" if partial_merges else "") + " is "
                   + ("the same on every seed" if len({tuple(o) for o in orders.values()}) == 1 else "not the same on every seed")
                   + f" ({order_text}).")
        leaders = {s: o[0] for s, o in orders.items()}
        verdict += (f" The leader among them is {leaders[seeds[0]]} on every seed." if len(set(leaders.values())) == 1
                    else " The leader among them changes: " + ", ".join(f"seed {s} {m}" for s, m in leaders.items()) + ".")
    variants = ["| variant | against | " + " | ".join(f"seed {s}: variant - against [95%]" for s in seeds)
                + " | mean | seeds whose interval includes 0 |", "|" + "---|" * (len(seeds) + 4)]
    # each rank variant against its own exact merge, against full-rank RegMean (the yardstick: a single
    # LoRA's size at no measurable loss) and against RegMean's LoRA of the same rank, where those are other merges
    pairs = [(m, b) for m in rows for base, rank in [registry.split_rank(m)] if rank is not None
             for b in dict.fromkeys([base, "regmean", f"regmean_r{rank}"]) if b in rows and b != m]
    for m, base in pairs:
        cells, diffs, holds, with_ci = [], [], 0, 0
        for s, points in zip(seeds, scored):
            ci = found_ci[s][2]
            if points.get(m) is None or points.get(base) is None:
                cells.append("no score")
                continue
            lo_hi = paired_interval(ci, m, base)
            diffs.append(points[m] - points[base])
            with_ci += bool(lo_hi)
            holds += bool(lo_hi and lo_hi[0] <= 0 <= lo_hi[1])
            cells.append(f"{diffs[-1]:+.3f}" + (f" [{lo_hi[0]:+.3f}, {lo_hi[1]:+.3f}]" if lo_hi else ""))
        mean = (f"{sum(diffs) / len(diffs):+.3f}" + (f" ({len(diffs)} seed{'s' * (len(diffs) > 1)})"
                                                      if len(diffs) < len(seeds) else "")) if diffs else "n/a"
        variants.append(f"| {m} | {base} | " + " | ".join(cells) + f" | {mean} | {holds} of {with_ci} |")
    singles = ["| task | " + " | ".join(f"seed {s} [95% rows]" for s in seeds) + " |", "|" + "---|" * (len(seeds) + 1)]
    for t in found_ci[seeds[0]][0]["single"]["tasks"]:
        values = {s: (f["single"]["primary"][t], ci["single"]["per_task"].get(t)) for s, (f, _, ci) in found_ci.items()}
        big = any(_big(v) for v in values.values())
        singles.append(f"| {t} ({get_task(t).primary}) | " + " | ".join(_fmt(v, big) for v in values.values()) + " |")
    return ("\n".join(lines) + f"\n\nNormalized score (method / single, each seed's own single) on {n_tasks} tasks, "
            f"{len(seeds)} training seeds of the seven LoRAs and the router; [95% rows]: the paired row-bootstrap "
            "interval of that seed; SD: sample standard deviation over the seeds; place: rank by normalized score "
            "among the methods run on every seed, on that seed (1 = highest)."
            + (" Parameters: what the method holds besides the base model (the merged LoRA; single: every task's "
               "LoRA; MoA: those and its routers), as its result file counts them (files written before the count "
               "was recorded: n/a)." if held else "")
            + (f" Without a score on every seed: {', '.join(partial)} (no score: not evaluated on that seed, or its "
               "result left out for other adapters or a missing task); their mean, SD and range are over the seeds "
               "they scored on, and they have no place." if partial else "")
            + (f" Scored on one seed only, so not here: {', '.join(one_seed)}." if one_seed else "")
            + ("\n\n**Paired gap to MoA per seed** (method - MoA on the same resampled rows, 95%; an interval that "
               "includes 0: not distinguishable from MoA on that seed's test rows)\n\n" + "\n".join(gaps)
               if len(gaps) > 2 else "")
            + ("\n\n**Each rank variant against its exact merge and full-rank RegMean, per seed** (one LoRA of "
               "rank k; variant - the other on the same resampled rows, 95%)\n\n" + "\n".join(variants)
               if len(variants) > 2 else "")
            + verdict + ("".join(router_settings(model_dir, analyses, n) for n in (n_tasks, 5) if n <= n_tasks)
                         if retrained else "")
            + "\n\n**The single-task LoRAs per seed** (the denominators: primary metric on the test rows)\n\n"
            + "\n".join(singles))


def paired_interval(ci: dict, m: str, other: str) -> tuple | None:
    """The 95% interval of m - other on the same resampled rows, whichever of the two the bootstrap compared with the
    other (paired_bootstrap's `compare`); None if neither."""
    if other in ci[m]["normalized_diff"]:
        return ci[m]["normalized_diff"][other]
    lo_hi = ci[other]["normalized_diff"].get(m)
    return None if lo_hi is None else (-lo_hi[1], -lo_hi[0])


def router_settings(model_dir: Path, analyses: Analyses, n_tasks: int = 7) -> str:
    """MoA on each retrained seed's adapters with the cpu preset's routers (`retrained-seed<N>`) and with each other
    router setting of the same adapters (`retrained-seed<N>-<label>`): the rows per task the routers learned on and
    their routing accuracy on held-out train-split prompts (the folder's train_logs/moa-<n>.json, where it has one),
    MoA's normalized score with its 95% row interval, its gap to RegMean, and the routing accuracy on the test
    prompts with its weakest task. Empty without another setting."""
    rows = []
    for seed, by_label in retrained_folders(model_dir, n_tasks).items():
        for label, folder in sorted(by_label.items()) if len(by_label) > 1 else ():
            analysis = analyses(folder)
            if not analysis or "moa" not in analysis[0]:
                continue
            found, _, ci = analysis
            points, router = normalized_points(found), found["moa"]["router"]
            point, other = points["moa"], points.get("regmean")
            weakest = min(router["per_task"], key=router["per_task"].get)
            gap = paired_interval(ci, "moa", "regmean") if other is not None and point is not None else None
            log_path = router_log(folder.parent, n_tasks)
            log = json.loads(log_path.read_text()) if log_path.exists() else None
            trained = ("n/a | n/a" if log is None else
                       f"{log.get('router_rows_chosen', {}).get('rows', log['config']['router_rows'])}"
                       + (f" (of {', '.join(str(t['rows']) for t in log['router_rows_chosen']['tried'])})"
                          if "router_rows_chosen" in log else "") + f" | {_accuracy(log['heldout_accuracy'])}")
            rows.append(f"| {seed} | {label or 'cpu preset'} | {trained} | "
                        + (_fmt((point, ci["moa"]["normalized"])) if point is not None else "n/a")
                        + (f" | {point - other:+.3f} [{gap[0]:+.3f}, {gap[1]:+.3f}]" if gap else " | n/a")
                        + f" | {_accuracy(router)} | {weakest} {router['per_task'][weakest]:.2f} |")
    if not rows:
        return ""
    return (f"\n\n**MoA per router setting, on the same adapters, {n_tasks} tasks** (the folder's README gives the "
            "setting; rows: train rows per task the routers learned on, of the counts tried, the one that routed "
            "held-out prompts better; held-out routing: on other train-split prompts after those, before any test "
            "row; MoA - RegMean: on the same resampled rows, 95%, where the folder holds RegMean's result on these "
            "adapters; test routing: the gold "
            "task's adapter chosen per (test prompt, layer) at the prompt's last position, 95% over resampled "
            "prompts)\n\n| seed | routers | rows | held-out routing [95%] | moa normalized [95%] | moa - regmean [95%] "
            "| test routing [95%] | least-routed task |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def _accuracy(router: dict) -> str:
    """A routing accuracy with its 95% interval over resampled prompts (results written before it had none)."""
    lo_hi = router.get("interval")
    return f"{router['accuracy']:.3f}" + (f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "")


def routing_table(found: dict) -> str:
    """How often the routed methods pick the gold task's adapter: MoA's router and Arrow's top choice, at the
    prompt's last position, over every (test prompt, adapted layer)."""
    rows = [f"| {m} | {_accuracy(res['router'])} | "
            + ", ".join(f"{t} {a:.2f}" for t, a in res["router"]["per_task"].items()) + " |"
            for m, res in found.items() if "router" in res]
    if not rows:
        return ""
    return ("\n**Routing: the gold task's adapter chosen** (per (test prompt, layer), at the prompt's last position)"
            "\n\n| method | accuracy [95%] | per task |\n|---|---|---|\n" + "\n".join(rows) + "\n")


def merge_table(found: dict) -> str:
    """How each merge was made: its parameters, how they were chosen (grid on validation loss, learned on train
    rows, or defaults), and the time it took (selection or fitting included)."""
    rows = []
    for m, res in found.items():
        info = res.get("merge") or res.get("arrow")
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
            given = (res.get("settings", {}).get("merge_params") or {}).get(registry.split_rank(m)[0], {})
            how = (f"given ({', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in given.items())}"
                   ", by --set), the rest the method's defaults" if given else "the method's defaults")
        rows.append(f"| {m} | {params or '-'} | {how} | {info['seconds']:.1f} |")
    if not rows:
        return ""
    what = "Merges and Arrow" if any("arrow" in res for res in found.values()) else "Merges"
    return (f"\n**{what}: parameters and how they were chosen** (never on test rows)\n\n"
            "| method | parameters | chosen by | seconds |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


NO_CORE = {"factors": "on the factors, exact", "data": "learned on rows after the training rows"}


def method_table() -> str:
    """The README's method table, from the registry (a test keeps the README in step with it)."""
    lines = ["| method | paper | merged update | parameters (default; grid searched on validation rows) | output "
             "| core space vs dense |", "|---|---|---|---|---|---|"]
    for name, m in registry.METHODS.items():
        params = "; ".join(f"{k}={p.default}" + (f" ({', '.join(map(str, p.grid))})" if p.grid else "")
                           for k, p in m.params.items()) or "none"
        if m.mean:
            params += "; weights 1/n"
        opt = "" if m.default else " (option)"
        lines.append(f"| `{name}`{opt} | {m.paper} | `{m.formula}` | {params} | {m.output} | "
                     f"{m.exact or NO_CORE[m.space]} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the generated parts of README.md and REPORT.md
GENERATED = re.compile(r"(<!-- generated: (?P<key>[^>]+?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)
REPORTS = ("README.md", "results/REPORT.md")   # the documents whose generated parts `python -m src.reporting` refills


def headline_table(model_dir: Path, analyses: Analyses | None = None) -> str:
    """Per method, the normalized score with its 95% interval on 5 and on 7 tasks, the paper's, and the paired
    difference from MoA on 7 tasks: the front page's table, from the result files of one model."""
    sets, analyses = {}, analyses or Analyses()
    for n in (5, 7):
        analysis = analyses(model_dir / f"{n}-task")
        if analysis:
            found, _, ci = analysis
            sets[n] = (found, ci, normalized_points(found), paper_normalized(found["single"]["tasks"]))
    methods = [m for m in ordered(m for s in sets.values() for m in s[2]) if any(s[2].get(m) is not None
                                                                             for s in sets.values())]
    header, rows = ["method"], []
    for n, (_, _, _, paper) in sets.items():
        header += [f"{n} tasks [95%]"] + [f"paper {model}" for model in paper]
    if 7 in sets:
        header.append("7 tasks: - MoA [95%]")
    for m in methods:
        cells = [m]
        for n, (found, ci, points, paper) in sets.items():
            point = points.get(m)
            cells.append(_fmt((point, ci[m]["normalized"])) if point is not None else "n/a")
            cells += [_fmt(paper[model].get(m)) for model in paper]
        if 7 in sets:
            found, ci, points, _ = sets[7]
            gap = ci.get(m, {}).get("normalized_diff", {}).get("moa")
            cells.append("" if m in ("moa", "single") or points.get(m) is None or gap is None
                         else f"{points[m] - points['moa']:+.3f} [{gap[0]:+.3f}, {gap[1]:+.3f}]")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + rows)


FRONT_METHODS = ("base", "single", "moa", "regmean", None, "svd", "concat")   # None: the best other routing-free merge
ROUTED = ("base", "majority", "single", "moa", "arrow")                       # not a merge into one LoRA


def front_table(model_dir: Path, analyses: Analyses | None = None, retrained: bool = False) -> str:
    """The README's first table: per method, the normalized score on 7 tasks of seed 0 with its 95% row interval, the
    mean and SD over the training seeds, the 5-task score of seed 0, and the paper's. retrained: from the retrained
    seeds (`retrained-seed<N>`, this repository's machine, the current presets) instead of the committed run and its
    seeds. The best other routing-free merge is the one of highest mean over the committed run's seeds among those
    run on every one of them (RegMean and the paper's merges aside): they are where every merge was run."""
    analyses = analyses or Analyses()
    spread = seed_spread(model_dir, analyses, retrained=retrained)
    committed_spread = seed_spread(model_dir, analyses) if retrained else spread
    sets = {}
    for n in (7, 5):
        folder = seed_runs(model_dir, n, retrained).get(0)
        analysis = analyses(folder) if folder else None
        if analysis and "single" in analysis[0]:
            found, _, ci = analysis
            sets[n] = (normalized_points(found), ci, paper_normalized(found["single"]["tasks"]).get("Qwen2-1.5B", {}))
        else:
            sets[n] = ({}, {}, {})
    seeds, committed_seeds = len(seed_runs(model_dir, 7, retrained)), len(seed_runs(model_dir))
    others = [m for m, v in committed_spread.items() if m not in ROUTED + ("regmean", "svd", "concat", "weight_sum")
              and registry.split_rank(m)[1] is None and len(v["points"]) == committed_seeds]   # exact merges only
    best = max(others, key=lambda m: committed_spread[m]["mean"]) if others else None
    rows = [f"| method | 7 tasks, seed 0 [95%] | 7 tasks, mean (SD) over {seeds} seeds | 5 tasks, seed 0 [95%] | "
            "paper Qwen2-1.5B, 7 tasks / 5 tasks |", "|---|---|---|---|---|"]
    for m in FRONT_METHODS:
        m = best if m is None else m
        if m is None:
            continue
        cells = []
        for n in (7, 5):
            points, ci, _ = sets[n]
            cells.append(_fmt((points[m], ci[m]["normalized"])) if points.get(m) is not None else "n/a")
        v = spread.get(m)
        seeds_cell = (f"{v['mean']:.3f} ({v['sd']:.3f})" if v and len(v["points"]) == seeds
                      else f"{v['mean']:.3f} ({v['sd']:.3f}) on {len(v['points'])} of {seeds} seeds" if v
                      else "seed 0 only" if sets[7][0].get(m) is not None else "n/a")
        paper = " / ".join(_fmt(sets[n][2].get(m)) for n in (7, 5))
        label = f"{m} (best other merge)" if m == best else m
        rows.append(f"| {label} | {cells[0]} | {seeds_cell} | {cells[1]} | {paper} |")
    return "\n".join(rows)


def generated(key: str, root: Path, analyses: Analyses | None = None) -> str:
    """The text of one generated part: `headline <model folder>`, `front <model folder>` (`front-retrained <model
    folder>`: from the retrained seeds), `summary <results
    folder>`, `seeds <model folder>` (the training seeds), `retrained <model folder>` (the retrained seeds),
    `methods` (the registry's table), or `file <path>` (a file another tool generates from its own measurements)."""
    kind, _, arg = key.partition(" ")
    if kind == "headline":
        return headline_table(root / arg, analyses)
    if kind in ("front", "front-retrained"):
        return front_table(root / arg, analyses, retrained=kind == "front-retrained")
    if kind == "summary":
        return summary_files(root / arg, analyses)[0].rstrip("\n")
    if kind == "methods":
        return method_table()
    if kind in ("seeds", "retrained"):
        return seeds_table(root / arg, analyses, retrained=kind == "retrained")
    if kind == "file":  # its own title line, if any, becomes bold text under the document's heading
        text = (root / arg).read_text()
        if text.startswith("# "):
            title, _, rest = text[2:].partition("\n")
            text = f"**{title}**\n{rest}"
        return text.rstrip("\n")
    raise ValueError(f"unknown generated part {key!r}")


def fill(text: str, root: Path, analyses: Analyses | None = None) -> str:
    """`text` with every generated part rebuilt from the files under `root`; the prose around them is kept."""
    analyses = analyses or Analyses()
    return GENERATED.sub(lambda m: m.group(1) + generated(m.group("key"), root, analyses) + "\n" + m.group(4), text)


def main(root: Path = ROOT):
    """Rebuild every results folder's summary, then the generated parts of the README and REPORT.md."""
    analyses = Analyses()
    for folder in (sorted(Path(root).glob("results/*/*-task")) + sorted(Path(root).glob("results/*/seeds/*/*-task"))
                   + sorted(Path(root).glob("results/*/retrained-*/*-task"))):
        write_summary(folder, analyses)
    for name in REPORTS:
        path = Path(root) / name
        if not path.exists():   # a scratch results root (scripts/update_results.sh in the tests) has no reports
            continue
        atomic_write(path, lambda p, text=fill(path.read_text(), Path(root), analyses): p.write_text(text))
        print(f"refilled the generated parts of {name}")


if __name__ == "__main__":
    main()
