"""TrajectoryMonitor math, and the drift actions inside a locked run."""

import json

import pytest
import torch

from lockedopd.diagnostics.monitor import TrajectoryMonitor
from tests.test_trainer import read_metrics, run


def _orthonormal(n, r, seed):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_monitor_cosines_and_drift_patience():
    V = _orthonormal(8, 2, 0)
    monitor = TrajectoryMonitor(every=1, capture_threshold=0.9, patience=2)
    grad = torch.randn(4, 2, dtype=torch.float64) @ V.T  # fully captured
    check = monitor.measure(1, {"w": grad}, {"w": -grad}, {"w": (None, V)})
    assert check["captured_energy"] == pytest.approx(1.0)
    assert check["cosine_to_gradient"] == pytest.approx(1.0)
    assert check["random_baseline"] == pytest.approx(2 / 8)
    assert not check["drift"]
    off = torch.randn(4, 8, dtype=torch.float64)
    off = off - off @ V @ V.T
    assert not monitor.measure(2, {"w": off}, {"w": off}, {"w": (None, V)})["drift"]
    third = monitor.measure(3, {"w": off}, {"w": off}, {"w": (None, V)})
    assert third["drift"] and third["cosine_to_gradient"] == pytest.approx(-1.0)
    assert monitor.summary()["drift_events"] == [3]
    assert monitor.summary()["captured_energy_mean"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="capture_threshold"):
        TrajectoryMonitor(capture_threshold=2.0)
    with pytest.raises(ValueError, match="capture_threshold"):
        TrajectoryMonitor(capture_threshold="sometimes")


def test_auto_threshold_is_relative_to_the_random_baseline():
    monitor = TrajectoryMonitor(every=1, capture_threshold="auto", patience=1)
    assert monitor.threshold_for(0.025) == pytest.approx(0.125)
    assert monitor.threshold_for(0.5) == 1.0
    V = _orthonormal(64, 2, 0)  # random baseline 2/64, threshold 5 x 2/64 = 0.15625
    grad = torch.randn(4, 2, dtype=torch.float64) @ V.T
    off = torch.randn(4, 64, dtype=torch.float64)
    off = off - off @ V @ V.T
    for share, drift in ((0.2, False), (0.1, True)):
        mixed = grad / grad.norm() * share**0.5 + off / off.norm() * (1 - share) ** 0.5
        check = monitor.measure(1, {"w": mixed}, {"w": mixed}, {"w": (None, V)})
        assert check["threshold"] == pytest.approx(5 * 2 / 64)
        assert check["captured_energy"] == pytest.approx(share)
        assert check["drift"] is drift


def test_locked_run_writes_trajectory_report(tmp_path):
    run(tmp_path / "ref", "lock.enabled=false", "max_steps=8", "eval_steps=0")
    run(tmp_path / "locked", "max_steps=8", "eval_steps=0", "lock.at_step=4", f"reference_run={tmp_path / 'ref'}")
    report = json.loads((tmp_path / "locked" / "trajectory.json").read_text())
    assert report["lock_step"] == 4
    assert [c["step"] for c in report["checks"]] == [6, 8]
    assert 0.0 < report["captured_energy_mean"] <= 1.0
    assert report["captured_energy_random_baseline"] == pytest.approx(
        (6 * 4 / 32 + 4 / 64) / 7
    )  # r / in: q,k,v,o,gate,up read 32, down 64
    assert report["verdict"] in ("matches", "drifted")
    for key in ("reference_final_reverse_kl", "kl_gap_ratio", "kl_gain_share", "final_update_similarity"):
        assert key in report, key
    assert 0.0 < report["final_update_similarity"] <= 1.0
    assert (tmp_path / "locked" / "trajectory.png").is_file()
    monitored = [r for r in read_metrics(tmp_path / "locked") if "monitor_captured_energy" in r]
    assert [r["step"] for r in monitored] == [6, 8]


@pytest.mark.parametrize("action, phases_after", [("unlock", {"full"}), ("relock", {"warmup", "locked"})])
def test_drift_actions(tmp_path, action, phases_after):
    overrides = [
        "max_steps=12",
        "eval_steps=0",
        "lock.at_step=null",
        "lock.max_warmup_steps=3",
        "monitor.every=1",
        "monitor.patience=1",
        "monitor.capture_threshold=1.0",
        f"monitor.on_drift={action}",
    ]
    summary = run(tmp_path, *overrides)
    records = read_metrics(tmp_path)
    drift_step = next(r["step"] for r in records if r.get("drift"))
    assert drift_step == 4  # locked after step 3, first check at step 4 cannot capture 100%
    after = {r["phase"] for r in records if r["step"] > drift_step}
    assert after <= phases_after and after
    events = [e["event"] for e in summary["lock_events"]]
    assert events[:2] == ["lock", "relock-start" if action == "relock" else "unlock"]
    if action == "relock":
        assert events.count("lock") >= 2  # a fresh basis was locked again


def test_predicted_progress_share_accumulates_first_order_decreases():
    V = torch.linalg.qr(torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    monitor = TrajectoryMonitor(every=1, capture_threshold=0.0, patience=1, eps=0.0)
    grad = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lr = 1e-3
    reference = -lr * grad.sign()  # the fresh-AdamW step with eps = 0
    # a locked step that is exactly half the reference step: it buys half the first-order decrease
    check = monitor.measure(1, {"w": grad}, {"w": 0.5 * reference}, {"w": (None, V)}, reference_lr=lr)
    assert check["reference_decrease"] == pytest.approx(lr * float(grad.abs().sum()))
    assert check["predicted_decrease"] == pytest.approx(0.5 * check["reference_decrease"])
    # a second check whose locked step goes uphill by a quarter of the reference: accumulated (0.5 - 0.25) / 2
    monitor.measure(2, {"w": grad}, {"w": -0.25 * reference}, {"w": (None, V)}, reference_lr=lr)
    assert monitor.summary()["predicted_progress_share"] == pytest.approx(0.125)
    assert TrajectoryMonitor().summary()["predicted_progress_share"] is None


def test_predicted_progress_share_ranks_locked_runs_like_their_measured_share(tmp_path):
    """Tiny recipe (lock at step 6, 12 steps): the monitor's predicted share orders the right-sided lock, the
    two-sided lock, plain AdamW on the coefficients (lr_scale=1) and a random basis (all with lock.optimizer=
    coefficients, the per-coefficient Adam whose lr scale is under test) as their measured shares of full
    OPD's post-lock gain do (measured: 0.86, 0.79, 0.64, 0.15; predicted 0.24, 0.17, 0.11, 0.04); the captured
    gradient energy alone does not (lr_scale=1 captures as much as the right-sided lock)."""
    # rollout.seeding=batch: the sampling these shares were measured with (tiny.yaml's per-prompt streams draw other
    # samples; on 12 tiny steps plain and random then land within noise of each other)
    full = run(tmp_path / "full", "lock.enabled=false", "eval_steps=6", "rollout.seeding=batch")
    kl_lock = next(r["eval_reverse_kl"] for r in read_metrics(tmp_path / "full") if r["step"] == 6)
    methods = {"right": [], "two_sided": ["lock.mode=two_sided"], "plain": ["lock.lr_scale=1"]}
    methods["random"] = ["lock.basis_source=random"]
    measured, predicted = {}, {}
    for name, overrides in methods.items():
        summary = run(
            tmp_path / name,
            "monitor.every=1",
            "eval_steps=6",
            "lock.optimizer=coefficients",
            "rollout.seeding=batch",
            *overrides,
        )
        measured[name] = (kl_lock - summary["final_reverse_kl"]) / (kl_lock - full["final_reverse_kl"])
        predicted[name] = summary["monitor"]["predicted_progress_share"]
    order = sorted(methods, key=measured.get, reverse=True)
    assert order == ["right", "two_sided", "plain", "random"], measured
    assert sorted(methods, key=predicted.get, reverse=True) == order, predicted
    assert predicted["random"] < 0.25 * predicted["right"]


def test_next_batch_share_does_not_credit_a_step_that_fits_the_checked_batch_noise():
    """A locked step that fits only batch t's noise buys first-order decrease on batch t (in sample) and none on the
    next batch, whose noise is independent: the same-batch estimate credits it, the next-batch one does not."""
    V = _orthonormal(8, 3, 0)  # the subspace: directions v0, v1, v2
    signal = torch.outer(torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=torch.float64), V[:, 0])
    noise_t = torch.outer(torch.tensor([3.0, 1.0, -1.0, 2.0], dtype=torch.float64), V[:, 1])
    outside = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    noise_next = outside - outside @ V @ V.T  # batch t+1's noise: outside the subspace
    lr = 1e-2
    monitor = TrajectoryMonitor(every=2, capture_threshold=0.0, patience=1)
    bases = {"w": (None, V)}
    assert not monitor.wants_gradient(1) and monitor.wants_gradient(2) and not monitor.wants_gradient(3)
    check = monitor.measure(2, {"w": signal + noise_t}, {"w": -lr * noise_t}, bases, reference_lr=lr)
    assert check["predicted_decrease"] == pytest.approx(lr * float(noise_t.square().sum()))  # credited in sample
    assert monitor.wants_gradient(3)  # the follow-up step takes the unconstrained gradient too
    grad_next = signal + noise_next
    scored = monitor.measure_next_batch(3, {"w": grad_next}, bases)
    assert scored["step"] == 2
    assert scored["next_batch_predicted_decrease"] == pytest.approx(0.0, abs=1e-12)  # ⟨−G_{t+1}, −lr·N_t⟩ = 0
    sign_t = (signal + noise_t).sign()
    assert scored["next_batch_reference_decrease"] == pytest.approx(lr * float((grad_next * sign_t).sum()))
    assert not monitor.wants_gradient(3)  # scored once
    # a step along the signal keeps its credit out of sample: share = ⟨S, S⟩·lr / reference
    monitor.measure(4, {"w": signal + noise_t}, {"w": -lr * signal}, bases, reference_lr=lr)
    second = monitor.measure_next_batch(5, {"w": grad_next}, bases)
    assert second["next_batch_predicted_decrease"] == pytest.approx(lr * float(signal.square().sum()))
    summary = monitor.summary()
    total_reference = scored["next_batch_reference_decrease"] + second["next_batch_reference_decrease"]
    assert summary["next_batch_progress_share"] == pytest.approx(lr * float(signal.square().sum()) / total_reference)
    assert summary["next_batch_checks"] == 2 and summary["predicted_progress_share"] > 0
    # a step that does not follow its check directly scores nothing (the check is dropped)
    monitor.measure(6, {"w": signal}, {"w": -lr * signal}, bases, reference_lr=lr)
    assert monitor.measure_next_batch(8, {"w": grad_next}, bases) is None and not monitor.wants_gradient(7)


def test_a_check_awaiting_its_next_batch_survives_a_checkpoint_round_trip():
    V = _orthonormal(8, 2, 1)
    grad = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grad_next = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    step = -1e-3 * (grad @ V @ V.T)
    bases = {"w": (None, V)}
    live = TrajectoryMonitor(every=2)
    live.measure(2, {"w": grad}, {"w": step}, bases, reference_lr=1e-3)
    restored = TrajectoryMonitor(every=2)
    restored.load_state_dict(json.loads(json.dumps(live.state_dict())), live.pending_tensors())
    assert restored.wants_gradient(3)
    after_resume = restored.measure_next_batch(3, {"w": grad_next}, bases)
    assert after_resume == live.measure_next_batch(3, {"w": grad_next}, bases)
    assert after_resume["next_batch_predicted_decrease"] != 0.0
    with pytest.raises(ValueError, match=r"step-2 check awaits its next-batch score.*incomplete"):
        fresh = TrajectoryMonitor(every=2)
        fresh.measure(2, {"w": grad}, {"w": step}, bases, reference_lr=1e-3)
        TrajectoryMonitor(every=2).load_state_dict(fresh.state_dict())


def test_locked_run_scores_each_check_on_the_next_batch_and_the_monitor_only_observes(tmp_path):
    """Tiny recipe (lock at 6, checks every 2 steps): steps 9 and 11 score checks 8 and 10 on their own batches;
    the run with the monitor trains exactly the run without it."""
    watched = run(tmp_path / "watched", "eval_steps=4")
    plain = run(tmp_path / "plain", "eval_steps=4", "monitor.enabled=false")
    assert watched["final_reverse_kl"] == plain["final_reverse_kl"]
    rows = {r["step"]: r for r in read_metrics(tmp_path / "watched")}
    assert [s for s, r in rows.items() if "monitor_scored_step" in r] == [9, 11]
    assert rows[9]["monitor_scored_step"] == 8 and "monitor_captured_energy" not in rows[9]
    monitor = watched["monitor"]
    scored = [rows[s] for s in (9, 11)]
    expected = sum(r["monitor_next_batch_predicted_decrease"] for r in scored) / sum(
        r["monitor_next_batch_reference_decrease"] for r in scored
    )
    assert monitor["next_batch_checks"] == 2 and monitor["next_batch_progress_share"] == pytest.approx(expected)
    report = json.loads((tmp_path / "watched" / "trajectory.json").read_text())
    assert report["next_batch_progress_share"] == pytest.approx(expected)
