"""Low-rank linear algebra shared by every merge: orthonormal bases kept as Householder reflectors, and the SVD of a
product B A (d_out x R times R x d_in) from its factors, never forming the d_out x d_in matrix.

Both rest on one step, a thin QR then the SVD of its small triangular factor:

    X = Q T (thin QR, Q kept as LAPACK's reflectors),  T = U S V^T  =>  X = (Q U) S V^T

For a product, B = Q_b T_b and A^T = Q_a T_a give B A = Q_b (T_b T_a^T) Q_a^T, so the SVD of the R x R core
T_b T_a^T gives the singular values of B A, and Q_b, Q_a carry its singular vectors to full size (`truncate_core`,
which also truncates the merged cores of the core-space merges). The reflectors are applied to the k kept columns
only (ormqr), O(d R k): a rank-k merge needs P times k columns, so forming the d x R matrix Q would cost more than
the rest of the merge; it is formed only when asked for (`matrix()`). Used by the SVD merge (`lora.svd_merge`),
Arrow's prototypes (`arrow.arrow_prototypes`), every rank budget (`merges.truncate`, `merges.regmean_truncate`,
`merges._to_lora`), the core space of the merges published since the paper (`merges.core_project`), and the
spectra figure.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Basis:
    """Orthonormal bases P = Q U (m, d, K), K = min(d, R), of a batch of d x R matrices (or one, without the batch
    axis): Q kept as LAPACK's Householder reflectors (geqrf), U (m, K, K) an optional rotation inside its span.
    `P @ X` applies them (ormqr) in O(d K k) for a k-column X, and P itself is formed only when asked (`matrix()`),
    since a rank-k merge needs P times k columns only."""
    h: torch.Tensor           # (m, d, R): the triangular factor on and above the diagonal, the reflectors below
    tau: torch.Tensor         # (m, K)
    rotation: torch.Tensor | None = None   # (m, K, K); None: the QR basis itself

    def __matmul__(self, X):
        """P @ X for X (m, K, k)."""
        X = X if self.rotation is None else self.rotation @ X
        pad = X.new_zeros(*X.shape[:-2], self.h.shape[-2] - X.shape[-2], X.shape[-1])
        return torch.ormqr(self.h, self.tau, torch.cat([X, pad], dim=-2))

    def matrix(self):
        Q = torch.linalg.householder_product(self.h[..., :self.tau.shape[-1]], self.tau)
        return Q if self.rotation is None else Q @ self.rotation

    def triangle(self):
        """The QR's R factor, (m, K, R): the matrix is Q @ triangle() (of the QR basis, before any rotation)."""
        return self.h[..., :self.tau.shape[-1], :].triu()


def qr_basis(X) -> Basis:
    """Thin QR of a batch X (m, d, R); column-major input saves LAPACK a transposing copy."""
    return Basis(*torch.geqrf(X))


def svd_basis(X) -> tuple[Basis, torch.Tensor]:
    """The left singular vectors of a batch X (m, d, R) as a Basis, and X's coordinates in it, (m, K, R): X = P C.
    A thin QR X = Q T, then the SVD of the small K x R factor T = U S V^T: P = Q U, C = S V^T. O(d R^2 + R^3)."""
    Q = qr_basis(X)
    U, S, Vh = torch.linalg.svd(Q.triangle(), full_matrices=False)
    return Basis(Q.h, Q.tau, U), S[..., :, None] * Vh


def truncated_svd(B, A, rank: int | None = None) -> tuple:
    """The rank-k truncated SVD U_k S_k V_k^T of the product B A (B (..., d_out, R), A (..., R, d_in)) from its
    factors, in float64, as the LoRA factors (B_k = U_k S_k, S_k, A_k = V_k^T), k = min(rank, R, d_out, d_in) (all
    of them when rank is None). By Eckart-Young B_k A_k is the best approximation of B A of rank <= k in the
    Frobenius norm; the rows of A_k are orthonormal, the columns of B_k orthogonal with norms S_k."""
    Pb, Pa = qr_basis(B.double()), qr_basis(A.double().mT)
    return truncate_core(Pb, Pb.triangle() @ Pa.triangle().mT, Pa, rank)


def truncate_core(Pb: Basis, M, Pa: Basis, rank: int | None = None) -> tuple:
    """The rank-k truncated SVD of P_b M P_a^T (M (..., K_b, K_a) a core between two orthonormal bases) as LoRA
    factors (B_k, S_k, A_k): M = U S V^T gives P_b M P_a^T = (P_b U) S (P_a V)^T, whose singular vectors are P_b U
    and P_a V, so B_k = P_b U_k S_k and A_k = (P_a V_k)^T; k = min(rank, K_b, K_a), all when rank is None."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    k = S.shape[-1] if rank is None else min(rank, S.shape[-1])
    return Pb @ (U[..., :k] * S[..., None, :k]), S[..., :k], (Pa @ Vh[..., :k, :].mT).mT
