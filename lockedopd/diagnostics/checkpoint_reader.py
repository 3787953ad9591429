"""Streaming, one-tensor-at-a-time access to Hugging Face safetensors checkpoints.

Supported layouts (``CheckpointReader(path)``):

* a directory holding ``model.safetensors.index.json`` (sharded checkpoint; the index's
  ``weight_map`` names the shard file of every tensor),
* a directory holding ``model.safetensors``,
* a directory holding exactly one ``*.safetensors`` file,
* a path to a single ``.safetensors`` file.

Only the headers are read up front (names, shapes, dtypes).  ``get(name)`` opens the owning file
with :func:`safetensors.safe_open`, copies that one tensor out and closes the file again, so the
memory map is released after every read and resident memory stays at "a few tensors" no matter
how large the checkpoint is.

Errors are explicit: a missing path raises :class:`FileNotFoundError` naming the path and what was
expected there; a corrupt or truncated file, or a malformed index, raises :class:`ValueError`
naming the file.

The class keeps a count of tensors it has handed out that are still alive
(``live_tensors`` / ``peak_live_tensors``), shared by all readers in the process; the diagnostics
tests use it to check that the drivers stream.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["CheckpointReader", "TensorCounter", "tensor_counter", "resolve_checkpoint_files"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class TensorCounter:
    """Process-wide count of checkpoint tensors handed out by readers and still referenced."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live = 0
        self.peak = 0
        self.loaded = 0
        self.peak_bytes = 0
        self._live_bytes = 0

    def reset(self) -> None:
        with self._lock:
            self.peak = self.live
            self.peak_bytes = self._live_bytes
            self.loaded = 0

    def _acquire(self, nbytes: int) -> None:
        with self._lock:
            self.live += 1
            self.loaded += 1
            self._live_bytes += nbytes
            self.peak = max(self.peak, self.live)
            self.peak_bytes = max(self.peak_bytes, self._live_bytes)

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.live -= 1
            self._live_bytes -= nbytes

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        self._acquire(nbytes)
        weakref.finalize(tensor, self._release, nbytes)
        return tensor


tensor_counter = TensorCounter()


def _expected_layouts() -> str:
    return (
        f"a directory containing '{SINGLE_NAME}' or '{INDEX_NAME}' (sharded) or a single '.safetensors' file, "
        "or a path to a '.safetensors' file"
    )


def _read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names -> (shape, safetensors dtype string) for one file, reading only its header."""
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {file}")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
            return out
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # SafetensorError, OSError on bad mmap, ...
        raise ValueError(f"corrupt or unreadable safetensors file {file}: {exc}") from None


def resolve_checkpoint_files(path: str | os.PathLike) -> tuple[Path, dict[str, Path] | None, list[Path]]:
    """Work out the layout of ``path``.

    Returns ``(root, weight_map, files)``: ``weight_map`` maps tensor name -> shard file for a
    sharded checkpoint (``None`` otherwise) and ``files`` lists the safetensors files involved.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {p} (expected {_expected_layouts()})")
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _resolve_index(p)
        if not p.name.endswith(".safetensors"):
            raise ValueError(f"not a safetensors file: {p} (expected {_expected_layouts()})")
        return p.parent, None, [p]
    index = p / INDEX_NAME
    if index.is_file():
        return _resolve_index(index)
    single = p / SINGLE_NAME
    if single.is_file():
        return p, None, [single]
    candidates = sorted(q for q in p.glob("*.safetensors") if q.is_file())
    if len(candidates) == 1:
        return p, None, candidates
    if len(candidates) > 1:
        raise FileNotFoundError(
            f"checkpoint directory {p} holds {len(candidates)} .safetensors files but no '{INDEX_NAME}'; "
            f"expected {_expected_layouts()}"
        )
    raise FileNotFoundError(f"no safetensors checkpoint found in {p}: expected {_expected_layouts()}")


def _resolve_index(index: Path) -> tuple[Path, dict[str, Path], list[Path]]:
    try:
        data = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"bad checkpoint index {index}: not valid JSON ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"bad checkpoint index {index}: missing or empty 'weight_map'")
    root = index.parent
    resolved: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ValueError(f"bad checkpoint index {index}: tensor {name!r} maps to {shard!r}, not a file name")
        resolved[name] = root / shard
    files = sorted(set(resolved.values()))
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"shard {f} listed in checkpoint index {index} does not exist")
    return root, resolved, files


class CheckpointReader:
    """Lazy, streaming reader over a safetensors checkpoint (single file or sharded).

    >>> r = CheckpointReader("path/to/model_dir")
    >>> for name in r.keys():
    ...     w = r.get(name)  # one tensor, copied out of the file; the file is closed again
    """

    def __init__(self, path: str | os.PathLike, counter: TensorCounter | None = None) -> None:
        self.path = Path(path)
        self.root, weight_map, self.files = resolve_checkpoint_files(path)
        self.counter = counter if counter is not None else tensor_counter
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        headers = {f: _read_header(f) for f in self.files}
        if weight_map is None:
            for f, hdr in headers.items():
                for name, meta in hdr.items():
                    self._file_of[name] = f
                    self._meta[name] = meta
        else:
            index = self.root / INDEX_NAME
            for name, f in weight_map.items():
                hdr = headers[f]
                if name not in hdr:
                    raise ValueError(f"bad checkpoint index {index}: tensor {name!r} is not in shard {f}")
                self._file_of[name] = f
                self._meta[name] = hdr[name]

    # ------------------------------------------------------------------ metadata
    def keys(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: object) -> bool:
        return name in self._meta

    def __len__(self) -> int:
        return len(self._meta)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> str:
        """safetensors dtype string, e.g. ``"F32"``, ``"BF16"``, ``"I64"``."""
        return self._meta[name][1]

    def is_floating(self, name: str) -> bool:
        return self._meta[name][1].startswith(("F", "BF"))

    def numel(self, name: str) -> int:
        n = 1
        for d in self._meta[name][0]:
            n *= d
        return n

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    # ------------------------------------------------------------------ data
    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (CPU, stored dtype). The file is opened and closed around the read."""
        if name not in self._meta:
            raise KeyError(f"tensor {name!r} not in checkpoint {self.path}")
        f = self._file_of[name]
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                t = fh.get_tensor(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint file disappeared while reading: {f}") from None
        except Exception as exc:
            raise ValueError(f"corrupt or unreadable safetensors file {f} (tensor {name!r}): {exc}") from None
        return self.counter.track(t)

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, files={len(self.files)}, tensors={len(self)})"
