"""Saved-for-backward bytes by component, and the live-tensor peak that ignores views of existing tensors."""

from __future__ import annotations

import pytest
import torch

from lockedopd.diagnostics.components import COMPONENTS, SavedBytesByComponent, component_of
from lockedopd.diagnostics.memory import PeakLiveBytes, SavedTensorBytes
from lockedopd.models import build_tiny_llama
from lockedopd.runtime.activation_checkpointing import enable_activation_checkpointing

VOCAB, LAYERS, HIDDEN, BATCH, LENGTH = 96, 2, 64, 3, 10


def _student():
    model = build_tiny_llama(VOCAB, num_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=128, num_heads=4, seed=0)
    model.train()
    return model


def _loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1).logsumexp(-1).square().mean()


def test_component_names():
    assert component_of("model.layers.3.self_attn.q_proj.base_layer") == "attention"
    assert component_of("base_model.model.model.layers.0.mlp.down_proj.locked_A") == "mlp"
    assert component_of("model.layers.0.input_layernorm") == "norms"
    assert component_of("model.norm") == "norms"
    assert component_of("model.embed_tokens") == "embeddings"
    assert component_of("lm_head") == "logits_loss"
    assert component_of("model.rotary_emb") == "other"


def test_components_add_up_to_the_saved_storages():
    model = _student()
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    with SavedTensorBytes(exclude=[*model.parameters(), *model.buffers()]) as plain:
        _loss(model, ids).backward()
    model.zero_grad(set_to_none=True)
    with SavedBytesByComponent(model) as saved:
        loss = _loss(model, ids)
    loss.backward()
    assert set(saved.by_component) == set(COMPONENTS)
    assert saved.bytes == plain.bytes
    assert saved.by_component["attention"] > 0 and saved.by_component["mlp"] > 0 and saved.by_component["norms"] > 0
    # the log-softmax's output, (B, L, V) float32, is saved by the loss (outside the decoder)
    assert saved.by_component["logits_loss"] >= BATCH * LENGTH * VOCAB * 4
    # SwiGLU keeps gate, silu(gate) and up per layer: (B, L, 128) float32 each
    assert saved.by_component["mlp"] >= LAYERS * 3 * BATCH * LENGTH * 128 * 4
    assert saved.by_component["layer_inputs"] == 0


def test_checkpointing_keeps_one_input_per_layer_and_nothing_inside():
    model = _student()
    enable_activation_checkpointing(model)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    with SavedBytesByComponent(model) as saved:
        loss = _loss(model, ids)
    loss.backward()
    assert saved.by_component["attention"] == 0 and saved.by_component["mlp"] == 0
    assert saved.by_component["layer_inputs"] == LAYERS * BATCH * LENGTH * HIDDEN * 4


def test_peak_live_bytes_does_not_count_views_of_existing_tensors():
    weight = torch.randn(256, 128)
    x = torch.randn(4, 128)
    with PeakLiveBytes() as live:
        y = x @ weight.t()  # the transpose is a view of the weight: no new memory
        z = y.view(2, 2, 256)  # a view of a new tensor: counted once
    assert live.peak_bytes == y.numel() * 4
    assert z.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_exit_removes_every_hook(checkpointing):
    model = _student()
    if checkpointing:
        enable_activation_checkpointing(model)
    before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with SavedBytesByComponent(model):
        pass
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == before
