"""Names and places: the methods a run can take, where adapters, routers and results live, and the command that
makes each. The scripts import this for a path instead of the evaluation code."""
from pathlib import Path

from . import registry

ROOT = Path(__file__).resolve().parent.parent
PAPER_RESULTS = ROOT / "results" / "paper" / "paper_results.json"

MODEL_METHODS = ["base", "majority", "single", "moa"]
PAPER_METHODS = MODEL_METHODS + ["concat", "weight_sum", "svd"]  # --methods paper: the thesis's table
MERGE_METHODS = list(registry.METHODS)
METHODS = MODEL_METHODS + ["arrow"] + [n for n in MERGE_METHODS if registry.METHODS[n].default]  # default --methods
ALL_METHODS = MODEL_METHODS + ["arrow"] + MERGE_METHODS                             # also the tables' row order


def ordered(names) -> list:
    """Method names in the tables' row order: ALL_METHODS's, each merge followed by its rank variants
    (`<merge>_r<k>`, by k); names of neither kind are left out."""
    def key(name):
        base, rank = registry.split_rank(name)
        return ALL_METHODS.index(base), rank or 0
    return sorted({n for n in names if registry.split_rank(n)[0] in ALL_METHODS}, key=key)


def model_slug(name: str) -> str:
    """The folder name used under adapters/ and results/ for a model: `Qwen/Qwen2-1.5B` -> `Qwen2-1.5B`."""
    return Path(name.rstrip("/")).name


def adapter_dir(root: Path, model: str, task: str) -> Path:
    return Path(root) / "adapters" / model_slug(model) / task


def moa_dir(root: Path, model: str, tasks: list[str]) -> Path:
    return Path(root) / "adapters" / model_slug(model) / f"moa-{len(tasks)}"


def model_results_dir(root: Path, model: str) -> Path:
    return Path(root) / "results" / model_slug(model)


def results_dir(root: Path, model: str, tasks: list[str]) -> Path:
    return model_results_dir(root, model) / f"{len(tasks)}-task"


def control_dir(root: Path, model: str, tasks: list[str]) -> Path:
    """The merges of random LoRAs (full_evaluation.py --loras random), beside the results of the trained ones."""
    return results_dir(root, model, tasks) / "random-loras"


def router_log(model_dir: Path, n_tasks: int) -> Path:
    """train_moa's record of the routers for n_tasks (settings, rows tried, each epoch's held-out routing), beside a
    results/<model> folder's results: what the reports and the reproduction check read of them."""
    return Path(model_dir) / "train_logs" / f"moa-{n_tasks}.json"


def seed_dir(root: Path, model: str, seed: int) -> Path:
    """The result files of another training seed (scripts/seeds.sh), beside the committed run's, which is seed 0."""
    return model_results_dir(root, model) / "seeds" / f"seed{seed}"


def train_command(model: str, preset: str, task: str) -> str:
    return f"python train_individual_loras.py --task {task} --model {model} --preset {preset}"


def moa_command(model: str, preset: str, tasks: list[str]) -> str:
    return f"python train_moa.py --tasks {','.join(tasks)} --model {model} --preset {preset}"
