"""`make reproduce`'s check (src/reproduction.py) on small fake result folders: identical, inside the committed
interval, outside it, a method missing on either side, and single's per-task check."""
import csv
import json

import pytest

from src import reproduction

HEADER = ["method", "qa (f1)", "qa (f1) lo", "qa (f1) hi", "nli (accuracy)", "nli (accuracy) lo",
          "nli (accuracy) hi", "normalized", "normalized lo", "normalized hi", "paper Qwen2-1.5B"]


def write_folder(folder, scores: dict, predictions: dict):
    """scores: {method: (qa, nli, normalized)}, every interval +-0.05 around its point (single's normalized: [1, 1]);
    predictions: {method: [text per row]} over two tasks of len/2 rows each."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for method, (qa, nli, norm) in scores.items():
            norm_ci = [1.0, 1.0] if method == "single" else [norm - 0.05, norm + 0.05]
            w.writerow([method, qa, qa - 5, qa + 5, nli, nli - 0.05, nli + 0.05, norm, *norm_ci, ""])
    for method, texts in predictions.items():
        half = len(texts) // 2
        rows = [{"task": "qa" if i < half else "nli", "index": i % half, "prediction": t, "references": ["x"]}
                for i, t in enumerate(texts)]
        (folder / f"{method}.predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


COMMITTED = {"single": (50.0, 0.40, 1.0), "moa": (48.0, 0.38, 0.95), "svd": (30.0, 0.10, 0.70)}
TEXTS = {m: [f"{m} {i}" for i in range(10)] for m in COMMITTED}


def record(folder, rows):
    """train_moa's record of the router settings beside a results folder."""
    (folder / "train_logs").mkdir(parents=True, exist_ok=True)
    (folder / "train_logs" / "moa-7.json").write_text(json.dumps(
        {"config": {"router_rows": rows, "router_epochs": 3, "seed": 0, "lr": 0.1}}))


@pytest.fixture
def committed(tmp_path):
    write_folder(tmp_path / "committed" / "7-task", COMMITTED, TEXTS)
    return tmp_path / "committed"


def test_an_identical_run_is_reproduced_exactly(committed, tmp_path):
    write_folder(tmp_path / "run" / "7-task", COMMITTED, TEXTS)
    checks = reproduction.compare(committed, tmp_path / "run")
    assert [(c.method, c.status, c.differing) for c in checks] == [(m, "identical", (0, 10)) for m in COMMITTED]
    ok, line = reproduction.verdict(checks)
    assert ok and line.startswith("reproduced exactly") and "30 predictions identical" in line.replace(",", "")


def test_a_run_inside_the_intervals_is_reproduced_and_counts_the_differing_predictions(committed, tmp_path):
    scores = {**COMMITTED, "moa": (47.0, 0.39, 0.99)}          # 0.99 inside [0.90, 1.00]
    texts = {**TEXTS, "moa": ["changed"] * 3 + TEXTS["moa"][3:]}
    write_folder(tmp_path / "run" / "7-task", scores, texts)
    checks = {c.method: c for c in reproduction.compare(committed, tmp_path / "run")}
    assert checks["moa"].status == "inside" and checks["moa"].differing == (3, 10)
    assert checks["moa"].ours - checks["moa"].committed[0] == pytest.approx(0.04)
    ok, line = reproduction.verdict(list(checks.values()))
    assert ok and line.startswith("reproduced:") and "3 of 30 predictions differ" in line
    text = reproduction.report(list(checks.values()), committed, tmp_path / "run")
    assert "| 7-task | moa | 0.950 [0.900, 1.000] | 0.990 | +0.040 | yes | 3 of 10 |" in text


def test_a_score_outside_its_interval_is_not_reproduced_and_named(committed, tmp_path):
    write_folder(tmp_path / "run" / "7-task", {**COMMITTED, "svd": (30.0, 0.10, 0.76)}, TEXTS)  # 0.76 > 0.75
    checks = reproduction.compare(committed, tmp_path / "run")
    ok, line = reproduction.verdict(checks)
    assert not ok and line == "not reproduced: outside the committed 95% interval: svd (7-task)"
    assert "| **no** |" in reproduction.report(checks, committed, tmp_path / "run")


def test_single_is_checked_per_task_since_its_normalized_interval_has_no_width(committed, tmp_path):
    write_folder(tmp_path / "run" / "7-task", {**COMMITTED, "single": (56.0, 0.40, 1.0)}, TEXTS)  # qa 56 > 55
    single = next(c for c in reproduction.compare(committed, tmp_path / "run") if c.method == "single")
    assert single.status == "OUTSIDE" and single.tasks_inside == (1, 2)


def test_a_method_missing_on_either_side(committed, tmp_path):
    run = {**COMMITTED, "ties": (40.0, 0.2, 0.8)}
    del run["svd"]
    write_folder(tmp_path / "run" / "7-task", run, TEXTS)
    # asked for svd and ties: svd is missing from the run (a failure), ties has nothing committed (named, not a failure)
    checks = {c.method: c for c in reproduction.compare(committed, tmp_path / "run", ["single", "moa", "svd", "ties"])}
    assert checks["svd"].status == "not in this run" and checks["ties"].status == "no committed result"
    ok, line = reproduction.verdict(list(checks.values()))
    assert not ok and "missing in this run: svd (7-task)" in line and "no committed result to compare for ties" in line
    # without the list, the run's own methods: ties is named but the rest reproduces
    ok, line = reproduction.verdict(reproduction.compare(committed, tmp_path / "run"))
    assert ok and line.endswith("no committed result to compare for ties (7-task)")


def test_main_writes_the_report_and_exits_1_when_not_reproduced(committed, tmp_path, capsys):
    write_folder(tmp_path / "run" / "7-task", {**COMMITTED, "moa": (48.0, 0.38, 0.5)}, TEXTS)
    assert reproduction.main(["--committed", str(committed), "--run", str(tmp_path / "run")]) == 1
    written = (tmp_path / "run" / "reproduction.md").read_text()
    assert "**Verdict: not reproduced" in written and written in capsys.readouterr().out
    write_folder(tmp_path / "run2" / "7-task", COMMITTED, TEXTS)
    assert reproduction.main(["--committed", str(committed), "--run", str(tmp_path / "run2")]) == 0


def test_moa_is_not_compared_with_routers_trained_otherwise_or_unrecorded(committed, tmp_path):
    """MoA's routers trained with other router settings than the committed ones (each side's
    train_logs/moa-<n>.json), or committed without a record, make two settings' results: MoA is shown, not
    compared, and named in the verdict, which the other methods still decide. Same recorded settings compare."""
    scores = {**COMMITTED, "moa": (40.0, 0.30, 0.80)}        # outside [0.90, 1.00]
    write_folder(tmp_path / "run" / "7-task", scores, TEXTS)

    record(tmp_path / "run", 400)
    for committed_rows, status in ((None, "not compared: the committed routers' settings are not recorded"),
                                   (48, "not compared: routers trained with other settings (router_rows 48 -> 400)"),
                                   (400, "OUTSIDE")):
        if committed_rows is not None:
            record(committed, committed_rows)
        checks = {c.method: c for c in reproduction.compare(committed, tmp_path / "run")}
        assert checks["moa"].status.startswith(status) and checks["svd"].status == "identical"
        ok, line = reproduction.verdict(list(checks.values()))
        if status == "OUTSIDE":
            assert not ok and "outside the committed 95% interval: moa (7-task)" in line
        else:
            assert ok and line.endswith("not recorded beside, the committed result's): moa (7-task)")
            assert "| 7-task | moa | 0.950 [0.900, 1.000] | 0.800 | -0.150 | not compared: " in reproduction.report(
                list(checks.values()), committed, tmp_path / "run")


def test_several_committed_folders_each_method_against_the_first_that_has_it(committed, tmp_path):
    """`make reproduce` gives retrained seed 0 (the paper's methods, recorded routers) first and the committed run
    (every method, unrecorded routers) second: MoA and svd are compared with the first, ties, which only the second
    has, with the second; MoA under other router settings than the first's falls through to a folder whose routers
    match, and where none does it is shown against the first that has it, not compared."""
    first = tmp_path / "retrained"
    write_folder(first / "7-task", {**COMMITTED, "moa": (40.0, 0.30, 0.80)}, TEXTS)
    write_folder(committed / "7-task", {**COMMITTED, "ties": (20.0, 0.05, 0.50)}, {**TEXTS, "ties": TEXTS["svd"]})
    record(first, 400)
    write_folder(tmp_path / "run" / "7-task", {**COMMITTED, "moa": (40.0, 0.30, 0.80), "ties": (20.0, 0.05, 0.50)},
                 {**TEXTS, "ties": TEXTS["svd"]})
    record(tmp_path / "run", 400)
    checks = {c.method: c for c in reproduction.compare([first, committed], tmp_path / "run")}
    assert {m: (c.committed_in, c.status) for m, c in checks.items()} == {
        "single": (first, "identical"), "moa": (first, "identical"), "svd": (first, "identical"),
        "ties": (committed, "identical")}
    assert checks["moa"].committed == pytest.approx((0.80, 0.75, 0.85))
    text = reproduction.report(list(checks.values()), [first, committed], tmp_path / "run")
    assert f"against {first}, then {committed}" in text
    assert f"| 7-task | ties | 0.500 [0.450, 0.550] | 0.500 | +0.000 | yes | 0 of 10 | {committed} |" in text

    record(tmp_path / "run", 48)     # routers of other settings than either side's: shown against the first
    moa = next(c for c in reproduction.compare([first, committed], tmp_path / "run") if c.method == "moa")
    assert moa.committed_in == first and moa.status.startswith("not compared: routers trained with other settings")
    record(committed, 48)            # the second folder's routers match: compared there
    moa = next(c for c in reproduction.compare([first, committed], tmp_path / "run") if c.method == "moa")
    assert moa.committed_in == committed and moa.status == "OUTSIDE"
    assert moa.committed == pytest.approx((0.95, 0.90, 1.00))


def test_several_committed_folders_a_method_or_task_set_only_some_have(committed, tmp_path):
    """A method no committed folder has is named (no folder, no failure); a task set only the second folder has is
    compared there; asked-for methods of a task set the run lacks are missing, whichever folder commits them."""
    first = tmp_path / "retrained"
    write_folder(first / "7-task", COMMITTED, TEXTS)
    write_folder(committed / "5-task", COMMITTED, TEXTS)
    write_folder(tmp_path / "run" / "7-task", {**COMMITTED, "ties": (20.0, 0.05, 0.50)}, TEXTS)
    write_folder(tmp_path / "run" / "5-task", COMMITTED, TEXTS)
    checks = {(c.task_set, c.method): c for c in reproduction.compare([first, committed], tmp_path / "run")}
    assert (checks["7-task", "ties"].status, checks["7-task", "ties"].committed_in) == ("no committed result", None)
    assert {c.committed_in for (n, _), c in checks.items() if n == "5-task"} == {committed}
    assert {c.committed_in for (n, m), c in checks.items() if n == "7-task" and m != "ties"} == {first}
    assert reproduction.verdict(list(checks.values())) == (True, "reproduced exactly: all 6 method results inside "
                                                           "the committed intervals, every one of 60 predictions "
                                                           "identical; no committed result to compare for ties "
                                                           "(7-task)")
    (tmp_path / "run" / "5-task" / "summary.csv").unlink()
    checks = reproduction.compare([first, committed], tmp_path / "run", ["single", "svd"])
    assert [(c.task_set, c.method, c.status, c.committed_in) for c in checks if c.task_set == "5-task"] == [
        ("5-task", "single", "not in this run", committed), ("5-task", "svd", "not in this run", committed)]
