"""Where a method's bytes are: tensors counted by size, the optimizer's state by kind, the process's RSS."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "anonymous_peak_growth",
    "make_resident",
    "optimizer_breakdown",
    "proc_status_bytes",
    "reset_peak_rss",
    "tensor_bytes",
]

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "row_sq", "col_sq")  # row/col: the factored second moment
BASIS_KEYS = ("U", "V")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return t.numel() * t.element_size()


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    """Tensors held by a non-tensor optimizer-state value (e.g. GaLore's projector object)."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for item in obj for t in _tensors_in(item)]
    if hasattr(obj, "__dict__"):
        return [t for value in vars(obj).values() for t in _tensors_in(value)]
    return []


def optimizer_breakdown(optimizer: torch.optim.Optimizer | None, model: nn.Module | None = None) -> dict[str, int]:
    """Optimizer-state bytes split into Adam moments, step counters and projection bases, plus Adam coordinates.

    Bases the optimizer shares with ``model``'s buffers (the factored optimizer projects with the adapter's own
    ``V``) are counted once, with the model. ``None`` (the inference row) holds nothing."""
    out = {"moment_bytes": 0, "step_bytes": 0, "optimizer_basis_bytes": 0, "other_state_bytes": 0, "adam_coords": 0}
    state_values = optimizer.state.values() if optimizer is not None else []
    for state in state_values:
        for key, value in state.items():
            if key in MOMENT_KEYS:
                out["moment_bytes"] += tensor_bytes(value)
                out["adam_coords"] += value.numel() if key == "exp_avg" else 0
            elif key == "step":
                out["step_bytes"] += tensor_bytes(value) if torch.is_tensor(value) else 0
            elif key in BASIS_KEYS or not torch.is_tensor(value):
                out["optimizer_basis_bytes"] += sum(tensor_bytes(t) for t in _tensors_in(value))
            else:
                out["other_state_bytes"] += tensor_bytes(value)
    shared = set() if model is None else {b.untyped_storage().data_ptr() for b in model.buffers()}
    for basis in getattr(optimizer, "bases", {}).values():  # FactoredSubspaceAdamW's U, V
        for t in (basis.U, basis.V):
            if t is not None and t.untyped_storage().data_ptr() not in shared:
                out["optimizer_basis_bytes"] += tensor_bytes(t)
    out["optimizer_state_bytes"] = (
        out["moment_bytes"] + out["step_bytes"] + out["optimizer_basis_bytes"] + out["other_state_bytes"]
    )
    return out


def proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssFile``) in bytes; None where absent."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def make_resident(model: nn.Module) -> int:
    """Read every parameter and buffer once, so that their pages are resident before the RSS baseline.

    The SmolLM2 student's weights are memory-mapped from the converted checkpoint and paged in on first touch:
    without this the first step's RSS growth counts loading the model, and a method that writes its weights
    (full OPD: copy-on-write) counts it differently from one that only reads them. Returns the bytes read.
    """
    seen: set[int] = set()
    total = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            key = tensor.untyped_storage().data_ptr()
            if key in seen or tensor.numel() == 0:
                continue
            seen.add(key)
            tensor.float().sum()  # reads every page of the storage
            total += tensor.untyped_storage().nbytes()
    return total


def anonymous_peak_growth(record: dict[str, Any]) -> int | None:
    """Peak RSS growth without the file-backed pages the steps mapped in: ``peak_rss_delta − file_rss_growth``.

    File-backed pages the steps map in are shared and reclaimable, no memory the method holds: the code of the
    kernels the first step runs, and the weights wherever :func:`make_resident` did not page them in first (the
    SmolLM2 student is memory-mapped from the checkpoint; a method that writes them turns them into private copies).
    File pages only grow and are at their final count at the peak whenever the peak comes after the first step's
    kernels ran, so this is the peak of the process's own (anonymous) memory growth; a lower bound on it otherwise.
    """
    peak, files = record.get("peak_rss_delta_bytes"), record.get("file_rss_growth_bytes")
    return None if peak is None or files is None else peak - files
