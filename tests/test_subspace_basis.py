"""SubspaceBasis: the one home of the locked-subspace algebra (reduce, lift, project, delta, moments, files)."""

from __future__ import annotations

import pytest
import torch

from lockedopd.subspace import SubspaceBasis
from lockedopd.subspace.basis import change_moment_basis


def _orthonormal(n, r, seed):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


OUT, IN, R = 6, 8, 2


def test_captured_energy_known_values():
    V = _orthonormal(IN, R, 0)
    U = _orthonormal(OUT, R, 1)
    right = SubspaceBasis(V)
    inside = torch.randn(OUT, R, dtype=torch.float64) @ V.T
    e_in, e_all = right.captured_energy(inside)
    assert e_in / e_all == pytest.approx(1.0, abs=1e-12)
    outside = torch.randn(OUT, IN, dtype=torch.float64)
    outside = outside - outside @ V @ V.T
    e_in, e_all = right.captured_energy(outside)
    assert e_in / e_all == pytest.approx(0.0, abs=1e-12)
    mixed = inside / inside.norm() + outside / outside.norm()  # equal energy in and out
    e_in, e_all = right.captured_energy(mixed)
    assert e_in / e_all == pytest.approx(0.5, abs=1e-12)
    two = SubspaceBasis(V, U, "two_sided")
    two_sided = U @ torch.randn(R, R, dtype=torch.float64) @ V.T
    assert torch.allclose(two.project(two_sided), two_sided)
    e_in, _ = two.captured_energy(inside)  # rows of `inside` are not in span(U)
    assert e_in < float(inside.square().sum())


@pytest.mark.parametrize("mode", ["right", "two_sided"])
def test_reduce_is_the_adjoint_of_lift_and_project_is_a_projector(mode):
    basis = SubspaceBasis(_orthonormal(IN, R, 0), _orthonormal(OUT, R, 1), mode)
    gen = torch.Generator().manual_seed(2)
    G = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    c = torch.randn(*basis.coefficient_shape(OUT), generator=gen, dtype=torch.float64)
    # <G, lift(c)> = <reduce(G), c>
    assert float((G * basis.lift(c)).sum()) == pytest.approx(float((basis.reduce(G) * c).sum()), rel=1e-12)
    P = basis.project(G)
    torch.testing.assert_close(basis.project(P), P, atol=1e-12, rtol=0)
    assert float(((G - P) * P).sum()) == pytest.approx(0.0, abs=1e-10)  # orthogonal
    assert basis.coefficient_shape(OUT) == ((R, R) if mode == "two_sided" else (OUT, R))
    expected = R / IN * (R / OUT if mode == "two_sided" else 1.0)
    assert basis.random_baseline(OUT) == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["right", "two_sided"])
def test_delta_and_apply_agree_and_keep_dtype(mode):
    basis = SubspaceBasis(_orthonormal(IN, R, 0).float(), _orthonormal(OUT, R, 1).float(), mode)
    gen = torch.Generator().manual_seed(3)
    coef = torch.randn(*basis.coefficient_shape(OUT), generator=gen)
    x = torch.randn(5, IN, generator=gen)
    delta = basis.delta(coef)
    assert delta.shape == (OUT, IN) and delta.dtype == torch.float32
    torch.testing.assert_close(basis.apply(x, coef), x @ delta.T, atol=1e-5, rtol=1e-5)
    half = basis.delta(coef.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), delta, atol=3e-2, rtol=3e-2)


def test_moments_round_trip_on_coordinate_axes():
    V = torch.eye(IN, dtype=torch.float64)[:, [3, 0]]
    U = torch.eye(OUT, dtype=torch.float64)[:, [1, 4]]
    gen = torch.Generator().manual_seed(4)
    m, v = torch.randn(OUT, IN, generator=gen, dtype=torch.float64), torch.rand(OUT, IN, generator=gen).double()
    for mode in ("right", "two_sided"):
        basis = SubspaceBasis(V, U, mode)
        mr, vr = basis.reduce_moments(m, v, grad_scale=2.0)
        torch.testing.assert_close(mr, 2.0 * basis.reduce(m))
        torch.testing.assert_close(vr, 4.0 * basis.reduce(v))  # the bases select coordinates: exact
        ml, vl = basis.lift_moments(mr / 2.0, vr / 4.0)
        torch.testing.assert_close(ml, basis.project(m))
        torch.testing.assert_close(vl, basis.project(v))
    m2, v2 = change_moment_basis(m, v)
    assert torch.equal(m2, m) and torch.equal(v2, v)


def test_validation_errors_name_the_problem():
    V, U = _orthonormal(IN, R, 0), _orthonormal(OUT, R, 1)
    with pytest.raises(ValueError, match="two_sided' needs the left basis U"):
        SubspaceBasis(V, None, "two_sided")
    with pytest.raises(ValueError, match=r"lock mode; allowed values are \['right', 'two_sided'\]"):
        SubspaceBasis(V, U, "left")
    with pytest.raises(ValueError, match=r"'w': U has shape \(6, 3\), expected \(out_features, r\) = \(6, 2\)"):
        SubspaceBasis(V, _orthonormal(OUT, R + 1, 2)).validate("w", OUT, IN)
    with pytest.raises(ValueError, match=r"'w': V has shape \(8, 2\), expected \(in_features, r\) = \(9, 2\)"):
        SubspaceBasis(V, U).validate("w", OUT, 9)
    bad = V.clone()
    bad[:, 0] *= 1.1
    with pytest.raises(ValueError, match=r"'w\.V'.*orthonormal columns"):
        SubspaceBasis(bad, U).validate("w", OUT, IN)
    SubspaceBasis(V, U, "two_sided").validate("w", OUT, IN)
    assert SubspaceBasis.coerce((None, V)).mode == "right"
    assert SubspaceBasis.coerce((U, V)).mode == "two_sided"
    assert SubspaceBasis.coerce((U, V), "right").mode == "right"


def test_save_all_and_load_all_round_trip(tmp_path):
    bases = {"b": SubspaceBasis(_orthonormal(IN, R, 0).float(), _orthonormal(OUT, R, 1).float())}
    path = SubspaceBasis.save_all(tmp_path / "basis.safetensors", bases, {"step": 3})
    loaded, meta = SubspaceBasis.load_all(path, mode="two_sided")
    assert meta["step"] == "3" and meta["rank"] == str(R)
    assert loaded["b"].mode == "two_sided"
    assert torch.equal(loaded["b"].V, bases["b"].V) and torch.equal(loaded["b"].U, bases["b"].U)
    with pytest.raises(ValueError, match="carry no left basis U"):
        SubspaceBasis.save_all(tmp_path / "x.safetensors", {"b": SubspaceBasis(bases["b"].V)}, {"step": 0})
