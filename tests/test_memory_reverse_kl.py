"""The exact reverse KL saves only its inputs and makes its temporaries in blocks; same values and gradients."""

from __future__ import annotations

import pytest
import torch

import lockedopd.opd.objectives as obj
from lockedopd.diagnostics.memory import PeakLiveBytes, SavedTensorBytes


def _plain(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (s.exp() * (s - t)).sum(-1)


def _inputs(dtype, seed=0, shape=(3, 7, 50)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    teacher = torch.log_softmax(torch.randn(*shape, generator=g, dtype=dtype) * 2, -1).requires_grad_()
    weights = torch.randn(*shape[:-1], generator=g, dtype=dtype)
    return logits, teacher, weights


@pytest.mark.parametrize("block", [100, 1 << 22], ids=["many-blocks", "one-block"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_values_and_gradients_equal_the_plain_expression(monkeypatch, block, dtype, tol):
    monkeypatch.setattr(obj, "KL_BLOCK_ELEMENTS", block)
    logits, teacher, weights = _inputs(dtype)
    lean = (obj.reverse_kl_per_token(torch.log_softmax(logits, -1), teacher) * weights).sum()
    lean_grads = torch.autograd.grad(lean, [logits, teacher])
    plain = (_plain(torch.log_softmax(logits, -1), teacher) * weights).sum()
    plain_grads = torch.autograd.grad(plain, [logits, teacher])
    assert float(lean) == pytest.approx(float(plain), abs=tol)
    for a, b in zip(lean_grads, plain_grads, strict=True):
        assert float((a - b).abs().max()) <= tol
    with torch.no_grad():
        s = torch.log_softmax(logits, -1)
        assert float((obj.reverse_kl_per_token(s, teacher) - _plain(s, teacher)).abs().max()) <= tol


def test_broadcast_inputs_fall_back_to_the_plain_expression():
    logits, teacher, _ = _inputs(torch.float64)
    s = torch.log_softmax(logits, -1)
    out = obj.reverse_kl_per_token(s, teacher[:1])
    assert torch.allclose(out, _plain(s, teacher[:1]))


def test_saves_nothing_but_its_inputs_and_holds_one_block():
    rows, vocab = 64, 4096
    one_copy = rows * vocab * 4
    logits = torch.randn(1, rows, vocab, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(1, rows, vocab), -1)
    s = torch.log_softmax(logits, -1)
    peaks = {}
    for name, fn in (("lean", obj.reverse_kl_per_token), ("plain", _plain)):
        with SavedTensorBytes(exclude=[s, teacher]) as saved, PeakLiveBytes() as live:
            loss = fn(s, teacher).sum()
            (grad,) = torch.autograd.grad(loss, [s])
        peaks[name] = (saved.bytes, live.peak_bytes)
        del grad
    # autograd of the plain expression saves exp(s) and s - t; the lean one saves only s and t (excluded here)
    assert peaks["plain"][0] >= 2 * one_copy
    assert peaks["lean"][0] < 1024
    # the lean one holds its gradient plus one block of temporaries (16 MiB > one copy here, so at most 2 copies)
    assert peaks["lean"][1] <= 2 * one_copy + 4096
    assert peaks["plain"][1] >= 3 * one_copy
