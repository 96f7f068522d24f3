"""Merges at a rank budget: RegMean's best rank-k LoRA in its own objective, Compress-then-Merge, and the rank
variants (`<method>_r<k>`) that evaluation and merge_adapters.py take. The references are dense float64 formulas
written from the papers (numpy), on fresh random factors of unequal ranks."""
import numpy as np
import pytest
import torch

from src import lora, merge_fit, merges, registry
from src.errors import BadInput
from src.evaluation import parse_merge_params, parse_methods


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def regmean_problem(seed: int, ranks=(3, 5, 2), d_in=12, d_out=9, tokens=40):
    """Task LoRAs of unequal ranks and scales, and each task's Gram matrix of random correlated inputs."""
    gen = torch.Generator().manual_seed(seed)
    loras = [lora.Lora(torch.randn(r, d_in, generator=gen, dtype=torch.float64),
                       torch.randn(d_out, r, generator=gen, dtype=torch.float64), 0.5 + i) for i, r in enumerate(ranks)]
    mix = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64)
    grams = []
    for _ in ranks:
        X = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64) @ mix
        grams.append(X.T @ X)
    return loras, grams


def regularised(G, alpha):
    return alpha * G + (1 - alpha) * np.diag(np.diag(G))


def objective(D, loras, grams, alpha) -> float:
    """RegMean's objective for the update D (W_0 cancels): sum_i tr((D - D_i) G_i' (D - D_i)^T)."""
    return sum(float(np.trace((D - f.delta().numpy()) @ regularised(G.numpy(), alpha) @ (D - f.delta().numpy()).T))
               for f, G in zip(loras, grams))


def dense_regmean_rank(loras, grams, alpha, k):
    """The optimum from the paper's formula, whitened by the symmetric square root of G' (not its Cholesky factor):
    D* = (sum_i D_i G_i') G'^-1, then [D* G'^1/2]_k G'^-1/2."""
    Gs = [regularised(G.numpy(), alpha) for G in grams]
    G = sum(Gs)
    D = sum(f.delta().numpy() @ g for f, g in zip(loras, Gs)) @ np.linalg.inv(G)
    w, V = np.linalg.eigh(G)
    root, inv_root = (V * np.sqrt(w)) @ V.T, (V / np.sqrt(w)) @ V.T
    U, S, Vt = np.linalg.svd(D @ root)
    return (U[:, :k] * S[:k]) @ Vt[:k] @ inv_root, D


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_regmean_rank_k_is_the_optimum_of_its_objective(alpha):
    loras, grams = regmean_problem(0)
    R = sum(f.A.shape[0] for f in loras)
    for k in (1, 4, 7):
        stats, projected = merges.regmean_statistics(loras, grams)
        got = merges.regmean_solve(loras, stats, projected, alpha, rank=k)
        assert got.A.shape == (k, 12) and got.B.shape == (9, k)
        want, full = dense_regmean_rank(loras, grams, alpha, k)
        assert rel(got.delta().numpy(), want) <= 1e-9, (k, rel(got.delta().numpy(), want))
        best = objective(got.delta().numpy(), loras, grams, alpha)
        U, S, Vt = np.linalg.svd(full)
        plain = objective((U[:, :k] * S[:k]) @ Vt[:k], loras, grams, alpha)
        assert best <= plain * (1 + 1e-12), (k, best, plain)
        # no rank-k perturbation of the optimum does better: D' = (B_k + e X)(A_k + e Y)
        gen = torch.Generator().manual_seed(k)
        for eps in (1e-3, 1e-1, 1.0):
            for _ in range(10):
                X = torch.randn(got.B.shape, generator=gen, dtype=torch.float64)
                Y = torch.randn(got.A.shape, generator=gen, dtype=torch.float64)
                other = ((got.B + eps * X) @ (got.A + eps * Y)).numpy()
                assert objective(other, loras, grams, alpha) >= best * (1 - 1e-12)
    # at k >= R, RegMean itself
    full = merges.regmean(loras, grams, alpha)
    stats, projected = merges.regmean_statistics(loras, grams)
    for k in (R, R + 3):
        got = merges.regmean_solve(loras, stats, projected, alpha, rank=k)
        assert torch.equal(got.A, full.A) and torch.equal(got.B, full.B)


def test_regmean_rank_k_does_not_depend_on_the_order_of_the_tasks():
    loras, grams = regmean_problem(1, ranks=(4, 1, 3, 2))
    order = [2, 0, 3, 1]
    results = []
    for ls, gs in ((loras, grams), ([loras[i] for i in order], [grams[i] for i in order])):
        stats, projected = merges.regmean_statistics(ls, gs)
        results.append(merges.regmean_solve(ls, stats, projected, 0.9, rank=3).delta().numpy())
    assert rel(results[1], results[0]) <= 1e-10


def dense_ctm(Ds, k, beta, density, lam, tol=1e-6):
    """Compress then Merge on the dense updates, from its description: norm-balanced updates, their Tucker-2
    factors by HOOI (SVD initialisation, tensorly's stopping rule), each update's k x k coordinates, TIES there
    (int(density k^2) largest entries per task, sign of the sum, mean of the agreeing nonzero entries)."""
    norms = [np.linalg.norm(D) for D in Ds]
    X = [D * (beta + (1 - beta) * np.mean(norms) / n) for D, n in zip(Ds, norms)]
    U0 = np.linalg.svd(np.hstack(X))[0][:, :k]
    U1 = np.linalg.svd(np.hstack([x.T for x in X]))[0][:, :k]
    total, previous = np.sqrt(sum(np.sum(x ** 2) for x in X)), None
    for iteration in range(1000):
        U0 = np.linalg.svd(np.hstack([x @ U1 for x in X]))[0][:, :k]
        U1 = np.linalg.svd(np.hstack([x.T @ U0 for x in X]))[0][:, :k]
        core = np.sqrt(sum(np.sum((U0.T @ x @ U1) ** 2) for x in X))
        error = np.sqrt(abs(total ** 2 - core ** 2)) / total
        if iteration > 1 and abs(previous - error) < tol:   # tensorly's partial_tucker: from the third iteration
            break
        previous = error
    trimmed = []
    for D in Ds:
        C = U0.T @ D @ U1
        keep = int(density * C.size)
        cut = np.sort(np.abs(C).ravel())[::-1][keep - 1] if keep else np.inf
        trimmed.append(np.where(np.abs(C) >= cut, C, 0.0))
    T = np.stack(trimmed)
    sign = np.where(T.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(T) == sign) & (T != 0)
    merged = (T * agree).sum(0) / np.maximum(agree.sum(0), 1)
    return lam * U0 @ merged @ U1.T


@pytest.mark.parametrize("k,beta,density", [(4, 0.25, 0.25), (6, 0.0, 0.5), (3, 1.0, 1.0)])
def test_ctm_against_its_dense_definition(k, beta, density):
    gen = torch.Generator().manual_seed(k)
    adapters = [lora.Adapter({"m.q_proj": lora.Lora(torch.randn(r, 20, generator=gen, dtype=torch.float64),
                                                  torch.randn(18, r, generator=gen, dtype=torch.float64), s)})
                for r, s in ((4, 1.0), (6, 0.5), (2, 2.0), (5, 1.5))]
    got = merges.merge(adapters, "ctm", rank=k, beta=beta, density=density, lam=0.75).modules["m.q_proj"]
    assert got.A.shape[0] == k
    want = dense_ctm([a.modules["m.q_proj"].delta().numpy() for a in adapters], k, beta, density, 0.75)
    assert rel(got.delta().numpy(), want) <= 1e-8, rel(got.delta().numpy(), want)


def test_ctm_keeps_a_single_loras_size_by_default():
    gen = torch.Generator().manual_seed(5)
    adapters = [lora.Adapter({"m": lora.Lora(torch.randn(r, 30, generator=gen), torch.randn(24, r, generator=gen), 1.0)})
                for r in (8, 8, 6)]
    assert merges.merge(adapters, "ctm").modules["m"].A.shape == (8, 30)


def test_rank_variants_are_named_parsed_and_refused_clearly():
    assert registry.split_rank("regmean_r8") == ("regmean", 8)
    assert registry.split_rank("ties_r16") == ("ties", 16)
    assert registry.split_rank("ties") == ("ties", None)
    assert registry.split_rank("nothing_r8") == ("nothing_r8", None) and not registry.is_merge("nothing_r8")
    assert parse_methods("single,regmean_r8,ctm_r8") == ["single", "regmean_r8", "ctm_r8"]
    assert parse_methods("single,regmean,ties,svd", rank=16) == ["single", "regmean_r16", "ties_r16", "svd_r16"]
    for bad in ("ties_r0", "ties_r", "single_r8"):
        with pytest.raises(BadInput, match="unknown method"):
            parse_methods(bad)
    with pytest.raises(BadInput, match="--rank 8 truncates merges"):
        parse_methods("single,base", rank=8)
    assert parse_merge_params(["ties.rank=8", "regmean.rank=4"]) == {"ties": {"rank": 8}, "regmean": {"rank": 4}}
    with pytest.raises(BadInput, match="ties.rank='0' is out of range"):
        parse_merge_params(["ties.rank=0"])
    with pytest.raises(BadInput, match="ties.rank is set twice"):
        parse_merge_params(["ties.rank=8", "ties.rank=16"])
    # a rank from --set makes the variant (its results never under the exact merge's name), and leaves the params
    params = parse_merge_params(["ties.rank=8", "ties.density=0.5", "regmean.rank=4"])
    assert parse_methods("single,ties,regmean,iso_c", merge_params=params) == ["single", "ties_r8", "regmean_r4", "iso_c"]
    assert params == {"ties": {"density": 0.5}, "regmean": {}}
    for names, rank, sets, message in (("ties_r16", 8, [], "--methods ties_r16: 16, --rank 8: 8"),
                                       ("ties_r16", None, ["ties.rank=8"], "--methods ties_r16: 16, --set ties.rank: 8"),
                                       ("ties", 4, ["ties.rank=8"], "--rank 4: 4, --set ties.rank: 8")):
        with pytest.raises(BadInput, match=f"ties: two ranks \\({message}\\): give one"):
            parse_methods(names, rank, parse_merge_params(sets))


def test_build_takes_the_rank_from_the_name_the_settings_or_the_options():
    gen = torch.Generator().manual_seed(6)
    adapters = [lora.Adapter({"m": lora.Lora(torch.randn(r, 30, generator=gen), torch.randn(24, r, generator=gen), 1.0)})
                for r in (8, 8, 6)]
    want = merges.merge(adapters, "ties", rank=4).modules["m"].delta()
    for name, fixed, options in (("ties_r4", {}, {}), ("ties", {"rank": 4}, {}), ("ties", {}, {"rank": 4})):
        merged, info = merge_fit.build(name, adapters, None, 0, fixed, options=options)
        assert torch.equal(merged.modules["m"].delta(), want) and info["rank"] == 4
    merged, _ = merge_fit.build("svd_r3", adapters, None, 0)
    assert merged.modules["m"].A.shape[0] == 3
    merged, info = merge_fit.build("ctm_r5", adapters, None, 0)
    assert merged.modules["m"].A.shape[0] == 5 and info["params"]["rank"] == 5
    with pytest.raises(BadInput, match=r"ties: two ranks \(the name's suffix _r4: 4, the parameters' rank: 8\): give one"):
        merge_fit.build("ties_r4", adapters, None, 0, {"rank": 8})
