"""One archive per grid for its finished cells' small files: ``OUT/cells.tar.xz``.

    python -m lockedopd.bench.archive benchmarks/results/quality_smollm2            # pack the finished cells
    python -m lockedopd.bench.archive benchmarks/results/quality_smollm2 --unpack   # write archived cells to disk

A grid's report needs only each finished cell's small files (``cell.json``, ``config.yaml``, ``metrics.jsonl``,
``summary.json``, the lock's ``lock.json`` and ``trajectory.json``, ...), not its plots or weights. Packing keeps
those files of every finished cell (one with a ``cell.json``) in ``OUT/cells.tar.xz``, members ``METHOD/seedN/FILE``;
a cell on disk replaces the archived copy of the same method and seed. The archive is deterministic (sorted members,
fixed times and owners, no directory entries), so packing unchanged cells again gives the same bytes.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

ARCHIVE = "cells.tar.xz"
CELL_FILE = "cell.json"  # written last by a cell: it marks the cell finished
KEPT_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".txt", ".md", ".csv")  # small text; no plots, no weights
CellFiles = dict[str, bytes]  # file name -> content


def small_files(cell: Path) -> CellFiles:
    """A cell folder's files that go into the archive (top-level text and JSON; sorted by name)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(cell.iterdir())
        if p.is_file() and not p.is_symlink() and p.suffix in KEPT_SUFFIXES
    }


def disk_cells(results_dir: Path) -> dict[tuple[str, int], Path]:
    """The finished cells on disk under ``results_dir/cells/METHOD/seedN/``."""
    found = {}
    for marker in sorted((Path(results_dir) / "cells").glob(f"*/seed*/{CELL_FILE}")):
        seed = marker.parent.name.removeprefix("seed")
        if seed.lstrip("-").isdigit():
            found[(marker.parent.parent.name, int(seed))] = marker.parent
    return found


def read_archive(results_dir: Path) -> dict[tuple[str, int], CellFiles]:
    """The archived cells of a grid (empty without an archive)."""
    path = Path(results_dir) / ARCHIVE
    cells: dict[tuple[str, int], CellFiles] = {}
    if not path.is_file():
        return cells
    with tarfile.open(path, "r:xz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or not parts[1].startswith("seed"):
                raise ValueError(f"{path}: unexpected member {member.name!r} (members are METHOD/seedN/FILE).")
            handle = tar.extractfile(member)
            cells.setdefault((parts[0], int(parts[1][4:])), {})[parts[2]] = handle.read()
    return cells


def all_cells(results_dir: Path) -> dict[tuple[str, int], CellFiles]:
    """Every finished cell of a grid: the archived ones, each replaced by its copy on disk where there is one."""
    cells = read_archive(results_dir)
    for key, folder in disk_cells(results_dir).items():
        cells[key] = small_files(folder)
    return cells


def _tar_bytes(cells: dict[tuple[str, int], CellFiles]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for (method, seed), files in sorted(cells.items()):
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{method}/seed{seed}/{name}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def pack(results_dir: str | Path) -> Path | None:
    """Write ``results_dir/cells.tar.xz`` from every finished cell (:func:`all_cells`); None when there is none.

    The file is replaced only when its content changes, and atomically.
    """
    import lzma

    from lockedopd.runtime.atomic_io import atomic_file

    results_dir = Path(results_dir)
    cells = all_cells(results_dir)
    if not cells:
        return None
    data = lzma.compress(_tar_bytes(cells), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)
    path = results_dir / ARCHIVE
    if not path.is_file() or path.read_bytes() != data:
        with atomic_file(path) as tmp:
            tmp.write_bytes(data)
            tmp.chmod(0o644)
    return path


def unpack(results_dir: str | Path) -> list[Path]:
    """Write each archived cell that is not on disk to ``results_dir/cells/METHOD/seedN/``; the folders written."""
    results_dir = Path(results_dir)
    on_disk = disk_cells(results_dir)
    written = []
    for (method, seed), files in sorted(read_archive(results_dir).items()):
        if (method, seed) in on_disk:
            continue
        folder = results_dir / "cells" / method / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in sorted(files.items(), key=lambda kv: kv[0] == CELL_FILE):  # cell.json last
            (folder / name).write_bytes(data)
        written.append(folder)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="+", help="a grid's output directory (holds cells/)")
    parser.add_argument("--unpack", action="store_true", help="write the archived cells that are not on disk")
    args = parser.parse_args(argv)
    for results_dir in args.results_dir:
        if args.unpack:
            print(f"{results_dir}: {len(unpack(results_dir))} cells written")
        else:
            path = pack(results_dir)
            print(f"{results_dir}: " + ("no finished cells" if path is None else f"{path} ({path.stat().st_size} B)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
