"""The subspace-locked PEFT tuner: wraps target Linears with :class:`~lockedopd.adapter.layer.Linear`."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features, _maybe_include_all_linear_layers
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ..subspace.basis import check_orthonormal
from ..subspace.basis_io import load_basis
from .config import SubspaceLockedConfig
from .layer import Linear, SubspaceLockedLayer

__all__ = ["SubspaceLockedModel", "base_module_name", "locked_coefficients", "locked_layers"]

_Bases = dict[str, tuple[torch.Tensor | None, torch.Tensor]]


def base_module_name(name: str) -> str:
    """Map a (possibly PEFT-wrapped or compiled) module name to the base model's ``named_modules()`` name."""
    name = name.removeprefix("_orig_mod.").removeprefix("base_model.model.").removeprefix("_orig_mod.")
    return re.sub(r"\.base_layer(?=\.|$)", "", name)


def _is_supported(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and GPT-2 ``Conv1D`` (possibly already wrapped by a tuner layer)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return isinstance(module, (nn.Linear, Conv1D))


def _shape_str(t: torch.Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


class SubspaceLockedModel(BaseTuner):
    """PEFT tuner that confines each target Linear's update to a frozen top-r subspace ``ΔW = A Vᵀ`` or ``U C Vᵀ``.

    Create it via ``peft.get_peft_model(model, SubspaceLockedConfig(...))`` after ``import lockedopd.adapter``. New
    adapters read their bases from ``config.basis_path`` (keyed by the base model's module names) and validate
    them; adapters loaded with ``PeftModel.from_pretrained`` get placeholder bases that the saved state dict
    overwrites (``save_basis=True``), or read ``basis_path`` (``save_basis=False``).

    Args:
        model: The model to adapt.
        config: A :class:`SubspaceLockedConfig` (or a dict of them).
        adapter_name: Name of the first adapter.
        low_cpu_mem_usage: Create the coefficient tensors on the meta device (loading speed-up).
    """

    prefix: str = "locked_"
    tuner_layer_cls = SubspaceLockedLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: SubspaceLockedConfig, model_config: dict) -> SubspaceLockedConfig:
        """Without ``target_modules``, target exactly the modules the basis file has bases for.

        (PEFT's usual fallback, a per-architecture default list, would silently lock fewer modules than the
        basis describes.)
        """
        if peft_config.target_modules is None and peft_config.basis_path:
            from pathlib import Path

            from safetensors import safe_open

            path = Path(peft_config.basis_path)
            if path.is_file():
                with safe_open(str(path), framework="pt") as handle:
                    names = {key.rsplit(".", 1)[0] for key in handle.keys() if key.endswith((".U", ".V"))}
                if names:
                    peft_config.target_modules = names
                    return peft_config
        return super()._prepare_adapter_config(peft_config, model_config)

    def _check_new_adapter_config(self, config: SubspaceLockedConfig) -> None:
        """Reject a new adapter whose ``save_basis`` differs from the existing adapters'."""
        super()._check_new_adapter_config(config)
        values = sorted({bool(getattr(c, "save_basis", True)) for c in self.peft_config.values()})
        if len(values) > 1:
            raise ValueError(
                f"All subspace-locked adapters of a model must use the same save_basis, got {values}; set "
                "save_basis identically in every SubspaceLockedConfig."
            )

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Load and validate all bases of ``adapter_name`` first, then let PEFT create the layers.

        Every check (missing/extra basis entries, shapes, ranks, orthonormality) runs before any module is
        replaced, so a bad basis never leaves the model half-wrapped.
        """
        config = self.peft_config[adapter_name]
        from_state_dict = kwargs.get("state_dict") is not None or (len(args) >= 3 and args[2] is not None)
        self._locked_bases = self._prepare_bases(model, config, check_targets=not from_state_dict)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._locked_bases = None
            config._loading_checkpoint = False  # the flag is consumed by this one injection

    def _iter_targets(self, model: nn.Module, config: SubspaceLockedConfig) -> list[tuple[str, nn.Module]]:
        """The supported modules that ``config`` targets, in ``named_modules()`` order (as PEFT will match them)."""
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        config = _maybe_include_all_linear_layers(config, model)
        tuner_keys = [key + "." for key, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
        targets = []
        for key, module in model.named_modules():
            if not key or any(key.startswith(t) for t in tuner_keys):
                continue
            if self._check_target_module_exists(config, key) and _is_supported(module):
                targets.append((key, module))
        return targets

    def _prepare_bases(self, model: nn.Module, config: SubspaceLockedConfig, check_targets: bool) -> _Bases | None:
        """Read ``config.basis_path`` and return validated ``{module_name: (U or None, V)}`` for all targets.

        Returns ``None`` when the adapter is being loaded from a checkpoint that carries its bases
        (placeholders are created and overwritten by the saved state dict).
        """
        if getattr(config, "_loading_checkpoint", False) and config.save_basis:
            return None
        if config.basis_path is None:
            raise ValueError(
                "SubspaceLockedConfig.basis_path is None: a new subspace-locked adapter needs a basis.safetensors "
                "file (see lockedopd.subspace.basis_io.save_basis). Only PeftModel.from_pretrained of an adapter "
                "saved with save_basis=True works without one."
            )
        raw, _ = load_basis(config.basis_path, check=False)
        bases = {base_module_name(name): pair for name, pair in raw.items()}
        module_names = {base_module_name(name) for name, _ in model.named_modules()}
        unknown = sorted(set(bases) - module_names)
        if unknown:
            raise ValueError(
                f"Basis file {config.basis_path!r} has entries for {len(unknown)} module(s) that do not exist in the "
                f"model: {unknown[:5]}. Names must come from the base model's named_modules()."
            )
        targets = self._iter_targets(model, config)
        if check_targets and not targets:
            raise ValueError(
                f"target_modules={config.target_modules!r} matched no nn.Linear module of the model; check the "
                "names (suffix match for lists, full match for a regex string)."
            )
        missing = [key for key, _ in targets if base_module_name(key) not in bases]
        if missing:
            raise ValueError(
                f"Basis file {config.basis_path!r} has no entry for target module(s) {missing[:5]} "
                f"({len(missing)} in all); recompute the basis for these modules or narrow target_modules."
            )
        result: _Bases = {}
        for key, module in targets:
            name = base_module_name(key)
            U, V = bases[name]
            in_f, out_f = _get_in_out_features(
                module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            )
            r_basis = V.shape[1]
            if r_basis != config.r:
                raise ValueError(
                    f"Basis for module {name!r} has rank {r_basis} (U {_shape_str(U)}, V {_shape_str(V)}) but "
                    f"config r={config.r}; set r={r_basis} or recompute the basis."
                )
            if config.r > min(in_f, out_f):
                raise ValueError(
                    f"r={config.r} is larger than min(out, in) = min({out_f}, {in_f}) of module {name!r}; use "
                    f"r <= {min(in_f, out_f)}."
                )
            if tuple(U.shape) != (out_f, config.r) or tuple(V.shape) != (in_f, config.r):
                raise ValueError(
                    f"Basis shapes for module {name!r} do not match the module (out={out_f}, in={in_f}): U must be "
                    f"({out_f}, {config.r}) and V ({in_f}, {config.r}), got U {_shape_str(U)} and V {_shape_str(V)}."
                )
            check_orthonormal(f"{name}.U", U)
            check_orthonormal(f"{name}.V", V)
            result[name] = (U if config.mode == "two_sided" else None, V)
        return result

    def _create_and_replace(
        self,
        config: SubspaceLockedConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        """Wrap ``target`` (or add an adapter to an existing wrapper) using the basis of ``current_key``."""
        if current_key is None:
            raise ValueError("current_key must not be None.")
        from transformers.pytorch_utils import Conv1D

        name = base_module_name(current_key)
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not _is_supported(base):
            raise TypeError(
                f"Target module {name!r} is a {type(base).__name__}; subspace locking supports only torch.nn.Linear "
                "and transformers Conv1D. Narrow target_modules."
            )
        in_f, out_f = _get_in_out_features(base)
        bases = getattr(self, "_locked_bases", None)
        if bases is None:  # loading a checkpoint: placeholders, overwritten by the saved state dict
            U = torch.zeros(out_f, config.r) if config.mode == "two_sided" else None
            V = torch.zeros(in_f, config.r)
        elif name in bases:
            U, V = bases[name]
        else:
            raise ValueError(
                f"Basis file {config.basis_path!r} has no entry for target module {name!r} (out={out_f}, in={in_f})."
            )

        fan_in_fan_out = isinstance(base, Conv1D)
        if fan_in_fan_out != config.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(base).__name__} module {name!r}; using "
                f"fan_in_fan_out={fan_in_fan_out}.",
                stacklevel=2,
            )
            config.fan_in_fan_out = fan_in_fan_out

        if isinstance(target, Linear):
            target.update_layer(
                adapter_name,
                config.r,
                config.mode,
                U,
                V,
                init_scale=config.init_scale,
                inference_mode=config.inference_mode,
            )
            return
        new_module = Linear(
            target,
            adapter_name,
            r=config.r,
            mode=config.mode,
            U=U,
            V=V,
            init_scale=config.init_scale,
            fan_in_fan_out=fan_in_fan_out,
            save_basis=config.save_basis,
            inference_mode=config.inference_mode,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an additional adapter is not automatically trainable
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SubspaceLockedConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to model keys and insist that saved bases are present when ``save_basis``."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        if getattr(config, "save_basis", True):
            suffixes = (f".locked_U.{adapter_name}", f".locked_V.{adapter_name}")
            expected = [k for k in model.state_dict() if k.endswith(suffixes)]
            missing = [k for k in expected if k not in remapped]
            if missing:
                raise ValueError(
                    f"The checkpoint of subspace-locked adapter {adapter_name!r} lacks {len(missing)} saved basis "
                    f"tensor(s), e.g. {missing[:3]}; it was not saved with save_basis=True. Load it with a config "
                    "that has save_basis=False and basis_path set to its basis file."
                )
        return remapped


def locked_coefficients(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The trainable coefficients of every subspace-locked layer of ``model`` (a PeftModel, the tuner or the model
    inside), keyed by the base model's module name and sorted by it."""
    found = {
        base_module_name(name): module.coefficients(adapter_name)
        for name, module in model.named_modules()
        if isinstance(module, SubspaceLockedLayer) and adapter_name in module.locked_mode
    }
    if not found:
        raise ValueError(f"no subspace-locked layer carries adapter {adapter_name!r}; wrap the model first.")
    return {name: found[name] for name in sorted(found)}


def locked_layers(model: nn.Module) -> dict[str, SubspaceLockedLayer]:
    """Every subspace-locked layer of ``model``, keyed by the base model's module name and sorted by it."""
    found = {base_module_name(n): m for n, m in model.named_modules() if isinstance(m, SubspaceLockedLayer)}
    return {name: found[name] for name in sorted(found)}
