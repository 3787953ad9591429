"""The fixed values and value checks the config declares and the runtime implements, defined once here.

Only the standard library is imported, so the config module (and anything that only reads configs) loads no
runtime: the host allocator, bitsandbytes' quantization and the vLLM server client import these from here.
"""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = [
    "AUTO_BACKEND",
    "BASE_DTYPES",
    "MAX_MMAP_THRESHOLD",
    "MIN_MMAP_THRESHOLD",
    "check_mmap_threshold",
    "check_server_url",
]

AUTO_BACKEND = "auto"
"""The ``teacher.backend`` value that picks the vLLM engine where it can load the teacher, else ``hf``."""

BASE_DTYPES = ("keep", "bf16", "int8", "nf4")
"""``lock.base_dtype`` values: ``keep`` (the student's own dtype), ``bf16``, ``int8`` (LLM.int8 row-wise absmax),
``nf4`` (4-bit NormalFloat, block size 64)."""

MIN_MMAP_THRESHOLD = 4096  # one page: below it every small tensor would be its own mapping
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's HEAP_MAX_SIZE / 2 on 64-bit; mallopt refuses more


def check_mmap_threshold(nbytes: int) -> None:
    """Raise ``ValueError`` unless ``nbytes`` is 0 (glibc's default, dynamic) or in [4096, 32 MiB]."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise ValueError(f"malloc_mmap_threshold must be an integer number of bytes, got {nbytes!r}")
    if nbytes != 0 and not MIN_MMAP_THRESHOLD <= nbytes <= MAX_MMAP_THRESHOLD:
        raise ValueError(
            f"malloc_mmap_threshold={nbytes} is outside [{MIN_MMAP_THRESHOLD}, {MAX_MMAP_THRESHOLD}] bytes; "
            "use 0 for glibc's default or e.g. 65536 (blocks of 64 KiB and more are returned to the OS when freed)"
        )


def check_server_url(url: str) -> str:
    """Return ``url`` without a trailing slash if it is an ``http://`` or ``https://`` URL with a host, else raise
    ``ValueError`` naming the fix (``urllib`` would also open ``file://`` and ``ftp://`` URLs)."""
    parts = urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"teacher.server_url={url!r} is not an http(s) URL with a host; give the vLLM server's root URL, e.g. "
            "http://127.0.0.1:8000."
        )
    return str(url).rstrip("/")
