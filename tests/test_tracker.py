"""SubspaceTracker and sketch helpers on synthetic update sequences with planted subspaces."""

import io
import warnings

import pytest
import torch
from torch import nn

from lockedopd.subspace import (
    SubspaceTracker,
    default_sketch_sizes,
    draw_test_matrices,
    exact_top_subspaces,
    reconstruct_top_subspaces,
    sketch_matrix,
    subspace_similarity,
)

R = 4  # tracked rank in these tests


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 24)
        self.a = nn.Linear(24, 30)
        self.b = nn.Linear(30, 36, bias=False)
        self.lm_head = nn.Linear(36, 10)


def orth(n, r, gen):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return q


def make_model(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def planted_update(module, u, v, scale, gen, noise=1e-6):
    """Add scale·U·(random r x r)·Vᵀ plus small Gaussian noise to module.weight."""
    r = u.shape[1]
    coeff = torch.randn(r, r, generator=gen, dtype=torch.float64)
    upd = scale * u @ coeff @ v.T + noise * torch.randn(u.shape[0], v.shape[0], generator=gen, dtype=torch.float64)
    with torch.no_grad():
        module.weight.add_(upd.to(module.weight.dtype))


def test_subspace_similarity_values():
    e = torch.eye(5, dtype=torch.float64)
    v1 = e[:, :2]
    v2 = torch.stack([e[:, 0], (e[:, 1] + e[:, 2]) / 2**0.5], dim=1)
    assert subspace_similarity(v1, v1) == pytest.approx(1.0)
    assert subspace_similarity(v1, e[:, 2:4]) == pytest.approx(0.0)
    assert subspace_similarity(v1, v2) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        subspace_similarity(v1, e[:, :3])


def test_sketch_is_exact_for_low_rank_matrix():
    gen = torch.Generator().manual_seed(1)
    a = orth(40, 3, gen) @ torch.diag(torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64)) @ orth(25, 3, gen).T
    k, ell = default_sketch_sizes(3, 40, 25)
    assert (k, ell) == (7, 15)
    omega, psi = draw_test_matrices(40, 25, k, ell, seed=3)
    y, z = sketch_matrix(a, omega, psi)
    est = reconstruct_top_subspaces(y, z, psi, rank=3)
    exact = exact_top_subspaces(a, 3)
    torch.testing.assert_close(est.S, exact.S, atol=1e-10, rtol=0)
    assert subspace_similarity(est.V, exact.V) == pytest.approx(1.0, abs=1e-10)
    assert subspace_similarity(est.U, exact.U) == pytest.approx(1.0, abs=1e-10)
    assert reconstruct_top_subspaces(torch.zeros_like(y), torch.zeros_like(z), psi, 3) is None
    y_chunked, z_chunked = sketch_matrix(a.float(), omega, psi, chunk_rows=7)
    y_full, z_full = a.float().double() @ omega, psi @ a.float().double()
    torch.testing.assert_close(y_chunked, y_full, atol=1e-12, rtol=0)
    torch.testing.assert_close(z_chunked, z_full, atol=1e-12, rtol=0)


def test_default_targets_exclude_lm_head_and_selection_modes():
    model = make_model()
    assert SubspaceTracker(model, rank=R).module_names == ["a", "b"]
    assert SubspaceTracker(model, target_modules=["b"], rank=R).module_names == ["b"]
    assert SubspaceTracker(model, target_modules=r"(a|lm_head)", rank=R).module_names == ["a", "lm_head"]
    with pytest.raises(ValueError):
        SubspaceTracker(model, target_modules=["nope"], rank=R)
    with pytest.raises(ValueError):
        SubspaceTracker(model, target_modules="(", rank=R)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": 0},
        {"rank": 2.5},
        {"threshold": 0.0},
        {"threshold": 1.5},
        {"patience": 0},
        {"check_every": 0},
        {"min_warmup_steps": -1},
        {"max_warmup_steps": 0},
        {"min_fraction": 2},
        {"sketch_size": 2},
        {"sketch_size": 9, "co_sketch_size": 5},
        {"seed": -1},
        {"target_modules": 3},
    ],
)
def test_invalid_arguments(kwargs):
    kwargs = {"rank": R, **kwargs}
    with pytest.raises(ValueError):
        SubspaceTracker(make_model(), **kwargs)


def test_observe_rejects_bad_steps():
    tracker = SubspaceTracker(make_model(), rank=R)
    with pytest.raises(ValueError):
        tracker.observe(0)
    tracker.observe(1)
    with pytest.raises(ValueError):
        tracker.observe(1)


def test_recovers_planted_subspace_and_stable_at_check_patience_plus_one():
    model = make_model()
    w0 = {n: model.get_submodule(n).weight.detach().double().clone() for n in ("a", "b")}
    tracker = SubspaceTracker(model, rank=R, check_every=1, patience=2, min_warmup_steps=0)
    gen = torch.Generator().manual_seed(0)
    planted = {
        n: (orth(m.out_features, R, gen), orth(m.in_features, R, gen)) for n, m in [("a", model.a), ("b", model.b)]
    }
    results = []
    for step in range(1, 6):
        for name, (u, v) in planted.items():
            planted_update(model.get_submodule(name), u, v, 1e-2, gen)
        results.append(tracker.observe(step))
    # check 1 has nothing to compare with; checks 2 and 3 are the two consecutive stable ones
    assert results == [False, False, True, True, True]
    assert tracker.stable and tracker.reason == "stable" and tracker.stable_step == 3
    assert len(tracker.history) == 3  # no checks after stability
    assert tracker.history[0]["median_similarity"] is None and tracker.history[0]["fraction_stable"] == 0.0
    assert tracker.history[1]["min_similarity"] > 0.99 and tracker.history[2]["fraction_stable"] == 1.0

    bases = tracker.bases()
    svals = tracker.singular_values()
    for name, (u_star, v_star) in planted.items():
        u, v = bases[name]
        assert u.dtype == torch.float32 and v.shape == (v_star.shape[0], R) and u.shape == (u_star.shape[0], R)
        torch.testing.assert_close(v.T @ v, torch.eye(R), atol=1e-5, rtol=0)
        assert subspace_similarity(v, v_star) > 0.99
        assert subspace_similarity(u, u_star) > 0.99
        delta = model.get_submodule(name).weight.detach().double() - w0[name]
        exact = exact_top_subspaces(delta, R).S
        torch.testing.assert_close(svals[name], exact, rtol=1e-2, atol=0)  # tail (noise) limits the smallest
        torch.testing.assert_close(svals[name][0], exact[0], rtol=1e-4, atol=0)


def _rotating_then_fixed(model, switch_step, gen, steps):
    """Updates in a fresh random subspace each step, 10x larger than the last, until switch_step; from then on
    a fixed planted subspace with a much larger scale."""
    fixed = {
        n: (orth(m.out_features, R, gen), orth(m.in_features, R, gen)) for n, m in [("a", model.a), ("b", model.b)]
    }
    for step in range(1, steps + 1):
        for name, module in [("a", model.a), ("b", model.b)]:
            if step < switch_step:
                u, v = orth(module.out_features, R, gen), orth(module.in_features, R, gen)
                planted_update(module, u, v, 1e-5 * 10**step, gen, noise=0.0)
            else:
                planted_update(module, *fixed[name], 10.0, gen, noise=0.0)
        yield step


def test_subspace_switch_delays_stability_until_switch_plus_patience():
    model = make_model()
    tracker = SubspaceTracker(model, rank=R, check_every=1, patience=2, min_warmup_steps=0)
    gen = torch.Generator().manual_seed(1)
    flags = [tracker.observe(s) for s in _rotating_then_fixed(model, 5, gen, 8)]
    assert flags == [False] * 6 + [True, True]
    assert tracker.stable_step == 7 and tracker.reason == "stable"
    sims = [h["median_similarity"] for h in tracker.history]
    assert all(s < 0.6 for s in sims[1:5])  # rotating phase, including the switch check at step 5
    assert sims[5] > 0.95 and sims[6] > 0.95
    assert [h["consecutive"] for h in tracker.history] == [0, 0, 0, 0, 0, 1, 2]


def test_min_warmup_steps_and_max_warmup_steps():
    model = make_model()
    tracker = SubspaceTracker(model, rank=R, check_every=1, patience=2, min_warmup_steps=6)
    gen = torch.Generator().manual_seed(2)
    u, v = orth(30, R, gen), orth(24, R, gen)
    flags = []
    for step in range(1, 8):
        planted_update(model.a, u, v, 1e-2, gen)
        planted_update(model.b, orth(36, R, gen), orth(30, R, gen), 1e-2, gen)  # b never stable
        flags.append(tracker.observe(step))
    assert not any(flags)  # only half the matrices stable < min_fraction 0.9
    tracker2 = SubspaceTracker(model, rank=R, check_every=1, patience=2, min_warmup_steps=6, min_fraction=0.5)
    flags = []
    for step in range(1, 8):
        planted_update(model.a, u, v, 1e-2, gen)
        flags.append(tracker2.observe(step))
    assert flags == [False] * 5 + [True, True] and tracker2.stable_step == 6

    model = make_model()
    tracker = SubspaceTracker(model, rank=R, check_every=2, max_warmup_steps=5)
    gen = torch.Generator().manual_seed(3)
    flags = [tracker.observe(s) for s in _rotating_then_fixed(model, 100, gen, 5)]
    assert flags == [False] * 4 + [True]
    assert tracker.reason == "max_warmup_steps" and tracker.stable_step == 5 and len(tracker.history) == 2


def test_zero_and_nonfinite_updates_do_not_crash():
    model = make_model()
    tracker = SubspaceTracker(model, rank=R, check_every=1, min_warmup_steps=0, min_fraction=0.5)
    for step in range(1, 4):
        assert tracker.observe(step) is False
    assert all(h["n_zero_update"] == 2 and h["fraction_stable"] == 0.0 for h in tracker.history)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tracker.bases() == {}
    assert caught
    gen = torch.Generator().manual_seed(4)
    u, v = orth(30, R, gen), orth(24, R, gen)
    with torch.no_grad():
        model.b.weight[0, 0] = float("nan")
    for step in range(4, 7):
        planted_update(model.a, u, v, 1e-2, gen)
        tracker.observe(step)
    assert [h["n_zero_update"] for h in tracker.history[3:]] == [1, 1, 1]
    assert tracker.stable_step == 6  # only 'a' is stable: fraction 0.5 >= min_fraction at checks 5 and 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(tracker.bases()) == ["a"]


def test_state_dict_round_trip_continues_identically():
    model = make_model()
    gen = torch.Generator().manual_seed(5)
    steps = _rotating_then_fixed(model, 4, gen, 9)
    tracker = SubspaceTracker(model, rank=R, check_every=1, patience=3, min_warmup_steps=0)
    for _ in range(4):
        tracker.observe(next(steps))
    buf = io.BytesIO()
    torch.save(tracker.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = SubspaceTracker(model, rank=R, check_every=1, patience=3, min_warmup_steps=0)  # built on W_4, not W_0
    resumed.load_state_dict(state)
    for step in steps:
        assert tracker.observe(step) == resumed.observe(step)
    # decisions identical; similarities equal up to BLAS rounding (results can differ in the last ulp)
    assert resumed.stable_step == tracker.stable_step == 7 and len(resumed.history) == len(tracker.history) == 7
    for h_resumed, h_ref in zip(resumed.history, tracker.history):
        assert h_resumed.keys() == h_ref.keys()
        for key, value in h_ref.items():
            assert h_resumed[key] == (
                value if value is None or isinstance(value, int) else pytest.approx(value, abs=1e-12)
            )
    for name, (u, v) in tracker.bases().items():
        torch.testing.assert_close(v, resumed.bases()[name][1], atol=1e-6, rtol=0)
        torch.testing.assert_close(u, resumed.bases()[name][0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        SubspaceTracker(model, rank=R, seed=1).load_state_dict(state)


def test_memory_is_sketch_sized_and_below_fp32_copy():
    model = nn.Sequential(nn.Linear(256, 192), nn.Linear(192, 256))
    tracker = SubspaceTracker(model, rank=R, check_every=1)
    k, ell = 2 * R + 1, 2 * (2 * R + 1) + 1
    sketch = 8 * ((192 * k + ell * 256) + (256 * k + ell * 192))
    assert tracker.memory_bytes() == sketch
    assert tracker.fp32_copy_bytes() == 4 * 2 * 256 * 192
    with torch.no_grad():
        for m in model:
            m.weight.add_(1e-3)
    tracker.observe(1)  # adds the previous V bases (in x r float64 each)
    assert tracker.memory_bytes() == sketch + 8 * R * (256 + 192)
    assert tracker.memory_bytes() < 0.3 * tracker.fp32_copy_bytes()


def test_save_basis_writes_loadable_file(tmp_path):
    from lockedopd.subspace.basis_io import load_basis

    model = make_model()
    tracker = SubspaceTracker(model, rank=R, check_every=1)
    gen = torch.Generator().manual_seed(6)
    planted_update(model.a, orth(30, R, gen), orth(24, R, gen), 1e-2, gen)
    planted_update(model.b, orth(36, R, gen), orth(30, R, gen), 1e-2, gen)
    tracker.observe(1)
    meta = tracker.save_basis(tmp_path / "basis.safetensors")
    bases, file_meta = load_basis(tmp_path / "basis.safetensors")
    assert sorted(bases) == ["a", "b"] and bases["b"][0].shape == (36, R) and bases["b"][1].shape == (30, R)
    assert file_meta["step"] == "1" and file_meta["rank"] == str(R) and meta["reason"] == "not_stable"
