"""Count tensor bytes while a block of code runs: what autograd saves for backward, and the peak of live tensors.

Both count storages (a view and its base count once) and work on any device, CPU included, so a memory saving can
be asserted with exact byte counts instead of noisy RSS readings::

    with SavedTensorBytes(exclude=model.parameters()) as saved, PeakLiveBytes() as live:
        loss = step(model, batch)
        loss.backward()
    saved.bytes, live.peak_bytes
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["PeakLiveBytes", "SavedTensorBytes", "storage_bytes"]


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class SavedTensorBytes:
    """Context manager: the bytes of the tensors autograd saves for backward inside it, by storage.

    Args:
        exclude: tensors not to count (e.g. the model's parameters, which a Linear saves but which are no
            activation memory).

    Attributes:
        by_storage: storage address → bytes of every distinct saved storage.

    Tensors saved inside a non-reentrant ``torch.utils.checkpoint`` region are the checkpoint's own business and not
    seen here (that is the point of checkpointing); the checkpoint's inputs stay alive through it instead.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.by_storage: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._excluded:
            self.by_storage[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        """Total bytes of the distinct saved storages."""
        return sum(self.by_storage.values())

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class PeakLiveBytes(TorchDispatchMode):
    """Context manager: the peak bytes of tensors created inside it that are alive at the same time.

    Every operator's outputs are tracked by storage until the storage is freed; tensors that existed before the
    block (weights, inputs) are not counted, nor are outputs that alias an input's storage (views such as a
    weight's transpose, in-place results), so ``peak_bytes`` is what the block adds on top of them — forward,
    backward (gradients included) and whatever is still alive at the end (``live_bytes``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked = WeakIdKeyDictionary()

    def _release(self, size: int, _ref) -> None:
        self.live_bytes -= size

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._tracked:
            return
        size = storage.nbytes()
        self._tracked[storage] = weakref.ref(storage, lambda ref, size=size: self._release(size, ref))
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            leaf.untyped_storage().data_ptr()
            for leaf in tree_leaves((args, kwargs))
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta"
        }
        for leaf in tree_leaves(out):
            if (
                isinstance(leaf, torch.Tensor)
                and leaf.device.type != "meta"
                and leaf.untyped_storage().data_ptr() not in inputs
            ):
                self._track(leaf)
        return out
