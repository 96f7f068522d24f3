"""Merges of task LoRAs: every data-free method computed on the factors, in the LoRAs' core space, and the rank budget.

Each method is declared in src/registry.py (its paper, its hyperparameters with defaults from the paper and a small
grid that evaluation searches on validation rows, the space it works in and its output); `merge(adapters, name,
**params)` applies it to every module. Adapters that adapt different modules merge over the union of their modules,
a missing module being a zero update (`ZERO_UPDATE` says what that means per method).

The core space (Panariello et al., NeurIPS 2025). For one module with task updates D_i = s_i B_i A_i (rank r_i,
R = sum r_i), stack the factors, B = [s_1 B_1 ... s_n B_n] (d_out x R) and A = [A_1; ...; A_n] (R x d_in), and take
orthonormal bases of their column spaces, B = P_b C_b, A^T = P_a C_a. Then, exactly,

    D_i = P_b M_i P_a^T,   M_i = C_b[:, cols_i] C_a[:, cols_i]^T   (R x R, cols_i: task i's rank columns)

A method maps the n cores M_i to one R x R core M; the merged LoRA is B = P_b M, A = P_a^T (rank R, exact), or its
rank-k truncation from the SVD of M. The bases are the left singular vectors of the stacked B and A^T (a thin QR,
then the SVD of its small triangular factor: `lowrank.svd_basis`), so they do not depend on the order of the tasks,
and no method does; methods that do not act on entries (`Method.entrywise` false) take the cheaper QR bases, in
which their merged update is the same. Cost O(d R^2 + R^3) per module, never a d_out x d_in matrix, and the modules
that share a shape are processed as one batch. For methods that commute with orthogonal changes of basis (sums,
SVDs, orthogonalisation: task arithmetic, the SVD merge, TSV-M, Iso-C, Iso-CTS, KnOTS with a plain sum) the result
is the dense one exactly; entry-wise methods (TIES, DARE, magnitude pruning) act on the entries of M_i in that
basis, the variant the core-space paper evaluates, and differ from their dense definition by design (`ties_dense`
runs TIES on the dense D_i for comparison). DARE draws each adapter's mask from a generator seeded by the seed
and that adapter's A factors. Inside, everything is float64; the merged factors come back in the adapters' dtype.

Ranks: TSV-M and Iso-CTS split "the space" between tasks; here its dimension is R, the rank of the space the task
updates span (for a full fine-tuning update it is the matrix dimension, as in their papers): so the split does
not depend on the basis, and the dense and core computations agree.
"""
import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from .errors import BadInput
from .lowrank import Basis, qr_basis, svd_basis, truncate_core, truncated_svd
from .lora import Adapter, Lora, merge_weights
from .registry import METHODS, Method, check_rank, get_method, resolve_params

# -------------------------------------------------------------------------------------- core-space primitives
@dataclass(frozen=True)
class Context:
    """What a core/dense method may need besides the cores: each task's rank, and one seeded generator per adapter
    (DARE's masks), seeded from the merge's seed and the adapter itself (`adapter_generators`), so that an adapter
    gets the same mask wherever it stands in the list."""
    ranks: tuple
    generators: tuple


def weighted_sum(M, w):
    """sum_i w_i M_i over the task axis: M (m, n, p, q), w (n,) -> (m, p, q)."""
    return torch.einsum("n,mnpq->mpq", w, M)


def trim(M, density: float):
    """TIES's trim: in each task's matrix keep the int(density * entries) largest entries by magnitude."""
    flat = M.flatten(2)
    k = int(density * flat.shape[-1])
    if k >= flat.shape[-1]:
        return M
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, flat.abs().topk(k, dim=-1).indices, True)
    return (flat * keep).reshape(M.shape)


def numerical_zeros_out(M, rtol: float = 1e-12):
    """Entries below rtol times the largest of their task's matrix set to 0: where the exact value is 0 an SVD or a
    product of bases leaves ~1e-16, and the disjoint mean counts entries, so it must not count those."""
    return torch.where(M.abs() > rtol * M.abs().amax((-2, -1), keepdim=True), M, torch.zeros((), dtype=M.dtype))


def disjoint_mean(M):
    """TIES's elect + disjoint merge: each entry's sign is the sign of the sum over tasks (0 counts as +), and the
    entry is the mean over the tasks whose value is nonzero and of that sign."""
    M = numerical_zeros_out(M)
    sign = torch.where(M.sum(1) >= 0, 1.0, -1.0).to(M.dtype)
    agree = (torch.sign(M) == sign[:, None]) & (M != 0)
    return (M * agree).sum(1) / agree.sum(1).clamp(min=1)


def dare(M, p: float, generators):
    """DARE: drop each entry with probability p, rescale the rest by 1 / (1 - p). M (m, n, ...): task i's mask is
    drawn from generators[i]."""
    if p == 0:
        return M
    keep = torch.stack([torch.rand(M[:, i].shape, generator=g, dtype=M.dtype) >= p
                        for i, g in enumerate(generators)], dim=1)
    return M * keep / (1 - p)


def svd_parts(M):
    return torch.linalg.svd(M, full_matrices=False)


def polar(X):
    """The nearest matrix with orthonormal columns (polar factor): X = P S Q^T -> P Q^T."""
    P, _, Qh = svd_parts(X)
    return P @ Qh


def nonzero(S, rtol: float = 1e-9):
    """Mask of the singular values that are not numerically zero (relative to the largest of each matrix)."""
    return S > rtol * S.amax(-1, keepdim=True).clamp(min=torch.finfo(S.dtype).tiny)


# -------------------------------------------------------------------------------- data-free methods, on cores
def task_arithmetic(M, w, ctx, lam):
    """lambda * sum_i w_i D_i."""
    return lam * weighted_sum(M, w)


def ties(M, w, ctx, density, lam):
    """lambda * disjoint_mean(trim(w_i D_i, density))."""
    return lam * disjoint_mean(trim(M, density) * w[None, :, None, None])


def dare_linear(M, w, ctx, p, lam):
    """lambda * sum_i w_i DARE(D_i, p)."""
    return lam * weighted_sum(dare(M, p, ctx.generators), w)


def dare_ties(M, w, ctx, p, lam):
    """lambda * disjoint_mean(w_i DARE(D_i, p))."""
    return lam * disjoint_mean(dare(M, p, ctx.generators) * w[None, :, None, None])


def magnitude_prune(M, w, ctx, density, lam):
    """lambda * sum_i w_i trim(D_i, density)."""
    return lam * weighted_sum(trim(M, density), w)


def knots(M, w, ctx, merge: str, density: float, p: float, lam):
    """KnOTS: SVD of the column-wise concatenation [w_1 D_1 ... w_n D_n] = U S [V_1^T ... V_n^T]; each task is
    U (S V_i^T) in the shared basis U; the blocks S V_i^T are merged ("ties": trim + disjoint mean, "dare_ties":
    DARE + disjoint mean, "sum": their plain sum, which gives task arithmetic back) and rebuilt with U."""
    q = M.shape[-1]
    stacked = torch.cat(list((M * w[None, :, None, None]).unbind(1)), dim=-1)     # (m, p, n q)
    U, S, Vh = svd_parts(stacked)                                                   # Vh (m, k, n q)
    blocks = torch.stack((S[..., None] * Vh).split(q, dim=-1), dim=1)              # (m, n, k, q)
    if merge == "ties":
        merged = disjoint_mean(trim(blocks, density))
    elif merge == "dare_ties":
        merged = disjoint_mean(dare(blocks, p, ctx.generators))
    elif merge == "sum":
        merged = blocks.sum(1)
    else:
        raise BadInput(f"KnOTS merges its blocks by ties, dare_ties or sum, not {merge!r}")
    return lam * (U @ merged)



def knots_ties(M, w, ctx, density, lam):
    return knots(M, w, ctx, "ties", density, 0.0, lam)


def knots_dare_ties(M, w, ctx, p, lam):
    return knots(M, w, ctx, "dare_ties", 1.0, p, lam)


def tsv_m(M, w, ctx, fraction, alpha):
    """TSV-M: keep each task's top k_i = min(r_i, floor(fraction * R)) singular components (fraction 1/n: each task
    gets 1/n of the R-dimensional space), stack the U's, S's and V's, replace the stacked U and V by their nearest
    orthogonal matrices (polar factors), rebuild: alpha * U_perp diag(S) V_perp^T."""
    n = M.shape[1]
    fraction = 1.0 / n if fraction is None else fraction
    budget = math.floor(fraction * sum(ctx.ranks) + 1e-9)
    U, S, Vh = svd_parts(M * w[None, :, None, None])                                # per task
    keep = [min(r, budget, S.shape[-1]) for r in ctx.ranks]
    Us = torch.cat([U[:, i, :, :k] for i, k in enumerate(keep)], dim=-1)
    Ss = torch.cat([S[:, i, :k] for i, k in enumerate(keep)], dim=-1)
    Vs = torch.cat([Vh[:, i, :k].transpose(-1, -2) for i, k in enumerate(keep)], dim=-1)
    return alpha * (polar(Us) * Ss[:, None, :]) @ polar(Vs).transpose(-1, -2)


def iso_c(M, w, ctx, alpha):
    """Iso-C: the SVD of sum_i w_i D_i with its nonzero singular values all replaced by their mean (the public code
    averages over the full spectrum, zeros included, and so adds a spurious full-rank term to a sum of LoRAs)."""
    U, S, Vh = svd_parts(weighted_sum(M, w))
    nz = nonzero(S)
    mean = (S * nz).sum(-1, keepdim=True) / nz.sum(-1, keepdim=True).clamp(min=1)
    return alpha * (U * (mean * nz)[:, None, :]) @ Vh


def iso_cts(M, w, ctx, common_fraction, alpha):
    """Iso-CTS: the top k_c = fraction * R singular directions of the sum (the common subspace), plus for each task
    the top (R - k_c) / n directions of its update with the common subspace projected out; the stacked U and V are
    orthogonalised (polar factors) and every kept direction gets the mean of the kept nonzero singular values."""
    n = M.shape[1]
    R = sum(ctx.ranks)
    k_c = int(R * common_fraction)
    per_task = min(round((R - k_c) / n), R // n)  # rounding up must not claim more than R directions in all
    k_c = min(R - per_task * n, M.shape[-1], M.shape[-2])
    Mw = M * w[None, :, None, None]
    U, S, Vh = svd_parts(Mw.sum(1))
    Uc = U[..., :k_c]
    parts_u, parts_s, parts_v = [Uc], [S[..., :k_c]], [Vh[..., :k_c, :].transpose(-1, -2)]
    if per_task > 0:
        specific = Mw - Uc[:, None] @ (Uc[:, None].transpose(-1, -2) @ Mw)
        Ut, St, Vht = svd_parts(specific)
        k_t = min(per_task, St.shape[-1])
        for i in range(n):
            parts_u.append(Ut[:, i, :, :k_t])
            parts_s.append(St[:, i, :k_t])
            parts_v.append(Vht[:, i, :k_t].transpose(-1, -2))
    Us, Ss, Vs = torch.cat(parts_u, -1), torch.cat(parts_s, -1), torch.cat(parts_v, -1)
    nz = nonzero(Ss)
    mean = (Ss * nz).sum(-1, keepdim=True) / nz.sum(-1, keepdim=True).clamp(min=1)
    Us, Vs = polar(Us * nz[:, None, :]), polar(Vs * nz[:, None, :])  # zero directions stay out of the rotation
    return alpha * (Us * (mean * nz)[:, None, :]) @ Vs.transpose(-1, -2)


def tucker2(M, rank: int, tol: float = 1e-6, max_iter: int = 1000):
    """Tucker-2 of each module's stack of task matrices M (m, n, p, q) by higher-order orthogonal iteration, as
    tensorly's partial_tucker (init "svd", modes of the rows and the columns, the task mode left whole): orthonormal
    U0 (m, p, k) and U1 (m, q, k) maximising sum_i ||U0^T M_i U1||_F^2. Start from the top-k left singular vectors
    of [M_1 ... M_n] and of [M_1^T ... M_n^T]; then alternately U0 <- top-k left singular vectors of
    [M_1 U1 ... M_n U1], U1 <- those of [M_1^T U0 ... M_n^T U0], until the relative reconstruction error,
    sqrt(| ||M||^2 - ||core||^2 |) / ||M||, changes by less than `tol` (compared from the third iteration on). Each module
    iterates on its own (one that has converged stops changing), so the batch does not change any module's result."""
    m, n, p, q = M.shape
    k0, k1 = min(rank, p), min(rank, q)

    def top(X, k):   # top-k left singular vectors of X (m, rows, cols)
        return svd_parts(X)[0][..., :k]

    U0 = top(M.transpose(1, 2).reshape(m, p, n * q), k0)
    U1 = top(M.transpose(-1, -2).transpose(1, 2).reshape(m, q, n * p), k1)
    total = M.flatten(1).norm(dim=-1).clamp(min=torch.finfo(M.dtype).tiny)
    running = torch.ones(m, dtype=torch.bool, device=M.device)
    previous = None
    for iteration in range(max_iter):
        new0 = top((M @ U1[:, None]).transpose(1, 2).reshape(m, p, n * k1), k0)
        new1 = top((M.mT @ new0[:, None]).transpose(1, 2).reshape(m, q, n * k0), k1)
        U0 = torch.where(running[:, None, None], new0, U0)
        U1 = torch.where(running[:, None, None], new1, U1)
        core = (U0.mT[:, None] @ M @ U1[:, None]).flatten(1).norm(dim=-1)
        error = (total ** 2 - core ** 2).abs().sqrt() / total
        if iteration > 1:   # as tensorly: the change is first compared at the third iteration
            running &= (previous - error).abs() >= tol
            if not running.any():
                break
        previous = error
    return U0, U1


def ctm(M, w, ctx, rank, beta, density, lam):
    """Compress then Merge (He et al., ICML 2026), in the core space (whose cores are the dense updates D_i in the
    stacked factors' singular bases, as in its code): (1) shared rank-k subspaces, the Tucker-2 factors U0, U1 of
    the task cores after balancing their norms, M_i (beta + (1 - beta) mean_j ||M_j|| / ||M_i||) (balancing only
    chooses the subspaces); (2) each task projected to k x k coordinates C_i = U0^T M_i U1; (3) TIES there
    (trim to `density`, sign election, disjoint mean, times lambda); (4) the merge U0 C U1^T, of rank <= k by
    construction. k: `rank`, else the largest task rank (a single LoRA's size)."""
    k = rank or max(ctx.ranks)
    norms = M.flatten(2).norm(dim=-1)                                                # (m, n)
    balance = beta + (1 - beta) * norms.mean(1, keepdim=True) / norms.clamp(min=torch.finfo(M.dtype).tiny)
    U0, U1 = tucker2(M * balance[..., None, None], k)
    C = U0.mT[:, None] @ M @ U1[:, None]                                             # (m, n, k, k)
    return U0 @ ties(C, w, ctx, density, lam) @ U1.mT


# ------------------------------------------------------------------------------------------------ applying one
def _check_compatible(adapters: list[Adapter]):
    for i, a in enumerate(adapters):
        for name, factors in a.modules.items():
            if factors.A.shape[0] == 0:
                raise BadInput(f"adapter {i + 1} of {len(adapters)} has rank 0 at {name}: it adapts nothing there; "
                               "leave that module out of the adapter")
    for name in sorted(set().union(*(a.modules for a in adapters))):
        shapes = {(a.modules[name].A.shape[1], a.modules[name].B.shape[0]) for a in adapters if name in a.modules}
        if len(shapes) > 1:
            raise BadInput(f"cannot merge: module {name} has different (d_in, d_out) shapes {sorted(shapes)}")


ZERO_UPDATE = """A module an adapter does not adapt is a zero update of that adapter (D_i = 0), as in PEFT's `cat`
combination; per method family that means:
  sums (concat, task_arithmetic, dare_linear, magnitude_prune, svd): it adds nothing; the sum is over the adapters
    that adapt the module, with the weights given (svd's mean still divides by all N);
  disjoint means (ties, ties_dense, dare_ties, knots_*): its zero entries cast no sign vote and are not counted in
    the mean;
  spectral methods (tsv_m, iso_c, iso_cts): it has no singular directions (rank 0): tsv_m keeps none for it, and
    R, the dimension the space is split by, counts only the ranks present;
  factor sums (weight_sum, weighted_avg, lorahub): zero A and B factors of the others' rank and scale, adding
    nothing to sum_i B_i or sum_i A_i (weighted_avg's mean still divides by all N);
  cat: no branch of that adapter in that module (its alpha there has nothing to scale)."""


def over_union(adapters: list[Adapter], equal_ranks: bool = False) -> list[Adapter]:
    """The adapters over the union of their modules (`ZERO_UPDATE`): where an adapter has no module, rank-0 factors
    (A: 0 x d_in, B: d_out x 0), whose core M_i is 0 and which add no column to the stacked factors; for the methods
    that sum the factors themselves (`equal_ranks`), zero factors of the rank and scale of the first adapter that
    has the module, so that sum_i B_i and sum_i A_i are those of the others."""
    union = sorted(set().union(*(a.modules for a in adapters)))
    out = []
    for a in adapters:
        modules = dict(a.modules)
        for name in union:
            if name not in modules:
                like = next(b.modules[name] for b in adapters if name in b.modules)
                r = like.A.shape[0] if equal_ranks else 0
                modules[name] = Lora(like.A.new_zeros(r, like.A.shape[1]), like.B.new_zeros(like.B.shape[0], r),
                                     like.scale if equal_ranks else 1.0)
        out.append(Adapter(dict(sorted(modules.items())), a.base_model))
    return out


def _groups(adapters: list[Adapter]) -> dict:
    """Module names grouped by (d_out, d_in, ranks): each group is merged as one batch."""
    groups = defaultdict(list)
    for name in sorted(adapters[0].modules):
        loras = [a.modules[name] for a in adapters]
        groups[(loras[0].B.shape[0], loras[0].A.shape[1], tuple(l.A.shape[0] for l in loras))].append(name)
    return groups


def core_project(loras_by_module: list[list[Lora]], aligned: bool = True):
    """The core space of a batch of modules (same shapes and ranks): bases P_b (d_out) and P_a (d_in) of the stacked
    B = [s_1 B_1 ... s_n B_n] and A^T = [A_1; ...; A_n]^T, and the cores M (m, n, K_b, K_a), float64, with
    D_i = P_b M_i P_a^T for every module and task, M_i = C_b[:, cols_i] C_a[:, cols_i]^T.

    aligned: the bases are the stacked factors' left singular vectors (`lowrank.svd_basis`), which entry-wise
    methods need; else their thin QR bases, enough for a method that commutes with orthogonal changes of basis
    (sums, SVDs): its merged update is the same in any basis, and the QR bases cost less (on Qwen2-1.5B shapes the
    SVDs of the triangular factors take about a third of an SVD merge's time).

    Why singular vectors and not Q for the entry-wise methods: trim, sign election and DARE masks act on the entries
    of the cores, and entries depend on the basis. In Q's basis the triangular factor makes the first task's core
    fill only its leading r_1 x r_1 block and the last task's the whole R x R: TIES would weigh tasks by their place
    in the list. Singular vectors of the stacked factors do not depend on the order of the stacked columns (up to
    the sign of each vector, which every merge here is indifferent to, and for distinct singular values: within a
    repeated one any basis of its space is a singular basis, which random or trained factors do not meet), so
    neither does the merge. It is the basis the core-space paper's code uses (Panariello et al., NeurIPS 2025)."""
    n = len(loras_by_module[0])
    scales = [torch.tensor([mod[i].scale for mod in loras_by_module], dtype=torch.float64)[:, None, None]
              for i in range(n)]
    # B^T and A stacked along the rank: their transposes are the column-major d x R matrices the QRs take
    Bt = torch.cat([torch.stack([mod[i].B for mod in loras_by_module]).double().mT * scales[i] for i in range(n)],
                   dim=-2)
    A = torch.cat([torch.stack([mod[i].A for mod in loras_by_module]).double() for i in range(n)], dim=-2)
    if aligned:
        (Pb, Cb), (Pa, Ca) = svd_basis(Bt.mT), svd_basis(A.mT)
    else:
        Pb, Pa = qr_basis(Bt.mT), qr_basis(A.mT)
        Cb, Ca = Pb.triangle(), Pa.triangle()
    cols = torch.tensor([l.A.shape[0] for l in loras_by_module[0]]).cumsum(0).tolist()
    M = torch.stack([Cb[..., s:e] @ Ca[..., s:e].mT for s, e in zip([0] + cols[:-1], cols)], dim=1)
    return Pb, M, Pa


def dense_updates(loras_by_module: list[list[Lora]]):
    """D_i = s_i B_i A_i, float64, (m, n, d_out, d_in): the dense reference (and `ties_dense`)."""
    return torch.stack([torch.stack([l.scale * l.B.double() @ l.A.double() for l in loras])
                        for loras in loras_by_module])


def _to_lora(Pb: Basis, M, Pa: Basis, rank: int | None, dtype) -> list[Lora]:
    """Merged cores back to factors: B = P_b M, A = P_a^T, or the rank-k truncation from the SVD of M
    (B = P_b U_k S_k, A = (P_a V_k)^T)."""
    if rank is not None:
        Bm, _, Am = truncate_core(Pb, M, Pa, rank)
    else:
        Bm, Am = Pb @ M, Pa.matrix().mT
    return [Lora(a, b, 1.0) for a, b in zip(Am.to(dtype).contiguous().unbind(), Bm.to(dtype).contiguous().unbind())]


def _dense_to_lora(delta, rank: int | None, dtype) -> list[Lora]:
    if rank is not None:
        U, S, Vh = svd_parts(delta)
        k = min(rank, S.shape[-1])
        return [Lora(v.to(dtype), (u * s).to(dtype), 1.0) for u, s, v in zip(U[..., :k], S[..., None, :k], Vh[..., :k, :])]
    eye = torch.eye(delta.shape[-1], dtype=dtype)
    return [Lora(eye, d.to(dtype), 1.0) for d in delta]


def adapter_generators(adapters: list[Adapter], names: list[str], seed: int) -> tuple:
    """One generator per adapter for a group of modules, seeded from the merge's seed and the adapter's own A factors
    in those modules: the same adapter draws the same masks wherever it stands in the list (and whatever scales its
    update, B). Adapters with identical A factors draw identical masks."""
    out = []
    for a in adapters:
        h = hashlib.sha256(str(seed).encode())
        for name in names:
            h.update(a.modules[name].A.detach().cpu().contiguous().double().numpy().tobytes())
        out.append(torch.Generator().manual_seed(int.from_bytes(h.digest()[:8], "little")))
    return tuple(out)


def refuse_non_finite(adapters: list[Adapter]):
    """BadInput naming the first adapter and module with a NaN or inf factor, if any. One check per tensor: called
    where it is needed (before the dense path, when a result is not finite or a decomposition failed), since on
    Qwen2-1.5B shapes it costs a sixth of a core merge."""
    for i, a in enumerate(adapters):
        for name, factors in a.modules.items():
            if not (torch.isfinite(factors.A).all() and torch.isfinite(factors.B).all()):
                raise BadInput(f"adapter {i + 1} of {len(adapters)} has non-finite factors at {name} (NaN or inf): "
                               "it cannot be merged; retrain or replace it")


def check_finite(adapter: Adapter, what: str) -> Adapter:
    """Refuse a merged adapter with a NaN or an infinite factor entry (before it is folded or saved)."""
    for name, factors in adapter.modules.items():
        if not (torch.isfinite(factors.A).all() and torch.isfinite(factors.B).all()):
            raise BadInput(f"{what} gives non-finite factors at {name} (NaN or inf in the adapters, weights or "
                           "parameters): check the inputs; nothing was written")
    return adapter


def check_arguments(m: Method, seed: int | None = None, rank: int | None = None, dense: bool = False):
    """Refuse what a data-free merge would not use or cannot take, before any work: a data method, the dense form
    for an exact factor merge, a seed for a method that draws nothing, a rank below 1."""
    if m.space == "data":
        raise BadInput(f"{m.name} learns its merge from rows: run it through full_evaluation.py "
                       f"(--methods {m.name}) or src.merge_fit")
    if m.space == "factors" and dense:
        raise BadInput(f"{m.name} merges the factors exactly ({m.output}): it has no dense form")
    if seed is not None and not m.seeded:
        raise BadInput(f"{m.name} draws no random numbers: it takes no seed (the seeded methods: "
                       f"{', '.join(n for n, x in METHODS.items() if x.seeded)})")
    check_rank(rank)


def truncate(adapter: Adapter, rank: int) -> Adapter:
    """Each module's update s B A replaced by its best approximation of rank <= k in the Frobenius norm (Eckart-Young:
    the truncated SVD U_k S_k V_k^T, computed from the factors by `lowrank.truncated_svd`), as B = U_k S_k, A = V_k^T,
    scale 1. A module of rank <= k is kept as it is. The rank budget of the factor merges (concat, weight_sum), whose
    exact result is larger, and of the learned ones whose objective is a loss on rows rather than a norm (CAT,
    LoraHub); the core methods truncate their merged core the same way (`_to_lora`), RegMean in its own metric
    (`regmean_truncate`)."""
    check_rank(rank)
    out = {}
    for name, f in adapter.modules.items():
        if f.A.shape[0] <= rank:
            out[name] = f
            continue
        Bk, _, Ak = truncated_svd(f.scale * f.B.double(), f.A, rank)
        out[name] = Lora(Ak.to(f.A.dtype).contiguous(), Bk.to(f.B.dtype).contiguous(), 1.0)
    return Adapter(out, adapter.base_model)


def merge(adapters: list[Adapter], method: str, weights=None, seed: int | None = None, rank: int | None = None,
          dense: bool = False, **params) -> Adapter:
    """Merge `adapters` (one per task) with a data-free method of the registry, every module.

    weights: per-task weights w_i (default 1, or 1/n for the methods that average); seed: DARE's masks (methods
    that draw none refuse it); rank: truncate the result to this rank by SVD, the best approximation in the
    Frobenius norm (a core method's merged core, a factor method's merged factors: `truncate`; the SVD merge's own
    `rank` parameter defaults to 8); dense: run a core method on the dense d_out x d_in updates instead, one module at a
    time (the reference form: slow, and for entry-wise methods a different merge). An argument the method does not
    use, a parameter out of its range or a non-finite result is a BadInput, raised before anything is returned."""
    m = get_method(method)
    if rank is not None and "rank" in m.params:  # the SVD merge: `rank` is its own parameter
        params, rank = {**params, "rank": rank}, None
    check_arguments(m, seed, rank, dense)
    p = resolve_params(m, params)
    _check_compatible(adapters)
    adapters = over_union(adapters, m.equal_ranks)
    n = len(adapters)
    if weights is not None and not all(math.isfinite(x) for x in merge_weights(n, weights, 1.0)):
        raise BadInput(f"merge weights {list(weights)}: every weight must be a finite number")
    if m.space == "dense" or dense:  # a NaN entry could be trimmed away on the dense path: look first (elsewhere a
        refuse_non_finite(adapters)  # NaN reaches the result or fails a decomposition, and is named below)
    try:
        merged = _merge_checked(adapters, m, weights, seed, rank, dense, p)
    except torch.linalg.LinAlgError:  # the core space's decompositions fail on a NaN or inf factor
        refuse_non_finite(adapters)
        raise
    try:
        return check_finite(merged, method)
    except BadInput:
        refuse_non_finite(adapters)  # a non-finite input is the better message
        raise


def _merge_checked(adapters: list[Adapter], m: Method, weights, seed, rank, dense: bool, p: dict) -> Adapter:
    """`merge` after its checks: the factor, core or dense computation over every module."""
    n = len(adapters)
    if m.space == "factors":
        merged = Adapter({name: m.function([a.modules[name] for a in adapters], weights=weights, **p)
                          for name in sorted(adapters[0].modules)}, adapters[0].base_model)
        return merged if rank is None else truncate(merged, rank)
    w = torch.tensor(merge_weights(n, weights, 1.0 / n if m.mean else 1.0), dtype=torch.float64)
    dtype = next(iter(adapters[0].modules.values())).A.dtype
    out = {}
    for (_, _, ranks), names in _groups(adapters).items():
        ctx = Context(ranks, adapter_generators(adapters, names, seed or 0) if m.seeded else ())
        own = (p["rank"] or max(ranks)) if "rank" in p else None   # CtM: rank k by construction, stored as k
        if m.space == "core" and not dense:
            loras = [[a.modules[name] for a in adapters] for name in names]
            Pb, M, Pa = core_project(loras, aligned=m.entrywise)
            out.update(zip(names, _to_lora(Pb, m.function(M, w, ctx, **p), Pa, rank or own, dtype)))
            continue
        for name in names:  # dense: one module at a time (n d_out x d_in matrices in float64)
            D = dense_updates([[a.modules[name] for a in adapters]])
            out[name] = _dense_to_lora(m.function(D, w, ctx, **p), rank or own, dtype)[0]
    return Adapter(dict(sorted(out.items())), adapters[0].base_model)


# ------------------------------------------------------------------------- RegMean: data-aware, an exact LoRA
@dataclass
class RegMeanInput:
    """What RegMean needs of the inputs one or more modules read (q, k and v read one hidden state), summed over the
    tasks so that its size does not grow with their number: S = sum_i G_i (d_in x d_in), G_i = X_i^T X_i the Gram
    matrix of task i's inputs X_i (tokens x d_in), and each task's diagonal diag(G_i) (n x d_in). float64."""
    summed: torch.Tensor        # (d_in, d_in)
    diagonals: torch.Tensor     # (n, d_in): row i is diag(G_i)


def regmean_statistics(loras: list[Lora], grams: list[torch.Tensor]) -> tuple[RegMeanInput, list[torch.Tensor]]:
    """(S and the diagonals, each task's G_i A_i^T) from the per-task Gram matrices of one module: the statistics
    merge_fit collects while each task's rows run (there without ever holding two G_i), here from G_i given."""
    if len(grams) != len(loras):
        raise BadInput(f"{len(grams)} Gram matrices for {len(loras)} LoRAs: give one per task")
    G = [g.double() for g in grams]
    return (RegMeanInput(sum(G), torch.stack([torch.diagonal(g) for g in G])),
            [g @ f.A.to(g.device, torch.float64).T for g, f in zip(G, loras)])


def regmean_factor(stats: RegMeanInput, alpha: float) -> torch.Tensor:
    """The Cholesky factor of G' = sum_i G_i' = alpha S + (1 - alpha) diag(sum_i diag(G_i)), one per input and
    alpha, shared by every module reading that input."""
    G = alpha * stats.summed
    G.diagonal().add_((1 - alpha) * stats.diagonals.sum(0))
    factor, info = torch.linalg.cholesky_ex(G)
    if info.item() != 0:
        raise BadInput(f"RegMean: the summed Gram matrix is singular (an input feature never seen, or alpha {alpha} "
                       "with too few tokens): collect the Grams on more rows or lower alpha")
    return factor


def regmean_solve(loras: list[Lora], stats: RegMeanInput, projected: list[torch.Tensor], alpha: float,
                  factor: torch.Tensor | None = None, rank: int | None = None) -> Lora:
    """RegMean (Jin et al., ICLR 2023) of one linear module, as an exact LoRA of rank R = sum_i r_i.

    Task i's model maps its own layer inputs X_i (tokens x d_in) by W_i = W_0 + D_i, D_i = s_i B_i A_i. RegMean
    takes the W minimising sum_i ||X_i W^T - X_i W_i^T||^2, with each Gram matrix G_i = X_i^T X_i regularised by
    scaling its off-diagonal entries by alpha, G_i' = alpha G_i + (1 - alpha) diag(G_i):

        W = (sum_i W_i G_i') G'^{-1},  G' = sum_j G_j'
          = W_0 + sum_i s_i B_i (A_i G_i' G'^{-1})        (since sum_i G_i' G'^{-1} = I)

    so the merge is the LoRA B = [s_1 B_1 ... s_n B_n], A = [A_1 G_1' G'^{-1}; ...; A_n G_n' G'^{-1}], scale 1,
    and no d_out x d_in matrix is formed. Both G' and G_i' A_i^T are linear in statistics summed over the tasks:

        G'          = alpha S + (1 - alpha) diag(sum_i d_i),          S = sum_i G_i,  d_i = diag(G_i)
        G_i' A_i^T  = alpha (G_i A_i^T) + (1 - alpha) d_i * A_i^T     (d_i scaling the rows of A_i^T)

    so any alpha needs only S, the d_i and the G_i A_i^T (d_in x r_i): memory d_in^2 + n d_in + R d_in, not n d_in^2.
    G' is symmetric: A_i G_i' G'^{-1} = (G'^{-1} G_i' A_i^T)^T, one linear solve (Cholesky) for all tasks at once in
    float64, no explicit inverse. A task that does not adapt the module (rank 0) still counts in G': its model keeps
    W_0 there, which the merge should keep on its inputs too. alpha 1 is plain least squares; alpha -> 0 weighs each
    input feature by its share of the summed energy. `factor`: regmean_factor(stats, alpha), if already computed;
    `rank`: RegMean's best LoRA of at most that rank instead (`regmean_truncate`)."""
    if len(projected) != len(loras) or stats.diagonals.shape[0] != len(loras):
        raise BadInput(f"statistics of {len(projected)} tasks for {len(loras)} LoRAs: give one per task")
    factor = regmean_factor(stats, alpha) if factor is None else factor
    device = stats.summed.device   # the statistics' (the model's); the factors come back on the adapters'
    rhs = torch.cat([alpha * p + (1 - alpha) * d[:, None] * f.A.to(device, torch.float64).T
                     for p, d, f in zip(projected, stats.diagonals, loras)], dim=1)   # d_in x R
    A = torch.cholesky_solve(rhs, factor).T                                          # R x d_in
    B = torch.cat([f.scale * f.B.double().to(device) for f in loras], dim=1)
    if rank is not None and rank < A.shape[0]:
        B, A = regmean_truncate(B, A, factor, rank)
    dtype, home = loras[0].A.dtype, loras[0].A.device
    return Lora(A.to(home, dtype).contiguous(), B.to(home, dtype).contiguous(), 1.0)


def regmean_truncate(B, A, factor, rank: int) -> tuple:
    """RegMean's best update of rank <= k (float64 factors in and out: B (d_out x R), A (R x d_in), the Cholesky
    factor L of G' = L L^T).

    RegMean's objective with the regularised Grams, J(W) = sum_i tr((W - W_i) G_i' (W - W_i)^T), is a quadratic in W
    whose minimum W* = W_0 + B A satisfies the normal equations W* G' = sum_i W_i G_i'. Around it, exactly,

        J(W) = J(W*) + tr((W - W*) G' (W - W*)^T) = J(W*) + ||(W - W*) L||_F^2

    (the cross term 2 tr((W - W*) (G' W*^T - sum_i G_i' W_i^T)) vanishes). So among W = W_0 + D with rank(D) <= k
    the best minimises ||D L - B A L||_F; D -> D L maps the matrices of rank <= k onto themselves (L is invertible),
    and by Eckart-Young the optimum is D L = the truncated SVD U_k S_k V_k^T of B (A L):

        D_k = U_k S_k (V_k^T L^{-1}),   the LoRA B_k = U_k S_k, A_k = V_k^T L^{-1} (a triangular solve)

    It is the Frobenius truncation of B A only where G' is a multiple of the identity: in general it keeps the
    directions that matter on the tasks' inputs, measured by G'. Cost O(R d_in^2) for A L, besides the SVD of the
    factors."""
    Bk, _, Vh = truncated_svd(B, A @ factor, rank)
    return Bk, torch.linalg.solve_triangular(factor, Vh, upper=False, left=False)   # A_k L = V_k^T


def regmean(loras: list[Lora], grams: list[torch.Tensor], alpha: float) -> Lora:
    """RegMean of one module from each task's Gram matrix G_i (the formula: regmean_solve)."""
    stats, projected = regmean_statistics(loras, grams)
    return regmean_solve(loras, stats, projected, alpha)
