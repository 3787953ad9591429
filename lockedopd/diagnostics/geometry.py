"""Pure per-matrix parameter-space metrics (paper section 3/4; see shared/paper/DEFINITIONS.md).

Conventions
-----------
* ``W0`` is the base matrix (out x in), ``W1`` the fine-tuned one, ``ΔW = W1 - W0``.
* Every SVD runs in float64 on CPU (:func:`svd64`, :func:`svdvals64`).
* bf16 comparisons cast both tensors to bfloat16 first and compare the bf16 values in float32
  (every bf16 value, and the difference of two of them in the usual range, is exact there).
* "Changed" (the update mask ``M_upd``) is the complement of the η-"unchanged" mask used for
  bf16 sparsity: an entry is updated iff ``|ŵ1 - ŵ0| > η·max(|ŵ0|, |ŵ1|)``.  With ``eta=0``
  this is the exact-inequality mask used for update density.
* Masks by magnitude hold exactly ``round(α·n)`` entries; ties at the threshold are broken by
  flat index order (first ones win).
* Functions return ``None`` where a metric is undefined (zero update, empty mask, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "svd64",
    "svdvals64",
    "numerical_rank",
    "bf16_unchanged_mask",
    "bf16_changed_mask",
    "bf16_exact_changed_mask",
    "bf16_sparsity",
    "update_density",
    "principal_angles_deg",
    "principal_angles_from_bases",
    "tie_extended_k",
    "normalized_spectral_shift",
    "nss_from_singular_values",
    "exact_top_mask",
    "exact_bottom_mask",
    "principal_mask",
    "low_magnitude_mask",
    "mask_overlap",
    "overlap_fraction",
    "stable_rank",
    "stable_rank_from_singular_values",
    "hill_alpha",
    "hill_alpha_from_singular_values",
    "top_right_singular_vectors",
    "subspace_similarity",
]


# ---------------------------------------------------------------------------- SVD helpers
def _as_f64(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to(device="cpu", dtype=torch.float64)


def svd64(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, Vh)`` of a 2-D tensor in float64 on CPU; ``S`` is descending."""
    if w.dim() != 2:
        raise ValueError(f"svd64 expects a 2-D tensor, got shape {tuple(w.shape)}")
    return torch.linalg.svd(_as_f64(w), full_matrices=False)


def svdvals64(w: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of a 2-D tensor in float64 on CPU."""
    if w.dim() != 2:
        raise ValueError(f"svdvals64 expects a 2-D tensor, got shape {tuple(w.shape)}")
    return torch.linalg.svdvals(_as_f64(w))


def numerical_rank(s: torch.Tensor, shape: Sequence[int] | None = None, rtol: float | None = None) -> int:
    """Number of singular values above ``rtol·σ_1`` (default ``max(shape)·eps(float64)``, as numpy)."""
    if s.numel() == 0:
        return 0
    s1 = float(s[0])
    if not s1 > 0:
        return 0
    if rtol is None:
        dim = max(shape) if shape is not None else s.numel()
        rtol = dim * torch.finfo(torch.float64).eps
    return int((s > rtol * s1).sum())


# ---------------------------------------------------------------------------- bf16 masks
def _bf16_pair(w0: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if w0.shape != w1.shape:
        raise ValueError(f"shape mismatch: {tuple(w0.shape)} vs {tuple(w1.shape)}")
    return w0.detach().to(torch.bfloat16).float(), w1.detach().to(torch.bfloat16).float()


def bf16_unchanged_mask(w0: torch.Tensor, w1: torch.Tensor, eta: float = 1e-3) -> torch.Tensor:
    """Bool mask: entry unchanged iff ``|ŵ1 - ŵ0| <= η·max(|ŵ0|, |ŵ1|)`` on the bf16-cast values."""
    a0, a1 = _bf16_pair(w0, w1)
    diff = (a1 - a0).abs_()
    thr = torch.maximum(a0.abs_(), a1.abs_()).mul_(eta)
    return diff <= thr


def bf16_changed_mask(w0: torch.Tensor, w1: torch.Tensor, eta: float = 1e-3) -> torch.Tensor:
    """The update mask ``M_upd``: complement of :func:`bf16_unchanged_mask` (changed beyond η)."""
    return ~bf16_unchanged_mask(w0, w1, eta)


def bf16_exact_changed_mask(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Bool mask of entries whose bf16 values differ at all (exact inequality)."""
    if w0.shape != w1.shape:
        raise ValueError(f"shape mismatch: {tuple(w0.shape)} vs {tuple(w1.shape)}")
    return w0.detach().to(torch.bfloat16) != w1.detach().to(torch.bfloat16)


def bf16_sparsity(w0: torch.Tensor, w1: torch.Tensor, eta: float = 1e-3) -> float:
    """Fraction of entries unchanged under η after casting to bf16 (1.0 for identical tensors)."""
    n = w0.numel()
    if n == 0:
        return 1.0
    return int(bf16_unchanged_mask(w0, w1, eta).sum()) / n


def update_density(w0: torch.Tensor, w1: torch.Tensor) -> float:
    """Fraction of entries whose bf16 values differ at all."""
    n = w0.numel()
    if n == 0:
        return 0.0
    return int(bf16_exact_changed_mask(w0, w1).sum()) / n


# ---------------------------------------------------------------------------- principal angles
def principal_angles_from_bases(q0: torch.Tensor, q1: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of orthonormal ``q0``, ``q1``.

    Uses cosines (``σ(Q0ᵀQ1)``, clamped to [0, 1]) for large angles and sines
    (``σ(Q1 - Q0 Q0ᵀ Q1)``) for small ones, so angles near 0 are accurate rather than limited to
    ``sqrt(eps)`` by the arccos.
    """
    q0 = _as_f64(q0)
    q1 = _as_f64(q1)
    if q0.shape[0] != q1.shape[0]:
        raise ValueError(f"bases live in different spaces: {tuple(q0.shape)} vs {tuple(q1.shape)}")
    k = min(q0.shape[1], q1.shape[1])
    if k == 0:
        return torch.zeros(0, dtype=torch.float64)
    m = q0.T @ q1
    cos = torch.linalg.svdvals(m)[:k].clamp(0.0, 1.0)  # descending -> ascending angles
    resid = q1 - q0 @ m
    sin = torch.linalg.svdvals(resid)
    sin = torch.sort(sin).values[:k].clamp(0.0, 1.0)  # ascending -> ascending angles
    ang_cos = torch.arccos(cos)
    ang_sin = torch.arcsin(sin)
    return torch.where(cos * cos >= 0.5, ang_sin, ang_cos)


def tie_extended_k(s: torch.Tensor, k: int, rtol: float = 1e-10) -> int:
    """Smallest ``k' >= k`` such that ``σ_k'`` and ``σ_{k'+1}`` are not tied (within ``rtol·σ_1``).

    The top-k subspace is only well defined when ``σ_k > σ_{k+1}``; extending k over a tie
    cluster at the boundary makes the comparison basis-independent (e.g. ``W0 = c·Q``).
    """
    n = s.numel()
    k = max(0, min(k, n))
    if k == 0 or k == n:
        return k
    tol = rtol * float(s[0])
    while k < n and float(s[k - 1]) - float(s[k]) <= tol:
        k += 1
    return k


def principal_angles_deg(
    w0: torch.Tensor,
    w1: torch.Tensor,
    k: int = 512,
    svd0: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    svd1: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    extend_ties: bool = True,
) -> dict:
    """Principal angles (degrees) between the top-k left singular subspaces of ``w0`` and ``w1``.

    ``k`` is capped at ``min(out, in)``; with ``extend_ties`` it is then extended over singular
    values tied at the cut-off (the same k for both matrices).  Returns
    ``{"max": float, "mean": float, "k": int, "angles": tensor}``.
    """
    u0, s0, _ = svd0 if svd0 is not None else svd64(w0)
    u1, s1, _ = svd1 if svd1 is not None else svd64(w1)
    kk = max(1, min(k, s0.numel(), s1.numel()))
    if extend_ties:
        kk = max(tie_extended_k(s0, kk), tie_extended_k(s1, kk))
    ang = torch.rad2deg(principal_angles_from_bases(u0[:, :kk], u1[:, :kk]))
    return {"max": float(ang.max()), "mean": float(ang.mean()), "k": int(kk), "angles": ang}


# ---------------------------------------------------------------------------- spectra
def nss_from_singular_values(s0: torch.Tensor, s1: torch.Tensor) -> float | None:
    """``‖σ(W1) - σ(W0)‖₂ / ‖σ(W0)‖₂`` (``None`` if ``W0 = 0``)."""
    s0 = _as_f64(s0)
    s1 = _as_f64(s1)
    den = float(torch.linalg.vector_norm(s0))
    if den == 0.0:
        return None
    return float(torch.linalg.vector_norm(s1 - s0)) / den


def normalized_spectral_shift(w0: torch.Tensor, w1: torch.Tensor) -> float | None:
    """Normalized spectral shift (NSS) of a matrix pair."""
    return nss_from_singular_values(svdvals64(w0), svdvals64(w1))


def stable_rank_from_singular_values(s: torch.Tensor) -> float | None:
    """``Σσ² / σ_1²``; ``None`` for the zero matrix."""
    s = _as_f64(s)
    if s.numel() == 0 or not float(s.max()) > 0:
        return None
    s1 = float(s.max())
    return float((s * s).sum()) / (s1 * s1)


def stable_rank(delta: torch.Tensor) -> float | None:
    """Stable rank ``‖ΔW‖_F² / ‖ΔW‖₂²`` (``None`` if ``ΔW = 0``)."""
    return stable_rank_from_singular_values(svdvals64(delta))


def hill_alpha_from_singular_values(
    s: torch.Tensor, k: int = 16, shape: Sequence[int] | None = None, flat_tol: float = 1e-9
) -> float | None:
    """Hill tail-index estimate over the top ``k' = min(k, numerical rank)`` singular values.

    ``α̂ = [ (1/(k'-1)) Σ_{i<k'} log(σ_i / σ_k') ]⁻¹``.  Returns ``None`` when undefined: fewer
    than two nonzero singular values, or a flat top spectrum (mean log-ratio <= ``flat_tol``,
    i.e. α̂ -> ∞, as for a rank-r update with r equal singular values).
    """
    s = torch.sort(_as_f64(s), descending=True).values
    r = numerical_rank(s, shape)
    kk = min(k, r)
    if kk < 2:
        return None
    top = s[:kk]
    mean_log = float(torch.log(top[:-1] / top[-1]).sum()) / (kk - 1)
    if not mean_log > flat_tol:
        return None
    return 1.0 / mean_log


def hill_alpha(delta: torch.Tensor, k: int = 16) -> float | None:
    """Hill α̂ of ``ΔW``'s singular values (see :func:`hill_alpha_from_singular_values`)."""
    return hill_alpha_from_singular_values(svdvals64(delta), k=k, shape=tuple(delta.shape))


# ---------------------------------------------------------------------------- magnitude masks
def _n_select(n: int, alpha: float) -> int:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return int(min(n, max(0, round(alpha * n))))


def exact_top_mask(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bool mask (shape of ``scores``) of exactly ``round(α·n)`` largest entries; ties by index."""
    flat = scores.reshape(-1)
    n = flat.numel()
    m = _n_select(n, alpha)
    mask = torch.zeros(n, dtype=torch.bool)
    if m == 0:
        return mask.reshape(scores.shape)
    if m == n:
        return mask.fill_(True).reshape(scores.shape)
    thr = torch.kthvalue(flat, n - m + 1).values  # the m-th largest value
    mask = flat > thr
    need = m - int(mask.sum())
    if need > 0:
        ties = torch.nonzero(flat == thr, as_tuple=False).reshape(-1)[:need]
        mask[ties] = True
    return mask.reshape(scores.shape)


def exact_bottom_mask(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bool mask of exactly ``round(α·n)`` smallest entries; ties broken by index."""
    return exact_top_mask(-scores, alpha)


def principal_mask(
    w0: torch.Tensor,
    rank: int = 64,
    alpha: float = 0.3,
    svd0: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Top-α entries by magnitude of the rank-r SVD reconstruction of ``w0`` (r capped at min dim)."""
    u, s, vh = svd0 if svd0 is not None else svd64(w0)
    r = max(0, min(rank, s.numel()))
    recon = (u[:, :r] * s[:r]) @ vh[:r]
    return exact_top_mask(recon.abs_(), alpha)


def low_magnitude_mask(w0: torch.Tensor, alpha: float = 0.3) -> torch.Tensor:
    """Bottom-α entries by ``|w0|``."""
    return exact_bottom_mask(_as_f64(w0).abs(), alpha)  # not abs_(): _as_f64 may alias w0


def mask_overlap(mask: torch.Tensor, upd_mask: torch.Tensor) -> tuple[int, int]:
    """``(|mask ∩ upd_mask|, |upd_mask|)``."""
    if mask.shape != upd_mask.shape:
        raise ValueError(f"mask shapes differ: {tuple(mask.shape)} vs {tuple(upd_mask.shape)}")
    return int((mask & upd_mask).sum()), int(upd_mask.sum())


def overlap_fraction(mask: torch.Tensor, upd_mask: torch.Tensor) -> float | None:
    """``|mask ∩ M_upd| / |M_upd|``; ``None`` when ``M_upd`` is empty."""
    inter, n = mask_overlap(mask, upd_mask)
    return inter / n if n else None


# ---------------------------------------------------------------------------- subspace similarity
def top_right_singular_vectors(
    w: torch.Tensor,
    k: int = 16,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    cap_at_rank: bool = True,
) -> torch.Tensor:
    """Top-k right singular vectors as columns (in x k'), ``k' = min(k, numerical rank)``."""
    u, s, vh = svd if svd is not None else svd64(w)
    kk = min(k, s.numel())
    if cap_at_rank:
        kk = min(kk, numerical_rank(s, tuple(w.shape) if w is not None else None))
    return vh[:kk].T.contiguous()


def subspace_similarity(va: torch.Tensor, vb: torch.Tensor) -> float | None:
    """``‖V_aᵀ V_b‖_F² / K`` for orthonormal column bases, ``K = max(K_a, K_b)``.

    With both bases of the full K columns this is the paper's ``(1/K)‖V_K(t)ᵀ V_K(T)‖_F²``; when
    an update's rank is below K the bases are capped at the rank, and dividing by the larger
    dimension keeps the value 1 iff the two subspaces coincide.  ``None`` if either is empty.
    """
    ka, kb = va.shape[1], vb.shape[1]
    if ka == 0 or kb == 0:
        return None
    m = _as_f64(va).T @ _as_f64(vb)
    return float((m * m).sum()) / max(ka, kb)
