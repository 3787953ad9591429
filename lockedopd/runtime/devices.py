"""Where the student trains: ``device: cpu`` (default), ``cuda`` or ``auto`` resolved to one ``torch.device``.

With several processes each takes the GPU of its ``LOCAL_RANK`` (as ``torchrun`` sets it), the convention of
torch.distributed and accelerate. Rollout and teacher tensors are built on the CPU and moved where the model is, so
the loop itself is the same on either device.
"""

from __future__ import annotations

import os

import torch

__all__ = ["DEVICES", "resolve_device"]

#: The values ``device`` takes.
DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` of setting ``name`` for this process (``local_rank``: default ``$LOCAL_RANK`` or 0).

    Raises:
        ValueError: an unknown name, or ``cuda`` where torch sees no CUDA GPU (the message names the fix).
    """
    if name not in DEVICES:
        raise ValueError(f"device={name!r} is not one of {DEVICES}.")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            "device=cuda, but torch sees no CUDA GPU (a CPU-only torch build, or no visible device: check "
            "CUDA_VISIBLE_DEVICES and `nvidia-smi`); set device=cpu, or install torch's CUDA build."
        )
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    return torch.device("cuda", rank % torch.cuda.device_count())
