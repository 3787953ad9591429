"""Writing matplotlib figures: one place for layout, directory creation, resolution and closing."""

from __future__ import annotations

import os
from pathlib import Path


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Tighten ``fig``'s layout, write it to ``path`` (parent directories created), close it; returns the path."""
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
