"""visualize_lora.ipynb runs headless against the committed results/ and adapters, and writes its figures."""
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from src import peft_files
from src import lora
from src.reporting import seed_runs, seed_spread
from src.tasks import SEVEN_TASKS

pytestmark = pytest.mark.slow   # subprocesses, the real model or the notebook: make test runs it, test-fast not

REPO = Path(__file__).resolve().parent.parent


def write_random_adapters(folder: Path, layers: int = 3, d: int = 48, r: int = 4):
    """Seven PEFT-format adapters on q/k/v/o of a small model's module paths (the geometry cells need no model)."""
    gen = torch.Generator().manual_seed(0)
    for k, task in enumerate(SEVEN_TASKS):
        modules = {f"model.layers.{i}.self_attn.{p}": lora.Lora(torch.randn(r, d, generator=gen) * 0.1,
                                                             torch.randn(d, r, generator=gen) * 0.1, 2.0)
                   for i in range(layers) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        peft_files.save_adapter(lora.Adapter(modules, "smollm2-135m"), folder / "smollm2-135m" / task)


def test_notebook_executes_and_writes_every_figure(tmp_path, monkeypatch):
    if not (REPO / "results" / "smollm2-135m" / "7-task" / "moa.json").exists():
        pytest.fail("results/smollm2-135m is missing: it is committed by `make reproduce`")
    write_random_adapters(tmp_path / "adapters")
    monkeypatch.setenv("FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("ADAPTERS_DIR", str(tmp_path / "adapters"))
    nb = nbformat.read(REPO / "visualize_lora.ipynb", as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "adapters found" in outputs and "no adapters under" not in outputs
    model_dir = REPO / "results" / "smollm2-135m"
    seeds = ("training_seeds",) if len(seed_runs(model_dir)) > 1 and seed_spread(model_dir) else ()
    assert bool(seeds) != ("Only seed 0 has results" in outputs)
    assert "5-task set: concat" in outputs and "7-task set: concat" in outputs  # the update-norm ratios
    ranked = ("rank_budget",) if seed_runs(model_dir, retrained=True) else ()
    for name in ("normalized_score", "method_task_heatmap", "moa_router", "training_loss", "adapter_spectra",
                 "adapter_interference", "merge_selection") + seeds + ranked:
        png = tmp_path / "figures" / f"{name}.png"
        assert png.exists() and png.stat().st_size > 10_000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
