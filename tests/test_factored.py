"""FactoredSubspaceAdamW: projected W-space AdamW with a factored second moment, at coefficient size."""

from __future__ import annotations

import pytest
import torch

from lockedopd.lock.params import optimizer_state_bytes
from lockedopd.optim import FactoredSubspaceAdamW, WarmupCarry
from lockedopd.subspace.basis import SubspaceBasis
from tests.test_trainer import final_weights, read_metrics, run


def _basis(out_f, in_f, r, mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(torch.randn(in_f, r, generator=g, dtype=torch.float64))[0]
    U = torch.linalg.qr(torch.randn(out_f, r, generator=g, dtype=torch.float64))[0]
    return SubspaceBasis(V, U, mode)


@pytest.mark.parametrize("mode", ["right", "two_sided"])
def test_its_step_is_projected_w_space_adam_with_a_factored_second_moment(mode):
    """Reference: W-sized m_W and the row/column sums of g_W∘g_W (g_W = P(G)) kept explicitly; the step
    P(m̂_W ⊘ √(R̂·Ĉᵀ/ΣR̂)). The optimizer must take the same W-space steps from its small state."""
    out_f, in_f, r, lr, (b1, b2) = 7, 11, 3, 0.01, (0.9, 0.999)
    basis = _basis(out_f, in_f, r, mode)
    coef = torch.nn.Parameter(torch.zeros(basis.coefficient_shape(out_f), dtype=torch.float64))
    opt = FactoredSubspaceAdamW({"w": coef}, {"w": basis}, lr=lr, betas=(b1, b2), eps=0.0)
    m_w = torch.zeros(out_f, in_f, dtype=torch.float64)
    rows, cols, w = torch.zeros(out_f, dtype=torch.float64), torch.zeros(in_f, dtype=torch.float64), 0 * m_w
    g = torch.Generator().manual_seed(1)
    for t in range(1, 7):
        grad = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, in_f)
        coef.grad = basis.reduce(grad)
        opt.step()
        g_w = basis.project(grad)
        m_w = b1 * m_w + (1 - b1) * g_w
        rows, cols = b2 * rows + (1 - b2) * g_w.square().sum(1), b2 * cols + (1 - b2) * g_w.square().sum(0)
        v_hat = torch.outer(rows, cols) / rows.sum() / (1 - b2**t)
        w = w - lr * basis.project(m_w / (1 - b1**t) / v_hat.sqrt())
        assert torch.allclose(basis.delta(coef.detach()), w, rtol=0, atol=1e-12), t
    assert float(w.abs().max()) > 2 * lr  # it moved (six projected steps of about lr per W entry)


def test_its_state_is_coefficient_sized_and_counted():
    out_f, in_f, r = 96, 64, 8
    basis = _basis(out_f, in_f, r, "right")
    coef = torch.nn.Parameter(torch.zeros(out_f, r))
    opt = FactoredSubspaceAdamW({"w": coef}, {"w": basis}, lr=1e-3)
    coef.grad = torch.randn(out_f, r)
    opt.step()
    # m (out x r) + row sums (out) + column sums (in), float32, and the float32 step count
    assert optimizer_state_bytes(opt) == 4 * (out_f * r + out_f + in_f) + 4
    assert optimizer_state_bytes(opt) < 4 * out_f * in_f / 4  # a quarter of ONE W-sized Adam moment


def test_the_carry_holds_the_row_and_column_sums_and_round_trips(tmp_path):
    w = torch.nn.Parameter(torch.randn(6, 5))
    warmup = torch.optim.AdamW([w], lr=1e-2)
    for _ in range(3):
        w.grad = torch.randn(6, 5)
        warmup.step()
    v = warmup.state[w]["exp_avg_sq"]
    carry = WarmupCarry.from_optimizer(warmup, {"w": w}, {"w": _basis(6, 5, 2, "right").to(dtype=torch.float32)})
    assert torch.allclose(carry.row_sq["w"], v.sum(1)) and torch.allclose(carry.col_sq["w"], v.sum(0))
    back = WarmupCarry.load(carry.save(tmp_path / "c.safetensors"))
    assert torch.equal(back.row_sq["w"], carry.row_sq["w"]) and torch.equal(back.col_sq["w"], carry.col_sq["w"])
    coef = torch.nn.Parameter(torch.zeros(6, 2))
    opt = FactoredSubspaceAdamW.from_carry({"w": coef}, {"w": _basis(6, 5, 2, "right")}, back, lr=1e-2)
    assert float(opt.state[coef]["step"]) == 3.0 and torch.equal(opt.state[coef]["row_sq"], back.row_sq["w"])


def test_the_tiny_recipe_learns_and_resumes_exactly_with_the_factored_optimizer(tmp_path):
    summary = run(tmp_path / "ref", "save_steps=1", "lock.optimizer=factored")
    assert summary["lock_step"] == 6 and summary["lr_scale_median"] == 1.0
    assert summary["final_reverse_kl"] < summary["initial_reverse_kl"] - 0.2
    locked = [r for r in read_metrics(tmp_path / "ref") if r.get("phase") == "locked" and "optimizer_state_bytes" in r]
    full = [r for r in read_metrics(tmp_path / "ref") if r.get("phase") == "warmup" and "optimizer_state_bytes" in r]
    assert locked[-1]["optimizer_state_bytes"] < full[-1]["optimizer_state_bytes"] / 4
    run(tmp_path / "killed", "save_steps=1", "lock.optimizer=factored", kill_at=9)
    resumed = run(tmp_path / "killed", "save_steps=1", "lock.optimizer=factored", "resume=true")
    assert resumed["final_reverse_kl"] == summary["final_reverse_kl"]
    a, b = final_weights(tmp_path / "ref"), final_weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_relock_leaves_the_factored_phase_with_its_lifted_moments(tmp_path):
    relock = ("max_steps=16", "eval_steps=4", "monitor.on_drift=relock", "monitor.capture_threshold=0.99",
              "monitor.patience=1")  # fmt: skip
    summary = run(tmp_path, *relock, "lock.optimizer=factored")
    assert [e["event"] for e in summary["lock_events"]][:3] == ["lock", "relock-start", "lock"]
    assert summary["final_reverse_kl"] < summary["initial_reverse_kl"]
