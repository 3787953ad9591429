"""Writing matplotlib figures: one place for layout, directory creation, resolution and closing."""

from __future__ import annotations

import os
from pathlib import Path

from lockedopd.runtime.atomic_io import atomic_file

DISTINCT_COLOURS = 20
"""How many names :func:`distinct_colours` keeps apart (matplotlib's ``tab20``)."""


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


def distinct_colours(names) -> dict:
    """One colour per name, in order: tab20's 10 dark shades first, then its 10 light ones (cycling beyond 20)."""
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab20").colors
    return {name: palette[(2 * i) % DISTINCT_COLOURS + (i // 10) % 2] for i, name in enumerate(dict.fromkeys(names))}
