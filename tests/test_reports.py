"""The committed reports cannot drift from the result files: every generated part of README.md and results/REPORT.md
equals a fresh generation from results/, and so does every committed summary.md / summary.csv."""
from pathlib import Path

import pytest

from src import reporting

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", reporting.REPORTS)
def test_generated_parts_equal_a_fresh_generation(name):
    text = (ROOT / name).read_text()
    keys = [m.group("key") for m in reporting.GENERATED.finditer(text)]
    assert keys, f"{name} has no generated part"
    assert reporting.fill(text, ROOT) == text, f"{name} is stale: run `make report` and commit it"


def test_the_front_page_and_the_report_hold_the_headline_and_the_registry():
    readme, report = (ROOT / "README.md").read_text(), (ROOT / "results/REPORT.md").read_text()
    assert "<!-- generated: headline results/smollm2-135m -->" in readme
    assert "<!-- generated: methods -->" in report
    for n in (5, 7):
        assert f"<!-- generated: summary results/smollm2-135m/{n}-task -->" in report


@pytest.mark.parametrize("folder", sorted((ROOT / "results").glob("*/*-task")), ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_summaries_equal_a_fresh_generation(folder):
    md, csv = reporting.summary_files(folder)
    assert (folder / "summary.md").read_text() == md
    assert (folder / "summary.csv").read_bytes() == csv.encode()  # csv writes \r\n, which read_text would hide


def test_a_stale_part_is_rebuilt_and_the_prose_kept():
    text = "intro\n<!-- generated: methods -->\nold table\n<!-- end generated -->\nprose\n"
    filled = reporting.fill(text, ROOT)
    assert filled.startswith("intro\n<!-- generated: methods -->\n| method |") and filled.endswith(
        "\n<!-- end generated -->\nprose\n") and "old table" not in filled
