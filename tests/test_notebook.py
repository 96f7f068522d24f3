"""visualize_lora.ipynb runs headless against the committed results/ and writes its figures."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent


def test_notebook_executes_and_writes_figures(tmp_path, monkeypatch):
    if not (REPO / "results" / "smollm2-135m" / "7-task" / "moa.json").exists():
        pytest.fail("results/smollm2-135m is missing: it is committed by `make reproduce`")
    monkeypatch.setenv("FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("ADAPTERS_DIR", str(tmp_path / "no-adapters"))  # the geometry cells must cope without them
    nb = nbformat.read(REPO / "visualize_lora.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "no adapters under" in outputs and "train them with" in outputs
    for name in ("normalized_score", "method_task_heatmap", "moa_router", "training_loss"):
        png = tmp_path / "figures" / f"{name}.png"
        assert png.exists() and png.stat().st_size > 10_000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
