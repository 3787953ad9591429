"""Reading, writing and validating ``basis.safetensors`` files.

A basis file holds, for every locked module, the frozen top-r singular subspace of its cumulative update
``ΔW = W_t - W_0``:

* ``"{module_name}.U"``: float32, shape ``(out_features, r)``, orthonormal columns (left singular vectors);
* ``"{module_name}.V"``: float32, shape ``(in_features, r)``, orthonormal columns (right singular vectors).

Module names are those of the *base* model's ``named_modules()`` (e.g. ``model.layers.0.self_attn.q_proj``).
The safetensors metadata holds at least ``rank`` and ``step`` (as strings, safetensors only stores strings).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from lockedopd.runtime.atomic_io import atomic_file

__all__ = ["BASIS_FORMAT", "check_orthonormal", "load_basis", "save_basis"]

BASIS_FORMAT = "lockedopd.basis.v1"
_SUFFIXES = (".U", ".V")


def check_orthonormal(name: str, M: Tensor, atol: float = 1e-4) -> None:
    """Raise ``ValueError`` unless the columns of ``M`` are orthonormal (``MᵀM ≈ I`` within ``atol``).

    Args:
        name: Module (and matrix) name used in the error message, e.g. ``"model.layers.0.mlp.up_proj.U"``.
        M: A 2-D tensor of shape ``(n, r)`` with ``r <= n``.
        atol: Largest allowed absolute deviation of any entry of ``MᵀM`` from the identity.
    """
    if not isinstance(M, Tensor) or M.ndim != 2 or not M.dtype.is_floating_point:
        shape = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
        raise ValueError(f"Basis matrix {name!r} must be a 2-D floating tensor (n x r), got {shape}.")
    n, r = M.shape
    if r > n:
        raise ValueError(
            f"Basis matrix {name!r} has shape {tuple(M.shape)}: r={r} columns cannot be orthonormal in dimension "
            f"{n}. Use r <= {n}."
        )
    M64 = M.detach().to(dtype=torch.float64)
    gram = M64.T @ M64
    eye = torch.eye(r, dtype=torch.float64, device=M64.device)
    deviation = float((gram - eye).abs().max()) if r > 0 else 0.0
    if not deviation <= atol:  # also catches NaN
        raise ValueError(
            f"Basis matrix {name!r} (shape {tuple(M.shape)}) does not have orthonormal columns: max |MᵀM - I| = "
            f"{deviation:.3g} > atol={atol:g}. Orthonormalise it (e.g. torch.linalg.qr) or recompute the SVD."
        )


def _validate_pair(name: str, U: Tensor, V: Tensor) -> None:
    """Check that ``U``/``V`` are 2-D tensors sharing the same rank."""
    for suffix, M in (("U", U), ("V", V)):
        if not isinstance(M, Tensor):
            raise ValueError(f"Basis entry '{name}.{suffix}' must be a torch.Tensor, got {type(M).__name__}.")
        if M.ndim != 2:
            raise ValueError(f"Basis entry '{name}.{suffix}' must be 2-D, got shape {tuple(M.shape)}.")
        if not M.dtype.is_floating_point:
            raise ValueError(f"Basis entry '{name}.{suffix}' must be a real floating tensor, got {M.dtype}.")
    if U.shape[1] != V.shape[1]:
        raise ValueError(
            f"Basis entries for module {name!r} disagree on the rank: U has shape {tuple(U.shape)} (out x r) and V "
            f"has shape {tuple(V.shape)} (in x r); both need the same number of columns r."
        )


def save_basis(
    path: str | os.PathLike,
    bases: Mapping[str, tuple[Tensor, Tensor]],
    metadata: Mapping[str, object],
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Write a basis file atomically (temporary file in the same directory, then ``os.replace``).

    Args:
        path: Destination, normally ``.../basis.safetensors``.
        bases: ``{module_name: (U, V)}`` with ``U`` of shape ``(out, r)`` and ``V`` of shape ``(in, r)``.
        metadata: Extra string-able metadata; must contain ``step``. ``rank`` is filled in from the entries when
            missing and must match them when given. All values are stored as strings.
        check: Verify that every ``U`` and ``V`` has orthonormal columns before writing.
        atol: Tolerance of the orthonormality check.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if not bases:
        raise ValueError(f"save_basis({str(path)!r}): `bases` is empty; pass at least one module's (U, V) pair.")
    meta = {str(k): str(v) for k, v in metadata.items()}
    if "step" not in meta:
        raise ValueError(
            f"save_basis({str(path)!r}): metadata={meta} lacks 'step'; pass e.g. metadata={{'step': 100}}."
        )
    tensors: dict[str, Tensor] = {}
    ranks = set()
    for name, pair in bases.items():
        if not isinstance(name, str) or not name or name.endswith(_SUFFIXES):
            raise ValueError(f"save_basis: invalid module name {name!r}; use names from model.named_modules().")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"save_basis: bases[{name!r}] must be a (U, V) pair, got {type(pair).__name__}.")
        U, V = pair
        _validate_pair(name, U, V)
        if check:
            check_orthonormal(f"{name}.U", U, atol=atol)
            check_orthonormal(f"{name}.V", V, atol=atol)
        ranks.add(U.shape[1])
        tensors[f"{name}.U"] = U.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        tensors[f"{name}.V"] = V.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    if len(ranks) != 1:
        raise ValueError(f"save_basis: all modules must share one rank r, got ranks {sorted(ranks)}.")
    (rank,) = ranks
    if "rank" in meta and meta["rank"] != str(rank):
        raise ValueError(
            f"save_basis: metadata rank={meta['rank']!r} does not match the bases' rank {rank}; drop 'rank' from "
            "metadata or fix it."
        )
    meta["rank"] = str(rank)
    meta.setdefault("format", BASIS_FORMAT)

    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def load_basis(
    path: str | os.PathLike, check: bool = True, atol: float = 1e-4
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, str]]:
    """Read and validate a basis file.

    Args:
        path: A ``basis.safetensors`` file written by :func:`save_basis`.
        check: Verify orthonormal columns of every ``U`` and ``V``.
        atol: Tolerance of the orthonormality check.

    Returns:
        ``(bases, metadata)`` where ``bases`` maps module names to float32 ``(U, V)`` pairs (sorted by name).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not a readable safetensors file, has keys not ending in ``.U``/``.V``, a key
            without its partner, shapes that disagree, a ``rank`` metadata that disagrees with the tensors, or
            (with ``check``) columns that are not orthonormal.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Basis file {str(path)!r} does not exist; write one with lockedopd.subspace.basis_io.save_basis."
        )
    raw: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                raw[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers/data
        raise ValueError(
            f"Basis file {str(path)!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is "
            "probably truncated or corrupt. Recompute the basis."
        ) from exc

    bad = sorted(k for k in raw if not k.endswith(_SUFFIXES))
    if bad:
        raise ValueError(f"Basis file {str(path)!r} has keys not ending in '.U' or '.V': {bad[:5]}.")
    names = sorted({k[:-2] for k in raw})
    bases: dict[str, tuple[Tensor, Tensor]] = {}
    for name in names:
        missing = [f"{name}{s}" for s in _SUFFIXES if f"{name}{s}" not in raw]
        if missing:
            raise ValueError(
                f"Basis file {str(path)!r}: key(s) {missing} missing; every U needs its V and vice versa."
            )
        U, V = raw[f"{name}.U"], raw[f"{name}.V"]
        _validate_pair(name, U, V)
        U, V = U.to(torch.float32), V.to(torch.float32)
        if check:
            check_orthonormal(f"{name}.U", U, atol=atol)
            check_orthonormal(f"{name}.V", V, atol=atol)
        if "rank" in metadata and str(U.shape[1]) != metadata["rank"]:
            raise ValueError(
                f"Basis file {str(path)!r}: module {name!r} has rank {U.shape[1]} (U {tuple(U.shape)}, V "
                f"{tuple(V.shape)}) but the metadata says rank={metadata['rank']}."
            )
        bases[name] = (U, V)
    if not bases:
        raise ValueError(f"Basis file {str(path)!r} contains no (U, V) pairs.")
    return bases, metadata
