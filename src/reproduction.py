"""Did a run reproduce the committed results? `make reproduce` runs the three stages into a folder of its own
(runs/reproduce/ by default, out of git) and then calls this module, which compares that run's results with the
committed ones, method by method and task set by task set, from the files alone (summary.csv and the predictions):

    python -m src.reproduction --committed results/smollm2-135m/retrained-seed0 --committed results/smollm2-135m \
        --run runs/reproduce/results/smollm2-135m

`make reproduce` gives two committed folders: retrained seed 0 (the paper's methods, trained with the current code
and presets, MoA's routers included) first, then the first committed run (every method, adapters of an earlier
session, MoA's routers with the previous preset); each method is compared with the first that has it, against
that folder's interval (normalized by that folder's own single, as this run's score is by this run's).

For each method: the committed normalized score and its 95% row interval, this run's score, the difference, whether
this run's score lies inside the committed interval, and how many test predictions differ. Where the committed
interval has no width (single is 1 by definition; majority has no normalized score) the check is per task instead:
every task's primary metric inside the committed interval of that task. The verdict is "reproduced" when every
method compared lies inside, "reproduced exactly" when every prediction is also the same, "not reproduced"
otherwise (a method outside, or one asked for but missing from the run); the exit code is 0, 0 and 1.
MoA is compared with the first committed folder whose routers were trained with this run's router settings (each
side's record: train_logs/moa-<n>.json beside its results); where none was, it is shown against the first that has
it and not compared (other settings, or none recorded), and the verdict names it.

Why an interval and not equality: the same commit trains adapters with other bytes on another CPU (floating-point
rounding follows the vector width), which moves a few predictions; a score inside the committed row interval is a
difference the 100 test rows cannot tell from the committed one."""
import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .layout import router_log

TASK_SETS = ("7-task", "5-task")
REL_TOL = 1e-9   # a score equal to an interval's end up to float rounding counts as inside


@dataclass
class Check:
    """One method on one task set."""
    task_set: str
    method: str
    status: str                            # identical, inside, OUTSIDE, not in this run, no committed result
    committed: tuple | None = None         # (normalized, lo, hi) or None
    ours: float | None = None              # this run's normalized score
    tasks_inside: tuple | None = None      # (inside, of) where the check is per task
    differing: tuple | None = None         # (predictions that differ, committed predictions)
    committed_in: Path | None = None       # the committed folder compared with, where several were given

    @property
    def failed(self) -> bool:
        return self.status in ("OUTSIDE", "not in this run")


def _number(cell: str) -> float | None:
    return float(cell) if cell not in ("", None) else None


def read_summary(folder: Path) -> dict:
    """{method: {column: float or None}} from a results folder's summary.csv ({} if it has none)."""
    path = folder / "summary.csv"
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        return {row["method"]: {k: _number(v) for k, v in row.items() if k != "method"} for row in csv.DictReader(f)}


def _scored_columns(row: dict) -> list[str]:
    """The columns with an interval: each task's primary metric and the normalized score."""
    return [c for c in row if f"{c} lo" in row and f"{c} hi" in row]


def _inside(x: float, lo: float, hi: float) -> bool:
    slack = REL_TOL * max(1.0, abs(lo), abs(hi))
    return lo - slack <= x <= hi + slack


def _predictions(path: Path) -> dict:
    with path.open() as f:
        return {(r["task"], r["index"]): r["prediction"] for r in map(json.loads, f)}


def differing_predictions(committed: Path, ours: Path) -> tuple | None:
    """(rows whose prediction differs or is missing in `ours`, committed rows), or None without both files."""
    if not (committed.exists() and ours.exists()):
        return None
    a, b = _predictions(committed), _predictions(ours)
    return sum(b.get(key) != pred for key, pred in a.items()), len(a)


def router_settings(model_dir: Path, task_set: str) -> dict | None:
    """The router_* settings MoA's routers for `task_set` were trained with (train_moa's record in the model folder's
    train_logs/moa-<n>.json), or None without a record."""
    path = router_log(model_dir, int(task_set.split("-")[0]))
    if not path.exists():
        return None
    return {k: v for k, v in json.loads(path.read_text()).get("config", {}).items() if k.startswith("router_")}


def check_method(task_set: str, method: str, committed: dict | None, ours: dict | None,
                 differing: tuple | None, other_settings: str = "") -> Check:
    if ours is None:
        return Check(task_set, method, "not in this run")
    if committed is None:
        return Check(task_set, method, "no committed result", ours=ours.get("normalized"))
    point, lo, hi = committed.get("normalized"), committed.get("normalized lo"), committed.get("normalized hi")
    if other_settings:   # two settings' results, shown: a difference would say nothing about reproducing either
        return Check(task_set, method, f"not compared: {other_settings}", ours=ours.get("normalized"),
                     committed=(point, lo, hi) if point is not None else None, differing=differing)
    check = Check(task_set, method, "", committed=(point, lo, hi) if point is not None else None,
                  ours=ours.get("normalized"), differing=differing)
    if point is not None and lo is not None and hi is not None and hi > lo and check.ours is not None:
        inside = _inside(check.ours, lo, hi)
    else:   # no width to test against: each task's score inside its own committed interval
        tasks = [c for c in _scored_columns(committed) if c != "normalized" and committed[c] is not None]
        hits = [ours.get(c) is not None and _inside(ours[c], committed[f"{c} lo"], committed[f"{c} hi"])
                for c in tasks]
        check.tasks_inside = (sum(hits), len(hits))
        inside = bool(hits) and all(hits)   # nothing scored to compare is no reproduction
    check.status = ("identical" if inside and differing is not None and differing[0] == 0
                    else "inside" if inside else "OUTSIDE")
    return check


def _folders(dirs: Path | list[Path]) -> list[Path]:
    return [Path(dirs)] if isinstance(dirs, (str, Path)) else [Path(d) for d in dirs]


def _routers_differ(theirs: dict | None, mine: dict | None) -> str:
    """Why MoA's results on two sides are not comparable ("" where they are): the routers were trained with other
    settings, or the committed side records none."""
    changed = sorted(k for k in (mine or {}) if theirs is not None and theirs.get(k) != mine[k])
    if changed:
        return "routers trained with other settings (" + ", ".join(f"{k} {theirs.get(k)} -> {mine[k]}"
                                                                   for k in changed) + ")"
    if theirs is None and mine is not None:
        return "the committed routers' settings are not recorded (no train_logs/moa-<n>.json beside them)"
    return ""


def compare(committed_dirs: Path | list[Path], run_dir: Path, methods: list[str] | None = None) -> list[Check]:
    """Every method of `methods` (default: those the run has) on each task set, against the committed results of the
    same model (`results/<model>` folders). Several committed folders: each method is compared with the first that
    has it, MoA with the first whose routers were trained with this run's router settings (else the first that has
    it, not compared). With `methods` given, a task set committed but absent from the run counts its methods as
    missing; without, only the run's task sets are compared."""
    committed_dirs = _folders(committed_dirs)
    checks = []
    for task_set in TASK_SETS:
        ours_folder = Path(run_dir) / task_set
        ours = read_summary(ours_folder)
        sides = [(d, read_summary(d / task_set)) for d in committed_dirs]
        if not ours and not (methods and any(c for _, c in sides)):   # neither side has it, or the run was not asked
            continue
        mine = router_settings(run_dir, task_set)
        for method in methods or list(ours):
            having = [(d, c) for d, c in sides if method in c]
            where, committed, other = (*having[0], "") if having else (None, {}, "")
            if method == "moa" and having:   # the first folder whose routers share this run's settings, if any
                reasons = [_routers_differ(router_settings(d, task_set), mine) for d, _ in having]
                match = reasons.index("") if "" in reasons else 0
                where, committed, other = *having[match], reasons[match]
            differing = (differing_predictions(where / task_set / f"{method}.predictions.jsonl",
                                               ours_folder / f"{method}.predictions.jsonl") if where else None)
            check = check_method(task_set, method, committed.get(method), ours.get(method), differing, other)
            check.committed_in = where if len(committed_dirs) > 1 else None
            checks.append(check)
    return checks


def verdict(checks: list[Check]) -> tuple[bool, str]:
    """(reproduced?, the one-line verdict)."""
    compared = [c for c in checks if c.status in ("identical", "inside", "OUTSIDE")]
    outside = [f"{c.method} ({c.task_set})" for c in checks if c.status == "OUTSIDE"]
    missing = [f"{c.method} ({c.task_set})" for c in checks if c.status == "not in this run"]
    new = [f"{c.method} ({c.task_set})" for c in checks if c.status == "no committed result"]
    other = [f"{c.method} ({c.task_set})" for c in checks if c.status.startswith("not compared")]
    extra = ((f"; no committed result to compare for {', '.join(new)}" if new else "")
             + (f"; not compared (router settings other than, or not recorded beside, the committed result's): "
                f"{', '.join(other)}" if other else ""))
    if not compared and not missing:
        return False, ("not reproduced: nothing committed to compare with" if new
                       else "not reproduced: nothing to compare (the run has no summary.csv)") + extra
    if outside or missing:
        parts = ([f"outside the committed 95% interval: {', '.join(outside)}"] if outside else []) + \
                ([f"missing in this run: {', '.join(missing)}"] if missing else [])
        return False, "not reproduced: " + "; ".join(parts) + extra
    counted = [c.differing for c in compared if c.differing is not None]
    differ, total = sum(d[0] for d in counted), sum(d[1] for d in counted)
    if all(c.status == "identical" for c in compared):
        return True, (f"reproduced exactly: all {len(compared)} method results inside the committed intervals, "
                      f"every one of {total:,} predictions identical" + extra)
    return True, (f"reproduced: all {len(compared)} method results inside the committed 95% intervals "
                  f"({sum(c.status == 'identical' for c in compared)} identical in every prediction; "
                  f"{differ:,} of {total:,} predictions differ)" + extra)


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def report(checks: list[Check], committed_dirs: Path | list[Path], run_dir: Path) -> str:
    ok, line = verdict(checks)
    committed_dirs = _folders(committed_dirs)
    where = any(c.committed_in for c in checks)
    rows = ["| task set | method | committed [95%] | this run | difference | inside | predictions differing |"
            + (" committed in |" if where else ""), "|---|---|---|---|---|---|---|" + ("---|" if where else "")]
    for c in checks:
        committed = f"{_f(c.committed[0])} [{_f(c.committed[1])}, {_f(c.committed[2])}]" if c.committed else "n/a"
        diff = (f"{c.ours - c.committed[0]:+.3f}" if c.committed and c.ours is not None and c.committed[0] is not None
                else "n/a")
        inside = {"identical": "yes", "inside": "yes", "OUTSIDE": "**no**"}.get(c.status, c.status)
        if c.tasks_inside and inside in ("yes", "**no**"):
            inside += f" ({c.tasks_inside[0]}/{c.tasks_inside[1]} tasks)"
        differing = f"{c.differing[0]} of {c.differing[1]}" if c.differing else "n/a"
        rows.append(f"| {c.task_set} | {c.method} | {committed} | {_f(c.ours)} | {diff} | {inside} | {differing} |"
                    + (f" {c.committed_in or 'n/a'} |" if where else ""))
    against = ", then ".join(map(str, committed_dirs))
    return (f"# Reproduction: {run_dir} against {against}\n\n" + "\n".join(rows) + "\n\n"
            "Normalized score (mean over tasks of method / single) and the committed 95% paired bootstrap row "
            "interval; where that interval has no width (single, majority) each task's score is checked against "
            "its own committed interval instead. Predictions: test rows whose generated text differs."
            + (" Committed in: the committed folder a row is compared with, the first that has the method (for MoA, "
               "the first whose routers share this run's settings)." if where else "") + "\n\n"
            f"**Verdict: {line}**\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--committed", required=True, type=Path, action="append",
                   help="a committed results/<model> folder; repeated: each method against the first that has it")
    p.add_argument("--run", required=True, type=Path, help="this run's results/<model> folder")
    p.add_argument("--methods", default="", help="comma-separated methods the run was asked for (default: its own)")
    p.add_argument("--out", type=Path, default=None, help="where to write the report (default: <run>/reproduction.md)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m] or None
    checks = compare(args.committed, args.run, methods)
    text = report(checks, args.committed, args.run)
    out = args.out or args.run / "reproduction.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text + f"\n(written to {out})")
    return 0 if verdict(checks)[0] else 1


if __name__ == "__main__":
    sys.exit(main())
