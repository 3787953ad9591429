"""What autograd saves for backward, by component of a decoder-only causal LM (attention, MLP, norms, logits, ...).

:class:`SavedBytesByComponent` counts saved tensors by storage (as :class:`~lockedopd.diagnostics.memory.
SavedTensorBytes` does) and charges each storage to the module that was running when it was saved, classified by
:func:`component_of`. Under activation checkpointing a decoder layer saves nothing visible (the checkpoint keeps its
own tensors and recomputes them in backward); what it keeps instead, its input hidden states, is charged to
``layer_inputs``. Use it around the forward and the loss only::

    with SavedBytesByComponent(model) as saved:
        loss = compute_loss(model, batch)
    loss.backward()
    saved.by_component  # {"attention": ..., "mlp": ..., ...}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["COMPONENTS", "SavedBytesByComponent", "component_of"]

#: Components in report order: decoder parts, the checkpointed layer inputs, the vocabulary-sized loss, the rest.
COMPONENTS = ("attention", "mlp", "norms", "embeddings", "layer_inputs", "logits_loss", "other")


def component_of(module_name: str) -> str:
    """The component a module of a Llama-type model (plain or PEFT-wrapped) belongs to, from its qualified name.

    ``...self_attn...`` → attention (its projections and adapters included), ``...mlp...`` → mlp, a name ending in
    ``norm`` (``input_layernorm``, ``post_attention_layernorm``, the final ``norm``) → norms, ``embed_tokens`` →
    embeddings, ``lm_head`` → logits_loss, anything else (a decoder layer's own ops, rotary embeddings, the
    attention mask) → other.
    """
    parts = module_name.split(".")
    if "self_attn" in parts or "attention" in parts:
        return "attention"
    if "mlp" in parts:
        return "mlp"
    if "embed_tokens" in parts:
        return "embeddings"
    if "lm_head" in parts:
        return "logits_loss"
    if parts[-1].endswith("norm"):
        return "norms"
    return "other"


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class SavedBytesByComponent:
    """Context manager: bytes of the distinct storages autograd saves inside it, by :data:`COMPONENTS`.

    Args:
        model: the causal LM (plain transformers model or a PEFT wrapper of one). Its parameters and buffers are
            never counted. Modules above the decoder (the LM wrapper, PEFT's wrappers) and code outside the model
            (the loss) count as ``logits_loss``.
        exclude: further tensors not to count (e.g. a fixed teacher log-prob tensor the loss reads).

    Attributes:
        by_component: component → bytes (every key of :data:`COMPONENTS`, zeros included).
    """

    def __init__(self, model: nn.Module, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.model = model
        self._excluded = {_storage_key(t) for t in [*model.parameters(), *model.buffers(), *exclude]}
        self._charged: dict[int, tuple[str, int]] = {}  # storage → (component, bytes)
        self.by_component: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
        self._stack: list[str] = []
        self._handles: list[Any] = []
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        self._layers = set() if decoder is None else {id(layer) for layer in getattr(decoder, "layers", [])}
        self._above_decoder = self._ancestors_of(decoder)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _ancestors_of(self, decoder: nn.Module | None) -> set[str]:
        """Names of the modules that contain the decoder (the LM and PEFT wrappers) and the root."""
        if decoder is None:
            return {""}
        name = next((n for n, m in self.model.named_modules() if m is decoder), None)
        if name is None:
            return {""}
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(len(parts))}

    @property
    def bytes(self) -> int:
        """Total bytes of the distinct saved storages (and checkpointed layer inputs)."""
        return sum(self.by_component.values())

    def _current(self) -> str:
        if not self._stack or self._stack[-1] in self._above_decoder:
            return "logits_loss"
        return component_of(self._stack[-1])

    def _count(self, tensor: torch.Tensor, component: str) -> None:
        key = _storage_key(tensor)
        if key in self._excluded or key in self._charged:
            return
        size = tensor.untyped_storage().nbytes()
        self._charged[key] = (component, size)
        self.by_component[component] += size

    def _charge_layer_input(self, tensor: torch.Tensor) -> None:
        """Charge a checkpointed layer's input to ``layer_inputs`` (checkpointing saves it before the layer runs,
        so it may already be charged to the module around the layer)."""
        key = _storage_key(tensor)
        if key in self._excluded:
            return
        if key in self._charged:
            component, size = self._charged[key]
            self.by_component[component] -= size
            del self._charged[key]
        self._count(tensor, "layer_inputs")

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._count(tensor, self._current())
        return tensor

    def _pre_hook(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._stack.append(name)
        if id(module) in self._layers and getattr(module, "gradient_checkpointing", False) and module.training:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if torch.is_tensor(hidden) and torch.is_grad_enabled():
                self._charge_layer_input(hidden)

    def _post_hook(self, name: str, *_: Any) -> None:
        if self._stack and self._stack[-1] == name:
            self._stack.pop()

    def __enter__(self) -> SavedBytesByComponent:
        for name, module in self.model.named_modules():
            self._handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, k, name=name: self._pre_hook(name, m, a, k), with_kwargs=True
                )
            )
            self._handles.append(
                module.register_forward_hook(lambda *x, name=name: self._post_hook(name, *x), always_call=True)
            )
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()
