"""Known-answer tests for the pure per-matrix metrics in lockedopd.diagnostics.geometry."""

import math

import pytest
import torch

from lockedopd.diagnostics import geometry as G


def _orth(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q


def _rand(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def test_identical_matrices():
    w = _rand((40, 30), 0)
    assert G.bf16_sparsity(w, w.clone()) == 1.0
    assert G.update_density(w, w.clone()) == 0.0
    assert G.normalized_spectral_shift(w, w.clone()) == 0.0
    ang = G.principal_angles_deg(w, w.clone(), k=10)
    assert ang["max"] < 1e-6 and ang["mean"] < 1e-6
    assert G.stable_rank(w - w) is None
    assert G.hill_alpha(w - w) is None


def test_double_matrix_nss_exactly_one_and_no_rotation():
    w0 = _rand((50, 40), 1)
    w1 = 2 * w0
    assert abs(G.normalized_spectral_shift(w0, w1) - 1.0) < 1e-12
    ang = G.principal_angles_deg(w0, w1, k=10)
    assert ang["max"] < 1e-6


def test_degenerate_spectrum_uses_subspace():
    # all singular values equal: the top-k subspace is ill-defined for k < n; the tie is extended
    q = _orth(30, 30, 2)
    w0 = 3.0 * q
    w1 = 2 * w0
    ang = G.principal_angles_deg(w0, w1, k=8)
    assert ang["k"] == 30
    assert ang["max"] < 1e-6
    # partial degeneracy inside the top-k (not at the cut-off) keeps k
    s = torch.tensor([5.0, 5.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    u, v = _orth(20, 8, 3), _orth(12, 8, 4)
    w0 = (u * s) @ v.T
    ang = G.principal_angles_deg(w0, 2 * w0, k=4)
    assert ang["k"] == 4 and ang["max"] < 1e-6


@pytest.mark.parametrize("theta_deg", [0.05, 1.0, 17.0, 60.0])
def test_rotation_of_one_singular_vector(theta_deg):
    n_out, n_in, k = 32, 24, 6
    u, v = _orth(n_out, n_out, 5), _orth(n_in, n_in, 6)
    s = torch.linspace(10.0, 1.0, n_in, dtype=torch.float64)  # distinct
    w0 = (u[:, :n_in] * s) @ v.T
    th = math.radians(theta_deg)
    u1 = u.clone()
    j, m = 2, 20  # rotate u_j (inside top-k) toward u_m (outside)
    u1[:, j] = math.cos(th) * u[:, j] + math.sin(th) * u[:, m]
    u1[:, m] = -math.sin(th) * u[:, j] + math.cos(th) * u[:, m]
    w1 = (u1[:, :n_in] * s) @ v.T
    ang = G.principal_angles_deg(w0, w1, k=k)
    assert ang["k"] == k
    assert abs(ang["max"] - theta_deg) < 1e-3
    assert abs(ang["mean"] - theta_deg / k) < 1e-3
    assert G.normalized_spectral_shift(w0, w1) < 1e-12


def test_principal_angles_from_bases_small_angle_accuracy():
    q = _orth(10, 10, 7)
    th = 1e-7
    q1 = q[:, :3].clone()
    q1[:, 0] = math.cos(th) * q[:, 0] + math.sin(th) * q[:, 5]
    ang = G.principal_angles_from_bases(q[:, :3], q1)
    assert abs(float(ang.max()) - th) < 1e-12


def test_rank_r_update_equal_singular_values():
    r = 5
    u, v = _orth(40, r, 8), _orth(30, r, 9)
    delta = 0.7 * u @ v.T
    assert abs(G.stable_rank(delta) - r) < 1e-9
    assert G.hill_alpha(delta, k=16) is None  # flat top spectrum: alpha -> infinity


def test_stable_rank_and_hill_known_spectrum():
    sv = torch.tensor([math.e**2, math.e, 1.0], dtype=torch.float64)
    u, v = _orth(12, 3, 10), _orth(9, 3, 11)
    delta = (u * sv) @ v.T
    expected_sr = float((sv**2).sum() / sv[0] ** 2)
    assert abs(G.stable_rank(delta) - expected_sr) < 1e-9
    # mean log ratio over k=3: (2 + 1) / 2 = 1.5
    assert abs(G.hill_alpha(delta, k=3) - 1 / 1.5) < 1e-9
    # k=2: log(e^2/e) = 1
    assert abs(G.hill_alpha(delta, k=2) - 1.0) < 1e-9
    assert G.hill_alpha_from_singular_values(torch.tensor([1.0]), k=16) is None


def test_bf16_eta_semantics():
    w0 = torch.ones(4, 4)
    w1 = w0.clone()
    w1[0, 0] = 1.0 + 2**-7  # one bf16 ulp at 1.0 (0.0078 relative) -> changed for eta=1e-3
    w1[1, 1] = 1.0 + 1e-5  # invisible in bf16
    assert G.bf16_sparsity(w0, w1, eta=1e-3) == 15 / 16
    assert G.update_density(w0, w1) == 1 / 16
    assert G.bf16_sparsity(w0, w1, eta=0.01) == 1.0  # within eta -> unchanged
    assert int(G.bf16_changed_mask(w0, w1, eta=1e-3).sum()) == 1


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_exact_masks_count_with_ties(alpha):
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0], [0.0, 0.0, 3.0, 3.0, 3.0]])
    m = round(alpha * x.numel())
    top = G.exact_top_mask(x, alpha)
    bot = G.exact_bottom_mask(x, alpha)
    assert int(top.sum()) == m and int(bot.sum()) == m
    if 0 < m < x.numel():
        assert float(x[top].min()) >= float(x[~top].max())
        assert float(x[bot].max()) <= float(x[~bot].min())


def test_overlap_one_on_low_and_principal_masks():
    w0 = _rand((30, 20), 12)
    alpha = 0.3
    low = G.low_magnitude_mask(w0, alpha)
    assert int(low.sum()) == round(alpha * w0.numel())
    w1 = w0.clone()
    w1[low] += 0.5
    upd = G.bf16_changed_mask(w0, w1)
    assert torch.equal(upd, low)
    assert G.overlap_fraction(low, upd) == 1.0
    pm = G.principal_mask(w0, rank=4, alpha=alpha)
    assert G.overlap_fraction(pm, upd) == pytest.approx(int((pm & low).sum()) / int(low.sum()))
    w2 = w0.clone()
    w2[pm] *= 1.5
    upd2 = G.bf16_changed_mask(w0, w2)
    assert G.overlap_fraction(pm, upd2) == 1.0
    assert G.overlap_fraction(pm, torch.zeros_like(pm)) is None


def test_principal_mask_is_top_of_low_rank_reconstruction():
    u, v = _orth(16, 2, 13), _orth(10, 2, 14)
    w0 = (u * torch.tensor([5.0, 3.0], dtype=torch.float64)) @ v.T
    pm = G.principal_mask(w0, rank=2, alpha=0.25)  # rank-2 reconstruction == w0
    assert torch.equal(pm, G.exact_top_mask(w0.abs(), 0.25))


def test_subspace_similarity():
    q = _orth(20, 8, 15)
    assert G.subspace_similarity(q[:, :4], q[:, :4]) == pytest.approx(1.0)
    assert G.subspace_similarity(q[:, :4], q[:, [0, 1, 6, 7]]) == pytest.approx(0.5)
    assert G.subspace_similarity(q[:, :4], q[:, 4:8]) == pytest.approx(0.0, abs=1e-12)
    assert G.subspace_similarity(q[:, :2], q[:, :4]) == pytest.approx(0.5)  # divided by max(K_a, K_b)
    assert G.subspace_similarity(q[:, :0], q[:, :4]) is None


def test_inputs_not_modified():
    w0 = _rand((12, 10), 16, torch.float64)
    w1 = w0 + 0.1 * _rand((12, 10), 17, torch.float64)
    c0, c1 = w0.clone(), w1.clone()
    G.low_magnitude_mask(w0, 0.3)
    G.principal_mask(w0, 4, 0.3)
    G.bf16_unchanged_mask(w0, w1)
    G.principal_angles_deg(w0, w1, k=4)
    G.stable_rank(w1 - w0)
    assert torch.equal(w0, c0) and torch.equal(w1, c1)
