"""Writing matplotlib figures: one place for layout, directory creation, resolution and closing."""

from __future__ import annotations

import os
from pathlib import Path

from lockedopd.atomic_io import atomic_file


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Tighten ``fig``'s layout, write it to ``path`` atomically (parents created), close it; returns the path."""
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return out
