"""Tasks, prompts, truncation, metrics and the embedded model (src/tasks.py, data.py, metrics.py, models.py)."""
import json
import random

import numpy as np
import pytest

from src import metrics
from src.data import encode_train, fit_prompt, load_rows, pad_batch
from src.tasks import SEVEN_TASKS, TASKS, get_task, parse_tasks


def first_test_row(task):
    return json.loads(TASKS[task].local_path("test").read_text().splitlines()[0])


EXPECTED = {  # the original's prompt strings for the first row of each shipped test file
    "translation": '"At the time, the Town Hall traffic lights were installed because this was a school route," '
                   'explained Eckert yesterday.\n### Translation from English to German:\n',
    "sentiment": "unflinchingly bleak and desperate\n### Sentiment:\n",
    "nli": "### Premise:\n5 The share of gross national saving used to replace depreciated capital has increased over "
           "the past 40 years.\n### Hypothesis:\nGross national saving was highest this year.\n### Relationship:\n",
    "paraphrasing": "It is situated south of Köroğlu Mountains and to the north of Bolu .\n### Paraphrasing:\n",
    "commonsense": "To fight Ivan Drago in Rocky for sega master system.\n### Solution 1:\nDrago isn't in this game "
                   "because it was released before Rocky IV.\n### Solution 2:\nYou have to defeat Apollo Creed and "
                   "Clubber Lang first.\n### Correct Solution:\n",
}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_prompt_is_the_original_string(task):
    assert TASKS[task].prompt(first_test_row(task)) == EXPECTED[task]


def test_long_prompts_are_the_original_strings():
    s = TASKS["summarization"].prompt(first_test_row("summarization"))
    assert s.startswith("(CNN)Share, and your gift will be multiplied. That may sound like an esoteric adage")
    assert s.endswith('Facebook page. "You are a true angel my friend."\n### Summarization:\n')
    q = TASKS["qa"].prompt(first_test_row("qa"))
    assert q.startswith("### Context:\nThroughout the centuries, the Kenyan Coast has played host")
    assert q.endswith("Vasco da Gama in 1498.\n### Question:\nWhen was the City of Malindi established?\n### Answer:\n")


def test_targets_and_references():
    assert TASKS["sentiment"].target(first_test_row("sentiment")) == "negative"
    assert TASKS["nli"].target(first_test_row("nli")) == "neutral"
    assert TASKS["commonsense"].target(first_test_row("commonsense")) == "You have to defeat Apollo Creed and Clubber Lang first."
    assert TASKS["qa"].references(first_test_row("qa")) == ["14th century", "14th century", "14th century"]


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown task 'sumarization': choose from summarization, translation"):
        get_task("sumarization")
    assert parse_tasks("all") == SEVEN_TASKS and parse_tasks("qa, nli") == ["qa", "nli"]


def test_every_shipped_file_loads_with_the_hub_field_names():
    for task in TASKS.values():
        train, test = load_rows(task, "train", n=3), load_rows(task, "eval")
        assert len(train) == 3 and len(test) == 200
        assert task.prompt(test[0]).endswith(":\n") and task.references(test[0])


def test_empty_data_file_is_a_clear_error(tmp_path, monkeypatch):
    import src.tasks

    (tmp_path / "sentiment").mkdir()
    (tmp_path / "sentiment" / "test.jsonl").write_text("")
    monkeypatch.setattr(src.tasks, "DATA_DIR", tmp_path)
    with pytest.raises(ValueError, match="data file .*sentiment/test.jsonl is empty"):
        load_rows(TASKS["sentiment"], "eval")


# -------------------------------------------------------------------------------------------- truncation
@pytest.fixture(scope="session")
def tokenizer():
    from src.models import embedded_model_dir, load_tokenizer

    return load_tokenizer(embedded_model_dir())


@pytest.mark.parametrize("task", ["summarization", "qa", "sentiment"])
def test_truncation_cuts_the_content_and_keeps_the_template(task, tokenizer):
    t = TASKS[task]
    row = dict(first_test_row(task))
    row[t.content] = " ".join([row[t.content]] * 40)  # far over budget
    for budget in (60, 150):
        ids = fit_prompt(t, row, tokenizer, budget)
        text = tokenizer.decode(ids)
        assert len(ids) <= budget and len(ids) >= budget - 8
        tail = t.prompt(row).split(row[t.content].strip())[-1]  # everything the template puts after the content
        assert text.endswith(tail) and ("### Context:\n" in text) == (task == "qa")


def test_encode_train_masks_the_prompt_and_ends_with_eos(tokenizer):
    t = TASKS["summarization"]
    row = first_test_row("summarization")
    ex = encode_train(t, row, tokenizer, max_len=128, max_target=24)
    assert len(ex["input_ids"]) <= 128 and ex["input_ids"][-1] == tokenizer.eos_token_id
    n_target = sum(l != -100 for l in ex["labels"])
    assert n_target == 25 and ex["labels"][-n_target:] == ex["input_ids"][-n_target:]
    assert tokenizer.decode(ex["input_ids"][:-n_target]).endswith("\n### Summarization:\n")
    batch = pad_batch([[5, 6, 7], [8]], pad_id=2, left=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8]] and batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# ---------------------------------------------------------------------------------------------------- metrics
def test_squad_official_normalization_and_all_gold_answers():
    assert metrics.normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    got = metrics.squad(["Denver Broncos", "the broncos", "Carolina"], [["Denver Broncos"], ["Broncos", "Denver Broncos"], ["Panthers"]])
    assert got["exact_match"] == pytest.approx(200 / 3)
    assert got["f1"] == pytest.approx(200 / 3)
    assert metrics.squad_f1("denver broncos team", "Denver Broncos") == pytest.approx(0.8)


def test_identical_texts_score_one():
    texts = ["The cat sat on the mat today.", "Ein Hund lief schnell über die Straße, sagte er."]
    refs = [[t] for t in texts]
    assert metrics.bleu(texts, refs)["bleu"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in metrics.rouge(texts, refs).values())
    assert metrics.squad(texts, refs) == {"exact_match": 100.0, "f1": 100.0}


def random_pairs(seed, n=30):
    rng = random.Random(seed)
    words = "the a cat dog sat ran on over mat hill quickly slowly , . today he she said Haus".split()
    preds, refs = [], []
    for _ in range(n):
        ref = [rng.choice(words) for _ in range(rng.randint(4, 20))]
        pred = [w if rng.random() < 0.7 else rng.choice(words) for w in ref][:rng.randint(3, len(ref) + 3)]
        preds.append(" ".join(pred))
        refs.append(" ".join(ref))
    return preds, refs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleu_agrees_with_sacrebleu_statistics(seed):
    import sacrebleu

    preds, refs = random_pairs(seed)
    ours = metrics.bleu(preds, [[r] for r in refs])
    theirs = sacrebleu.corpus_bleu(preds, [refs], smooth_method="none", tokenize="13a")
    assert ours["bleu"] * 100 == pytest.approx(theirs.score, abs=1e-9)
    assert ours["brevity_penalty"] == pytest.approx(theirs.bp)
    assert [p * 100 for p in ours["precisions"]] == pytest.approx(theirs.precisions)


@pytest.mark.parametrize("seed", [0, 1])
def test_rouge_agrees_with_rouge_score_called_directly(seed):
    from rouge_score import rouge_scorer

    preds, refs = random_pairs(seed)
    refs = [r.replace(" . ", " .\n") for r in refs]  # newline-separated sentences for rougeLsum
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"])
    direct = [scorer.score(r, p) for p, r in zip(preds, refs)]
    ours = metrics.rouge(preds, [[r] for r in refs])
    for k in ours:
        assert ours[k] == pytest.approx(sum(d[k].fmeasure for d in direct) / len(direct))


def test_label_accuracy_counts_invalid_outputs_and_reads_the_first_line():
    got = metrics.label_accuracy(["Positive\n### more", "negative", "great movie", ""],
                                 [["positive"], ["positive"], ["negative"], ["negative"]], ("negative", "positive"))
    assert got == {"accuracy": 0.25, "invalid": 0.5}
    assert metrics.match_accuracy(["Use a spoon.", "fork"], [["use a spoon"], ["knife"]]) == {"accuracy": 0.5}


def test_normalized_score():
    single = {"a": {"acc": 0.8}, "b": {"f1": 50.0}}
    method = {"a": {"acc": 0.4}, "b": {"f1": 50.0}}
    got = metrics.normalized_score(method, single, {"a": "acc", "b": "f1"})
    assert got == {"per_task": {"a": 0.5, "b": 1.0}, "mean": 0.75}


# ------------------------------------------------------------------------------------------ embedded model
@pytest.mark.slow
def test_embedded_model_loads_offline_and_generates(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from src.models import load_model

    model, tokenizer = load_model("smollm2-135m", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) > 130e6
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:])


def test_unreachable_hub_model_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from src.models import load_model

    from src.errors import BadInput

    with pytest.raises(BadInput, match="cannot load model 'Qwen/Qwen2-0.5B-not-cached'.*smollm2-135m") as e:
        load_model("Qwen/Qwen2-0.5B-not-cached")
    assert isinstance(e.value.__cause__, OSError)  # the hub's own error stays attached


def test_template_longer_than_the_budget(tokenizer):
    from src.data import PromptTooLong

    t = TASKS["commonsense"]
    row = dict(first_test_row("commonsense"), sol1=" ".join(["a long first solution"] * 30))
    with pytest.raises(PromptTooLong, match="template alone is longer than the budget of 60"):
        fit_prompt(t, row, tokenizer, 60)
    assert tokenizer.decode(fit_prompt(t, row, tokenizer, 60, strict=False)) == t.prompt(row)  # kept whole


def test_paired_bootstrap_recomputes_corpus_bleu_per_resample_and_pairs_the_rows():
    import sacrebleu

    task = get_task("translation")
    refs_pred, refs = random_pairs(3, n=30)
    other, _ = random_pairs(4, n=30)
    third, _ = random_pairs(5, n=30)
    stats = {"single": {"translation": metrics.example_stats(task, refs_pred, [[r] for r in refs])},
             "merge": {"translation": metrics.example_stats(task, other, [[r] for r in refs])},
             "moa": {"translation": metrics.example_stats(task, third, [[r] for r in refs])}}
    n_boot = 40
    ci = metrics.paired_bootstrap([task], stats, n_boot=n_boot, seed=7, compare=("moa",))
    # the reference: the same draws (one task, so the generator's first call), sacreBLEU on each resample's rows
    draws = np.random.default_rng(7).integers(0, 30, size=(n_boot, 30))

    def corpus(preds, idx):
        return sacrebleu.corpus_bleu([preds[i] for i in idx], [[refs[i] for i in idx]], smooth_method="none",
                                     tokenize="13a").score / 100

    single = np.array([corpus(refs_pred, d) for d in draws])
    merge = np.array([corpus(other, d) for d in draws])
    q = [2.5, 97.5]
    assert ci["merge"]["per_task"]["translation"] == pytest.approx(tuple(np.percentile(merge, q)), abs=1e-9)
    assert ci["merge"]["diff"]["translation"] == pytest.approx(tuple(np.percentile(merge - single, q)), abs=1e-9)
    assert ci["merge"]["ratio"]["translation"] == pytest.approx(tuple(np.percentile(merge / single, q)), abs=1e-9)
    moa = np.array([corpus(third, d) for d in draws])   # one task: the normalized score is the ratio to single
    assert ci["merge"]["normalized_diff"]["moa"] == pytest.approx(
        tuple(np.percentile(merge / single - moa / single, q)), abs=1e-9)
    assert ci["single"]["diff"]["translation"] == (0.0, 0.0) and ci["single"]["normalized"] == (1.0, 1.0)


def test_paired_intervals_are_narrower_than_unpaired_for_a_method_that_tracks_the_reference():
    task = get_task("sentiment")
    rng = np.random.default_rng(0)
    correct = (rng.random(200) < 0.6).astype(float)
    better = correct.copy()
    better[np.flatnonzero(correct == 0)[:10]] = 1.0     # right on 10 more rows, the same rows otherwise
    ci = metrics.paired_bootstrap([task], {"single": {"sentiment": correct[:, None]},
                                               "m": {"sentiment": better[:, None]}}, n_boot=500)
    lo, hi = ci["m"]["diff"]["sentiment"]
    assert 0 < lo <= 0.05 <= hi < 0.1                  # the 10/200 gain, always positive when paired
    single_lo, single_hi = ci["single"]["per_task"]["sentiment"]
    assert hi - lo < (single_hi - single_lo) / 2


def test_routing_accuracy_interval_resamples_each_tasks_prompts_among_themselves():
    """grouped_mean_interval (the routing accuracy's interval): each task's prompts resampled within the task. Checked
    against the same draws done prompt by prompt, against the normal approximation of a stratified mean's spread
    (2 x 1.96 x its standard error, within 10% at 2000 resamples of 300 prompts), and as zero width where every
    task's prompts agree (only the mix between tasks varies, and the resampling keeps it)."""
    rng = np.random.default_rng(3)
    groups = np.repeat([0, 1, 2], [120, 100, 80])
    values = rng.random(300) < np.array([0.9, 0.6, 0.3])[groups]   # share of a prompt's layers routed right
    values = values * rng.integers(1, 5, size=300) / 4
    lo, hi = metrics.grouped_mean_interval(values, groups, n_boot=50, seed=11)
    draws = np.random.default_rng(11)
    means = np.zeros(50)
    for g in (0, 1, 2):
        members = [v for v, h in zip(values, groups) if h == g]
        picks = draws.integers(0, len(members), size=(50, len(members)))
        means += np.array([sum(members[i] for i in row) for row in picks]) / 300
    assert (lo, hi) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=1e-12)
    lo, hi = metrics.grouped_mean_interval(values, groups, n_boot=2000)
    se = np.sqrt(sum((groups == g).sum() * values[groups == g].var() for g in (0, 1, 2))) / 300
    assert lo < values.mean() < hi and (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert metrics.grouped_mean_interval(np.array([1.0, 1.0, 0.5, 0.5, 0.5]), np.array([0, 0, 1, 1, 1])) == \
        pytest.approx((0.7, 0.7), abs=1e-12)
