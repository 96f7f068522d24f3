"""The merges that look at data (src/merge_fit.py) on a tiny model: they lower the loss on their rows from their
starting point, the grid search keeps the candidate of lowest validation loss, and none of them reads a test row."""
import contextlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_tiny_model
from src import peft_files
from src import lora
from src import merge_fit, provenance, registry
from src.errors import BadInput
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
    return model, tokenizer, [peft_files.load_adapter(root / "adapters" / t) for t in TASKS], root / "data", root / "adapters"


@pytest.fixture
def no_test_rows(trained, monkeypatch):
    import src.tasks

    monkeypatch.setattr(src.tasks, "DATA_DIR", trained[3])  # reading a test row would raise MissingFile


def fit_data(trained) -> merge_fit.FitData:
    model, tokenizer = trained[:2]
    return merge_fit.FitData(model, tokenizer, TASKS, records(trained), batch_size=4)


def records(trained) -> dict:
    return {t: provenance.read_record(trained[4] / t) for t in TASKS}


def test_cat_learns_its_weights_and_lowers_the_loss(trained, no_test_rows):
    merged, info = merge_fit.build("cat", trained[2], fit_data(trained), select_rows=0,
                                   fixed=dict(rows=8, epochs=3, lr=0.05))
    assert sum(info["loss_after"].values()) < sum(info["loss_before"].values())
    assert info["rows_per_task"] == {"sentiment": 8, "nli": 8} and info["seconds"] >= 0
    assert info["rows"] == {"sentiment": [48, 56], "nli": [48, 56]}  # after the 48 rows the adapters trained on
    alphas = info["alphas"]["model.layers.0.self_attn.q_proj"]
    assert len(alphas) == 2 and alphas != [0.5, 0.5]  # started at 1/n, moved
    layer = merged.modules["model.layers.0.self_attn.q_proj"]
    assert layer.A.shape[0] == 16  # the two rank-8 LoRAs, concatenated with their learned weights
    assert not lora.lora_layers(trained[0])  # the model is left as it was


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
    assert [c["params"]["lam"] for c in candidates][:4] == [0.125, 0.25, 0.5, 1.0]
    assert info["params"] == min(candidates, key=lambda c: c["val_loss"])["params"]
    tried = [c["params"]["lam"] for c in candidates]
    assert min(tried) < info["params"]["lam"] < max(tried) and info["selection"]["at_edge"] == []
    assert info["selection"]["rows"] == {"sentiment": [48, 52], "nli": [48, 52]}  # after the training rows
    fixed, fixed_info = merge_fit.build("task_arithmetic", trained[2], fit_data(trained), select_rows=4,
                                        fixed={"lam": 0.3})
    assert fixed_info["params"] == {"lam": 0.3} and "selection" not in fixed_info


def test_grid_extends_past_its_edge_until_the_best_is_inside(trained, no_test_rows, monkeypatch):
    """A validation loss whose minimum (lambda = 2.5) lies above the grid (0.125 .. 1): the search doubles past the
    top until a larger value is worse, so the chosen value has a worse neighbour on each side."""
    merged_with = []
    monkeypatch.setattr(merge_fit.merges, "merge", lambda adapters, name, **p: merged_with.append(p) or p)
    monkeypatch.setattr(merge_fit.lora, "folded", lambda model, merged: contextlib.nullcontext())
    monkeypatch.setattr(merge_fit.FitData, "loss", lambda self, ex: {t: (merged_with[-1]["lam"] - 2.5) ** 2
                                                                    for t in TASKS})
    _, info = merge_fit.build("task_arithmetic", trained[2], fit_data(trained), select_rows=2)
    assert [c["params"]["lam"] for c in info["selection"]["candidates"]] == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0]
    assert info["params"] == {"lam": 2.0} and info["selection"]["at_edge"] == []
    # and below the grid, by halving; a range's own end (density 1) stops the search there
    monkeypatch.setattr(merge_fit.FitData, "loss", lambda self, ex: {t: merged_with[-1]["lam"] for t in TASKS})
    _, info = merge_fit.build("task_arithmetic", trained[2], fit_data(trained), select_rows=2)
    assert [c["params"]["lam"] for c in info["selection"]["candidates"]][4:] == [0.125 / 2 ** k for k in range(1, 9)]
    assert info["selection"]["at_edge"] == ["lam"]  # MAX_EXTENSIONS reached: recorded, not hidden
    density = registry.METHODS["ties"].params["density"]
    assert merge_fit.beyond_edge(density, 1.0, [0.5, 1.0]) is None and merge_fit.beyond_edge(density, 0.5, [0.5, 1.0]) == 0.25


def test_rows_come_from_the_training_records_and_never_overlap_them(trained, no_test_rows):
    recs = records(trained)
    assert recs["nli"]["rows"] == {"train": [0, 48], "validation": [48, 56]}
    assert fit_data(trained).rows(5) == {"sentiment": [48, 53], "nli": [48, 53]}
    trained_on_more = {**recs, "nli": {**recs["nli"], "rows": {"train": [0, 450], "validation": [450, 458]}}}
    assert merge_fit.FitData(trained[0], trained[1], TASKS, trained_on_more).rows(8)["nli"] == [450, 458]
    with pytest.raises(BadInput, match="nli: 600 rows after the 450 its adapter trained on need 1050 .* has 1000"):
        merge_fit.FitData(trained[0], trained[1], TASKS, trained_on_more).examples(600)
    all_trained = {**recs, "nli": {**recs["nli"], "rows": {"train": [0, 1000], "validation": [1000, 1000]}}}
    with pytest.raises(BadInput, match="nli: 4 rows after the 1000 .* the data has 1000"):
        merge_fit.FitData(trained[0], trained[1], TASKS, all_trained).examples(4)
    with pytest.raises(BadInput, match="the adapter of nli has no training.json"):
        merge_fit.FitData(trained[0], trained[1], TASKS, {**recs, "nli": None}).rows(4)
    assert not merge_fit.needs_rows("svd", 8) and not merge_fit.needs_rows("ties", 8, {"lam": 1.0})
    assert merge_fit.needs_rows("ties", 8) and merge_fit.needs_rows("cat", 0) and not merge_fit.needs_rows("ties", 0)
    other_data = {**recs, "nli": {**recs["nli"], "source": {**recs["nli"]["source"], "sha256": "0" * 16}}}
    with pytest.raises(BadInput, match="nli: its adapter was trained on"):
        merge_fit.FitData(trained[0], trained[1], TASKS, other_data)


def test_cat_permuted_adapters_learn_permuted_alphas(trained, no_test_rows):
    """CAT is not order-invariant by construction (a gradient method), but what holds is tested: the adapters listed
    the other way round train on the same batches and learn the same alphas, permuted. Not bitwise: each adapted
    layer sums the stacked adapters in the other order, a float32 rounding of relative size R * eps (R = 16 stacked
    ranks), entering the gradient once per adapted layer (8); AdamW, invariant to the gradient's scale, turns a
    relative gradient error delta into at most 2 delta times its largest step, lr * 3.17, at each of the 4 steps.
    Not a worst case (an alpha whose gradient nearly cancels could step the other way): measured here, 5e-7 against
    this tolerance of 2e-5."""
    fixed = dict(rows=8, epochs=2, lr=0.05)
    _, forward = merge_fit.build("cat", trained[2], fit_data(trained), select_rows=0, fixed=fixed)
    data = merge_fit.FitData(trained[0], trained[1], TASKS[::-1], records(trained), batch_size=4)
    _, backward = merge_fit.build("cat", trained[2][::-1], data, select_rows=0, fixed=fixed)
    steps, eps32 = 2 * 2 * 8 // 4, 2.0 ** -24
    bound = steps * 0.05 * 3.17 * 2 * (16 * eps32) * 8
    for name, alphas in forward["alphas"].items():
        assert alphas == pytest.approx(backward["alphas"][name][::-1], abs=bound), name


def test_gram_matrices_are_the_inputs_of_each_tasks_own_model(trained, no_test_rows):
    """gram_matrices (batches of 3, right-padded) against Grams written here: each example run alone (no padding)
    through the model with the task's adapter folded in, the inputs of q_proj and o_proj caught by forward hooks,
    X^T X summed in float64. The model runs in float32 and a padded batch may take other kernels than a lone row,
    so activations agree to float32 rounding (~1e-6 relative after 2 layers); 1e-4 on the Gram leaves a margin."""
    model, tokenizer, adapters = trained[:3]
    data = fit_data(trained)
    examples, spans = data.training_examples(5)
    assert spans == {"sentiment": [0, 5], "nli": [0, 5]}  # the first rows the adapters trained on
    grams = merge_fit.gram_matrices(model, adapters[1], examples["nli"], 3, tokenizer.eos_token_id)
    q, k, o = (f"model.layers.1.self_attn.{m}" for m in ("q_proj", "k_proj", "o_proj"))
    assert grams[q] is grams[k] and grams[q] is not grams[o]  # q, k, v read one hidden state
    want = {q: 0, o: 0}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, inp, n=n: want.__setitem__(n, want[n] + inp[0][0].double().T @ inp[0][0].double())) for n in want]
    try:
        with torch.no_grad(), lora.folded(model, adapters[1]):
            for e in examples["nli"]:
                model(torch.tensor([e["input_ids"]]))
    finally:
        for h in hooks:
            h.remove()
    for n in want:
        assert (grams[n] - want[n]).abs().max() <= 1e-4 * want[n].abs().max(), n


def test_regmean_chooses_alpha_on_validation_rows_and_merges_the_grams_of_the_training_rows(trained, no_test_rows):
    model, tokenizer, adapters = trained[:3]
    merged, info = merge_fit.build("regmean", adapters, fit_data(trained), select_rows=4, fixed={"rows": 6})
    candidates = info["selection"]["candidates"]
    assert [c["params"]["alpha"] for c in candidates][:4] == [0.1, 0.5, 0.9, 1.0]
    assert info["params"] == min(candidates, key=lambda c: c["val_loss"])["params"]
    assert info["gram_rows"] == {"sentiment": [0, 6], "nli": [0, 6]}             # Grams: rows trained on
    assert info["selection"]["rows"] == {"sentiment": [48, 52], "nli": [48, 52]}  # alpha: rows after them
    examples, _ = fit_data(trained).training_examples(6)
    grams = [merge_fit.gram_matrices(model, a, examples[t], 4, tokenizer.eos_token_id) for t, a in zip(TASKS, adapters)]
    for name, got in merged.modules.items():
        want = merge_fit.merges.regmean([a.modules[name] for a in adapters], [g[name] for g in grams],
                                        info["params"]["alpha"])
        assert got.A.shape[0] == 16 and torch.allclose(got.delta(), want.delta(), rtol=1e-4, atol=1e-6), name


def test_regmean_statistics_are_the_per_task_grams_summed(trained, no_test_rows):
    """regmean_pass against gram_matrices (each task's Grams held at once, the reference): S = sum_i G_i, the task
    diagonals diag(G_i) and G_i A_i^T, per distinct input and module. Same batches, so the same activations; the
    float64 sums run in another order (tasks into one S), hence a relative bound of 1e-12, far above the ~1e-15 of
    reordering a float64 sum of a few hundred terms and far below any change of the data."""
    model, tokenizer, adapters = trained[:3]
    examples, _ = fit_data(trained).training_examples(6)
    rows = [examples[t] for t in TASKS]
    inputs = merge_fit.model_inputs(model, adapters[0])
    assert [i.modules for i in inputs[:2]] == [[f"model.layers.0.self_attn.{m}_proj" for m in "qkv"],
                                                ["model.layers.0.self_attn.o_proj"]]
    stats, projected = merge_fit.regmean_pass(model, adapters, rows, inputs, 4, tokenizer.eos_token_id)
    grams = [merge_fit.gram_matrices(model, a, r, 4, tokenizer.eos_token_id) for a, r in zip(adapters, rows)]
    for inp in inputs:
        s = stats[inp.modules[0]]
        want = grams[0][inp.modules[0]] + grams[1][inp.modules[0]]
        assert (s.summed - want).abs().max() <= 1e-12 * want.abs().max()
        for t in range(2):
            assert torch.allclose(s.diagonals[t], torch.diagonal(grams[t][inp.modules[0]]), rtol=1e-12, atol=0)
            for m in inp.modules:
                p = grams[t][m] @ adapters[t].modules[m].A.double().T
                assert (projected[m][t] - p).abs().max() <= 1e-12 * p.abs().max(), m


def test_regmean_in_layer_groups_equals_one_pass_and_ignores_the_order_of_the_tasks(trained, no_test_rows, capsys):
    """A budget that fits one input at a time: as many passes as distinct inputs (each forward stopped after its
    last module), and the same merge as one pass at every alpha; the tasks given in the other order merge to the
    same update (float32 factors: a few u32)."""
    model, tokenizer, adapters = trained[:3]
    one_make, one_info = merge_fit.regmean(adapters, fit_data(trained), rows=6)
    assert one_info["gram_memory"]["passes"] == 1 and "one pass over each adapter's rows" in capsys.readouterr().out
    inputs = merge_fit.model_inputs(model, adapters[0])
    alphas = merge_fit.reachable(registry.get_method("regmean").params["alpha"])
    assert len(alphas) == 12 and 0.1 / 8 in alphas   # the grid's 4 and 8 halvings below 0.1 (1 ends the range)
    # alpha given: only it is solved in the passes, and any other alpha asked for runs the passes again
    plan = merge_fit.plan_passes(inputs, adapters, None, "cpu", model)
    budget = (max(plan.bytes_per_input) + plan.workspace) / 1e9
    make, info = merge_fit.regmean(adapters, fit_data(trained), rows=6, memory=budget, alpha=0.1)
    assert info["gram_memory"]["passes"] == len(inputs) == 4 and f"{len(inputs)} passes" in capsys.readouterr().out
    data = fit_data(trained)
    swapped = merge_fit.FitData(data.model, data.tokenizer, TASKS[::-1], records(trained), batch_size=4)
    swapped_make, _ = merge_fit.regmean(adapters[::-1], swapped, rows=6)
    for alpha in (0.1, 0.5, 1.0, 0.1 / 8):
        a, b, c = one_make({"alpha": alpha}), make({"alpha": alpha}), swapped_make({"alpha": alpha})
        for name in a.modules:
            want = a.modules[name].delta().double()
            assert torch.equal(a.modules[name].A, b.modules[name].A), name   # the same float64 sums, in the same order
            assert (c.modules[name].delta().double() - want).abs().max() <= 1e-5 * want.abs().max(), name


def test_regmean_refuses_a_budget_below_one_inputs_statistics_in_one_line(trained, no_test_rows):
    model, tokenizer, adapters = trained[:3]
    with pytest.raises(BadInput, match=r"^regmean needs .* MB for the Gram statistics of one input .* raise --memory GB"):
        merge_fit.regmean(adapters, fit_data(trained), rows=6, memory=1e-6)


def test_regmean_float32_products_stay_within_the_dot_product_rounding_bound(trained, no_test_rows):
    """The bound regmean_pass's docstring gives for float32 batch products summed in float64: every entry of S within
    gamma_n sqrt(S_jj S_kk) of the float64 statistics, n the most tokens in one batch, gamma_n = n u / (1 - n u),
    u = 2^-24 (a dot product's rounding bound, |x|.|y| <= sqrt(x.x y.y), summed over batches by Cauchy-Schwarz);
    the float64 sums themselves add ~1e-16 relative, hence the 1.01 margin."""
    model, tokenizer, adapters = trained[:3]
    examples, _ = fit_data(trained).training_examples(8)
    rows = [examples[t] for t in TASKS]
    inputs = merge_fit.model_inputs(model, adapters[0])
    exact, _ = merge_fit.regmean_pass(model, adapters, rows, inputs, 4, tokenizer.eos_token_id)
    single, _ = merge_fit.regmean_pass(model, adapters, rows, inputs, 4, tokenizer.eos_token_id, dtype=torch.float32)
    n = max(sum(len(e["input_ids"]) for e in r[i:i + 4]) for r in rows for i in range(0, len(r), 4))
    u = 2.0 ** -24
    gamma = n * u / (1 - n * u)
    for key, s in exact.items():
        scale = torch.sqrt(torch.outer(torch.diagonal(s.summed), torch.diagonal(s.summed)))
        error = (single[key].summed - s.summed).abs()
        assert (error <= 1.01 * gamma * scale).all(), key
        assert error.max() > 0   # float32 did round: the bound is exercised, not trivially met


def test_regmean_in_passes_solves_every_alpha_a_search_may_try_in_those_passes(trained, no_test_rows, monkeypatch):
    """Without a given alpha, a plan of several passes solves the grid and its extensions (`reachable`) in the
    passes themselves: asking for any of them then runs no pass again, and equals the one-pass merge."""
    model, tokenizer, adapters = trained[:3]
    one_make, _ = merge_fit.regmean(adapters, fit_data(trained), rows=6)
    plan_passes, regmean_pass, passes = merge_fit.plan_passes, merge_fit.regmean_pass, []

    def one_input_per_pass(*args, **kwargs):   # the tiny model fits at once: split it as a small budget would
        plan = plan_passes(*args, **kwargs)
        plan.passes = [[i] for i in range(len(plan.inputs))]
        return plan

    def counted(*args, **kwargs):
        passes.append(len(args[3]))
        return regmean_pass(*args, **kwargs)

    monkeypatch.setattr(merge_fit, "plan_passes", one_input_per_pass)
    monkeypatch.setattr(merge_fit, "regmean_pass", counted)
    make, info = merge_fit.regmean(adapters, fit_data(trained), rows=6)
    assert info["gram_memory"]["passes"] == 4 and passes == [1, 1, 1, 1]
    for alpha in merge_fit.reachable(registry.get_method("regmean").params["alpha"]):
        got, want = make({"alpha": alpha}), one_make({"alpha": alpha})
        assert all(torch.equal(got.modules[n].A, want.modules[n].A) for n in want.modules), alpha
    assert passes == [1, 1, 1, 1]   # no pass run again


def test_regmean_at_a_rank_is_the_best_rank_k_lora_of_the_tasks_grams(trained, no_test_rows):
    """`regmean_r4` through build (statistics summed in the pass) against merges.regmean_solve at rank 4 from each
    task's own Gram matrices (gram_matrices, the per-task reference): rank 4 everywhere and the same update, to the
    float32 factors' rounding."""
    model, tokenizer, adapters = trained[:3]
    data = fit_data(trained)
    merged, info = merge_fit.build("regmean_r4", adapters, data, select_rows=0, fixed={"rows": 6, "alpha": 0.5})
    assert info["params"]["rank"] == 4 and info["params"]["alpha"] == 0.5
    examples, _ = data.training_examples(6)
    grams = [merge_fit.gram_matrices(model, a, examples[t], 4, tokenizer.eos_token_id) for a, t in zip(adapters, TASKS)]
    for name, got in merged.modules.items():
        loras = [a.modules[name] for a in adapters]
        stats, projected = merge_fit.merges.regmean_statistics(loras, [g[name] for g in grams])
        want = merge_fit.merges.regmean_solve(loras, stats, projected, 0.5, rank=4).delta().double()
        assert got.A.shape[0] == 4 and got.B.shape[1] == 4
        assert (got.delta().double() - want).abs().max() <= 1e-5 * want.abs().max(), name


def dense_regmean_block(deltas: list, grams: list, alpha: float, rank: int | None) -> torch.Tensor:
    """RegMean of one module written from the paper in dense float64: W - W_0 = (sum_i D_i G_i') G'^-1 with
    G_i' = alpha G_i + (1 - alpha) diag(G_i), G' = sum_i G_i'; at a rank k, the best rank-k update in the metric of
    G' = L L^T (the truncated SVD of D L, mapped back by L^-1), by numpy's SVD."""
    reg = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in grams]
    G = sum(reg)
    D = sum(d @ g for d, g in zip(deltas, reg)) @ torch.linalg.inv(G)
    if rank is None:
        return D
    L = torch.linalg.cholesky(G)
    U, S, Vt = np.linalg.svd((D @ L).numpy())
    return torch.from_numpy(U[:, :rank] * S[:rank] @ Vt[:rank]) @ torch.linalg.inv(L)


@pytest.mark.parametrize("rank", [None, 3])
def test_regmean_pp_is_regmean_block_by_block_on_the_merged_models_inputs(trained, no_test_rows, rank):
    """RegMean++ (build, `regmean_pp` or `regmean_pp_r3`) against a reference written from its definition: for each
    block in turn, each task's Gram matrices by gram_matrices (the whole model's forward, the reference's merge of
    the earlier blocks folded in as dense updates, the task's own adapter in this block), then dense RegMean
    (dense_regmean_block). Unequal ranks (8 and 5); the tasks in the other order merge to the same updates.
    Tolerance: the factors returned are float32 (u = 2^-24 relative each), and both sides fold their earlier blocks
    as float32 weights (factors here, dense updates there), so the activations differ by a few u, which the solve
    can multiply by G''s condition number (asserted below 200; 88 on this model): 8 u * 200 = 1e-4 relative. On
    AMD EPYC the largest difference was 2.7e-7. A wrong input (RegMean's own, the task model's) is off by more than
    1e-2 on the second block (0.23 to 0.48 there)."""
    model, tokenizer, adapters = trained[:3]
    adapters = [adapters[0], merge_fit.merges.truncate(adapters[1], 5)]
    data, alpha = fit_data(trained), 0.5
    name = "regmean_pp" if rank is None else f"regmean_pp_r{rank}"
    merged, info = merge_fit.build(name, adapters, data, select_rows=0, fixed={"rows": 6, "alpha": alpha})
    examples, _ = data.training_examples(6)
    rows = [examples[t] for t in TASKS]
    block_of = {m: int(m.split(".")[2]) for m in adapters[0].modules}
    reference, conds = {}, []
    for block in sorted(set(block_of.values())):
        names = [m for m in adapters[0].modules if block_of[m] == block]
        earlier = lora.Adapter({m: lora.Lora(torch.eye(d.shape[1]), d.float(), 1.0) for m, d in reference.items()},
                               adapters[0].base_model)
        with lora.folded(model, earlier):
            grams = [merge_fit.gram_matrices(model, lora.Adapter({m: a.modules[m] for m in names}, a.base_model),
                                             r, 4, tokenizer.eos_token_id) for a, r in zip(adapters, rows)]
        for m in names:
            deltas = [a.modules[m].delta().double() for a in adapters]
            reference[m] = dense_regmean_block(deltas, [g[m] for g in grams], alpha, rank)
            conds.append(torch.linalg.cond(sum(alpha * g[m] + (1 - alpha) * torch.diag(torch.diagonal(g[m]))
                                               for g in grams)).item())
    assert max(conds) < 200
    swapped = merge_fit.FitData(model, tokenizer, TASKS[::-1], records(trained), batch_size=4)
    other, _ = merge_fit.build(name, adapters[::-1], swapped, select_rows=0, fixed={"rows": 6, "alpha": alpha})
    plain, _ = merge_fit.build("regmean" if rank is None else f"regmean_r{rank}", adapters, data, select_rows=0,
                               fixed={"rows": 6, "alpha": alpha})
    last = max(block_of.values())
    for m, want in reference.items():
        for got in (merged.modules[m], other.modules[m]):
            assert rank is None or got.A.shape[0] == rank
            assert (got.delta().double() - want).abs().max() <= 1e-4 * want.abs().max(), m
        if block_of[m] == last:   # the last block's inputs went through the merged blocks: not RegMean's
            assert (plain.modules[m].delta().double() - want).abs().max() > 1e-2 * want.abs().max(), m
    assert info["gram_rows"] == {"sentiment": [0, 6], "nli": [0, 6]} and len(info["pass_seconds"]) == 1


def test_regmean_pp_over_adapters_of_one_block_is_regmean(trained, no_test_rows):
    """Adapters of the second block only: the first block is the base model's in every task model and in the merge,
    so the second block's inputs are the same for RegMean and RegMean++ (the unadapted block is run, not merged),
    and the merges agree to the float32 factors' rounding (the bound of the test above)."""
    adapters = [lora.Adapter({m: f for m, f in a.modules.items() if m.startswith("model.layers.1.")}, a.base_model)
                for a in trained[2]]
    data = fit_data(trained)
    pp, _ = merge_fit.build("regmean_pp", adapters, data, select_rows=0, fixed={"rows": 6, "alpha": 0.5})
    plain, _ = merge_fit.build("regmean", adapters, data, select_rows=0, fixed={"rows": 6, "alpha": 0.5})
    assert sorted(pp.modules) == sorted(plain.modules) and len(pp.modules) == 4
    for m, want in plain.modules.items():
        want = want.delta().double()
        assert (pp.modules[m].delta().double() - want).abs().max() <= 1e-4 * want.abs().max(), m
