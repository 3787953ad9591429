"""Atomic, resumable checkpoints.

A checkpoint is a directory ``checkpoints/step-{k:06d}/`` written under a temporary name and renamed into place
only when complete, so a run killed mid-write never leaves a half checkpoint that resume would pick up. Tensors
travel as safetensors; optimizer/scheduler/RNG state as ``torch.save`` files read back with
``weights_only=True`` (nothing is unpickled).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lockedopd.runtime.atomic_io import atomic_directory, atomic_file, atomic_write_text

__all__ = [
    "atomic_save_safetensors",
    "atomic_write_text",
    "checkpoint_dir",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "unique_state_dict",
]

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")


def unique_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a state dict with tied (shared-storage) tensors kept once, as safetensors needs."""
    seen: dict[tuple, str] = {}
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen[key] = name
        out[name] = tensor.detach().to("cpu").contiguous().clone()
    return out


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None):
    """Write a safetensors file atomically."""
    with atomic_file(path) as tmp:
        save_file(unique_state_dict(tensors), tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Path of the checkpoint taken after ``step`` optimizer steps."""
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary, half-written directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    states: dict[str, Any],
    trainer_state: dict[str, Any],
) -> Path:
    """Write checkpoint ``step`` atomically.

    Args:
        tensors: file stem → tensor dict, each written as ``{stem}.safetensors``.
        states: file stem → picklable-by-torch state (optimizer, scheduler, RNG), written as ``{stem}.pt``; must
            hold only tensors and plain Python values so ``weights_only=True`` loading works.
        trainer_state: JSON-serialisable dict (``trainer_state.json``, written last: its presence marks the
            checkpoint complete).
    """
    final = checkpoint_dir(run_dir, step)
    with atomic_directory(final) as tmp:
        for stem, tensor_dict in tensors.items():
            save_file(unique_state_dict(tensor_dict), tmp / f"{stem}.safetensors")
        for stem, state in states.items():
            torch.save(state, tmp / f"{stem}.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """Read a checkpoint directory back: ``(tensors, states, trainer_state)``.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: a file in it is corrupt (names the file).
    """
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete lockedopd checkpoint (no trainer_state.json).")
    tensors, states = {}, {}
    for child in sorted(path.iterdir()):
        try:
            if child.suffix == ".safetensors":
                tensors[child.stem] = load_file(child)
            elif child.suffix == ".pt":
                states[child.stem] = torch.load(child, map_location="cpu", weights_only=True)
        except Exception as exc:  # safetensors/torch raise several types for damaged files
            raise ValueError(
                f"checkpoint file {child} is corrupt or unreadable ({exc}); delete that checkpoint "
                "directory to resume from the previous one."
            ) from exc
    try:
        trainer_state = json.loads(state_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{state_file} is corrupt ({exc.msg}).") from exc
    return tensors, states, trainer_state
