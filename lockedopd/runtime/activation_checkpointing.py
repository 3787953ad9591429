"""Activation checkpointing of the student's decoder layers (``gradient_checkpointing: true``), in both phases.

Each decoder layer keeps only its input in the forward and recomputes its activations in the backward
(transformers' ``gradient_checkpointing_enable`` with non-reentrant ``torch.utils.checkpoint``): the attention and
MLP intermediates, most of a step's saved bytes after the vocabulary-sized ones, no longer wait for the backward,
at the cost of a second forward through every layer. Non-reentrant checkpointing sends gradients to the weights
inside a layer even when its input needs none, so the locked phase, whose embeddings are frozen, needs no
input-requires-grad workaround; transformers installs it anyway, which changes no value. The setting lives on the
layers, so it survives the lock: PEFT wraps the same modules.
"""

from __future__ import annotations

from torch import nn

__all__ = ["activation_checkpointing_enabled", "enable_activation_checkpointing"]


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute ``model``'s decoder-layer activations in the backward (non-reentrant), in training mode only.

    Args:
        model: a transformers causal LM, or a PEFT model wrapping one.

    Raises:
        ValueError: the model does not support gradient checkpointing (set ``gradient_checkpointing: false``).
    """
    base = _transformers_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient_checkpointing: {type(base).__name__} does not support activation checkpointing; set "
            "gradient_checkpointing=false."
        )
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def activation_checkpointing_enabled(model: nn.Module) -> bool:
    """Whether ``model`` (or the transformers model under its PEFT wrapper) checkpoints its decoder layers."""
    return bool(getattr(_transformers_model(model), "is_gradient_checkpointing", False))
