"""Export a subspace-locked model for tools without lockedopd: as a plain PEFT LoRA adapter, or merged into a plain
Hugging Face model directory."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lockedopd.runtime.atomic_io import atomic_directory

from .model import locked_layers

__all__ = ["export_lora", "export_merged"]


def export_lora(peft_model: nn.Module, out_dir: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` of ``peft_model`` as a standard PEFT LoRA adapter directory.

    The locked update ``ΔW = A Vᵀ`` (right) or ``U C Vᵀ`` (two_sided) is exactly a rank-r LoRA with
    ``lora_A = Vᵀ`` (r x in), ``lora_B = A`` or ``U C`` (out x r) and ``lora_alpha = r`` (scaling 1). The directory
    gets ``adapter_config.json`` (a ``peft.LoraConfig`` with the exact module names as ``target_modules``) and
    ``adapter_model.safetensors`` with keys ``base_model.model.{name}.lora_A.weight`` / ``lora_B.weight``, so plain
    ``PeftModel.from_pretrained(base, out_dir)`` reproduces the adapted model on the *unmerged* base weights.
    The directory is written to a temporary sibling first and then moved into place.

    Args:
        peft_model: A ``PeftModel`` (or the tuner/model inside it) holding subspace-locked layers.
        out_dir: Destination directory; replaced if it exists.
        adapter_name: Which adapter to export.

    Returns:
        The output directory.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    configs = getattr(peft_model, "peft_config", None) or {}
    config = configs.get(adapter_name) if isinstance(configs, dict) else None
    if config is None:
        raise ValueError(f"export_lora: adapter {adapter_name!r} not found; available adapters: {sorted(configs)}.")
    if getattr(config, "modules_to_save", None):
        raise ValueError(
            f"export_lora: adapter {adapter_name!r} has modules_to_save={config.modules_to_save}, which a LoRA export "
            "cannot carry; export only adapters without modules_to_save."
        )
    if getattr(config, "bias", "none") != "none":
        raise ValueError(
            f"export_lora: adapter {adapter_name!r} trains biases (bias={config.bias!r}); only bias='none' exports "
            "exactly to LoRA."
        )

    tensors: dict[str, torch.Tensor] = {}
    names: list[str] = []
    ranks: set[int] = set()
    fan_in_fan_out = False
    for name, layer in locked_layers(peft_model).items():
        if adapter_name not in layer.locked_mode:
            continue
        with torch.no_grad():
            coeff = layer.coefficients(adapter_name)
            B, A = layer.basis(adapter_name).to(dtype=torch.float32).factors(coeff.to(torch.float32))
        dtype = coeff.dtype
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).cpu().contiguous().clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype).cpu().contiguous().clone()
        names.append(name)
        ranks.add(layer.r[adapter_name])
        fan_in_fan_out = fan_in_fan_out or bool(getattr(layer, "fan_in_fan_out", False))
    if not names:
        raise ValueError(f"export_lora: no subspace-locked layer carries adapter {adapter_name!r}.")
    if len(ranks) != 1:
        raise ValueError(f"export_lora: layers of adapter {adapter_name!r} have different ranks {sorted(ranks)}.")
    (r,) = ranks

    lora_config = LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        target_modules=sorted(names),
        init_lora_weights=False,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=getattr(config, "base_model_name_or_path", None),
        revision=getattr(config, "revision", None),
        task_type=getattr(config, "task_type", None),
        inference_mode=True,
    )

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        lora_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def export_merged(peft_model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write ``peft_model`` with its locked update folded into the weights as a plain Hugging Face model directory
    (safetensors): ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it without lockedopd or PEFT, and so do the
    tools users evaluate with (``lm-eval --model hf --model_args pretrained=out_dir``, vLLM). ``peft_model`` itself is
    left as it is (a copy is merged); ``tokenizer``, when given, is saved beside the weights. The directory is
    written to a temporary sibling first and then moved into place.

    Returns:
        The output directory.
    """
    merged = copy.deepcopy(peft_model).merge_and_unload()
    with atomic_directory(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
