"""Models this project trains once and reuses: a training recipe's final weights, cached by the recipe's content.

``lockedopd build-model RECIPE.yaml`` trains the recipe (e.g. the SFT run that makes a task's teacher) and exports
its final model as a Hugging Face directory under ``$LOCKEDOPD_CACHE/built/<recipe>-<hash>/``. The hash covers
everything that decides the weights — the resolved training settings and the bytes of the training data — and
nothing that only observes the run (evaluation, checkpoint cadence, progress bars), so an unchanged recipe is
trained once and a changed one gets a new directory.

A config names such a model as ``source: built:RECIPE.yaml`` (student or teacher); if it was not built yet, the
error names the command that builds it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

BUILT_PREFIX = "built:"
BUILD_FORMAT = 1
#: Settings that observe or move a run without changing its weights (left out of the content hash).
OBSERVING_KEYS = frozenset(
    {
        "output_dir", "resume", "progress", "save_steps", "eval_steps", "eval_at_start", "eval_sampling_seeds",
        "eval_fixed_text", "eval_fixed_text_path", "reference_run", "malloc_mmap_threshold", "accuracy",
        "data.eval_path", "data.eval_size",
    }
)  # fmt: skip


def is_built_source(source: str) -> bool:
    """Whether a model ``source`` names a built model (``built:RECIPE.yaml``)."""
    return source.startswith(BUILT_PREFIX)


def recipe_config(recipe: str | Path, overrides: list[str] | None = None):
    """The :class:`~lockedopd.opd.OPDConfig` of a build recipe (its YAML with ``overrides``)."""
    from lockedopd.opd.config import load_config

    return load_config(recipe, overrides)


def build_key(config) -> str:
    """A 16-hex content hash of what decides a recipe's final weights: its settings that differ from the defaults
    (less :data:`OBSERVING_KEYS`; a setting added to lockedopd later, at its default, leaves the key as it was) and
    the bytes of its training data file. A model source that is itself built (an SFT anchor trained from a built
    teacher) enters with that recipe's own key, so rebuilding the inner model rebuilds the outer one."""
    from lockedopd.opd.config import OPDConfig, config_to_dict, flatten_settings

    defaults = flatten_settings(config_to_dict(OPDConfig()))
    settings = {
        key: _with_built_key(value)
        for key, value in flatten_settings(config_to_dict(config)).items()
        if defaults.get(key, object()) != value and not _observing(key)
    }
    digest = hashlib.sha256(json.dumps([BUILD_FORMAT, settings], sort_keys=True).encode())
    if config.data.train_path:
        path = Path(config.data.train_path)
        if not path.is_file():
            raise FileNotFoundError(f"build recipe: data.train_path {path} does not exist.")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def built_dir(recipe: str | Path, config=None) -> Path:
    """Where the model of ``recipe`` is (or will be) cached."""
    from lockedopd.models import default_cache_dir

    config = config if config is not None else recipe_config(recipe)
    return default_cache_dir() / "built" / f"{Path(recipe).stem}-{build_key(config)}"


def resolve_built_source(source: str) -> Path:
    """The directory of a ``built:RECIPE.yaml`` model; ``FileNotFoundError`` naming the build command when it has
    not been built (or the recipe changed since)."""
    recipe = source[len(BUILT_PREFIX) :]
    if not Path(recipe).is_file():
        raise FileNotFoundError(f"model source {source!r}: the recipe {recipe} does not exist.")
    directory = built_dir(recipe)
    if not (directory / "build.json").is_file():
        raise FileNotFoundError(
            f"model source {source!r} has not been built (no {directory}); build it once with "
            f"`lockedopd build-model {recipe}` (it is then reused until the recipe or its data change)."
        )
    return directory


def built_model_identity(source: str) -> dict[str, str]:
    """``{"key", "weights_sha256"}`` of a built model source: its recipe key and the digest of the weights in the
    cache (from ``build.json``; computed, and not stored, for a model built before builds recorded it)."""
    from lockedopd.runtime.provenance import weights_digest

    directory = resolve_built_source(source)
    record = json.loads((directory / "build.json").read_text())
    return {"key": record["key"], "weights_sha256": record.get("weights_sha256") or weights_digest(directory)}


def _with_built_key(value):
    if isinstance(value, str) and is_built_source(value) and Path(value[len(BUILT_PREFIX) :]).is_file():
        return f"{value}#{build_key(recipe_config(value[len(BUILT_PREFIX) :]))}"
    return value


def _observing(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in OBSERVING_KEYS)
