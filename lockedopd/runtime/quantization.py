"""bitsandbytes in one place: the 8-bit warmup optimizer, its moments read back in float32, and quantized bases.

- ``optimizer: adamw8bit`` — :func:`build_adamw8bit` (``bnb.optim.AdamW8bit``: block-wise 8-bit moments, ~4× less
  state than float32 AdamW; tensors under ``min_8bit_size`` elements keep float32 moments). At the lock
  :func:`adam_state_fp32` dequantizes the moments, so the warmup carry (moments and lr scales) works as from AdamW.
- ``lock.base_dtype: bf16 | int8 | nf4`` — :func:`quantize_linears` replaces the locked target Linears' frozen
  weights (the warmup update folded in) by bf16 copies or bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` (QLoRA
  style); the adapter's coefficients stay float32. What the rounding loses is reported per matrix
  (:class:`QuantizationReport`).

The 4-bit trap: on a CPU with AVX512-BF16, ``Linear4bit`` repacks its weight for a faster kernel the first time it
runs in eval mode without gradients (as it does when the student samples), and that kernel has no backward: later
training passes silently get no input gradient, so every adapter below the layer stops learning.
:func:`quantize_linears` switches that repacking off on the modules it makes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lockedopd.opd.values import BASE_DTYPES

__all__ = [
    "BASE_DTYPES",
    "BF16Linear",
    "QuantizationReport",
    "adam_state_fp32",
    "build_adamw8bit",
    "dense_weight",
    "import_bitsandbytes",
    "is_quantized",
    "quantize_linears",
]


def import_bitsandbytes(what: str) -> ModuleType:
    """``import bitsandbytes``, or an ``ImportError`` saying how to install it for ``what``."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError(
            f"{what} needs bitsandbytes: pip install bitsandbytes (or pip install 'lockedopd[bnb]')."
        ) from exc
    return bitsandbytes


def build_adamw8bit(
    params: Iterable[nn.Parameter],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    min_8bit_size: int = 4096,
) -> torch.optim.Optimizer:
    """The 8-bit warmup optimizer (``optimizer: adamw8bit``): ``bitsandbytes.optim.AdamW8bit``.

    Tensors with fewer than ``min_8bit_size`` elements keep float32 moments (bitsandbytes' default).
    """
    bnb = import_bitsandbytes("optimizer: adamw8bit")
    return bnb.optim.AdamW8bit(
        list(params), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size
    )


def adam_state_fp32(state: Mapping[str, Any]) -> dict[str, Any]:
    """An Adam parameter state with float32 ``step`` / ``exp_avg`` / ``exp_avg_sq``, whatever optimizer wrote it.

    ``torch.optim.AdamW`` states are returned as they are; bitsandbytes states (``state1`` / ``state2``, 8-bit with
    block-wise ``absmax1`` / ``absmax2`` and code books ``qmap1`` / ``qmap2``, or float32 below ``min_8bit_size``)
    are dequantized. An empty state stays empty.
    """
    if not state or "state1" not in state:
        return dict(state)
    moments = []
    for i in (1, 2):
        tensor = state[f"state{i}"]
        if tensor.dtype == torch.uint8:
            functional = import_bitsandbytes("reading 8-bit Adam moments").functional
            absmax = state[f"absmax{i}"]
            blocksize = 2 ** math.ceil(math.log2(tensor.numel() / absmax.numel()))
            tensor = functional.dequantize_blockwise(
                tensor, absmax=absmax, code=state[f"qmap{i}"], blocksize=blocksize
            )
        moments.append(tensor.float())
    return {"step": torch.tensor(float(state["step"])), "exp_avg": moments[0], "exp_avg_sq": moments[1]}


class BF16Linear(nn.Linear):
    """A frozen Linear stored in bfloat16 that takes and returns the caller's dtype (``lock.base_dtype: bf16``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + b`` computed in bfloat16, returned in ``x``'s dtype."""
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear made by :func:`quantize_linears` (bf16, int8 or nf4)."""
    if isinstance(module, BF16Linear):
        return True
    kind = type(module).__name__
    return kind in ("Linear8bitLt", "Linear4bit") and type(module).__module__.startswith("bitsandbytes")


@torch.no_grad()
def dense_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(out, in)`` weight a (possibly quantized) Linear computes with, dequantized to ``dtype``."""
    kind = type(module).__name__
    if kind == "Linear4bit":
        functional = import_bitsandbytes("lock.base_dtype: nf4").functional
        return functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
    if kind == "Linear8bitLt":
        scales = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
        return (module.weight.data.float() * scales.float().unsqueeze(1) / 127.0).to(dtype)
    return module.weight.detach().to(dtype)


@dataclass
class QuantizationReport:
    """What rounding the frozen base to ``base_dtype`` lost, per matrix (module name → value).

    Attributes:
        base_dtype: the ``lock.base_dtype``.
        error_norm: ‖Q(W) − W‖_F of each matrix W (the lock-time weights, warmup update folded in).
        weight_norm: ‖W‖_F of each matrix.
        bytes_before / bytes_after: the matrices' weight bytes before and after (packed data plus scales).
        original_dtype: the weights' dtype before (what dequantized state dicts use).
    """

    base_dtype: str
    original_dtype: torch.dtype = torch.float32
    error_norm: dict[str, float] = field(default_factory=dict)
    weight_norm: dict[str, float] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def relative_error(self) -> float:
        """‖Q(W) − W‖_F / ‖W‖_F over all matrices together."""
        err = math.sqrt(sum(e * e for e in self.error_norm.values()))
        norm = math.sqrt(sum(n * n for n in self.weight_norm.values()))
        return err / norm if norm else 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (``lock.json``'s ``base_quantization``)."""
        return {
            "base_dtype": self.base_dtype,
            "relative_error": self.relative_error(),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "error_norm": dict(self.error_norm),
        }


def _quiet_int8_cast_warning() -> None:
    """bitsandbytes warns on every int8 matmul that float32 activations are cast to float16 (LLM.int8 quantizes
    them row-wise from float16); say it once here and keep its per-call warning out of the log."""
    quieted = logging.getLogger("bitsandbytes.autograd._functions")
    if quieted.level < logging.ERROR:
        logging.getLogger(__name__).info(
            "lock.base_dtype=int8: bitsandbytes quantizes each int8 layer's activations from float16 in eval mode"
        )
        quieted.setLevel(logging.ERROR)


def _quantized_copy(linear: nn.Linear, base_dtype: str) -> nn.Module:
    """A frozen ``base_dtype`` copy of ``linear`` on its device (bitsandbytes quantizes on ``.to(device)``)."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    device = weight.device
    if base_dtype == "bf16":
        new = BF16Linear(linear.in_features, linear.out_features, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        if bias is not None:
            new.bias = nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)
        return new
    bnb = import_bitsandbytes(f"lock.base_dtype: {base_dtype}")
    if base_dtype == "int8":
        _quiet_int8_cast_warning()
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias is not None, has_fp16_weights=False, threshold=0.0
        )
        new.weight = bnb.nn.Int8Params(weight.float().cpu().clone(), requires_grad=False, has_fp16_weights=False)
    elif base_dtype == "nf4":
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias is not None, compute_dtype=weight.dtype,
            quant_type="nf4",
        )  # fmt: skip
        new.weight = bnb.nn.Params4bit(weight.cpu().clone(), requires_grad=False, quant_type="nf4")
        new.support_avx512bf16_for_cpu = False  # the 4-bit trap (module docstring): never repack for inference
    else:
        raise ValueError(f"lock.base_dtype must be one of {list(BASE_DTYPES)}, got {base_dtype!r}.")
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return new.to(device)


@torch.no_grad()
def quantize_linears(model: nn.Module, names: Iterable[str], base_dtype: str) -> QuantizationReport:
    """Replace the Linear modules ``names`` of ``model`` by frozen ``base_dtype`` copies, in place.

    Args:
        model: the student (plain, before the adapter wraps it).
        names: full module names of ``nn.Linear`` modules.
        base_dtype: one of :data:`BASE_DTYPES`; ``"keep"`` changes nothing.

    Returns:
        What the rounding lost (:class:`QuantizationReport`).
    """
    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"lock.base_dtype must be one of {list(BASE_DTYPES)}, got {base_dtype!r}.")
    report = QuantizationReport(base_dtype)
    names = sorted(names)
    if names:
        report.original_dtype = model.get_submodule(names[0]).weight.dtype
    if base_dtype == "keep":
        return report
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or is_quantized(linear):
            raise ValueError(f"quantize_linears: {name} is a {type(linear).__name__}, not a full-precision Linear.")
        new = _quantized_copy(linear, base_dtype)
        exact = linear.weight.detach().float()
        report.error_norm[name] = float((dense_weight(new) - exact).norm())
        report.weight_norm[name] = float(exact.norm())
        report.bytes_before += exact.numel() * linear.weight.element_size()
        report.bytes_after += sum(
            t.numel() * t.element_size() for t in new.state_dict().values() if torch.is_tensor(t)
        )
        if linear.bias is not None:
            report.bytes_after -= linear.bias.numel() * linear.bias.element_size()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return report
