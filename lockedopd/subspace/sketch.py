"""Single-pass randomized sketches of a cumulative update ΔW and subspace-similarity helpers.

The sketch follows Tropp, Yurtsever, Udell & Cevher (2017), "Practical sketching algorithms for low-rank
matrix approximation" (SIAM J. Matrix Anal. Appl.), Algorithms 1-3: for a matrix A (out x in) draw fixed
Gaussian test matrices Ω (in x k) and Ψ (l x out), keep only the range sketch Y = A·Ω and the co-range
sketch Z = Ψ·A, and reconstruct

    Q = orth(Y),   X = (Ψ·Q)⁺ · Z,   Â = Q·X.

Because the sketch is linear, the sketch of ΔW_t = W_t - W_0 is the sketch of W_t minus the (stored) sketch
of W_0; no copy of W_0 is needed.  All sketch arithmetic runs in float64: ΔW is typically 1e-4..1e-6 of ‖W‖,
so a float32 sketch of W_0 would lose most of ΔW's digits to cancellation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "LowRankFactors",
    "default_sketch_sizes",
    "draw_test_matrices",
    "exact_top_subspaces",
    "reconstruct_top_subspaces",
    "sketch_matrix",
    "subspace_similarity",
]


class LowRankFactors(NamedTuple):
    """Top-r factors of a matrix: U (out x r), S (r,), V (in x r); U and V have orthonormal columns."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


def default_sketch_sizes(
    rank: int, out_features: int, in_features: int, k: int | None = None, ell: int | None = None
) -> tuple[int, int]:
    """Return the sketch sizes (k, l) actually used for an out x in matrix (`ell` is l).

    Defaults follow Tropp et al.'s simple recommendation k = 2r + 1, l = 2k + 1.  k is capped at
    min(out, in) (a larger range sketch carries no extra information) and l at out, but never below k
    (Ψ·Q, an l x k matrix, must have full column rank).
    """
    if k is None:
        k = 2 * rank + 1
    if ell is None:
        ell = 2 * k + 1
    k = min(k, out_features, in_features)
    ell = max(k, min(ell, out_features))
    return k, ell


def draw_test_matrices(
    out_features: int, in_features: int, k: int, ell: int, seed: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the Gaussian test matrices Ω (in x k) and Ψ (l x out) in float64 from a CPU generator seeded by `seed`.

    They are drawn on the CPU (so they are identical on every device) and then moved to `device`.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    omega = torch.randn(in_features, k, generator=gen, dtype=torch.float64)
    psi = torch.randn(ell, out_features, generator=gen, dtype=torch.float64)
    if device is not None:
        omega = omega.to(device)
        psi = psi.to(device)
    return omega, psi


def sketch_matrix(
    weight: torch.Tensor, omega: torch.Tensor, psi: torch.Tensor, chunk_rows: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (Y, Z) = (W·Ω, Ψ·W) in float64 for a 2-D weight W (out x in).

    W is cast to float64 `chunk_rows` rows at a time, so the transient float64 copy stays small.
    """
    out_features = weight.shape[0]
    y = torch.empty(out_features, omega.shape[1], dtype=torch.float64, device=omega.device)
    z = torch.zeros(psi.shape[0], weight.shape[1], dtype=torch.float64, device=omega.device)
    for start in range(0, out_features, chunk_rows):
        rows = weight.detach()[start : start + chunk_rows].to(device=omega.device, dtype=torch.float64)
        y[start : start + rows.shape[0]] = rows @ omega
        z += psi[:, start : start + rows.shape[0]] @ rows
    return y, z


def reconstruct_top_subspaces(
    y: torch.Tensor, z: torch.Tensor, psi: torch.Tensor, rank: int, zero_tol: float = 0.0
) -> LowRankFactors | None:
    """Reconstruct the top-`rank` SVD factors of A from its sketches Y = A·Ω, Z = Ψ·A (Tropp et al. 2017).

    Q = orth(Y) (out x k), X = lstsq(Ψ·Q, Z) (k x in), Â = Q·X; with X = Ũ·Σ·Vᵀ the factors are U = Q·Ũ, Σ, V.
    Returns None when the sketch is (numerically) zero, i.e. max(‖Y‖_F, ‖Z‖_F) <= zero_tol, or when it holds
    non-finite values; then no subspace is defined.  `rank` is capped at k.  Results are float64.
    """
    if not (torch.isfinite(y).all() and torch.isfinite(z).all()):
        return None
    scale = max(float(torch.linalg.matrix_norm(y)), float(torch.linalg.matrix_norm(z)))
    if scale <= zero_tol or scale == 0.0:
        return None
    q, _ = torch.linalg.qr(y, mode="reduced")
    x = torch.linalg.lstsq(psi @ q, z).solution
    if not torch.isfinite(x).all():
        return None
    u_small, s, vh = torch.linalg.svd(x, full_matrices=False)
    r = min(rank, s.shape[0])
    return LowRankFactors(U=q @ u_small[:, :r], S=s[:r], V=vh[:r].mT.contiguous())


def exact_top_subspaces(delta: torch.Tensor, rank: int) -> LowRankFactors:
    """Exact top-`rank` SVD factors of a dense matrix (float64, for tests and small matrices)."""
    u, s, vh = torch.linalg.svd(delta.detach().to(torch.float64), full_matrices=False)
    r = min(rank, s.shape[0])
    return LowRankFactors(U=u[:, :r], S=s[:r], V=vh[:r].mT.contiguous())


def subspace_similarity(v1: torch.Tensor, v2: torch.Tensor) -> float:
    """Subspace similarity (1/r)·‖V1ᵀ·V2‖_F² of two orthonormal bases with r columns each (1 = same span).

    This is the paper's sim(t) for right singular vectors; it equals the mean squared cosine of the principal
    angles between the two r-dimensional subspaces.
    """
    if v1.dim() != 2 or v2.dim() != 2:
        raise ValueError(f"subspace_similarity expects 2-D bases, got shapes {tuple(v1.shape)} and {tuple(v2.shape)}")
    if v1.shape != v2.shape:
        raise ValueError(f"bases must have the same shape, got {tuple(v1.shape)} and {tuple(v2.shape)}")
    r = v1.shape[1]
    if r == 0:
        raise ValueError("bases must have at least one column")
    dtype = torch.promote_types(torch.promote_types(v1.dtype, v2.dtype), torch.float64)
    m = v1.detach().to(dtype).mT @ v2.detach().to(device=v1.device, dtype=dtype)
    return float((m * m).sum() / r)
