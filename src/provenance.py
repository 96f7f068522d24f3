"""Where an adapter's rows came from, so that the rule "choose on rows no adapter trained on, score on test rows" can
be checked instead of trusted.

Training writes `training.json` next to each adapter: the train-split rows it trained on and the ones its early
stopping read (half-open ranges [start, end) of the rows the task keeps), the data source and a hash of its file,
the preset and every setting, the seed, the steps and the commit. Merge selection, CAT and LoraHub take their rows
from these records (`rows_after_training`): the first rows of the train split that no adapter of the merge trained
on, and refuse when there are not enough of them. Evaluation rows come from the other split (test / validation).
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
    from .lora import atomic_write

    atomic_write(Path(folder) / RECORD, lambda p: p.write_text(json.dumps(record, indent=2)))


def read_record(folder: Path, hint: str = "") -> dict:
    """An adapter's training record; an adapter without one (trained before records, or elsewhere) cannot prove
    which rows it trained on, so data-driven steps refuse it."""
    path = Path(folder) / RECORD
    if not path.exists():
        raise MissingFile(f"adapter {folder} has no {RECORD} (which rows it trained on): retrain it"
                          + (f" with `{hint}`" if hint else "") + ", or merge it data-free with merge_adapters.py")
    return json.loads(path.read_text())


def rows_after_training(records: dict, n: int, available: dict | None = None) -> dict:
    """{task: [start, start + n)}: the first n train-split rows after the rows that task's adapter trained on
    (its early-stopping rows may be among them: they were read, never trained on). `records`: {task: training
    record}; `available`: {task: rows the split has}, to refuse a selection that would run past its end."""
    out = {}
    for task, rec in records.items():
        start = rec["rows"]["train"][1]
        out[task] = [start, start + n]
        if available is not None and available[task] < start + n:
            raise BadInput(f"{task}: {n} selection rows after the {start} training rows need {start + n} train-split "
                           f"rows, the data has {available[task]}: lower the rows of the selection or train on fewer")
    return out


def check_disjoint(records: dict, used: dict, what: str):
    """Refuse rows [start, end) of the train split that overlap the rows an adapter of the same task trained on."""
    for task, (start, end) in used.items():
        t0, t1 = records[task]["rows"]["train"]
        if start < t1 and t0 < end:
            raise BadInput(f"{what} would read {task} train-split rows [{start}, {end}), which its adapter trained on "
                           f"([{t0}, {t1}), {RECORD}): choose rows from {t1} on")


def check_source(record: dict, task, data: str):
    """Refuse rows from another source than the adapter trained on: row numbers would not name the same rows."""
    now = data_source(task, data)
    same = lambda src: {k: v for k, v in src.items() if k != "file"}  # noqa: E731  (the hash names the file)
    if same(record["source"]) != same(now):
        raise BadInput(f"{task.name}: its adapter was trained on {record['source']}, this run reads {now}: row "
                       f"numbers would not name the same rows; retrain the adapter on this data or use its data")
