"""src/merges.py against references written here from each paper's definition: dense float64 updates, numpy where
an entry-wise rule reads better element by element, fresh random factors with unequal ranks."""
import math

import numpy as np
import pytest
import torch

from src import lora
from src import lowrank, merges, registry
from src.errors import BadInput

RANKS, SCALES = (3, 5, 2), (2.0, 0.5, 1.5)
D_OUT, D_IN = 14, 11



def merge_one(loras: list, method: str, **kwargs) -> lora.Lora:
    """merges.merge on one module: the task LoRAs of that module in, the merged LoRA out."""
    return merges.merge([lora.Adapter({"m": factors}) for factors in loras], method, **kwargs).modules["m"]

def random_adapters(seed: int, ranks=RANKS, scales=SCALES, modules=("a.q_proj", "b.q_proj", "c.v_proj"), d_out=D_OUT,
                    d_in=D_IN) -> list[lora.Adapter]:
    """One adapter per task over a few modules of the same shape (so the batched path runs), float64."""
    gen = torch.Generator().manual_seed(seed)
    return [lora.Adapter({m: lora.Lora(torch.randn(r, d_in, generator=gen, dtype=torch.float64),
                                 torch.randn(d_out, r, generator=gen, dtype=torch.float64), s) for m in modules})
            for r, s in zip(ranks, scales)]


def updates(adapters, module) -> list[np.ndarray]:
    return [(a.modules[module].scale * a.modules[module].B @ a.modules[module].A).numpy() for a in adapters]


def delta(adapter, module) -> np.ndarray:
    return adapter.modules[module].delta().double().numpy()


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def core_reference(adapters, module):
    """The core space as the core-space paper's code builds it, from dense float64 matrices and numpy alone: the
    left singular vectors U_b of the stacked B = [s_1 B_1 ... s_n B_n] and U_a of the stacked A^T, and the task
    updates projected on them, M_i = U_b^T D_i U_a. (numpy's singular vectors may differ from torch's in sign;
    every merge is indifferent to that, which test_registry.py checks.)"""
    B = np.concatenate([a.modules[module].scale * a.modules[module].B.numpy() for a in adapters], axis=1)
    A = np.concatenate([a.modules[module].A.numpy() for a in adapters], axis=0)
    Ub, Ua = np.linalg.svd(B, full_matrices=False)[0], np.linalg.svd(A.T, full_matrices=False)[0]
    return Ub, [Ub.T @ D @ Ua for D in updates(adapters, module)], Ua


# ----------------------------------------------------------------------------- references from the papers
def ref_trim(X, density):
    k = int(density * X.size)
    keep = np.zeros(X.size, dtype=bool)
    keep[np.argsort(-np.abs(X).ravel(), kind="stable")[:k]] = True
    return np.where(keep.reshape(X.shape), X, 0.0)


def ref_disjoint_mean(Xs):
    """Elect the sign of the sum, average the agreeing nonzero entries; entries below 1e-12 of their matrix's
    largest are zeros (an SVD leaves 1e-16 where the exact value is 0)."""
    Xs = [np.where(np.abs(X) > 1e-12 * np.abs(X).max(), X, 0.0) for X in Xs]
    out = np.zeros_like(Xs[0])
    for idx in np.ndindex(out.shape):
        values = [X[idx] for X in Xs]
        sign = 1.0 if sum(values) >= 0 else -1.0
        agree = [v for v in values if v != 0 and np.sign(v) == sign]
        out[idx] = sum(agree) / len(agree) if agree else 0.0
    return out


def ref_polar(X):
    P, _, Qh = np.linalg.svd(X, full_matrices=False)
    return P @ Qh


def ref_tsv_m(Ds, ranks, alpha=1.0):
    budget = sum(ranks) // len(Ds)
    us, ss, vs = [], [], []
    for D, r in zip(Ds, ranks):
        U, S, Vh = np.linalg.svd(D, full_matrices=False)
        k = min(r, budget)
        us.append(U[:, :k]), ss.append(S[:k]), vs.append(Vh[:k].T)
    U, S, V = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)
    return alpha * ref_polar(U) @ np.diag(S) @ ref_polar(V).T


def ref_iso_c(Ds, alpha=1.0):
    U, S, Vh = np.linalg.svd(sum(Ds), full_matrices=False)
    nz = S > 1e-9 * S.max()
    return alpha * S[nz].mean() * U[:, nz] @ Vh[nz]


def ref_iso_cts(Ds, ranks, fraction=0.8, alpha=1.0):
    n, R = len(Ds), sum(ranks)
    k_c = int(R * fraction)
    per_task = min(round((R - k_c) / n), R // n)  # no more than R directions in all
    k_c = R - per_task * n
    U, S, Vh = np.linalg.svd(sum(Ds), full_matrices=False)
    us, ss, vs = [U[:, :k_c]], [S[:k_c]], [Vh[:k_c].T]
    for D in Ds:
        Ut, St, Vht = np.linalg.svd(D - U[:, :k_c] @ U[:, :k_c].T @ D, full_matrices=False)
        us.append(Ut[:, :per_task]), ss.append(St[:per_task]), vs.append(Vht[:per_task].T)
    U, S, V = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)
    nz = S > 1e-9 * S.max()
    return alpha * S[nz].mean() * ref_polar(U[:, nz]) @ ref_polar(V[:, nz]).T


def ref_knots(Ds, merge_blocks):
    """[D_1 ... D_n] = U S [V_1 ... V_n]^T; merge the blocks S V_i^T; rebuild with U."""
    U, S, Vh = np.linalg.svd(np.concatenate(Ds, axis=1), full_matrices=False)
    blocks = [np.diag(S) @ V for V in np.split(Vh, len(Ds), axis=1)]
    return U @ merge_blocks(blocks)


# --------------------------------------------------------------------------------- the paper's own merges
def test_concat_and_weight_sum_against_dense_float64():
    adapters = random_adapters(3)
    loras = [a.modules["a.q_proj"] for a in adapters]
    w = [0.7, -1.3, 2.1]
    got = merge_one(loras, "concat", weights=w)
    want = sum(wi * D for wi, D in zip(w, updates(adapters, "a.q_proj")))
    assert got.A.shape == (10, D_IN) and rel(got.delta().numpy(), want) <= 1e-12
    same = [a.modules["a.q_proj"] for a in random_adapters(4, ranks=(4, 4, 4), scales=(2.0,) * 3)]
    ws = merge_one(same, "weight_sum", weights=w)
    sum_A, sum_B = sum(wi * l.A for wi, l in zip(w, same)), sum(wi * l.B for wi, l in zip(w, same))
    assert torch.allclose(ws.delta(), 2.0 * sum_B @ sum_A, atol=1e-12)
    assert not torch.allclose(ws.delta(), sum(wi * l.delta() for wi, l in zip(w, same)), atol=1e-3)  # cross terms
    avg = merge_one(same, "weighted_avg")
    assert torch.allclose(avg.delta(), 2.0 * (sum(l.B for l in same) / 3) @ (sum(l.A for l in same) / 3))
    with pytest.raises(BadInput, match="equal ranks and scales"):
        merge_one(loras, "weight_sum")


def truncated(D, k):
    U, S, Vh = np.linalg.svd(D, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_svd_merge_equals_dense_truncated_svd_at_qwen_size(dtype, tol):
    gen = torch.Generator().manual_seed(4)
    loras = [lora.Lora(torch.randn(8, 1536, generator=gen, dtype=dtype),
                    torch.randn(1536, 8, generator=gen, dtype=dtype), 2.0) for _ in range(7)]
    got = merge_one(loras, "svd", rank=8)
    assert got.A.dtype == dtype and got.A.shape == (8, 1536) and got.B.shape == (1536, 8)
    want = truncated(sum(l.delta().double().numpy() for l in loras) / 7, 8)
    assert rel(got.delta().double().numpy(), want) <= tol


def test_svd_merge_unequal_ranks_weights_and_ranks():
    adapters = random_adapters(5)
    w = [0.5, 1.5, -2.0]
    dense = sum(wi * D for wi, D in zip(w, updates(adapters, "c.v_proj")))
    for k in (3, 8, 10, 40):
        got = merges.merge(adapters, "svd", rank=k, weights=w).modules["c.v_proj"]
        assert got.A.shape[0] == min(k, 10) and rel(got.delta().numpy(), truncated(dense, min(k, 10))) <= 1e-10
    default = merges.merge(adapters, "svd").modules["c.v_proj"]  # rank 8 of the mean
    assert rel(default.delta().numpy(), truncated(sum(updates(adapters, "c.v_proj")) / 3, 8)) <= 1e-10


@pytest.mark.parametrize("batch,d_out,d_in,rank", [((), 9, 13, None), ((), 9, 13, 2), ((), 3, 13, None),
                                                  ((5,), 9, 3, 8), ((2,), 3, 2, None)])
def test_truncated_svd_is_the_svd_of_the_update(batch, d_out, d_in, rank):
    """Against numpy's SVD of the dense product (R = 4): a tall B, a wide one (d_out < R: fewer reflectors than
    columns), a narrow A (d_in < R), a batch, and a rank above what the product has (k = min(rank, d_out, d_in, R))."""
    gen = torch.Generator().manual_seed(3)
    B = torch.randn(*batch, d_out, 4, generator=gen, dtype=torch.float64)
    A = torch.randn(*batch, 4, d_in, generator=gen, dtype=torch.float64)
    Bk, S, Ak = lowrank.truncated_svd(B, A, rank)
    k = min(d_out, d_in, 4, rank or 4)
    assert S.shape == (*batch, k) and Bk.shape == (*batch, d_out, k) and Ak.shape == (*batch, k, d_in)
    for b in np.ndindex(*batch):
        D = (B[b] @ A[b]).numpy()
        assert np.allclose(S[b].numpy(), np.linalg.svd(D, compute_uv=False)[:k], rtol=1e-12)
        assert rel((Bk[b] @ Ak[b]).numpy(), truncated(D, k)) <= 1e-12
        assert np.allclose(Ak[b] @ Ak[b].T, np.eye(k), atol=1e-12)
        assert np.allclose(Bk[b].T @ Bk[b], np.diag(S[b].numpy() ** 2), atol=1e-10)


def test_core_space_on_modules_narrower_than_the_stacked_rank():
    """d_out = 6 < R = 10 < d_in = 11 (a k_proj of a small model under 7 adapters): the Householder bases have fewer
    reflectors than stacked columns on the B side; exact and truncated merges still equal the dense ones."""
    adapters = random_adapters(9, d_out=6)
    Ds = updates(adapters, "b.q_proj")
    assert rel(delta(merges.merge(adapters, "task_arithmetic", lam=0.7), "b.q_proj"), 0.7 * sum(Ds)) <= 1e-10
    assert rel(delta(merges.merge(adapters, "svd", rank=4), "b.q_proj"), truncated(sum(Ds) / 3, 4)) <= 1e-10
    assert rel(delta(merges.merge(adapters, "tsv_m", alpha=1.3), "b.q_proj"), ref_tsv_m(Ds, RANKS, 1.3)) <= 1e-10


# ----------------------------------------------------------------- basis-invariant methods: core == dense
@pytest.mark.parametrize("seed", [0, 1])
def test_core_space_equals_dense_for_basis_invariant_methods(seed):
    adapters = random_adapters(seed)
    for module in ("a.q_proj", "c.v_proj"):
        Ds = updates(adapters, module)
        cases = {
            "task_arithmetic": (dict(lam=0.7), 0.7 * sum(Ds)),
            "tsv_m": (dict(alpha=1.3), ref_tsv_m(Ds, RANKS, 1.3)),
            "iso_c": (dict(alpha=0.9), ref_iso_c(Ds, 0.9)),
            "iso_cts": (dict(alpha=1.1, common_fraction=0.6), ref_iso_cts(Ds, RANKS, 0.6, 1.1)),
            "svd": (dict(rank=4), truncated(sum(Ds) / 3, 4)),
        }
        for name, (params, want) in cases.items():
            got = delta(merges.merge(adapters, name, **params), module)
            assert rel(got, want) <= 1e-10, name
    # KnOTS with a plain sum of its blocks is task arithmetic, in the core as in the dense definition
    Ds = updates(adapters, "b.q_proj")
    Qb, Ms, Qa = merges.core_project([[a.modules["b.q_proj"] for a in adapters]])
    ctx = merges.Context(RANKS, ())
    merged_core = merges.knots(Ms, torch.ones(3, dtype=torch.float64), ctx, "sum", 1.0, 0.0, 1.0)
    core_sum = (Qb.matrix() @ merged_core @ Qa.matrix().mT)[0]
    assert rel(core_sum.numpy(), ref_knots(Ds, sum)) <= 1e-10 and rel(ref_knots(Ds, sum), sum(Ds)) <= 1e-10


def test_tsv_m_budget_and_iso_c_rank_on_a_sum_of_loras():
    """TSV-M keeps min(r_i, R/n) components per task; Iso-C flattens only the nonzero spectrum, so a sum of LoRAs
    stays rank R (the public code's mean over the full spectrum would add a full-rank term)."""
    adapters = random_adapters(7, ranks=(6, 1, 3))
    got = delta(merges.merge(adapters, "iso_c"), "a.q_proj")
    assert np.linalg.matrix_rank(got, tol=1e-8) == 10
    S = np.linalg.svd(got, compute_uv=False)[:10]
    assert np.allclose(S, S.mean(), rtol=1e-10)
    # Iso-CTS with a small common share: rounding the per-task share up must not claim more than R directions
    # (ranks 1, 1, 2, 2 at fraction 0.1: round(6 / 4) = 2 per task would leave -2 common; 6 // 4 = 1, 2 common)
    small = random_adapters(8, ranks=(1, 1, 2, 2), scales=(2.0, 1.0, 0.5, 1.5))
    got = delta(merges.merge(small, "iso_cts", common_fraction=0.1), "a.q_proj")
    assert rel(got, ref_iso_cts(updates(small, "a.q_proj"), (1, 1, 2, 2), 0.1)) <= 1e-10
    tsv = delta(merges.merge(adapters, "tsv_m"), "a.q_proj")
    assert np.linalg.matrix_rank(tsv, tol=1e-8) == 3 + 1 + 3  # min(6, 10 // 3), min(1, 3), min(3, 3)


# ----------------------------------------------------------------- entry-wise methods: on the cores, by design
def test_ties_dare_magnitude_knots_on_the_cores_against_references():
    adapters = random_adapters(11)
    module = "a.q_proj"
    Qb, Ms, Qa = core_reference(adapters, module)
    back = lambda X: Qb @ X @ Qa.T  # noqa: E731
    w = [1.0, 0.5, 2.0]
    checks = {
        "ties": (dict(density=0.3, lam=0.8),
                 back(0.8 * ref_disjoint_mean([wi * ref_trim(X, 0.3) for wi, X in zip(w, Ms)]))),
        "magnitude_prune": (dict(density=0.4, lam=1.2), back(1.2 * sum(wi * ref_trim(X, 0.4) for wi, X in zip(w, Ms)))),
        "knots_ties": (dict(density=0.5, lam=0.9), None),
    }
    for name, (params, want) in checks.items():
        if name == "knots_ties":
            U, S, Vh = np.linalg.svd(np.concatenate([wi * X for wi, X in zip(w, Ms)], axis=1), full_matrices=False)
            blocks = [np.diag(S) @ V for V in np.split(Vh, 3, axis=1)]
            want = back(0.9 * U @ ref_disjoint_mean([ref_trim(b, 0.5) for b in blocks]))
        got = delta(merges.merge(adapters, name, weights=w, **params), module)
        assert rel(got, want) <= 1e-10, name
    # ties_dense is TIES on the dense updates; it differs from TIES on the cores
    Ds = updates(adapters, module)
    dense = delta(merges.merge(adapters, "ties_dense", weights=w, density=0.3, lam=0.8), module)
    assert rel(dense, 0.8 * ref_disjoint_mean([wi * ref_trim(D, 0.3) for wi, D in zip(w, Ds)])) <= 1e-12
    assert rel(dense, checks["ties"][1]) > 0.05


def recovered_masks(merged_core, Ms, scale):
    """DARE's masks read back from a DARE-linear merge: every entry of merged_core / scale is the sum of the task
    cores' entries over the tasks that kept it, and (with random cores) exactly one subset of tasks matches."""
    n = len(Ms)
    subsets = [np.array(bits) for bits in np.ndindex(*(2,) * n)]
    keep = np.zeros((n,) + Ms[0].shape)
    for idx in np.ndindex(Ms[0].shape):
        value = merged_core[idx] / scale
        errors = [abs(value - sum(b * X[idx] for b, X in zip(bits, Ms))) for bits in subsets]
        best = int(np.argmin(errors))
        assert errors[best] <= 1e-9 * max(1.0, max(abs(X[idx]) for X in Ms)), (idx, sorted(errors)[:2])
        keep[(slice(None),) + idx] = subsets[best]
    return keep


def test_dare_masks_are_bernoulli_and_shared_by_dare_ties():
    """DARE-linear's merged core, in the reference basis, is lam / (1 - p) times a sum of the task cores over the
    tasks that kept each entry: the kept share is 1 - p within a binomial bound, DARE-TIES with the same seed drops
    the same entries (its result is the disjoint mean of exactly those), and another seed draws other masks."""
    adapters = random_adapters(12)
    p = 0.7
    got = merges.merge(adapters, "dare_linear", seed=5, p=p, lam=0.6)
    got_ties = merges.merge(adapters, "dare_ties", seed=5, p=p, lam=1.4)
    other = merges.merge(adapters, "dare_linear", seed=6, p=p, lam=0.6)
    kept, total = 0, 0
    for module in sorted(adapters[0].modules):
        Ub, Ms, Ua = core_reference(adapters, module)
        keep = recovered_masks(Ub.T @ delta(got, module) @ Ua, Ms, 0.6 / (1 - p))
        kept, total = kept + keep.sum(), total + keep.size
        dropped = [X * keep[i] / (1 - p) for i, X in enumerate(Ms)]
        assert rel(delta(got_ties, module), Ub @ (1.4 * ref_disjoint_mean(dropped)) @ Ua.T) <= 1e-10
        assert rel(delta(other, module), delta(got, module)) > 1e-3
    # 3 modules x 3 tasks x 100 entries: the kept share is within 4 standard deviations of 1 - p
    assert abs(kept / total - (1 - p)) <= 4 * math.sqrt(p * (1 - p) / total), kept / total
    again = merges.merge(adapters, "dare_linear", seed=5, p=p, lam=0.6)
    assert all(torch.equal(got.modules[m].B, again.modules[m].B) for m in got.modules)


# ------------------------------------------------------------------------------------------------ reductions
def test_reductions_to_task_arithmetic():
    adapters = random_adapters(13)
    ta = merges.merge(adapters, "task_arithmetic", lam=1.0)
    for name, params in (("dare_linear", dict(p=0.0, lam=1.0)), ("magnitude_prune", dict(density=1.0, lam=1.0))):
        got = merges.merge(adapters, name, **params)
        assert all(rel(delta(got, m), delta(ta, m)) <= 1e-12 for m in ta.modules), name
    # TIES at density 1 is the disjoint mean: for tasks whose updates agree in sign it is their mean, so lambda = n
    # gives task arithmetic back
    base = random_adapters(14, ranks=(4,), scales=(2.0,))[0]
    agreeing = [lora.Adapter({m: lora.Lora(l.A, c * l.B, l.scale) for m, l in base.modules.items()}) for c in (0.5, 1.0, 3.0)]
    ties = merges.merge(agreeing, "ties", density=1.0, lam=3.0)
    dare_ties = merges.merge(agreeing, "dare_ties", p=0.0, lam=3.0)
    sum_ = merges.merge(agreeing, "task_arithmetic")
    assert all(rel(delta(ties, m), delta(sum_, m)) <= 1e-10 and rel(delta(dare_ties, m), delta(sum_, m)) <= 1e-10
               for m in sum_.modules)


@pytest.mark.parametrize("name,params", [
    ("concat", {}), ("weight_sum", {}), ("weighted_avg", {}), ("svd", {}), ("task_arithmetic", {}),
    ("ties", dict(density=1.0)), ("ties_dense", dict(density=1.0)), ("dare_linear", dict(p=0.0)),
    ("dare_ties", dict(p=0.0)), ("magnitude_prune", dict(density=1.0)), ("knots_ties", {}),
    ("knots_dare_ties", dict(p=0.0)), ("tsv_m", {})])
def test_one_adapter_comes_back_unchanged(name, params):
    adapter = random_adapters(15, ranks=(5,), scales=(2.0,))[0]
    got = merges.merge([adapter], name, **params)
    assert all(rel(delta(got, m), delta(adapter, m)) <= 1e-10 for m in adapter.modules)


def test_every_method_is_documented_and_bad_input_is_clear():
    for name, method in registry.METHODS.items():
        assert method.paper and method.formula and method.space in ("factors", "core", "dense", "data"), name
        assert all(p.help for p in method.params.values()), name
    assert {"cat", "lorahub"} <= {n for n, m in registry.METHODS.items() if m.space == "data"}
    adapters = random_adapters(16)
    with pytest.raises(BadInput, match="unknown merge 'slerp'"):
        merges.merge(adapters, "slerp")
    with pytest.raises(BadInput, match="merge ties has no parameter alpha: it takes density, lam"):
        merges.merge(adapters, "ties", alpha=1.0)
    # different target sets merge over their union (was refused; test_adapters_with_different_modules_... below)
    union = merges.merge([adapters[0], lora.Adapter({"a.q_proj": adapters[1].modules["a.q_proj"]})], "concat")
    assert set(union.modules) == set(adapters[0].modules)
    odd = random_adapters(17, modules=("a.q_proj", "b.q_proj", "c.v_proj"), d_out=9)
    with pytest.raises(BadInput, match="module a.q_proj has different"):
        merges.merge([adapters[0], odd[1]], "svd")
    with pytest.raises(BadInput, match="learns its merge from rows"):
        merges.merge(adapters, "cat")
    assert math.isclose(merges.merge(adapters, "svd").modules["a.q_proj"].scale, 1.0)


def test_adapters_with_different_modules_merge_over_their_union():
    """merges.ZERO_UPDATE: a module an adapter does not adapt is a zero update of that adapter. Adapter 2 lacks
    c.v_proj and adapter 3 a.q_proj: the sums are the dense sums of the updates present, a disjoint mean counts no
    vote of the absent adapter (TIES over the union is TIES over the adapters present, and the dense definition with
    its update 0), TSV-M gives it no direction and splits R = the ranks present, the factor sum adds no factor."""
    full = random_adapters(31)
    drop = {1: "c.v_proj", 2: "a.q_proj"}
    partial = [lora.Adapter({m: f for m, f in a.modules.items() if m != drop.get(i)}) for i, a in enumerate(full)]
    w = [0.7, -1.3, 2.1]
    for m in full[0].modules:
        here = [a for a in partial if m in a.modules]
        assert len(here) == (3 if m == "b.q_proj" else 2)
        dense = updates(here, m)
        for name, params in (("concat", {}), ("task_arithmetic", {"lam": 1.0})):
            got = merges.merge(partial, name, weights=w, **params)
            want = sum(w[i] * D for i, D in zip([i for i, a in enumerate(partial) if m in a.modules], dense))
            assert rel(delta(got, m), want) <= 1e-10, (name, m)
        assert rel(delta(merges.merge(partial, "svd", rank=10), m), sum(dense) / 3) <= 1e-10  # the mean over N = 3
        ties = merges.merge(partial, "ties", density=0.5)
        alone = merges.merge([lora.Adapter({m: a.modules[m]}) for a in here], "ties", density=0.5)
        assert rel(delta(ties, m), delta(alone, m)) <= 1e-10, m
        zero = [D if a_has else np.zeros_like(dense[0]) for D, a_has in
                zip(updates(full, m), [m in a.modules for a in partial])]
        assert rel(delta(merges.merge(partial, "ties_dense", density=0.5), m),
                   ref_disjoint_mean([ref_trim(D, 0.5) for D in zero])) <= 1e-10, m
        assert rel(ref_disjoint_mean([ref_trim(D, 0.5) for D in zero]),
                   ref_disjoint_mean([ref_trim(D, 0.5) for D in dense])) <= 1e-12  # the zero update: no vote
        ranks = [a.modules[m].A.shape[0] if m in a.modules else 0 for a in partial]
        assert rel(delta(merges.merge(partial, "tsv_m"), m), ref_tsv_m(zero, ranks)) <= 1e-8, m
    same = random_adapters(32, ranks=(4, 4, 4), scales=(2.0,) * 3)
    same[0] = lora.Adapter({m: f for m, f in same[0].modules.items() if m != "c.v_proj"})
    got = merges.merge(same, "weight_sum")
    assert torch.allclose(got.modules["c.v_proj"].delta(),
                          2.0 * sum(a.modules["c.v_proj"].B for a in same[1:]) @ sum(a.modules["c.v_proj"].A for a in same[1:]))


# ------------------------------------------------------------------------------------------------------ RegMean
def random_inputs(seed: int, tokens=(40, 25, 60), d_in=D_IN, correlated: bool = True) -> list[np.ndarray]:
    """Each task's layer inputs X_i (tokens x d_in), with correlated features (a random mixing), float64."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((t, d_in)) @ (rng.standard_normal((d_in, d_in)) if correlated else np.eye(d_in))
            for t in tokens]


def test_regmean_at_alpha_1_is_the_least_squares_merge():
    """alpha 1: W minimising sum_i ||X_i W^T - X_i W_i^T||^2, solved here by numpy's lstsq on the stacked rows
    [X_1; ...; X_n] W^T = [X_1 W_1^T; ...] (an SVD-based solver, not the normal equations); W_0 cancels, so the
    merged update equals W - W_0 for any W_0. Ranks 3, 5, 2, scales 2, 0.5, 1.5."""
    adapters, X = random_adapters(11), random_inputs(12)
    W0 = np.random.default_rng(13).standard_normal((D_OUT, D_IN))
    for module in adapters[0].modules:
        D = updates(adapters, module)
        W, *_ = np.linalg.lstsq(np.vstack(X), np.vstack([x @ (W0 + d).T for x, d in zip(X, D)]), rcond=None)
        merged = merges.regmean([a.modules[module] for a in adapters], [torch.tensor(x.T @ x) for x in X], 1.0)
        assert merged.A.shape[0] == sum(RANKS) and merged.scale == 1.0
        assert rel(delta(lora.Adapter({module: merged}), module), W.T - W0) < 1e-9


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_regmean_with_reduced_off_diagonals_is_the_papers_formula(alpha):
    """W - W_0 = sum_i D_i G_i' (sum_j G_j')^{-1}, G_i' = alpha G_i + (1 - alpha) diag(G_i), written densely here with
    numpy's inverse."""
    adapters, X = random_adapters(21), random_inputs(22)
    G = [x.T @ x for x in X]
    Gr = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in G]
    total = np.linalg.inv(sum(Gr))
    for module in adapters[0].modules:
        want = sum(d @ g @ total for d, g in zip(updates(adapters, module), Gr))
        merged = merges.regmean([a.modules[module] for a in adapters], [torch.tensor(g) for g in G], alpha)
        assert rel(delta(lora.Adapter({module: merged}), module), want) < 1e-9


def test_regmean_one_task_gives_it_back_and_order_does_not_matter():
    adapters, X = random_adapters(31), random_inputs(32)
    grams = [torch.tensor(x.T @ x) for x in X]
    module = "a.q_proj"
    loras = [a.modules[module] for a in adapters]
    one = merges.regmean(loras[1:2], grams[1:2], 0.5)
    assert rel(one.delta().numpy(), updates(adapters, module)[1]) < 1e-10
    order = [2, 0, 1]
    forward = merges.regmean(loras, grams, 0.7).delta().numpy()
    permuted = merges.regmean([loras[i] for i in order], [grams[i] for i in order], 0.7).delta().numpy()
    assert rel(permuted, forward) < 1e-10


def test_regmean_counts_the_inputs_of_a_task_that_does_not_adapt_the_module():
    """A task without the module (rank 0 there, its model keeps W_0) enters G': the merge keeps W_0 on its inputs,
    as the dense least-squares problem with D_i = 0 does."""
    adapters, X = random_adapters(41), random_inputs(42)
    module = "c.v_proj"
    absent = lora.Lora(torch.zeros(0, D_IN, dtype=torch.float64), torch.zeros(D_OUT, 0, dtype=torch.float64), 1.0)
    loras = [adapters[0].modules[module], absent, adapters[2].modules[module]]
    D = updates(adapters, module)
    D[1] = np.zeros_like(D[1])
    W, *_ = np.linalg.lstsq(np.vstack(X), np.vstack([x @ d.T for x, d in zip(X, D)]), rcond=None)
    merged = merges.regmean(loras, [torch.tensor(x.T @ x) for x in X], 1.0)
    assert merged.A.shape[0] == RANKS[0] + RANKS[2] and rel(merged.delta().numpy(), W.T) < 1e-9


def test_regmean_refuses_a_singular_gram_in_one_line():
    adapters, X = random_adapters(51), random_inputs(52)
    for x in X:
        x[:, 3] = 0  # an input feature no task ever sees
    with pytest.raises(BadInput, match="summed Gram matrix is singular"):
        merges.regmean([a.modules["a.q_proj"] for a in adapters], [torch.tensor(x.T @ x) for x in X], 1.0)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9, 1.0])
def test_regmean_from_statistics_summed_chunk_by_chunk_is_the_papers_formula(alpha):
    """The streaming form: S, each diag(G_i) and each G_i A_i^T summed over chunks of rows (as merge_fit collects
    them, no G_i ever formed), solved by merges.regmean_solve, against sum_i D_i G_i' (sum_j G_j')^{-1} written
    densely with numpy's inverse; unequal ranks, tasks in two orders."""
    adapters, X = random_adapters(61), random_inputs(62)
    G = [x.T @ x for x in X]
    Gr = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in G]
    total = np.linalg.inv(sum(Gr))
    for module in adapters[0].modules:
        want = sum(d @ g @ total for d, g in zip(updates(adapters, module), Gr))
        for order in ([0, 1, 2], [2, 0, 1]):
            loras = [adapters[i].modules[module] for i in order]
            S, diags, projected = torch.zeros(D_IN, D_IN, dtype=torch.float64), [], []
            for i, f in zip(order, loras):
                d, p = torch.zeros(D_IN, dtype=torch.float64), torch.zeros(D_IN, f.A.shape[0], dtype=torch.float64)
                for chunk in np.array_split(X[i], 4):
                    c = torch.tensor(chunk)
                    S, d, p = S + c.T @ c, d + (c * c).sum(0), p + c.T @ (c @ f.A.T)
                diags.append(d)
                projected.append(p)
            merged = merges.regmean_solve(loras, merges.RegMeanInput(S, torch.stack(diags)), projected, alpha)
            assert merged.A.shape[0] == sum(RANKS) and rel(delta(lora.Adapter({module: merged}), module), want) < 1e-9
