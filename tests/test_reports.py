"""The committed reports cannot drift from the result files: every generated part of README.md and results/REPORT.md
equals a fresh generation from results/, and so does every committed summary.md / summary.csv."""
import csv
from pathlib import Path

import pytest

from src import reporting
from src.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", reporting.REPORTS)
def test_generated_parts_equal_a_fresh_generation(name):
    text = (ROOT / name).read_text()
    keys = [m.group("key") for m in reporting.GENERATED.finditer(text)]
    assert keys, f"{name} has no generated part"
    assert reporting.fill(text, ROOT) == text, f"{name} is stale: run `make report` and commit it"


def test_the_front_page_and_the_report_hold_the_headline_and_the_registry():
    readme, report = (ROOT / "README.md").read_text(), (ROOT / "results/REPORT.md").read_text()
    assert "<!-- generated: front-retrained results/smollm2-135m -->" in readme.split("## Run it")[0]  # first screen
    assert "<!-- generated: headline results/smollm2-135m -->" in report
    assert "<!-- generated: methods -->" in report
    for n in (5, 7):
        assert f"<!-- generated: summary results/smollm2-135m/{n}-task -->" in report


def test_the_front_table_of_the_retrained_seeds_reads_retrained_seed_0_and_their_mean():
    """The README's table: seed 0's cells from retrained-seed0's summaries (7 and 5 tasks), the mean over the
    retrained seeds' own summaries; not the committed run's."""
    model_dir = ROOT / "results" / "smollm2-135m"
    table = reporting.front_table(model_dir, retrained=True)

    def normalized(folder, method):
        with (folder / "summary.csv").open(newline="") as f:
            return next(float(r["normalized"]) for r in csv.DictReader(f) if r["method"] == method)

    seeds = sorted(model_dir.glob("retrained-seed[0-9]/7-task"))
    assert len(seeds) == 3 and f"over {len(seeds)} seeds" in table
    mean = sum(normalized(f, "moa") for f in seeds) / len(seeds)
    row = next(line for line in table.splitlines() if line.startswith("| moa |"))
    seed0 = model_dir / "retrained-seed0"
    assert row.startswith(f"| moa | {normalized(seed0 / '7-task', 'moa'):.3f} [") and f"| {mean:.3f} (" in row
    assert f"| {normalized(seed0 / '5-task', 'moa'):.3f} [" in row


def test_the_front_tables_best_other_merge_is_chosen_on_the_committed_seeds_and_shown_on_the_retrained(tmp_path):
    """Two committed seeds where Iso-C beats CAT and two retrained seeds where Iso-C is scaled down below CAT: the
    retrained front table still names Iso-C the best other merge (chosen where every merge ran) with the retrained
    seeds' numbers, and has no CAT row; the committed front table names Iso-C with the committed numbers."""
    import json

    committed = ROOT / "results" / "smollm2-135m" / "7-task"
    methods = ("single", "moa", "svd", "regmean", "cat", "iso_c")
    folders = {(False, 0): tmp_path / "7-task", (False, 1): tmp_path / "seeds" / "seed1" / "7-task",
               (True, 0): tmp_path / "retrained-seed0" / "7-task", (True, 1): tmp_path / "retrained-seed1" / "7-task"}
    for (retrained, seed), folder in folders.items():
        folder.mkdir(parents=True)
        for m in methods:
            res = json.loads((committed / f"{m}.json").read_text())
            if m == "iso_c" and retrained:
                for t, d in res["metrics"].items():
                    d[get_task(t).primary] *= 0.7
            (folder / f"{m}.json").write_text(json.dumps(res))
    spread = {r: reporting.seed_spread(tmp_path, retrained=r) for r in (False, True)}
    assert spread[False]["iso_c"]["mean"] > spread[False]["cat"]["mean"]
    assert spread[True]["iso_c"]["mean"] < spread[True]["cat"]["mean"]
    for retrained in (False, True):
        table = reporting.front_table(tmp_path, retrained=retrained)
        row = next(line for line in table.splitlines() if "(best other merge)" in line)
        mean = spread[retrained]["iso_c"]["mean"]
        assert row.startswith("| iso_c (best other merge) |") and f"| {mean:.3f} (" in row
        assert not any(line.startswith("| cat") for line in table.splitlines())


@pytest.mark.parametrize("folder", sorted((ROOT / "results").glob("*/*-task")) + sorted((ROOT / "results").glob(
    "*/seeds/*/*-task")) + sorted((ROOT / "results").glob("*/retrained-*/*-task")),
    ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_summaries_equal_a_fresh_generation(folder):
    """summary.md byte for byte; summary.csv cell for cell, its full-precision numbers to float rounding (the CPU
    sets the bootstrap's summation order: `reporting.csv_rounding_equal`)."""
    md, csv = reporting.summary_files(folder)
    assert (folder / "summary.md").read_text() == md
    committed = (folder / "summary.csv").read_bytes().decode()  # csv writes \r\n, which read_text would hide
    assert reporting.csv_rounding_equal(committed, csv), f"{folder}/summary.csv is stale: run `make report`"


def test_csv_rounding_equal_forgives_the_last_bits_only():
    row = "method,qa (f1),qa (f1) lo,paper\r\n{},{},{},{}\r\n"
    base = row.format("moa", 56.144751552795015, 0.015497061269112910, "")
    assert reporting.csv_rounding_equal(base, row.format("moa", 56.14475155279502, 0.015497061269112907, ""))
    for changed in (row.format("moa", 56.1447516, 0.015497061269112910, ""),      # the 9th significant digit
                    row.format("moa", 56.144751552795015, 0.0154971, ""),
                    row.format("svd", 56.144751552795015, 0.015497061269112910, ""),  # another method
                    row.format("moa", 56.144751552795015, 0.015497061269112910, "0.0"),  # a number for a blank
                    base.replace("\r\n", "\n"), base + "svd,1,1,\r\n"):
        assert not reporting.csv_rounding_equal(base, changed), changed


def test_make_report_on_another_cpu_leaves_a_rounding_equal_csv_alone(tmp_path):
    """write_summary keeps a summary.csv whose numbers differ from a fresh one in the last bit only, and replaces one
    that differs beyond rounding."""
    import math
    import shutil

    folder = tmp_path / "7-task"
    shutil.copytree(ROOT / "results" / "smollm2-135m" / "7-task", folder)
    fresh = reporting.summary_files(folder)[1]
    svd = next(line for line in fresh.split("\r\n") if line.startswith("svd,"))
    cell = svd.split(",")[-2]   # its normalized score's upper bound, a full-precision float
    for changed, kept in ((str(math.nextafter(float(cell), 2.0)), True), (str(float(cell) + 1e-6), False)):
        text = fresh.replace(svd, svd.replace(f",{cell},", f",{changed},"))
        assert text != fresh
        (folder / "summary.csv").write_bytes(text.encode())
        reporting.write_summary(folder)
        assert (folder / "summary.csv").read_bytes().decode() == (text if kept else fresh)


def test_a_stale_part_is_rebuilt_and_the_prose_kept():
    text = "intro\n<!-- generated: methods -->\nold table\n<!-- end generated -->\nprose\n"
    filled = reporting.fill(text, ROOT)
    assert filled.startswith("intro\n<!-- generated: methods -->\n| method |") and filled.endswith(
        "\n<!-- end generated -->\nprose\n") and "old table" not in filled


def test_the_seed_table_is_each_seeds_own_normalized_score_with_its_mean_spread_and_order(tmp_path):
    """Three seeds from the committed 7-task files: seed 1 scales SVD's scores by 0.9 on every task, seed 2 lifts
    them above RegMean's; Iso-CTS is not run on seed 2. Each seed is normalized to its own single; the mean, sample
    SD, min-max and places are recomputed here from the result files with `statistics`, and the table says that the
    leader changed. Iso-CTS's mean is over its two seeds, and it has no place (it would compete with a different
    field on seed 2)."""
    import json
    import shutil
    import statistics

    from src.tasks import get_task

    committed = ROOT / "results" / "smollm2-135m" / "7-task"
    methods = ("single", "moa", "svd", "regmean", "iso_cts")
    folders = {0: tmp_path / "7-task", 1: tmp_path / "seeds" / "seed1" / "7-task",
               2: tmp_path / "seeds" / "seed2" / "7-task"}
    scale = {0: 1.0, 1: 0.9, 2: 1.6}
    for seed, folder in folders.items():
        folder.mkdir(parents=True)
        for m in methods[:4] if seed == 2 else methods:
            res = json.loads((committed / f"{m}.json").read_text())
            if seed:
                del res["stats"]  # no per-row statistics: no interval for seeds 1 and 2, seed 0 keeps its own
            if m == "svd":
                for t, d in res["metrics"].items():
                    d[get_task(t).primary] *= scale[seed]
            (folder / f"{m}.json").write_text(json.dumps(res))
    shutil.copy(committed / "base.json", folders[0] / "base.json")

    def norm(seed, m):
        load = lambda name: json.loads((folders[seed] / f"{name}.json").read_text())["metrics"]  # noqa: E731
        mine, single = load(m), load("single")
        return statistics.mean(mine[t][get_task(t).primary] / single[t][get_task(t).primary] for t in single)

    spread = reporting.seed_spread(tmp_path)
    assert set(spread) == {"single", "moa", "svd", "regmean", "iso_cts"}  # base is on seed 0 only: not in the table
    for m in ("moa", "svd", "regmean", "iso_cts"):
        seeds = (0, 1) if m == "iso_cts" else (0, 1, 2)
        points = [norm(s, m) for s in seeds]
        assert list(spread[m]["points"]) == list(seeds)
        assert [spread[m]["points"][s] for s in seeds] == pytest.approx(points, abs=1e-12)
        assert spread[m]["mean"] == pytest.approx(statistics.mean(points), abs=1e-12)
        assert spread[m]["sd"] == pytest.approx(statistics.stdev(points), abs=1e-12)
        assert (spread[m]["min"], spread[m]["max"]) == pytest.approx((min(points), max(points)), abs=1e-12)
    assert spread["svd"]["points"][1] == pytest.approx(0.9 * spread["svd"]["points"][0], abs=1e-12)
    for s in (0, 1, 2):
        order = sorted(("moa", "svd", "regmean"), key=lambda m: -norm(s, m))
        assert [spread[m]["rank"][s] for m in order] == [1, 2, 3]
    assert spread["iso_cts"]["rank"] == {}
    assert spread["regmean"]["ci"][0] is not None and spread["regmean"]["ci"][1] is None
    table = reporting.seeds_table(tmp_path)
    assert ("the order of the routing-free merges scored on every seed is not the same on every seed (seed 0: regmean > "
            "svd; seed 1: regmean > svd; seed 2: svd > regmean). The leader among them changes: seed 0 regmean, seed "
            "1 regmean, seed 2 svd.") in table
    iso = next(line for line in table.splitlines() if line.startswith("| iso_cts | "))
    mean = statistics.mean([norm(0, "iso_cts"), norm(1, "iso_cts")])
    sd = statistics.stdev([norm(0, "iso_cts"), norm(1, "iso_cts")])
    lo, hi = sorted([norm(0, "iso_cts"), norm(1, "iso_cts")])
    assert iso.split(" | ")[3:] == ["no score", f"{mean:.3f} (2 seeds)", f"{sd:.3f}", f"{lo:.3f} - {hi:.3f}", "- |"]
    assert "Without a score on every seed: iso_cts (no score:" in table
    assert "Scored on one seed only, so not here: base." in table
    assert table.startswith("| method | seed 0 [95% rows] | seed 1 [95% rows] | seed 2 [95% rows] | mean | SD |")
    # the gap to MoA, one column per seed; only seed 0 has per-row statistics, so only it has an interval to count
    gap_rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.split("**Paired gap to MoA")[1].split("\n\n")[1].splitlines()
                if line.startswith("| ") and not line.startswith("| method")}
    assert set(gap_rows) == {"svd", "regmean", "iso_cts"}
    gap = statistics.mean([norm(s, "iso_cts") - norm(s, "moa") for s in (0, 1)])
    assert gap_rows["iso_cts"][3:] == ["no score", f"{gap:+.3f} (2 seeds)", "1 of 1 |"]  # seed 0: -0.05 [-0.13, +0.04]
    for m in gap_rows:
        seeds = (0, 1) if m == "iso_cts" else (0, 1, 2)
        assert [gap_rows[m][s + 1].split(" [")[0] for s in seeds] == [f"{norm(s, m) - norm(s, 'moa'):+.3f}" for s in seeds]
        assert "[" in gap_rows[m][1] and "[" not in gap_rows[m][2] + gap_rows[m][3]
    assert gap_rows["svd"][-1] == "0 of 1 |" and gap_rows["regmean"][-1] == "1 of 1 |"  # -0.30 [-0.37, -0.21]; -0.02 [-0.11, +0.07]
    # a folder under seeds/ that is not seed<N>, N >= 1, is no seed's run
    for stray in ("seed0", "seed1.bak", "seed01"):
        shutil.copytree(folders[2], tmp_path / "seeds" / stray / "7-task")
    assert reporting.seed_runs(tmp_path) == folders
    assert "Only seed 0" in reporting.seeds_table(tmp_path / "seeds" / "seed1")
    # MoA without a score on seed 1: the gap cells of that seed say so, and each gap mean counts its seeds
    (folders[1] / "moa.json").unlink()
    table = reporting.seeds_table(tmp_path)
    gap_rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.split("**Paired gap to MoA")[1].split("\n\n")[1].splitlines()
                if line.startswith("| ") and not line.startswith("| method")}
    assert gap_rows["regmean"][2] == "MoA n/a" and gap_rows["regmean"][4].endswith(" (2 seeds)")
    assert gap_rows["iso_cts"][2] == "MoA n/a" and gap_rows["iso_cts"][4].endswith(" (1 seed)")
    from src import plots
    fig = plots.fig_seeds(tmp_path)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == sorted(
        ["moa *", "svd", "regmean", "iso_cts *"], key=lambda label: -reporting.seed_spread(tmp_path)[label.split()[0]]["mean"])


def test_the_normalized_score_figure_shows_the_committed_scores():
    """The front page's figure (plots.fig_normalized), read back from its bars: one bar per method scored on every
    task, in table order, as high as the method's normalized score recomputed here from its per-task metrics and
    single's (the mean over tasks of metric / single's), and the paper's bar beside it."""
    from src import plots
    from src.metrics import normalized_score

    results = plots.load_results(ROOT / "results", "smollm2-135m")
    fig = plots.fig_normalized(results)
    for ax, n in zip(fig.axes, sorted(results)):
        methods = [t.get_text() for t in ax.get_xticklabels()]
        found = results[n]
        tasks = found["single"]["tasks"]
        assert methods == [m for m in found if set(found[m]["metrics"]) == set(tasks)] and "regmean" in methods
        ours, paper = [c for c in ax.containers if type(c).__name__ == "BarContainer"]   # ours, then the paper's
        for bar, m in zip(ours.patches, methods):
            ratios = [found[m]["primary"][t] / found["single"]["primary"][t] for t in tasks
                      if found["single"]["primary"][t]]
            want = normalized_score(found[m]["metrics"], found["single"]["metrics"],
                                    {t: get_task(t).primary for t in tasks})["mean"]
            assert bar.get_height() == pytest.approx(want, rel=1e-12) and want == pytest.approx(
                sum(ratios) / len(ratios), rel=1e-9), (n, m)
        paper_scores = reporting.paper_normalized(tasks)["Qwen2-1.5B"]
        for bar, m in zip(paper.patches, methods):
            assert bar.get_height() == pytest.approx(paper_scores.get(m) or 0, rel=1e-12), (n, m)


def test_a_rank_variant_is_compared_with_its_exact_merge_on_the_same_rows(tmp_path):
    """The summary's rank-budget table: a variant's normalized score beside its exact merge's, and their paired
    difference. Here the variant is RegMean's own file under the variant's name, with one task's rows scored as
    TIES scored them: the gap is that task's change, over 7 tasks, and its interval comes from the same resamples."""
    import json
    import shutil

    folder = tmp_path / "7-task"
    shutil.copytree(ROOT / "results" / "smollm2-135m" / "7-task", folder)
    regmean, ties = (json.loads((folder / f"{m}.json").read_text()) for m in ("regmean", "ties"))
    variant = {**regmean, "method": "regmean_r8",
               "metrics": {**regmean["metrics"], "nli": ties["metrics"]["nli"]},
               "primary": {**regmean["primary"], "nli": ties["primary"]["nli"]},
               "stats": {**regmean["stats"], "nli": ties["stats"]["nli"]}}
    (folder / "regmean_r8.json").write_text(json.dumps(variant))
    shutil.copy(folder / "regmean.predictions.jsonl", folder / "regmean_r8.predictions.jsonl")
    text = reporting.summary_files(folder)[0]
    row = next(line for line in text.splitlines() if line.startswith("| regmean_r8 | 8 |"))
    single = json.loads((folder / "single.json").read_text())   # the gap: nli's change / single's nli, over 7 tasks
    want = (ties["primary"]["nli"] - regmean["primary"]["nli"]) / single["primary"]["nli"] / 7
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "regmean" and cells[5].startswith(f"{want:+.3f} [")
    lo, hi = (float(x) for x in cells[5].split("[")[1].rstrip("]").split(","))
    assert lo <= want <= hi and lo < hi
    assert "| regmean_r8 |" not in reporting.summary_files(ROOT / "results" / "smollm2-135m" / "7-task")[0]


def test_the_rank_figure_shows_each_variant_at_its_rank_and_the_exact_merge_last(tmp_path):
    """plots.fig_rank read back: for RegMean, its rank variants at their ranks then the exact merge, each point at
    the normalized score the summary gives; a folder without variants has no figure."""
    import json
    import shutil

    from src import plots
    from src.metrics import normalized_score

    folder = tmp_path / "7-task"
    shutil.copytree(ROOT / "results" / "smollm2-135m" / "7-task", folder)
    assert plots.fig_rank(folder) is None
    regmean = json.loads((folder / "regmean.json").read_text())
    for k, task in ((16, "nli"), (8, "qa")):   # variants: RegMean's file with one task scored as TIES scored it
        ties = json.loads((folder / "ties.json").read_text())
        variant = {**regmean, "method": f"regmean_r{k}", "metrics": {**regmean["metrics"], task: ties["metrics"][task]},
                   "primary": {**regmean["primary"], task: ties["primary"][task]},
                   "stats": {**regmean["stats"], task: ties["stats"][task]}}
        (folder / f"regmean_r{k}.json").write_text(json.dumps(variant))
    fig = plots.fig_rank(folder)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16", "exact"]
    line = next(c for c in ax.containers if c.get_label() == "regmean").lines[0]   # the errorbar's data line
    single = json.loads((folder / "single.json").read_text())
    primary = {t: get_task(t).primary for t in single["tasks"]}
    want = [normalized_score(json.loads((folder / f"{m}.json").read_text())["metrics"], single["metrics"],
                             primary)["mean"] for m in ("regmean_r8", "regmean_r16", "regmean")]
    assert list(line.get_ydata()) == pytest.approx(want, rel=1e-12) and len(set(want)) == 3


def test_the_retrained_seeds_table_gives_each_rank_variants_gap_per_seed_and_moa_per_router_setting(tmp_path):
    """Retrained seeds (`retrained-seed<N>`) make a seed table of their own; a labelled sibling
    (`retrained-seed<N>-<label>`, the same adapters under other routers) is no seed. Seed 2 here is seed 0's files
    with RegMean's rank-8 variant scored on NLI as TIES scored it; each variant's gap to its exact merge per seed is
    recomputed from the per-task metrics, and MoA is listed per router setting with its routing accuracy."""
    import json
    import shutil
    import statistics

    source = ROOT / "results" / "smollm2-135m" / "retrained-seed0"
    for name in ("retrained-seed0", "retrained-seed2"):
        shutil.copytree(source, tmp_path / name)
    shutil.copytree(ROOT / "results" / "smollm2-135m" / "retrained-seed0-routers400", tmp_path / "retrained-seed0-routers400")
    seed2 = tmp_path / "retrained-seed2" / "7-task"
    variant = json.loads((seed2 / "regmean_r8.json").read_text())
    ties = json.loads((ROOT / "results" / "smollm2-135m" / "7-task" / "ties.json").read_text())
    for key in ("metrics", "primary"):
        variant[key]["nli"] = ties[key]["nli"]
    del variant["stats"]   # no per-row statistics: no interval on seed 2
    variant["parameters"] = 921_600   # only seed 2's file counts its parameters
    (seed2 / "regmean_r8.json").write_text(json.dumps(variant))
    assert reporting.seed_runs(tmp_path, retrained=True) == {0: tmp_path / "retrained-seed0" / "7-task", 2: seed2}
    assert reporting.seed_runs(tmp_path) == {}   # no committed run here

    def norm(folder, m):
        load = lambda name: json.loads((folder / f"{name}.json").read_text())["metrics"]  # noqa: E731
        mine, single = load(m), load("single")
        return statistics.mean(mine[t][get_task(t).primary] / single[t][get_task(t).primary] for t in single)

    table = reporting.seeds_table(tmp_path, retrained=True)
    assert table.splitlines()[0].endswith("| parameters |")
    assert next(line for line in table.splitlines() if line.startswith("| regmean_r8 |")).endswith("| 921,600 |")
    assert next(line for line in table.splitlines() if line.startswith("| regmean |")).endswith("| n/a |")
    row = next(line for line in table.split("against its exact merge and full-rank RegMean, per seed")[1].splitlines()
               if line.startswith("| regmean_r8 |")).split(" | ")
    gaps = [norm(f, "regmean_r8") - norm(f, "regmean") for f in (tmp_path / "retrained-seed0" / "7-task", seed2)]
    assert row[1] == "regmean" and row[2].startswith(f"{gaps[0]:+.3f} [") and row[3] == f"{gaps[1]:+.3f}"
    assert row[4:] == [f"{statistics.mean(gaps):+.3f}", "1 of 1 |"]   # seed 0: -0.031 [-0.072, +0.021]
    routers = table.split("**MoA per router setting")[1].split("\n\n")[1].splitlines()[2:]
    labels = ("", "-routers400")
    moa = {label: json.loads((tmp_path / f"retrained-seed0{label}" / "7-task" / "moa.json").read_text())["router"]
           for label in labels}
    logs = {label: json.loads((tmp_path / f"retrained-seed0{label}" / "train_logs" / "moa-7.json").read_text())
            for label in labels}
    cells = [r.split(" | ") for r in routers]
    assert [c[:2] for c in cells] == [["| 0", "cpu preset"], ["| 0", "routers400"]]
    for c, label in zip(cells, labels):
        lo, hi = moa[label]["interval"]
        assert c[6] == f"{moa[label]['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"   # on the test prompts
        assert c[3].startswith(f"{logs[label]['heldout_accuracy']['accuracy']:.3f}")   # held-out, at training
        chosen = logs[label].get("router_rows_chosen")
        assert c[2] == (f"{chosen['rows']} (of " + ", ".join(str(t["rows"]) for t in chosen["tried"]) + ")" if chosen
                        else str(logs[label]["config"]["router_rows"]))
    # MoA - RegMean on the same rows, where the folder holds RegMean's result (both folders here)
    moa_gap = [norm(tmp_path / f"retrained-seed0{label}" / "7-task", "moa")
               - norm(tmp_path / f"retrained-seed0{label}" / "7-task", "regmean") for label in labels]
    assert [c[5].split(" [")[0] for c in cells] == [f"{g:+.3f}" for g in moa_gap]
    assert "| 2 |" not in "\n".join(routers)   # seed 2 has one router setting: nothing to compare


def test_the_rank_figure_over_seeds_joins_the_means_of_the_seeds(tmp_path):
    """plots.fig_rank on two seeds' folders: per merge, the line through the mean over the seeds of each point,
    and each seed's own points beside it; a variant missing on one seed is not drawn."""
    import json
    import shutil
    import statistics

    from src import plots
    from src.metrics import normalized_score

    folders = [tmp_path / "retrained-seed0" / "7-task", tmp_path / "retrained-seed2" / "7-task"]
    for f in folders:
        shutil.copytree(ROOT / "results" / "smollm2-135m" / "retrained-seed0" / "7-task", f)
    variant = json.loads((folders[1] / "regmean_r8.json").read_text())   # seed 2: rank 8 scores QA as TIES did
    ties = json.loads((ROOT / "results" / "smollm2-135m" / "7-task" / "ties.json").read_text())
    for key in ("metrics", "primary", "stats"):
        variant[key]["qa"] = ties[key]["qa"]
    (folders[1] / "regmean_r8.json").write_text(json.dumps(variant))
    (folders[1] / "regmean_r32.json").unlink()
    fig = plots.fig_rank(folders)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16", "exact"]   # r32 lacks seed 2
    line = next(ln for ln in ax.lines if ln.get_label() == "regmean (mean of 2 seeds)")

    def norm(folder, m):
        single = json.loads((folder / "single.json").read_text())
        primary = {t: get_task(t).primary for t in single["tasks"]}
        return normalized_score(json.loads((folder / f"{m}.json").read_text())["metrics"], single["metrics"],
                                primary)["mean"]
    want = [statistics.mean(norm(f, m) for f in folders) for m in ("regmean_r8", "regmean_r16", "regmean")]
    assert list(line.get_ydata()) == pytest.approx(want, rel=1e-12)
    assert norm(folders[0], "regmean_r8") != norm(folders[1], "regmean_r8")
    # a seed whose variants are not evaluated yet is left out rather than hiding the others'
    unfinished = tmp_path / "retrained-seed4" / "7-task"
    unfinished.mkdir(parents=True)
    for m in ("single", "regmean"):
        shutil.copy(folders[0] / f"{m}.json", unfinished / f"{m}.json")
    line = next(ln for ln in plots.fig_rank(folders + [unfinished]).axes[0].lines
                if ln.get_label() == "regmean (mean of 2 seeds)")
    assert list(line.get_ydata()) == pytest.approx(want, rel=1e-12)


def test_the_merge_table_names_parameters_fixed_by_set_as_given():
    """A merge run with `--set regmean_pp.alpha=1.0` chose nothing: its row says the value was given, not that the
    method's defaults were used; a merge with neither selection nor --set keeps "the method's defaults"."""
    import json

    folder = ROOT / "results" / "smollm2-135m" / "retrained-seed1" / "7-task"
    found = {m: json.loads((folder / f"{m}.json").read_text()) for m in ("regmean_pp_r8", "svd")}
    assert found["regmean_pp_r8"]["settings"]["merge_params"] == {"regmean_pp": {"alpha": 1.0}}
    rows = {line.split(" | ")[0]: line for line in reporting.merge_table(found).splitlines() if line.startswith("| ")}
    assert "| given (alpha=1, by --set), the rest the method's defaults |" in rows["| regmean_pp_r8"]
    assert "| the method's defaults |" in rows["| svd"]
