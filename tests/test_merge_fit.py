"""The merges that look at data (src/merge_fit.py) on a tiny model: they lower the loss on their rows from their
starting point, the grid search keeps the candidate of lowest validation loss, and none of them reads a test row."""
import shutil
from pathlib import Path

import pytest

from conftest import save_tiny_model
from src import lora as L
from src import merge_fit
from src.models import load_model
from src.train import make_config, train_lora

REPO = Path(__file__).resolve().parent.parent
TASKS = ["sentiment", "nli"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model and two task LoRAs trained on it, with a data folder that has no test files."""
    root = tmp_path_factory.mktemp("fit")
    model, tokenizer = load_model(str(save_tiny_model(root / "tiny")))
    for t in TASKS:
        cfg = make_config("cpu", dict(task=t, lr=0.03, max_steps=20, eval_every=10, train_rows=48, val_rows=8))
        train_lora(cfg, model, tokenizer, root / "adapters" / t)
        (root / "data" / t).mkdir(parents=True)
        shutil.copy(REPO / "data" / t / "train.jsonl", root / "data" / t / "train.jsonl")  # no test.jsonl
    return model, tokenizer, [L.load_adapter(root / "adapters" / t) for t in TASKS], root / "data"


@pytest.fixture
def no_test_rows(trained, monkeypatch):
    import src.tasks

    monkeypatch.setattr(src.tasks, "DATA_DIR", trained[3])  # reading a test row would raise MissingFile


def fit_data(trained) -> merge_fit.FitData:
    model, tokenizer, _, _ = trained
    return merge_fit.FitData(model, tokenizer, TASKS, batch_size=4)


def test_cat_learns_its_weights_and_lowers_the_loss(trained, no_test_rows):
    merged, info = merge_fit.build("cat", trained[2], fit_data(trained), select_rows=0,
                                   fixed=dict(rows=8, epochs=3, lr=0.05))
    assert sum(info["loss_after"].values()) < sum(info["loss_before"].values())
    assert info["rows_per_task"] == {"sentiment": 8, "nli": 8} and info["seconds"] >= 0
    alphas = info["alphas"]["model.layers.0.self_attn.q_proj"]
    assert len(alphas) == 2 and alphas != [0.5, 0.5]  # started at 1/n, moved
    layer = merged.modules["model.layers.0.self_attn.q_proj"]
    assert layer.A.shape[0] == 16  # the two rank-8 LoRAs, concatenated with their learned weights
    assert not L.lora_layers(trained[0])  # the model is left as it was


def test_lorahub_lowers_its_objective_from_the_base_model(trained, no_test_rows):
    merged, info = merge_fit.build("lorahub", trained[2], fit_data(trained), select_rows=0,
                                   fixed=dict(rows=4, budget=12))
    assert info["evaluations"] == 13 and info["history"][0]["w"] == [0.0, 0.0]  # the start, then the budget
    assert info["objective_best"] < info["objective_start"]
    assert all(abs(w) <= 1.5 for w in info["weights"])
    assert merged.modules["model.layers.0.self_attn.q_proj"].A.shape[0] == 8  # a factor sum keeps rank 8


def test_grid_search_keeps_the_lowest_validation_loss(trained, no_test_rows):
    merged, info = merge_fit.build("task_arithmetic", trained[2], fit_data(trained), select_rows=4)
    candidates = info["selection"]["candidates"]
    assert [c["params"]["lam"] for c in candidates] == [0.125, 0.25, 0.5, 1.0]
    assert info["params"] == min(candidates, key=lambda c: c["val_loss"])["params"]
    assert info["selection"]["train_row_offset"] == make_config("cpu").train_rows  # after the training rows
    fixed, fixed_info = merge_fit.build("task_arithmetic", trained[2], fit_data(trained), select_rows=4,
                                        fixed={"lam": 0.3})
    assert fixed_info["params"] == {"lam": 0.3} and "selection" not in fixed_info
