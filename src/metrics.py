"""Task metrics, computed offline with the libraries made for them, on the scales of the original's logs.

* rouge:  ROUGE-1/2/L/Lsum F-measure (rouge-score, no stemmer), mean over examples; Lsum splits on newlines.
* bleu:   corpus BLEU on a 0-1 scale, 13a tokenization, max order 4, no smoothing, with the brevity penalty of
          the tensorflow/nmt formula that Hugging Face `evaluate`'s "bleu" uses; sacreBLEU's 0-100 score beside it.
* squad:  exact match and F1 (0-100) with the official SQuAD v1.1 normalization, max over all gold answers.
* label:  accuracy of the first output line against the label word (normalized), and the share of invalid outputs.
* match:  accuracy of the normalized output against the normalized correct solution (commonsense).

`normalized_score` is the paper's number: the mean over tasks of metric(method) / metric(single).
"""
import collections
import math
import re
import string


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


def bleu(predictions: list[str], references: list[list[str]], max_order: int = 4) -> dict:
    from sacrebleu import corpus_bleu
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    matches, possible = [0] * max_order, [0] * max_order
    pred_len = ref_len = 0
    for p, refs in zip(predictions, references):
        pred_toks = tokenize(p).split()
        ref_toks = [tokenize(r).split() for r in refs]
        pred_len += len(pred_toks)
        ref_len += min(len(r) for r in ref_toks)
        clipped = collections.Counter()
        for r in ref_toks:
            clipped |= _ngrams(r, max_order)
        for ngram, count in (_ngrams(pred_toks, max_order) & clipped).items():
            matches[len(ngram) - 1] += count
        for n in range(1, max_order + 1):
            possible[n - 1] += max(len(pred_toks) - n + 1, 0)
    precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible)]
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order) if min(precisions) > 0 else 0.0
    ratio = pred_len / ref_len if ref_len else 0.0
    brevity = 1.0 if ratio > 1.0 else (math.exp(1 - 1 / ratio) if ratio > 0 else 0.0)
    n_refs = max(len(r) for r in references)
    padded = [[r[i] if i < len(r) else r[0] for r in references] for i in range(n_refs)]
    return {"bleu": geo_mean * brevity, "sacrebleu": corpus_bleu(predictions, padded).score,
            "precisions": precisions, "brevity_penalty": brevity, "length_ratio": ratio}


def label_accuracy(predictions: list[str], references: list[list[str]], labels: tuple) -> dict:
    valid = {normalize_answer(label) for label in labels}
    first_lines = [normalize_answer(p.strip().split("\n")[0]) if p.strip() else "" for p in predictions]
    correct = [float(f == normalize_answer(refs[0])) for f, refs in zip(first_lines, references)]
    invalid = [float(f not in valid) for f in first_lines]
    return {"accuracy": sum(correct) / len(correct), "invalid": sum(invalid) / len(invalid)}


def match_accuracy(predictions: list[str], references: list[list[str]]) -> dict:
    correct = [float(normalize_answer(p) == normalize_answer(refs[0])) for p, refs in zip(predictions, references)]
    return {"accuracy": sum(correct) / len(correct)}


def score(task, predictions: list[str], references: list[list[str]]) -> dict:
    """All metrics of `task` (a src.tasks.Task) for the predictions; the primary one is `task.primary`."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{task.name}: {len(predictions)} predictions for {len(references)} references")
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
    raise ValueError(f"{task.name}: unknown metric {task.metric!r}")


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
