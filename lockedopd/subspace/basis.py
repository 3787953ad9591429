"""``SubspaceBasis``: the one home of the locked-subspace algebra.

A locked matrix ``W`` (out x in) may only change inside a frozen subspace given by orthonormal columns ``V``
(in x r) and, two-sided, ``U`` (out x r):

* ``mode="right"``: ``ΔW = A·Vᵀ`` with coefficients ``A`` (out x r) — every row of ΔW lies in span(V);
* ``mode="two_sided"``: ``ΔW = U·C·Vᵀ`` with coefficients ``C`` (r x r).

Weight space and coefficient space are linked by ``reduce`` (W-space → coefficients, the adjoint of ``lift``:
``G·V`` or ``Uᵀ·G·V``) and ``lift`` (coefficients → W-space). ``project = lift ∘ reduce`` is the orthogonal projector
onto the locked subspace. The adapter layer, :class:`lockedopd.LockedAdamW`, the trajectory monitor, the LoRA export
and the lock itself all use these functions, so the algebra is written once. Like GaLore's projector, but the bases
are plain tensors (held in module buffers or optimizer state), so they travel with state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .basis_io import check_orthonormal, load_basis, save_basis
from .settings import LOCK_MODES, check_lock_mode

if TYPE_CHECKING:  # pragma: no cover
    import os
    from pathlib import Path

__all__ = ["LOCK_MODES", "SubspaceBasis", "check_lock_mode", "check_orthonormal", "check_rank_fits"]


@dataclass(frozen=True)
class SubspaceBasis:
    """The frozen subspace of one locked matrix, and every map between weight and coefficient space.

    Args:
        V: right basis, in x r, orthonormal columns.
        U: left basis, out x r, orthonormal columns; required for ``two_sided``, optional (carried, unused) for
            ``right``. (Basis files and the adapter need U and V of one rank; the projected optimizer also takes
            U with another number of columns, r_U x r coefficients.)
        mode: ``"right"`` or ``"two_sided"``.

    All maps compute in the promoted dtype of their input and the basis (so a float64 input gives float64 results)
    and return that dtype; the bases move to the input's device as needed.
    """

    V: Tensor
    U: Tensor | None = None
    mode: str = "right"

    def __post_init__(self) -> None:
        check_lock_mode(self.mode)
        if not isinstance(self.V, Tensor) or self.V.ndim != 2:
            raise ValueError(f"SubspaceBasis: V must be a 2-D tensor (in x r), got {_shape(self.V)}.")
        if self.U is not None and (not isinstance(self.U, Tensor) or self.U.ndim != 2):
            raise ValueError(f"SubspaceBasis: U must be None or a 2-D tensor (out x r), got {_shape(self.U)}.")
        if self.mode == "two_sided" and self.U is None:
            raise ValueError("SubspaceBasis: mode='two_sided' needs the left basis U (out x r) as well as V.")

    @classmethod
    def random(
        cls,
        out_features: int,
        in_features: int,
        rank: int,
        mode: str = "right",
        generator: torch.Generator | None = None,
    ) -> SubspaceBasis:
        """Random orthonormal bases (QR of Gaussian matrices, float32) of an out x in matrix: the control subspace."""
        U = torch.linalg.qr(torch.randn(out_features, rank, generator=generator, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(in_features, rank, generator=generator, dtype=torch.float64))[0]
        return cls(V.float().contiguous(), U.float().contiguous(), mode)

    @classmethod
    def coerce(
        cls, entry: SubspaceBasis | tuple[Tensor | None, Tensor] | Tensor, mode: str | None = None
    ) -> SubspaceBasis:
        """A ``SubspaceBasis`` from itself, a ``(U or None, V)`` pair or a bare V.

        Without ``mode`` a pair with U reads as two-sided and one without as right; with ``mode`` that mode is used.
        """
        if isinstance(entry, SubspaceBasis):
            return entry if mode is None or entry.mode == mode else entry.with_mode(mode)
        if isinstance(entry, Tensor):
            U, V = None, entry
        elif isinstance(entry, (tuple, list)) and len(entry) == 2:
            U, V = entry
        else:
            raise ValueError(f"a basis must be a SubspaceBasis, a (U, V) pair or V; got {type(entry).__name__}.")
        return cls(V, U, mode if mode is not None else ("right" if U is None else "two_sided"))

    # ------------------------------------------------------------------------------------------------ shape
    @property
    def rank(self) -> int:
        """r, the number of basis columns."""
        return int(self.V.shape[1])

    @property
    def in_features(self) -> int:
        """Rows of V: the locked matrix's input dimension."""
        return int(self.V.shape[0])

    @property
    def two_sided(self) -> bool:
        """Whether the left basis U is used (``mode == "two_sided"``)."""
        return self.mode == "two_sided"

    def coefficient_shape(self, out_features: int) -> tuple[int, int]:
        """Shape of the trainable coefficients for a matrix with ``out_features`` rows: (out, r) or (r, r)."""
        return (int(self.U.shape[1]), self.rank) if self.two_sided else (int(out_features), self.rank)

    def random_baseline(self, out_features: int) -> float:
        """Share of a random matrix's energy that ``project`` keeps in expectation: r/in, or r²/(in·out)."""
        share = self.rank / self.in_features
        return share * int(self.U.shape[1]) / out_features if self.two_sided else share

    def with_mode(self, mode: str) -> SubspaceBasis:
        """The same bases under another mode (``two_sided`` needs U)."""
        return SubspaceBasis(self.V, self.U, mode)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SubspaceBasis:
        """A copy of the bases on ``device`` / in ``dtype``."""
        U = None if self.U is None else self.U.to(device=device, dtype=dtype)
        return SubspaceBasis(self.V.to(device=device, dtype=dtype), U, self.mode)

    # ------------------------------------------------------------------------------------------- validation
    def validate(self, name: str, out_features: int | None = None, in_features: int | None = None) -> None:
        """Raise ``ValueError`` (naming ``name``) unless the bases fit an out x in matrix and are orthonormal."""
        if in_features is not None and self.in_features != in_features:
            raise ValueError(
                f"Basis of {name!r}: V has shape {tuple(self.V.shape)}, expected (in_features, r) = "
                f"({in_features}, {self.rank})."
            )
        if self.U is not None and (self.U.shape[1] != self.rank or (out_features and self.U.shape[0] != out_features)):
            raise ValueError(
                f"Basis of {name!r}: U has shape {tuple(self.U.shape)}, expected (out_features, r) = "
                f"({out_features}, {self.rank})."
            )
        if out_features is not None and in_features is not None and self.rank > min(out_features, in_features):
            raise ValueError(
                f"Basis of {name!r}: r={self.rank} exceeds min(out_features={out_features}, in_features={in_features})"
                f"; use r <= {min(out_features, in_features)}."
            )
        check_orthonormal(f"{name}.V", self.V)
        if self.U is not None:
            check_orthonormal(f"{name}.U", self.U)

    # -------------------------------------------------------------------------------------------- the maps
    def _factors(self, like: Tensor) -> tuple[Tensor | None, Tensor]:
        dtype = torch.promote_types(like.dtype, self.V.dtype)
        V = self.V.to(device=like.device, dtype=dtype)
        U = self.U.to(device=like.device, dtype=dtype) if self.two_sided else None
        return U, V

    def reduce(self, full: Tensor) -> Tensor:
        """W-space (out x in) → coefficient space: ``G·V`` (out x r) or ``Uᵀ·G·V`` (r x r).

        The adjoint of :meth:`lift`: the coefficient gradient of a loss whose W-gradient is ``G``.
        """
        U, V = self._factors(full)
        low = full.to(V.dtype) @ V
        return U.mT @ low if U is not None else low

    def lift(self, coefficients: Tensor) -> Tensor:
        """Coefficient space → W-space: ``A·Vᵀ`` or ``U·C·Vᵀ`` (out x in)."""
        U, V = self._factors(coefficients)
        low = coefficients.to(V.dtype)
        return (U @ low if U is not None else low) @ V.mT

    def project(self, full: Tensor) -> Tensor:
        """The orthogonal projection onto the locked subspace: ``G·V·Vᵀ`` or ``U·Uᵀ·G·V·Vᵀ``."""
        return self.lift(self.reduce(full))

    def delta(self, coefficients: Tensor) -> Tensor:
        """ΔW (out x in) of ``coefficients``, in the coefficients' dtype.

        Half-precision matmuls on CPU are slow and imprecise, so those are computed in float32 and cast back.
        """
        dtype = coefficients.dtype
        if coefficients.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            coefficients = coefficients.float()
        return self.to(dtype=coefficients.dtype).lift(coefficients).to(dtype)

    def apply(self, x: Tensor, coefficients: Tensor) -> Tensor:
        """``x·ΔWᵀ`` through the r-dimensional bottleneck (ΔW is never formed), in the coefficients' dtype."""
        V = self.V.to(device=x.device, dtype=coefficients.dtype)
        h = F.linear(x.to(coefficients.dtype), V.mT)  # x V: (..., r)
        if self.two_sided:
            U = self.U.to(device=x.device, dtype=coefficients.dtype)
            return F.linear(F.linear(h, coefficients), U)  # x V Cᵀ Uᵀ
        return F.linear(h, coefficients)  # x V Aᵀ

    def factors(self, coefficients: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, A)`` with ``ΔW = B·A``: B = the coefficients A (out x r) or ``U·C``, A = ``Vᵀ``; a LoRA pair."""
        U, V = self._factors(coefficients)
        low = coefficients.to(V.dtype)
        return (U @ low if U is not None else low), V.mT

    def captured_energy(self, full: Tensor) -> tuple[float, float]:
        """``(‖P(G)‖², ‖G‖²)`` in float64: how much of ``full``'s energy the subspace holds."""
        g = full.double()
        return float(self.project(g).square().sum()), float(g.square().sum())

    # --------------------------------------------------------------------------------------- Adam moments
    def reduce_moments(self, exp_avg: Tensor, exp_avg_sq: Tensor, grad_scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """Carry full-weight Adam moments into coefficient coordinates (the warmup → lock transfer).

        m_A = s·m_W·V, v_A = s²·v_W·(V∘V) (right) or m_C = s·Uᵀ·m_W·V, v_C = s²·(U∘U)ᵀ·v_W·(V∘V) (two-sided), where
        s = ``grad_scale`` (ΔW = s·A·Vᵀ). The second moment uses the diagonal approximation (gradient coordinates
        uncorrelated), exact when the bases select coordinates.
        """
        U, V = self._factors(exp_avg)
        m, v = change_moment_basis(exp_avg, exp_avg_sq, left=None if U is None else U.mT, right=V)
        return m * grad_scale, v * (grad_scale * grad_scale)

    def lift_moments(self, exp_avg: Tensor, exp_avg_sq: Tensor) -> tuple[Tensor, Tensor]:
        """Carry coefficient Adam moments back to full-weight coordinates (unlock / relock).

        m_W = m_A·Vᵀ, v_W = v_A·(Vᵀ∘Vᵀ), with (U, U∘U) on the left two-sided.
        """
        U, V = self._factors(exp_avg)
        return change_moment_basis(exp_avg, exp_avg_sq, left=U, right=V.mT)

    # -------------------------------------------------------------------------------------------- files
    @staticmethod
    def save_all(path: str | os.PathLike, bases: Mapping[str, SubspaceBasis], metadata: Mapping[str, object]) -> Path:
        """Write ``{module name: SubspaceBasis}`` as a ``basis.safetensors`` file (every entry needs U and V)."""
        missing = sorted(name for name, basis in bases.items() if basis.U is None)
        if missing:
            raise ValueError(
                f"SubspaceBasis.save_all: {missing[:3]} carry no left basis U; a basis file holds U and V for every "
                "module (the file is mode-agnostic). Build the bases with U."
            )
        return save_basis(path, {name: (b.U, b.V) for name, b in bases.items()}, metadata)

    @staticmethod
    def load_all(
        path: str | os.PathLike, mode: str = "right", check: bool = True
    ) -> tuple[dict[str, SubspaceBasis], dict[str, str]]:
        """Read a ``basis.safetensors`` file as ``{module name: SubspaceBasis}`` (sorted by name) and its metadata."""
        check_lock_mode(mode)
        pairs, metadata = load_basis(path, check=check)
        return {name: SubspaceBasis(V, U, mode) for name, (U, V) in pairs.items()}, metadata

    @staticmethod
    def from_pairs(pairs: Mapping[str, tuple[Tensor | None, Tensor]], mode: str) -> dict[str, SubspaceBasis]:
        """``{name: (U, V)}`` → ``{name: SubspaceBasis}`` sorted by name."""
        return {name: SubspaceBasis(pairs[name][1], pairs[name][0], mode) for name in sorted(pairs)}


def check_rank_fits(rank: int, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse a lock rank above min(out, in) of a target matrix (no rank-r update subspace exists there)."""
    too_small = {name: shape for name, shape in shapes.items() if rank > min(shape)}
    if too_small:
        name, shape = next(iter(sorted(too_small.items())))
        smallest = min(min(shape) for shape in shapes.values())
        raise ValueError(
            f"rank {rank} (lock.rank) is larger than {len(too_small)} target matrices allow (e.g. {name}: "
            f"{shape[0]} x {shape[1]}); set the rank <= {smallest} or leave those modules out of the targets."
        )


def change_moment_basis(
    exp_avg: Tensor, exp_avg_sq: Tensor, left: Tensor | None = None, right: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Carry Adam moments of g into the coordinates g' = left·g·right (None = identity).

    The first moment is linear in g, so m' = left·m·right is exact.  The second moment uses the diagonal
    approximation (gradient coordinates uncorrelated): E[(L·g·R)_ij²] = Σ_kl L_ik²·E[g_kl²]·R_lj², so
    v' = (L∘L)·v·(R∘R).  It is exact when L and R select coordinates (columns of an identity matrix).
    Computed in the promoted dtype of the inputs (at least float32).
    """
    dtype = torch.promote_types(torch.promote_types(exp_avg.dtype, exp_avg_sq.dtype), torch.float32)
    m, v = exp_avg.to(dtype), exp_avg_sq.to(dtype)
    if left is not None:
        left = left.to(device=m.device, dtype=dtype)
        m, v = left @ m, (left * left) @ v
    if right is not None:
        right = right.to(device=m.device, dtype=dtype)
        m, v = m @ right, v @ (right * right)
    return m, v


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
