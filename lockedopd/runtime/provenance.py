"""What a result was computed with: the versions of the packages that decide the numbers, and a digest of weights.

A built model (``built:RECIPE.yaml``) is keyed by its recipe and data, not by the environment that trained it: two
machines with other library versions can train the same recipe into different weights. ``build.json`` therefore
records :func:`weights_digest` and :func:`package_versions`, each quality cell records the digests of the built
models it used, and a grid's report says when its cells were computed on different builds of one model.
"""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path

__all__ = ["NUMERIC_PACKAGES", "package_versions", "weights_digest"]

#: Packages whose version can change a training run's numbers (kernels, model code, model conversion, loading).
NUMERIC_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "gguf", "numpy")


def package_versions(packages: tuple[str, ...] = NUMERIC_PACKAGES) -> dict[str, str | None]:
    """``{"python": ..., package: version or None (not installed)}``."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def weights_digest(directory: str | Path) -> str:
    """A 16-hex SHA-256 of a model directory's ``*.safetensors`` files (their names and bytes, in name order).

    Raises:
        FileNotFoundError: the directory holds no safetensors file.
    """
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights to digest.")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
