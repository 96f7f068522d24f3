"""Rows, prompts and batches.

Rows come either from the shipped samples in `data/` (`source="local"`) or from the paper's hub datasets
(`source="hub"`); both go through `datasets.load_dataset`, so every step after loading is the same code. A user's
own rows (merge_adapters.py --rows) are a JSON-lines file of {"prompt", "target"} objects (`read_row_file`), encoded
as a task's rows are (`encode_pair`).

Splits: training rows are the first `n` rows of the train split, validation rows (for the early-stopping loss) the
next ones, evaluation rows the first `n` rows of the evaluation split (the shipped `test.jsonl`, or the hub's
validation split as in the original).

Token budgets are met by cutting the task's content field (article, context, sentence), never the template, so the
`### ...:` cue that the model answers to is always there (the original truncated from the right and lost it).
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInput, MissingFile
from .tasks import Task


def load_split(task: Task, split: str, source: str = "local"):
    """The `datasets.Dataset` that rows of `split` ("train" or "eval") come from: a shipped file, or the hub."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if source == "local":
        path = task.local_path("train" if split == "train" else "test")
        if not path.exists():
            raise MissingFile(f"missing data file {path}: restore it with `git checkout -- data/`")
        if path.stat().st_size == 0:
            raise BadInput(f"data file {path} is empty: restore it with `git checkout -- data/`")
        return datasets.load_dataset("json", data_files=str(path), split="train")
    if source == "hub":
        hub_split = task.train_split if split == "train" else task.eval_split
        try:
            return datasets.load_dataset(*task.hub, split=hub_split,
                                         **({"revision": task.hub_revision} if task.hub_revision else {}))
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
            # what the hub raises for an unreachable hub, an unknown id (OSError: ConnectionError, FileNotFoundError,
            # HTTPError) and an unknown config or split (ValueError); the cause stays attached (__cause__), and
            # anything else (a bug, an ImportError) keeps its traceback
            raise BadInput(f"cannot load {'/'.join(task.hub)} [{hub_split}] from the Hugging Face hub "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           "use --data local for the shipped samples") from e
    raise BadInput(f"unknown data source {source!r}: use local or hub")


def load_rows(task: Task, split: str, source: str = "local", n: int | None = None, offset: int = 0) -> list[dict]:
    """Rows offset .. offset + n of `split` ("train": training and validation rows; "eval") among the rows the task
    keeps; reads the dataset only as far as it needs (a hub train split has up to 393k rows)."""
    rows, kept = [], 0
    for row in load_split(task, split, source):
        if not task.keep(row):
            continue
        if kept >= offset:
            rows.append(row)
            if n is not None and len(rows) == n:
                break
        kept += 1
    if not rows:
        raise BadInput(f"no {split} rows for task {task.name} (source {source}, offset {offset}, n {n})")
    return rows


class PromptTooLong(ValueError):
    pass


def fit_prompt(task: Task, row: dict, tokenizer, budget: int, strict: bool = True) -> list[int]:
    """Token ids of the task's prompt, the content field cut (at token boundaries) until it fits `budget`.

    When the template alone is longer than the budget (a PIQA row with two long solutions, say), cutting the
    content cannot help: `strict` raises PromptTooLong (training skips such rows), otherwise the whole prompt is
    returned over budget (evaluation keeps every row)."""
    ids = tokenizer(task.prompt(row)).input_ids
    if len(ids) <= budget:
        return ids
    full = ids
    content = [t for t, is_content in task.segments(row) if is_content][0].strip()
    content_ids = tokenizer(content, add_special_tokens=False).input_ids
    keep = len(content_ids) - (len(ids) - budget)
    while keep > 0:
        ids = tokenizer(task.prompt(row, tokenizer.decode(content_ids[:keep]))).input_ids
        if len(ids) <= budget:
            return ids
        keep -= len(ids) - budget  # re-tokenizing at the cut can merge differently: shave again
    if strict:
        raise PromptTooLong(f"{task.name}: the prompt template alone is longer than the budget of {budget} tokens")
    return full


def encode_train(task: Task, row: dict, tokenizer, max_len: int, max_target: int) -> dict:
    """Prompt + target + EOS; the loss is on the target tokens (and EOS) only."""
    target = tokenizer(task.target(row), add_special_tokens=False).input_ids[:max_target] + [tokenizer.eos_token_id]
    prompt = fit_prompt(task, row, tokenizer, max_len - len(target))
    return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool, labels: list[list[int]] | None = None) -> dict:
    """Dynamic padding to the longest sequence of the batch (left for generation, right for training)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long) if labels is not None else None
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s)
        mask[i, span] = 1
        if lab is not None:
            lab[i, span] = torch.tensor(labels[i])
    batch = {"input_ids": ids, "attention_mask": mask}
    if lab is not None:
        batch["labels"] = lab
    return batch


# ------------------------------------------------------------------------------------------ a user's own rows
ROW_FIELDS = ("prompt", "target")


@dataclass(frozen=True)
class RowFile:
    """A user's rows, as read: the file, the sha256 of the bytes read, and (line number, {"prompt", "target"}) per
    row, in file order."""
    path: Path
    sha256: str
    rows: list


def read_row_file(path) -> RowFile:
    """A JSON-lines file of {"prompt": str, "target": str} objects, one a line (other fields are ignored; blank lines
    are skipped). Anything else is a BadInput naming the file and the line: invalid JSON, a line that is not an
    object, a missing, empty or non-string prompt or target, a file with no rows."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"--rows: no file {path} (give a JSON-lines file of prompt/target rows, or a task name)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text (byte {e.start}): give a JSON-lines file") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}, line {number}: invalid JSON ({e.msg}, column {e.colno}): give one JSON object "
                           'a line, {"prompt": ..., "target": ...}') from None
        if not isinstance(row, dict):
            raise BadInput(f"{path}, line {number}: a JSON {type(row).__name__}, not an object: give "
                           '{"prompt": ..., "target": ...}')
        for key in ROW_FIELDS:
            if key not in row:
                raise BadInput(f'{path}, line {number}: no "{key}" field (a row needs "prompt" and "target")')
            if not isinstance(row[key], str) or not row[key].strip():
                raise BadInput(f'{path}, line {number}: "{key}" is {"empty" if isinstance(row[key], str) else "not a string"}: '
                               "give the text")
        rows.append((number, {key: row[key] for key in ROW_FIELDS}))
    if not rows:
        raise BadInput(f'{path}: no rows (the file is empty): give one JSON object a line, {{"prompt": ..., "target": ...}}')
    return RowFile(path, hashlib.sha256(raw).hexdigest(), rows)


def encode_pair(prompt: str, target: str, tokenizer) -> dict:
    """A user's row as a training example, as `encode_train` makes a task's: the prompt's tokens, then the target's
    and EOS, the loss on the target and EOS only. Nothing is cut (a user's prompt has no content field to shorten):
    a row too long for the model is refused by its caller."""
    target_ids = tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    prompt_ids = tokenizer(prompt).input_ids
    return {"input_ids": prompt_ids + target_ids, "labels": [-100] * len(prompt_ids) + target_ids}
