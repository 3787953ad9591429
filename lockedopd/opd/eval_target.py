"""What ``lockedopd eval`` scores: a run directory, a PEFT adapter directory, or a model, loaded as one plain causal
LM with its tokenizer.

- a **run directory** (it holds ``config.yaml``): its latest complete checkpoint, the locked update folded in
  (:func:`lockedopd.opd.run_checkpoint.load_run_model`);
- an **adapter directory** (it holds ``adapter_config.json``: a LoRA from :func:`lockedopd.export_lora`, or any PEFT
  adapter): the adapter on its base model (``base``, else the base its config names), merged;
- a **model**: a directory, a hub id, ``built:RECIPE.yaml``, ``smollm2`` or ``tiny`` (what ``student.source`` takes),
  pruned with ``keep_layers`` / ``drop_every`` if asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["EvalTarget", "load_eval_target"]


@dataclass
class EvalTarget:
    """A model ready to score.

    Attributes:
        model: the causal LM (plain: no adapter left on it).
        tokenizer: its tokenizer.
        kind: ``"run"``, ``"adapter"`` or ``"model"``.
        checkpoint_step: the run checkpoint scored (runs only).
    """

    model: nn.Module
    tokenizer: Any
    kind: str
    checkpoint_step: int | None = None


def load_eval_target(
    target: str | Path,
    base: str | None = None,
    keep_layers: list[int] | None = None,
    drop_every: int | None = None,
    revision: str | None = None,
) -> EvalTarget:
    """Load ``target`` (a run directory, an adapter directory or a model source) as one plain causal LM.

    Args:
        target: what to score.
        base: the base model of an adapter (a model source); default: ``base_model_name_or_path`` of its config.
        keep_layers / drop_every: prune a model source (not a run or an adapter: those carry their own shape).
        revision: the hub revision of a hub id.

    Raises:
        ValueError: pruning asked for a run or an adapter, an adapter without a base, or a run's own ``adapter/``
            (its base is the student at the lock, which only the run directory holds).
        FileNotFoundError: the target or the adapter's base cannot be found.
    """
    from lockedopd.opd.builders import build_model
    from lockedopd.opd.config import ModelConfig

    path = Path(target)
    pruned = keep_layers is not None or drop_every is not None
    if (path / "config.yaml").is_file():
        if pruned:
            raise ValueError(f"{path} is a run directory (its student has its own layers); drop the pruning options.")
        from lockedopd.opd.run_checkpoint import load_run_model

        model, tokenizer, step = load_run_model(path)
        return EvalTarget(model, tokenizer, "run", step)
    if (path / "adapter_config.json").is_file():
        if pruned:
            raise ValueError(f"{path} is an adapter: prune its base model, not the adapter; drop the pruning options.")
        if (path.parent / "config.yaml").is_file():
            raise ValueError(
                f"{path} is a run's own adapter: it applies to the student's weights at the lock, which only the run "
                f"holds; evaluate the run instead (`lockedopd eval {path.parent}`), or export the model with "
                "lockedopd.adapter.export_merged."
            )
        base = base or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{path}/adapter_config.json names no base model; give it with --base MODEL.")
        model, tokenizer = build_model(ModelConfig(source=str(base), revision=revision))
        return EvalTarget(_merged_adapter(model, path), tokenizer, "adapter")
    if not path.exists() and not _is_model_name(str(target)):
        raise FileNotFoundError(
            f"{target} is neither a run directory (config.yaml), an adapter directory (adapter_config.json), a model "
            "directory, a hub id (owner/name), built:RECIPE.yaml, smollm2 nor tiny."
        )
    spec = ModelConfig(source=str(target), revision=revision, keep_layers=keep_layers, drop_every=drop_every)
    model, tokenizer = build_model(spec)
    return EvalTarget(model, tokenizer, "model")


def _is_model_name(source: str) -> bool:
    from lockedopd.runtime.hub import is_hub_id

    return source in ("tiny", "smollm2") or source.startswith("built:") or is_hub_id(source)


def _merged_adapter(base_model: nn.Module, adapter_dir: Path) -> nn.Module:
    """``adapter_dir`` (any PEFT adapter, the lockedopd method registered) applied to ``base_model`` and merged."""
    from peft import PeftModel

    import lockedopd.adapter  # noqa: F401  registers the subspace-locked PEFT method

    return PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
