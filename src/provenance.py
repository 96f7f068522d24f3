"""Where an adapter's rows came from, so that the rule "choose on rows no adapter trained on, score on test rows" can
be checked instead of trusted.

Training writes `training.json` next to each adapter: the train-split rows it trained on and the ones its early
stopping read (half-open ranges [start, end) of the rows the task keeps), the data source and a hash of its file,
the preset and every setting, the seed, the steps and the commit. Merge selection, CAT and LoraHub take their rows
from these records (`rows_after_training`): the first rows of the train split after those its adapter trained on
(so they cannot overlap them), and refuse when there are not enough of them (src/merge_fit.py). Evaluation rows come
from the other split (test / validation).
"""
import hashlib
import json
import subprocess
from pathlib import Path

from .errors import BadInput, MissingFile

RECORD = "training.json"
ROOT = Path(__file__).resolve().parent.parent


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def data_source(task, data: str, split: str = "train") -> dict:
    """What the rows of `split` are read from: the shipped file and its hash, or the hub dataset and split."""
    if data == "local":
        path = task.local_path("train" if split == "train" else "test")
        return {"data": "local", "file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
                "sha256": file_hash(path)}
    return {"data": data, "hub": list(task.hub), "split": task.train_split if split == "train" else task.eval_split,
            "revision": task.hub_revision}


def commit() -> str | None:
    """The repository's commit (with '+dirty' when tracked files are modified), or None outside a git checkout."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_record(folder: Path, record: dict):
    from .files import atomic_write

    atomic_write(Path(folder) / RECORD, lambda p: p.write_text(json.dumps(record, indent=2)))


def find_record(folder: Path) -> dict | None:
    """An adapter's training record, or None when it has none."""
    path = Path(folder) / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def read_record(folder: Path, hint: str = "") -> dict:
    """An adapter's training record; an adapter without one (trained before records, or elsewhere) cannot prove
    which rows it trained on, so data-driven steps refuse it."""
    record = find_record(folder)
    if record is None:
        raise MissingFile(f"adapter {folder} has no {RECORD} (which rows it trained on): retrain it"
                          + (f" with `{hint}`" if hint else "") + ", or merge it data-free with merge_adapters.py")
    return record


def rows_after_training(records: dict, n: int) -> dict:
    """{task: [start, start + n)}: the first n train-split rows after the rows that task's adapter trained on
    (its early-stopping rows may be among them: they were read, never trained on). `records`: {task: record}."""
    return {task: [rec["rows"]["train"][1], rec["rows"]["train"][1] + n] for task, rec in records.items()}


def check_source(record: dict, task, data: str):
    """Refuse rows from another source than the adapter trained on: row numbers would not name the same rows."""
    now = data_source(task, data)
    same = lambda src: {k: v for k, v in src.items() if k != "file"}  # noqa: E731  (the hash names the file)
    if same(record["source"]) != same(now):
        raise BadInput(f"{task.name}: its adapter was trained on {record['source']}, this run reads {now}: row "
                       f"numbers would not name the same rows; retrain the adapter on this data or use its data")
