"""The seven tasks: the one place in the code that names a task.

Each task says where its data lives (hub dataset and splits for the paper preset, shipped sample files for the
offline default), how a row becomes a prompt (the original's exact strings), what the target is, how long a
generation may be, and which metric scores it. Everything else in the project loops over `TASKS`.

A prompt is a list of segments; exactly one of them is the row's main content field (article, context, sentence,
...), the only part that may be cut to fit a token budget, so the `### ...:` cue that ends every prompt survives.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import BadInput

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

SENTIMENT_LABELS = ("negative", "positive")            # GLUE sst2: 0, 1
NLI_LABELS = ("entailment", "neutral", "contradiction")  # GLUE mnli: 0, 1, 2


@dataclass(frozen=True)
class Task:
    name: str
    hub: tuple                 # (hub id, config) for datasets.load_dataset in the paper preset
    train_split: str           # hub split the training rows come from
    eval_split: str            # hub split the evaluation rows come from
    content: str               # the field that may be truncated
    segments: Callable         # row -> list of (text, is_content) in prompt order
    target: Callable           # row -> target text (training) and reference (evaluation)
    references: Callable       # row -> list of references the metric compares against
    metric: str                # name of the metric family in src/metrics.py
    primary: str               # the primary metric key (used by the normalized score)
    max_new_tokens: int        # generation budget that fits the target
    labels: tuple = ()         # the valid label words of a classification task
    classes: int = 0           # classification tasks: number of answer classes (row["label"] is the class index)
    keep: Callable = lambda row: True  # rows to keep (mnli drops label -1)
    hub_revision: str | None = None    # a hub branch to load instead of the default (a parquet conversion)

    @property
    def chance(self) -> float | None:
        """Accuracy of a uniform random answer (None for tasks that are not classification)."""
        return 1.0 / self.classes if self.classes else None

    def answer(self, row: dict, label: int) -> str:
        """The target text this row would have if its class were `label` (the majority baseline's answer)."""
        return self.target({**row, "label": label})

    def prompt(self, row: dict, content: str | None = None) -> str:
        """The original's prompt for `row`; `content` replaces the content field (used to truncate it)."""
        parts = []
        for text, is_content in self.segments(row):
            parts.append((content if content is not None else text.strip()) if is_content else text)
        return "".join(parts)

    def local_path(self, split: str) -> Path:
        return DATA_DIR / self.name / f"{split}.jsonl"


def _answers(row):
    return list(row["answers"]["text"])


TASKS = {
    "summarization": Task(
        name="summarization", hub=("abisee/cnn_dailymail", "3.0.0"), train_split="train", eval_split="validation",
        content="article",
        segments=lambda r: [(r["article"], True), ("\n### Summarization:\n", False)],
        target=lambda r: r["highlights"].strip(), references=lambda r: [r["highlights"].strip()],
        metric="rouge", primary="rougeL", max_new_tokens=128),
    "translation": Task(
        name="translation", hub=("wmt/wmt14", "de-en"), train_split="train", eval_split="validation",
        content="translation.en",
        segments=lambda r: [(r["translation"]["en"], True), ("\n### Translation from English to German:\n", False)],
        target=lambda r: r["translation"]["de"].strip(), references=lambda r: [r["translation"]["de"].strip()],
        metric="bleu", primary="bleu", max_new_tokens=128),
    "qa": Task(
        name="qa", hub=("rajpurkar/squad",), train_split="train", eval_split="validation",
        content="context",
        segments=lambda r: [("### Context:\n", False), (r["context"], True),
                            ("\n### Question:\n" + r["question"].strip() + "\n### Answer:\n", False)],
        target=lambda r: r["answers"]["text"][0].strip(), references=_answers,
        metric="squad", primary="f1", max_new_tokens=32),
    "sentiment": Task(
        name="sentiment", hub=("nyu-mll/glue", "sst2"), train_split="train", eval_split="validation",
        content="sentence",
        segments=lambda r: [(r["sentence"], True), ("\n### Sentiment:\n", False)],
        target=lambda r: SENTIMENT_LABELS[r["label"]], references=lambda r: [SENTIMENT_LABELS[r["label"]]],
        metric="label", primary="accuracy", max_new_tokens=8, labels=SENTIMENT_LABELS, classes=2),
    "nli": Task(
        name="nli", hub=("nyu-mll/glue", "mnli"), train_split="train", eval_split="validation_matched",
        content="premise",
        segments=lambda r: [("### Premise:\n", False), (r["premise"], True),
                            ("\n### Hypothesis:\n" + r["hypothesis"].strip() + "\n### Relationship:\n", False)],
        target=lambda r: NLI_LABELS[r["label"]], references=lambda r: [NLI_LABELS[r["label"]]],
        metric="label", primary="accuracy", max_new_tokens=8, labels=NLI_LABELS, classes=3,
        keep=lambda r: r["label"] in (0, 1, 2)),
    "paraphrasing": Task(
        name="paraphrasing", hub=("google-research-datasets/paws", "labeled_final"), train_split="train", eval_split="validation",
        content="sentence1",
        segments=lambda r: [(r["sentence1"], True), ("\n### Paraphrasing:\n", False)],
        target=lambda r: r["sentence2"].strip(), references=lambda r: [r["sentence2"].strip()],
        metric="bleu", primary="bleu", max_new_tokens=96),
    "commonsense": Task(
        # the default branch of ybisk/piqa is a loading script, which datasets >= 4 refuses; its parquet conversion
        # has the same fields, under the config "default"
        name="commonsense", hub=("ybisk/piqa", "default"), hub_revision="refs/convert/parquet",
        train_split="train", eval_split="validation",
        content="goal",
        segments=lambda r: [(r["goal"], True), ("\n### Solution 1:\n" + r["sol1"].strip() + "\n### Solution 2:\n"
                                                 + r["sol2"].strip() + "\n### Correct Solution:\n", False)],
        target=lambda r: (r["sol1"], r["sol2"])[r["label"]].strip(),
        references=lambda r: [(r["sol1"], r["sol2"])[r["label"]].strip()],
        metric="match", primary="accuracy", max_new_tokens=64, classes=2),
}

FIVE_TASKS = ["summarization", "translation", "qa", "sentiment", "nli"]
SEVEN_TASKS = FIVE_TASKS + ["paraphrasing", "commonsense"]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise BadInput(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[name]


def parse_tasks(names) -> list[str]:
    """A list or comma-separated string of task names, 'all' for the seven; unknown names fail with the valid list."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["all"]:
        return list(SEVEN_TASKS)
    for n in names:
        get_task(n)
    if len(set(names)) != len(names):
        raise BadInput(f"task list {names} names a task twice")
    return list(names)
