"""Properties every merge of the registry must have, parametrised over `registry.METHODS`, so a method registered
later is covered without a new test: the order of the adapters does not matter; the sign of a basis vector does not
matter, nor, for a method not declared entry-wise, any rotation of the bases; one adapter in gives it back where the
method's definition says so (`Method.identity`); scaling every update scales the merge; parameters out of their
range are refused. Fresh random float64 factors, unequal ranks."""
import math

import numpy as np
import pytest
import torch

from src import lora
from src import merges, registry
from src.errors import BadInput

DATA_FREE = [n for n, m in registry.METHODS.items() if m.space != "data"]
CORE = [n for n, m in registry.METHODS.items() if m.space == "core"]
MODULES = ("a.q_proj", "b.q_proj", "c.v_proj")


def adapters_for(name: str, seed: int, n: int = 5, d_out: int = 16, d_in: int = 13) -> list[lora.Adapter]:
    """n adapters with unequal ranks and scales (equal ones for the methods that sum the factors themselves)."""
    gen = torch.Generator().manual_seed(seed)
    equal = registry.METHODS[name].equal_ranks
    ranks = [4] * n if equal else [int(r) for r in torch.randint(1, 7, (n,), generator=gen)]
    scales = [2.0] * n if equal else [float(s) for s in 0.5 + 2 * torch.rand(n, generator=gen, dtype=torch.float64)]
    return [lora.Adapter({m: lora.Lora(torch.randn(r, d_in, generator=gen, dtype=torch.float64),
                                 torch.randn(d_out, r, generator=gen, dtype=torch.float64), s) for m in MODULES})
            for r, s in zip(ranks, scales)]


def merged_updates(adapters, name, **kwargs) -> dict:
    seed = {"seed": 3} if registry.METHODS[name].seeded else {}
    out = merges.merge(adapters, name, **seed, **kwargs)
    return {m: out.modules[m].delta().numpy() for m in MODULES}


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("name", DATA_FREE)
@pytest.mark.parametrize("seed", [0, 1])
def test_the_order_of_the_adapters_does_not_matter(name, seed):
    adapters = adapters_for(name, seed)
    weights = [0.5 + 0.25 * i for i in range(len(adapters))]
    want = merged_updates(adapters, name, weights=weights)
    for order in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        got = merged_updates([adapters[i] for i in order], name, weights=[weights[i] for i in order])
        for m in MODULES:
            assert rel(got[m], want[m]) <= 1e-10, (name, order, m, rel(got[m], want[m]))


@pytest.mark.parametrize("name", CORE)
def test_the_sign_of_a_basis_vector_does_not_matter(name):
    """A core method maps cores S_b M_i S_a (S diagonal signs: the same bases with some vectors flipped) to
    S_b M S_a: singular vectors come with an arbitrary sign, so the merge must not depend on it."""
    method = registry.METHODS[name]
    adapters = adapters_for(name, 7)
    Pb, Ms, Pa = merges.core_project([[a.modules[m] for a in adapters] for m in MODULES])
    gen = torch.Generator().manual_seed(8)
    Sb = torch.where(torch.rand(Ms.shape[-2], generator=gen) < 0.5, -1.0, 1.0).double()
    Sa = torch.where(torch.rand(Ms.shape[-1], generator=gen) < 0.5, -1.0, 1.0).double()
    w = torch.linspace(0.5, 1.5, Ms.shape[1], dtype=torch.float64)
    ranks = tuple(a.modules[MODULES[0]].A.shape[0] for a in adapters)
    params = registry.resolve_params(method, {})   # a core method's rank (CtM's) is an argument of its fn

    def run(X):
        generators = merges.adapter_generators(adapters, list(MODULES), 3) if method.seeded else ()
        return method.function(X, w, merges.Context(ranks, generators), **params)

    want = Sb[:, None] * run(Ms) * Sa
    got = run(Sb[:, None] * Ms * Sa)
    assert rel(got.numpy(), want.numpy()) <= 1e-10


@pytest.mark.parametrize("name", [n for n in CORE if not registry.METHODS[n].entrywise])
def test_a_method_not_declared_entrywise_commutes_with_rotations(name):
    """`Method.entrywise` false lets a method run in the QR bases instead of the singular ones: that is only right if
    it maps cores U M_i V^T to U M V^T for any orthogonal U, V (random ones here), and if the whole merge through
    QR bases equals the merge through singular bases."""
    method = registry.METHODS[name]
    adapters = adapters_for(name, 11)
    loras = [[a.modules[m] for a in adapters] for m in MODULES]
    _, Ms, _ = merges.core_project(loras)
    gen = torch.Generator().manual_seed(12)
    U = torch.linalg.qr(torch.randn(Ms.shape[-2], Ms.shape[-2], generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(Ms.shape[-1], Ms.shape[-1], generator=gen, dtype=torch.float64))[0]
    w = torch.linspace(0.5, 1.5, Ms.shape[1], dtype=torch.float64)
    ctx = merges.Context(tuple(a.modules[MODULES[0]].A.shape[0] for a in adapters), ())
    params = registry.resolve_params(method, {})   # a core method's rank (CtM's) is an argument of its fn
    want = U @ method.function(Ms, w, ctx, **params) @ V.T
    got = method.function(U @ Ms @ V.T, w, ctx, **params)
    assert rel(got.numpy(), want.numpy()) <= 1e-10

    def merged(aligned: bool) -> list:
        Pb, Ms, Pa = merges.core_project(loras, aligned=aligned)
        return [lora.delta().numpy() for lora in merges._to_lora(Pb, method.function(Ms, w, ctx, **params), Pa, None,
                                                             torch.float64)]

    for qr, svd, m in zip(merged(False), merged(True), MODULES):
        assert rel(qr, svd) <= 1e-10, (name, m)


@pytest.mark.parametrize("name", [n for n in DATA_FREE if registry.METHODS[n].identity is not None])
def test_one_adapter_gives_itself_back(name):
    """Where the definition says so (`Method.identity`: TIES at density 1, DARE at p = 0, lambda 1, ...), merging
    one adapter returns its update (rank 5, under the SVD merge's default truncation at 8)."""
    adapter = adapters_for(name, 9, n=1)[0]
    got = merged_updates([adapter], name, **registry.METHODS[name].identity)
    for m in MODULES:
        assert rel(got[m], adapter.modules[m].delta().numpy()) <= 1e-10, (name, m)


@pytest.mark.parametrize("name", DATA_FREE)
def test_scaling_every_update_scales_the_merge(name):
    """Every data-free method is positively homogeneous: D_i -> c D_i for all i gives c times the merge (B scaled,
    so DARE's masks, which follow the A factors, are the same)."""
    adapters = adapters_for(name, 10)
    scaled = [lora.Adapter({m: lora.Lora(l.A, 2.5 * l.B, l.scale) for m, l in a.modules.items()}) for a in adapters]
    want, got = merged_updates(adapters, name), merged_updates(scaled, name)
    for m in MODULES:
        assert rel(got[m], 2.5 * want[m]) <= 1e-10, (name, m)


def out_of_range(p: registry.Param) -> list:
    values = [float("nan"), float("inf")]
    if p.low is not None:
        values.append(p.low if "low" in p.open else p.low - 0.5)
    if p.high is not None:
        values.append(p.high if "high" in p.open else p.high + 0.5)
    return values


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_parameters_out_of_range_are_refused(name):
    method = registry.METHODS[name]
    for key, p in method.params.items():
        for value in out_of_range(p):
            with pytest.raises(BadInput, match=f"{name}.{key}="):
                registry.resolve_params(method, {key: value})
        for value in p.grid + ((p.default,) if p.default is not None else ()):
            assert registry.resolve_params(method, {key: value})[key] == value  # the grids and defaults are in range


@pytest.mark.parametrize("name", DATA_FREE)
def test_arguments_a_method_does_not_use_are_refused(name):
    method, adapters = registry.METHODS[name], adapters_for(name, 11)
    if not method.seeded:
        with pytest.raises(BadInput, match="takes no seed"):
            merges.merge(adapters, name, seed=1)
    if "rank" in method.params:  # the SVD merge: `rank` is its own parameter, checked as one
        for rank in (0, 2.5, math.nan, True):
            with pytest.raises(BadInput, match=f"{name}.rank="):
                merges.merge(adapters, name, rank=rank)
    if method.space == "factors":
        with pytest.raises(BadInput, match="has no dense form"):
            merges.merge(adapters, name, dense=True)
    if "rank" not in method.params:
        for rank in (0, 2.5, math.nan, True):
            with pytest.raises(BadInput, match="give a whole number >= 1"):
                merges.merge(adapters, name, rank=rank)
    with pytest.raises(BadInput, match="has no parameter"):
        merges.merge(adapters, name, not_a_parameter=1.0)
    with pytest.raises(BadInput, match="finite"):
        merges.merge(adapters, name, weights=[1.0] * (len(adapters) - 1) + [math.nan])


@pytest.mark.parametrize("name", [n for n in DATA_FREE if "rank" not in registry.METHODS[n].params])
def test_a_rank_budget_is_the_best_approximation_of_the_merge(name):
    """merge(rank=k) of a method without a rank of its own is a best rank-k approximation of its merged update in
    the Frobenius norm (a truncated SVD), whatever the method's space; at k >= its rank, the merge."""
    adapters = adapters_for(name, 17)
    full = merged_updates(adapters, name)
    for k in (1, 3):
        got = merged_updates(adapters, name, rank=k)
        for m in MODULES:
            S = np.linalg.svd(full[m], compute_uv=False)
            assert np.linalg.matrix_rank(got[m], tol=1e-9 * S[0]) <= k
            # Eckart-Young's least error (the truncated SVD is not unique where singular values repeat: Iso-C's)
            error, least = np.linalg.norm(got[m] - full[m]), np.sqrt(np.sum(S[k:] ** 2))
            assert abs(error - least) <= 1e-9 * S[0], (name, k, m, error, least)
    for m, update in merged_updates(adapters, name, rank=16).items():   # 16 = d_out: nothing to cut
        assert rel(update, full[m]) <= 1e-10


@pytest.mark.parametrize("name", DATA_FREE)
def test_a_rank_zero_module_is_refused(name):
    adapters = adapters_for(name, 13)
    empty = adapters[0].modules["c.v_proj"]
    adapters[0].modules["c.v_proj"] = lora.Lora(empty.A[:0], empty.B[:, :0], empty.scale)
    with pytest.raises(BadInput, match="adapter 1 of 5 has rank 0 at c.v_proj"):
        merges.merge(adapters, name, **({"seed": 0} if registry.METHODS[name].seeded else {}))


@pytest.mark.parametrize("name", DATA_FREE)
def test_non_finite_adapters_are_refused(name):
    adapters = adapters_for(name, 12)
    bad = adapters[1].modules["b.q_proj"]
    adapters[1].modules["b.q_proj"] = lora.Lora(bad.A, bad.B.clone().index_fill_(0, torch.tensor([0]), math.nan), bad.scale)
    with pytest.raises(BadInput, match="non-finite factors at b.q_proj"):
        merges.merge(adapters, name, **({"seed": 0} if registry.METHODS[name].seeded else {}))
