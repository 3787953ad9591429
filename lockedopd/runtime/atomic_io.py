"""Writes that a kill at any instant cannot leave half done.

Every file is written under a temporary name beside its destination and renamed into place (``os.replace`` is
atomic on POSIX); a directory is built under a temporary name and swapped in, the old one moved aside first and
removed only once the new one is in place. Temporary names start with :data:`TMP_PREFIX`, set-aside directories
with :data:`OLD_PREFIX`, so :func:`recover_interrupted_writes` can tell them from anything else after a kill:
temporaries are deleted, and a directory that was set aside but never replaced is put back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
"""Names of files and directories being written (removed by :func:`recover_interrupted_writes`)."""
OLD_PREFIX = ".old-"
"""``.old-NAME``: directory ``NAME`` set aside while its replacement is renamed in."""


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (the renames in it) to disk where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temporary_path(path: Path, directory: bool = False) -> Path:
    """A fresh temporary file (or directory) beside ``path``, named so recovery recognises it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent))
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; it replaces ``path`` only if the block succeeds.

    The temporary name keeps ``path``'s suffix, so writers that choose a format by extension (matplotlib) work.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temporary file and ``os.replace``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy ``source`` to ``destination`` through a temporary file in the destination's directory."""
    with atomic_file(destination) as tmp:
        shutil.copyfile(source, tmp)


def replace_directory(new: Path, final: Path) -> None:
    """Put the complete directory ``new`` at ``final``; an existing ``final`` is set aside first, removed last.

    A kill between the two renames leaves ``.old-NAME`` and no ``NAME``, which :func:`recover_interrupted_writes`
    restores; a kill after them leaves ``.old-NAME`` beside the new ``NAME``, which it removes.
    """
    for child in new.rglob("*"):
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    old = final.with_name(f"{OLD_PREFIX}{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    fsync_directory(final.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory to fill; it becomes ``path`` (via :func:`replace_directory`) only on success."""
    final = Path(path)
    tmp = temporary_path(final, directory=True)
    try:
        yield tmp
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_interrupted_writes(root: str | os.PathLike) -> list[str]:
    """Clean up after a kill anywhere under ``root``: delete temporaries, put back set-aside directories.

    Returns what it did, one line per item (also logged), so callers can report it.
    """
    root = Path(root)
    actions: list[str] = []
    if not root.is_dir():
        return actions
    for dirpath, dirnames, filenames in os.walk(root, topdown=True):
        here = Path(dirpath)
        for name in list(dirnames) + filenames:
            entry = here / name
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                actions.append(f"removed the half-written {entry}")
            elif name.startswith(OLD_PREFIX) and entry.is_dir():
                original = here / name[len(OLD_PREFIX) :]
                if original.exists():
                    shutil.rmtree(entry, ignore_errors=True)
                    actions.append(f"removed {entry} (its replacement {original.name} is complete)")
                else:
                    os.replace(entry, original)
                    actions.append(f"restored {original} (its replacement was never completed)")
        dirnames[:] = [d for d in dirnames if not d.startswith((TMP_PREFIX, OLD_PREFIX)) and (here / d).is_dir()]
    for line in actions:
        logger.warning("recovery: %s", line)
    return actions
