"""The experiment of a memory/speed run: this package's ``defaults.yaml`` merged with one experiment file, checked."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import yaml

from lockedopd.bench.memory.methods import METHODS, method_spec

__all__ = ["BENCH_DIR", "DEFAULTS", "DEVICES", "ISOLATIONS", "load_config", "merge_overrides"]

#: Every setting of the benchmark with its default and a one-line comment (ships with the package).
DEFAULTS = Path(__file__).with_name("defaults.yaml")
#: Where results go by default: ``benchmarks/results/<experiment>/`` under the current directory (in a source
#: checkout, the committed results).
BENCH_DIR = Path("benchmarks")
ISOLATIONS = ("fork", "spawn", "none")
DEVICES = ("cpu", "cuda")
MODEL_SOURCES = ("tiny", "smollm2")
PROJECTED_BASES = ("grad_svd", "random")


def merge_overrides(base: dict, override: dict, where: str, prefix: str = "", defaults_name: str = "") -> dict:
    """``base`` with ``override`` applied recursively; a key unknown to ``base`` raises ``ValueError``."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise ValueError(
                f"{where}: unknown key {prefix + key!r}; known keys here: {sorted(base)} "
                f"(see {defaults_name or DEFAULTS.name})."
            )
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {prefix + key!r} must be a mapping, got {value!r}.")
            out[key] = merge_overrides(base[key], value, where, f"{prefix}{key}.", defaults_name)
        else:
            out[key] = value
    return out


def load_config(
    path: str | os.PathLike, methods: list[str] | None = None, defaults: str | os.PathLike = DEFAULTS
) -> dict:
    """``defaults`` merged with the experiment file at ``path`` (and an optional method list), checked.

    Raises:
        ValueError: an unknown key, an unknown method, or a value out of range (the message names the key).
    """
    path, defaults = Path(path), Path(defaults)
    override = yaml.safe_load(path.read_text()) or {}
    if not isinstance(override, dict):
        raise ValueError(f"{path}: an experiment file must be a YAML mapping of overrides.")
    config = merge_overrides(yaml.safe_load(defaults.read_text()), override, str(path), defaults_name=defaults.name)
    config["name"] = config["name"] or path.stem
    if methods:
        config["methods"] = methods
    check_config(config)
    return config


def check_config(config: dict) -> None:
    """Raise ``ValueError`` for a method or a setting of a merged config that cannot run."""
    unknown = [m for m in config["methods"] if not _is_method(m)]
    if unknown or not config["methods"]:
        raise ValueError(
            f"methods={config['methods']!r}: each must be one of {list(METHODS)}, or full_<optimizer> / "
            "lock_<lock method> for a registered full-parameter optimizer or lock method."
        )
    for key, value, allowed in (
        ("isolation", config["isolation"], ISOLATIONS),
        ("model.source", config["model"]["source"], MODEL_SOURCES),
        ("projected.basis", config["projected"]["basis"], PROJECTED_BASES),
        ("device", config["device"], DEVICES),
    ):
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is invalid; allowed: {list(allowed)}.")
    if config["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda, but torch sees no CUDA GPU here; run on a GPU machine or set device: cpu.")
    if config["device"] == "cuda" and config["isolation"] == "fork":
        raise ValueError(
            "device=cuda with isolation=fork: a forked worker cannot use CUDA once any process before it has; set "
            "isolation: spawn (a fresh interpreter per method) or none."
        )
    for key, value in (
        ("objective.chunk_size", config["objective"]["chunk_size"]),
        ("rank", config["rank"]),
        ("steps.warmup", config["steps"]["warmup"]),
        ("steps.timed", config["steps"]["timed"]),
        ("threads", config["threads"]),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} must be a positive integer.")


def _is_method(name: str) -> bool:
    try:
        method_spec(name)
    except ValueError:
        return False
    return True
