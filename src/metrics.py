"""Task metrics, computed offline with the libraries made for them, on the scales of the original's logs.

* rouge:  ROUGE-1/2/L/Lsum F-measure (rouge-score, no stemmer), mean over examples; Lsum splits on newlines.
* bleu:   corpus BLEU on a 0-1 scale, 13a tokenization, max order 4, no smoothing, with the brevity penalty of
          the tensorflow/nmt formula that Hugging Face `evaluate`'s "bleu" uses; sacreBLEU's 0-100 score beside it.
* squad:  exact match and F1 (0-100) with the official SQuAD v1.1 normalization, max over all gold answers.
* label:  accuracy of the first output line against the label word (normalized), and the share of invalid outputs.
* match:  accuracy of the normalized output against the normalized correct solution (commonsense).

`normalized_score` is the paper's number: the mean over tasks of metric(method) / metric(single).

Intervals: `example_stats` gives each example's sufficient statistics for the primary metric (its score, or for
corpus BLEU its n-gram matches, n-gram counts and lengths), `primary_from_stats` the metric of any sum of them, so
`paired_bootstrap` recomputes every metric, corpus BLEU included, on each resample of the test rows.
"""
import collections
import math
import re
import string

import numpy as np

from .errors import BadInput


def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: list[str], references: list[list[str]]) -> dict:
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in refs) for p, refs in zip(predictions, references)]
    f1 = [max(squad_f1(p, g) for g in refs) for p, refs in zip(predictions, references)]
    return {"exact_match": 100.0 * sum(em) / len(em), "f1": 100.0 * sum(f1) / len(f1)}


def rouge(predictions: list[str], references: list[list[str]]) -> dict:
    from rouge_score import rouge_scorer

    keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(keys)
    totals = dict.fromkeys(keys, 0.0)
    for p, refs in zip(predictions, references):
        scores = scorer.score(refs[0], p)
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: v / len(predictions) for k, v in totals.items()}


def _ngrams(tokens: list[str], max_order: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1)
                               for i in range(len(tokens) - n + 1))


def bleu_counts(prediction: str, references: list[str], max_order: int = 4, tokenize=None) -> list[float]:
    """One example's BLEU sufficient statistics: clipped n-gram matches (max_order), candidate n-grams (max_order),
    candidate length, closest-shortest reference length (13a tokens)."""
    if tokenize is None:
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

        tokenize = Tokenizer13a()
    pred_toks = tokenize(prediction).split()
    ref_toks = [tokenize(r).split() for r in references]
    clipped = collections.Counter()
    for r in ref_toks:
        clipped |= _ngrams(r, max_order)
    matches = [0] * max_order
    for ngram, count in (_ngrams(pred_toks, max_order) & clipped).items():
        matches[len(ngram) - 1] += count
    possible = [max(len(pred_toks) - n + 1, 0) for n in range(1, max_order + 1)]
    return [*matches, *possible, len(pred_toks), min(len(r) for r in ref_toks)]


def bleu_from_counts(counts: np.ndarray, max_order: int = 4) -> np.ndarray:
    """Corpus BLEU (0-1) of summed counts, (..., 2 * max_order + 2) -> (...): the formula of `evaluate`'s "bleu"
    (geometric mean of the n-gram precisions, no smoothing, brevity penalty exp(1 - 1/ratio) when ratio <= 1)."""
    counts = np.asarray(counts, dtype=np.float64)
    matches, possible = counts[..., :max_order], counts[..., max_order:2 * max_order]
    pred_len, ref_len = counts[..., 2 * max_order], counts[..., 2 * max_order + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        precisions = np.where(possible > 0, matches / np.where(possible > 0, possible, 1), 0.0)
        geo = np.where(precisions.min(-1) > 0, np.exp(np.log(np.where(precisions > 0, precisions, 1)).mean(-1)), 0.0)
        ratio = np.where(ref_len > 0, pred_len / np.where(ref_len > 0, ref_len, 1), 0.0)
        brevity = np.where(ratio > 1.0, 1.0, np.where(ratio > 0, np.exp(1 - 1 / np.where(ratio > 0, ratio, 1)), 0.0))
    return geo * brevity


def bleu(predictions: list[str], references: list[list[str]], max_order: int = 4) -> dict:
    from sacrebleu import corpus_bleu
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    counts = np.array([bleu_counts(p, refs, max_order, tokenize) for p, refs in zip(predictions, references)]).sum(0)
    matches, possible = counts[:max_order], counts[max_order:2 * max_order]
    precisions = [float(m / p) if p > 0 else 0.0 for m, p in zip(matches, possible)]
    ratio = float(counts[-2] / counts[-1]) if counts[-1] else 0.0
    brevity = 1.0 if ratio > 1.0 else (math.exp(1 - 1 / ratio) if ratio > 0 else 0.0)
    n_refs = max(len(r) for r in references)
    padded = [[r[i] if i < len(r) else r[0] for r in references] for i in range(n_refs)]
    return {"bleu": float(bleu_from_counts(counts, max_order)), "sacrebleu": corpus_bleu(predictions, padded).score,
            "precisions": precisions, "brevity_penalty": brevity, "length_ratio": ratio}


def _first_line(p: str) -> str:
    return normalize_answer(p.strip().split("\n")[0]) if p.strip() else ""


def label_correct(predictions: list[str], references: list[list[str]]) -> list[float]:
    return [float(_first_line(p) == normalize_answer(refs[0])) for p, refs in zip(predictions, references)]


def match_correct(predictions: list[str], references: list[list[str]]) -> list[float]:
    return [float(normalize_answer(p) == normalize_answer(refs[0])) for p, refs in zip(predictions, references)]


def label_accuracy(predictions: list[str], references: list[list[str]], labels: tuple) -> dict:
    valid = {normalize_answer(label) for label in labels}
    correct = label_correct(predictions, references)
    invalid = [float(_first_line(p) not in valid) for p in predictions]
    return {"accuracy": sum(correct) / len(correct), "invalid": sum(invalid) / len(invalid)}


def match_accuracy(predictions: list[str], references: list[list[str]]) -> dict:
    correct = match_correct(predictions, references)
    return {"accuracy": sum(correct) / len(correct)}


def score(task, predictions: list[str], references: list[list[str]]) -> dict:
    """All metrics of `task` (a src.tasks.Task) for the predictions; the primary one is `task.primary`."""
    if len(predictions) != len(references) or not predictions:
        raise BadInput(f"{task.name}: {len(predictions)} predictions for {len(references)} references")
    if task.metric == "rouge":
        return rouge(predictions, references)
    if task.metric == "bleu":
        return bleu(predictions, references)
    if task.metric == "squad":
        return squad(predictions, references)
    if task.metric == "label":
        return label_accuracy(predictions, references, task.labels)
    if task.metric == "match":
        return match_accuracy(predictions, references)
    raise BadInput(f"{task.name}: unknown metric {task.metric!r}")


def normalized_score(method: dict, single: dict, primary: dict) -> dict:
    """Per-task ratio metric(method) / metric(single) on the primary metric, and their mean over tasks.

    `method` and `single` map task -> metrics dict; `primary` maps task -> primary key. A task whose single score
    is 0 has no defined ratio: it is reported as None and left out of the mean (and the caller says so).
    """
    ratios = {}
    for t in method:
        base = single[t][primary[t]]
        ratios[t] = method[t][primary[t]] / base if base else None
    defined = [r for r in ratios.values() if r is not None]
    return {"per_task": ratios, "mean": sum(defined) / len(defined) if defined else None}


# ------------------------------------------------------------------------------------------------ intervals
def example_stats(task, predictions: list[str], references: list[list[str]]) -> list[list[float]]:
    """Per example, the sufficient statistics of `task.primary`: [score] for per-example means (ROUGE-L F, SQuAD
    F1 on 0-100, accuracy), the n-gram counts of `bleu_counts` for corpus BLEU."""
    if task.metric == "bleu":
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

        tokenize = Tokenizer13a()
        return [bleu_counts(p, refs, tokenize=tokenize) for p, refs in zip(predictions, references)]
    if task.metric == "rouge":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer([task.primary])
        return [[scorer.score(refs[0], p)[task.primary].fmeasure] for p, refs in zip(predictions, references)]
    if task.metric == "squad":
        return [[100.0 * max(squad_f1(p, g) for g in refs)] for p, refs in zip(predictions, references)]
    if task.metric == "label":
        return [[c] for c in label_correct(predictions, references)]
    if task.metric == "match":
        return [[c] for c in match_correct(predictions, references)]
    raise BadInput(f"{task.name}: unknown metric {task.metric!r}")


def primary_from_stats(task, summed: np.ndarray, n: int) -> np.ndarray:
    """The primary metric from statistics summed over n examples, (..., k) -> (...)."""
    summed = np.asarray(summed, dtype=np.float64)
    return bleu_from_counts(summed) if task.metric == "bleu" else summed[..., 0] / n


def paired_bootstrap(tasks: list, stats: dict, reference: str = "single", n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95, compare: tuple = ()) -> dict:
    """Percentile intervals by resampling test rows, the same resample of a task's rows for every method.

    `tasks` are src.tasks.Task objects, `stats[method][task name]` the (n, k) example statistics (rows in the same
    order for every method). Returns {method: {"per_task": {t: (lo, hi)}, "diff": {t: (lo, hi)},
    "ratio": {t: (lo, hi)}, "normalized": (lo, hi)}}; differences (method - reference), ratios and the normalized
    score (mean over tasks of method / reference) exist when the reference method has the task. A resample where
    the reference scores 0 leaves that task out of its mean. For each method named in `compare`, "normalized_diff"
    {other: (lo, hi)} is this method's normalized score minus the other's, on the same resamples."""
    rng = np.random.default_rng(seed)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    draws, values = {}, {}
    for task in tasks:
        n = len(next(s[task.name] for s in stats.values() if task.name in s))
        draws[task.name] = rng.integers(0, n, size=(n_boot, n))
    for method, per_task in stats.items():
        values[method] = {t.name: primary_from_stats(t, np.asarray(per_task[t.name])[draws[t.name]].sum(1),
                                                     draws[t.name].shape[1])
                          for t in tasks if t.name in per_task}
    out, means = {}, {}
    for method, vals in values.items():
        entry = {"per_task": {t: tuple(np.percentile(v, q).tolist()) for t, v in vals.items()}, "ratio": {},
                 "normalized": None}
        ref = values.get(reference, {})
        entry["diff"] = {t: tuple(np.percentile(v - ref[t], q).tolist()) for t, v in vals.items() if t in ref}
        if ref and set(vals) == set(ref):
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = {t: np.where(ref[t] > 0, v / np.where(ref[t] > 0, ref[t], 1), np.nan) for t, v in vals.items()}
            entry["ratio"] = {t: tuple(np.nanpercentile(r, q).tolist()) if np.isfinite(r).any() else None
                              for t, r in ratios.items()}
            stacked = np.stack(list(ratios.values()))
            with np.errstate(invalid="ignore"):
                mean = np.nanmean(np.where(np.isfinite(stacked), stacked, np.nan), axis=0)
            entry["normalized"] = tuple(np.nanpercentile(mean, q).tolist()) if np.isfinite(mean).any() else None
            means[method] = mean
        out[method] = entry
    for method, entry in out.items():
        gaps = {o: means[method] - means[o] for o in compare if o in means and method in means}
        entry["normalized_diff"] = {o: tuple(np.nanpercentile(g, q).tolist()) for o, g in gaps.items()
                                    if np.isfinite(g).any()}
    return out


def grouped_mean_interval(values, groups, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple:
    """Percentile interval of the mean of `values` (one per prompt) when each group's (task's) prompts are resampled
    among themselves, as paired_bootstrap resamples each task's test rows: the routing accuracy's interval, a prompt's
    value being its share of right decisions over the layers (decisions within a prompt are not independent)."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups)
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for g in np.unique(groups):
        v = values[groups == g]
        total += v[rng.integers(0, len(v), size=(n_boot, len(v)))].sum(1)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    return tuple(np.percentile(total / len(values), q).tolist())
