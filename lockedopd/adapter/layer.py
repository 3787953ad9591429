"""The subspace-locked tuner layer: a Linear whose update is confined to a frozen singular subspace."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn

from ..subspace.basis import LOCK_MODES, SubspaceBasis

__all__ = ["Linear", "SubspaceLockedLayer"]


class SubspaceLockedLayer(BaseTunerLayer):
    """Mixin holding, per adapter, the frozen bases and the trainable coefficients of the locked update.

    For adapter ``a`` with mode ``"right"`` the update is ``ΔW = A Vᵀ`` (``locked_A[a]``: out x r, trainable;
    ``locked_V[a]``: in x r, frozen); for ``"two_sided"`` it is ``ΔW = U C Vᵀ`` (``locked_C[a]``: r x r, trainable;
    ``locked_U[a]``: out x r and ``locked_V[a]``, frozen). Only the coefficient dict the mode uses gets an entry.
    """

    adapter_layer_names: tuple[str, ...] = ("locked_A", "locked_C")
    other_param_names: tuple[str, ...] = ("locked_U", "locked_V", "locked_mode", "r")

    def __init__(self, base_layer: nn.Module, save_basis: bool = True, **kwargs: Any) -> None:
        """Set up empty per-adapter containers around ``base_layer``.

        Args:
            base_layer: The wrapped ``nn.Linear`` (or ``Conv1D``).
            save_basis: Whether ``locked_U``/``locked_V`` are persistent buffers (part of the state dict).
            **kwargs: Kept for PEFT compatibility.
        """
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.locked_mode: dict[str, str] = {}
        self.locked_A = nn.ParameterDict({})
        self.locked_C = nn.ParameterDict({})
        self.locked_U = BufferDict({}, persistent=save_basis)
        self.locked_V = BufferDict({}, persistent=save_basis)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"Unsupported layer type {type(self.get_base_layer()).__name__} for subspace locking.")
        self.in_features: int = in_features
        self.out_features: int = out_features
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        mode: str,
        U: torch.Tensor | None,
        V: torch.Tensor,
        init_scale: float = 0.0,
        inference_mode: bool = False,
    ) -> None:
        """Add adapter ``adapter_name`` with frozen bases ``U`` (out x r, two_sided only) and ``V`` (in x r).

        Args:
            adapter_name: Name of the adapter.
            r: Rank; must match the number of basis columns.
            mode: ``"right"`` or ``"two_sided"``.
            U: Left basis (out x r); required for ``"two_sided"``, ignored for ``"right"``.
            V: Right basis (in x r).
            init_scale: Std of the random initial coefficients (0 = exact zero, the base model is unchanged).
            inference_mode: Freeze the new coefficients.
        """
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"update_layer({adapter_name!r}): r={r!r} must be a positive integer.")
        if mode not in LOCK_MODES:
            raise ValueError(f"update_layer({adapter_name!r}): mode={mode!r} is invalid; allowed: {list(LOCK_MODES)}.")
        if r > min(self.in_features, self.out_features):
            raise ValueError(
                f"update_layer({adapter_name!r}): r={r} exceeds min(out_features={self.out_features}, "
                f"in_features={self.in_features}); use r <= {min(self.in_features, self.out_features)}."
            )
        if tuple(V.shape) != (self.in_features, r):
            raise ValueError(
                f"update_layer({adapter_name!r}): V has shape {tuple(V.shape)}, expected (in_features, r) = "
                f"({self.in_features}, {r})."
            )
        if mode == "two_sided" and (U is None or tuple(U.shape) != (self.out_features, r)):
            got = None if U is None else tuple(U.shape)
            raise ValueError(
                f"update_layer({adapter_name!r}): U has shape {got}, expected (out_features, r) = "
                f"({self.out_features}, {r})."
            )
        self.r[adapter_name] = r
        self.locked_mode[adapter_name] = mode
        self.locked_V[adapter_name] = V.detach().to(torch.float32).clone()
        if mode == "two_sided":
            self.locked_U[adapter_name] = U.detach().to(torch.float32).clone()
            coeff = torch.zeros(r, r)
            target = self.locked_C
        else:
            coeff = torch.zeros(self.out_features, r)
            target = self.locked_A
        if init_scale > 0:
            coeff.normal_(0.0, init_scale)
        target[adapter_name] = nn.Parameter(coeff)

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move the adapter to the base layer's device; coefficients also take its dtype, bases stay float32.

        Rounding an orthonormal basis to e.g. bfloat16 would break orthonormality, so ``locked_U``/``locked_V`` only
        change device here.
        """
        bases = {name: getattr(self, name) for name in ("locked_U", "locked_V")}
        kept = {name: d[adapter_name] for name, d in bases.items() if adapter_name in d}
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        for name, tensor in kept.items():
            moved = bases[name][adapter_name]
            bases[name][adapter_name] = tensor.to(moved.device)

    def coefficients(self, adapter: str) -> torch.Tensor:
        """The trainable coefficient tensor of ``adapter`` (``A``: out x r, or ``C``: r x r)."""
        return self.locked_C[adapter] if self.locked_mode[adapter] == "two_sided" else self.locked_A[adapter]

    def basis(self, adapter: str) -> SubspaceBasis:
        """The frozen :class:`~lockedopd.subspace.SubspaceBasis` of ``adapter`` (its algebra lives there)."""
        U = self.locked_U[adapter] if adapter in self.locked_U else None
        return SubspaceBasis(self.locked_V[adapter], U, self.locked_mode[adapter])

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Materialise ``ΔW`` (out x in; in x out with ``fan_in_fan_out``) of ``adapter`` in the coefficients' dtype.

        Args:
            adapter: Name of the adapter.
        """
        delta = self.basis(adapter).delta(self.coefficients(adapter))
        return transpose(delta, getattr(self, "fan_in_fan_out", False))

    def _adapter_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``x ΔWᵀ`` without materialising ``ΔW``, computed in the coefficients' dtype."""
        coeff = self.coefficients(adapter)
        return self.basis(adapter).apply(self._cast_input_dtype(x, coeff.dtype), coeff)


class Linear(nn.Module, SubspaceLockedLayer):
    """``nn.Linear`` (or GPT-2 ``Conv1D``) wrapped with subspace-locked adapters."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        mode: str,
        U: torch.Tensor | None,
        V: torch.Tensor,
        init_scale: float = 0.0,
        fan_in_fan_out: bool = False,
        save_basis: bool = True,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Wrap ``base_layer`` and add the first adapter (see :meth:`SubspaceLockedLayer.update_layer`)."""
        super().__init__()
        SubspaceLockedLayer.__init__(self, base_layer, save_basis=save_basis, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, mode, U, V, init_scale=init_scale, inference_mode=inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add ``ΔW`` of the given (default: active) adapters into the base weight.

        Args:
            safe_merge: Merge into a copy first and raise ``ValueError`` if it contains NaN/inf.
            adapter_names: Adapters to merge; ``None`` merges the active adapters.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for adapter in adapter_names:
            if adapter not in self.locked_mode:
                continue
            weight = self.get_base_weight()
            delta = self.get_delta_weight(adapter).to(device=weight.device, dtype=weight.dtype)
            if safe_merge:
                new_weight = weight.clone() + delta
                if not torch.isfinite(new_weight).all():
                    raise ValueError(
                        f"NaN/inf detected in the merged weights; the subspace-locked adapter {adapter!r} is broken."
                    )
                self.set_base_weight(new_weight)
            else:
                weight += delta
                self.set_base_weight(weight)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged adapters' ``ΔW`` from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.locked_mode:
                weight = self.get_base_weight()
                weight -= self.get_delta_weight(adapter).to(device=weight.device, dtype=weight.dtype)
                self.set_base_weight(weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + Σ_active x ΔWᵀ`` computed through the r-dimensional bottleneck (ΔW is never formed)."""
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
        elif self.merged:
            result = self.base_layer(x, *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs)
            result_dtype = result.dtype
            for adapter in self.active_adapters:
                if adapter not in self.locked_mode:
                    continue
                result = result + self._adapter_output(adapter, x).to(result_dtype)
        return result.to(previous_dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """The locked update is a rank-r product, so it converts to LoRA exactly."""
        return True

    def __repr__(self) -> str:
        """Prefix the module repr with the method name."""
        return "subspace_locked." + super().__repr__()
