"""glibc's mmap threshold for CPU training: freed activation blocks go back to the OS instead of staying resident.

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves blocks below its *mmap threshold* from the
heap, and the threshold is dynamic: each freed mmap'd block raises it (up to 32 MiB on 64-bit), so after the first
step a model's activations, a few MiB each, all come from the heap. Freed heap blocks stay resident and fragment, so
a training step's peak RSS ends well above its live tensors. Measured on the default recipe's student
(``benchmarks/results/smollm2/``, the ``*_mmap`` rows): fixing the threshold at 64 KiB brings the locked step's peak
RSS growth from 1009 to 587 MiB, next to its 579 MiB of live tensors. The price is one ``mmap``/``munmap`` and fresh
zeroed pages per large tensor: that step took 1.5x as long on one CPU thread.

Set through ``OPDConfig.malloc_mmap_threshold``, or call :func:`set_malloc_mmap_threshold` before training.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

from lockedopd.opd.values import check_mmap_threshold

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (``mallopt`` available), else ``None`` (macOS, musl, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "mallopt") else None


def set_malloc_mmap_threshold(nbytes: int) -> bool:
    """Serve every ``malloc`` of at least ``nbytes`` with its own ``mmap`` (returned to the OS on ``free``).

    Also turns off glibc's dynamic adjustment of the threshold. Affects allocations made from now on, in this
    process and in processes it forks later. ``nbytes`` = 0 does nothing (glibc's default stays).

    Returns:
        ``True`` when set; ``False`` when the C library is not glibc (a warning is logged; nothing changes).

    Raises:
        ValueError: ``nbytes`` outside [4096, 32 MiB] (and not 0), or glibc refused the value.
    """
    check_mmap_threshold(nbytes)
    if nbytes == 0:
        return False
    libc = glibc()
    if libc is None:
        logger.warning(
            "malloc_mmap_threshold=%d ignored: the C library here is not glibc (%s); set it to 0 to silence this",
            nbytes,
            platform.platform(),
        )
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if libc.mallopt(M_MMAP_THRESHOLD, nbytes) != 1:
        raise ValueError(f"glibc refused mallopt(M_MMAP_THRESHOLD, {nbytes}); use a value in [4096, 32 MiB]")
    return True
