"""LockedAdamW: exact AdamW in coefficient mode, subspace-confined projected mode, moment transfer, resume."""

import io

import pytest
import torch

from lockedopd.optim import LockedAdamW, WarmupCarry, change_moment_basis, project_adam_moments
from lockedopd.subspace import SubspaceBasis

OUT, IN, RANK = 6, 5, 2
HP = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.05}


def orth(n, r, gen):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return q.float()


def grads(n, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


def run(opt, params, grad_lists):
    for step_grads in zip(*grad_lists):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def test_coefficient_mode_matches_torch_adamw():
    gen = torch.Generator().manual_seed(0)
    init = [
        torch.randn(OUT, RANK, generator=gen),
        torch.randn(RANK, RANK, generator=gen),
        torch.randn(4, generator=gen),
    ]
    ours = [t.clone().requires_grad_() for t in init]
    ref = [t.clone().requires_grad_() for t in init]
    gl = [grads(6, t.shape, seed=i) for i, t in enumerate(init)]
    run(LockedAdamW(ours, **HP), ours, gl)
    run(torch.optim.AdamW(ref, foreach=False, **HP), ref, gl)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
        assert torch.equal(a, b)  # same arithmetic as torch's single-tensor AdamW
        assert not torch.equal(a, torch.zeros_like(a))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("projection", ["right", "two_sided"])
def test_projected_update_stays_in_subspace(projection, dtype):
    gen = torch.Generator().manual_seed(1)
    U, V = orth(OUT, RANK, gen).to(dtype), orth(IN, RANK, gen).to(dtype)
    if dtype == torch.float64:  # re-orthonormalize in float64
        U, V = torch.linalg.qr(U)[0], torch.linalg.qr(V)[0]
    w0 = torch.randn(OUT, IN, generator=gen).to(dtype)
    w = w0.clone().requires_grad_()
    opt = LockedAdamW([{"params": [w], "basis": [(U, V)], "projection": projection}], **HP)
    run(opt, [w], [[g.to(dtype) for g in grads(5, (OUT, IN), seed=2)]])
    delta = (w - w0).detach()
    inside = delta @ V @ V.T if projection == "right" else U @ U.T @ delta @ V @ V.T
    assert delta.norm() > 1e-2
    # float64: exact to rounding; float32: W itself is rounded to ~1e-7 per entry and step
    assert (delta - inside).norm() < (1e-12 if dtype == torch.float64 else 5e-6)
    U, V, w0 = U.float(), V.float(), w0.float()
    # Adam on the projected *gradient* leaves the subspace: the reason the update itself is projected
    naive = w0.clone().requires_grad_()
    run(torch.optim.AdamW([naive], foreach=False, **HP), [naive], [[g @ V @ V.T for g in grads(5, (OUT, IN), seed=2)]])
    naive_delta = (naive - w0).detach()
    assert (naive_delta - naive_delta @ V @ V.T).norm() > 1e-2


@pytest.mark.parametrize("projection", ["right", "two_sided"])
def test_identity_basis_equals_adamw(projection):
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(OUT, IN, generator=gen)
    w, ref = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    opt = LockedAdamW([w], projection=projection, **HP)
    opt.set_basis(w, torch.eye(IN), U=torch.eye(OUT))
    gl = [grads(6, (OUT, IN), seed=4)]
    run(opt, [w], gl)
    run(torch.optim.AdamW([ref], foreach=False, **HP), [ref], gl)
    torch.testing.assert_close(w, ref, atol=1e-7, rtol=0)
    assert torch.equal(w, ref)  # in fact bit-identical
    assert opt.state[w]["exp_avg"].shape == (OUT, IN)


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bitwise_identical(dtype):
    gen = torch.Generator().manual_seed(5)
    U, V = orth(OUT, RANK, gen), orth(IN, RANK, gen)
    init = [torch.randn(OUT, IN, generator=gen).to(dtype), torch.randn(OUT, IN, generator=gen).to(dtype)]
    init.append(torch.randn(3, generator=gen).to(dtype))
    gl = [[g.to(dtype) for g in grads(6, t.shape, seed=10 + i)] for i, t in enumerate(init)]

    def build(params, with_basis):
        groups = [
            {"params": [params[0]], "projection": "right"},
            {"params": [params[1]], "projection": "two_sided"},
            {"params": [params[2]]},
        ]
        if with_basis:
            groups[0]["basis"], groups[1]["basis"] = [V], [{"U": U, "V": V}]
        return LockedAdamW(groups, **HP)

    ref = [t.clone().requires_grad_() for t in init]
    opt_ref = build(ref, True)
    run(opt_ref, ref, [g[:3] for g in gl])
    resumed = [t.detach().clone().requires_grad_() for t in ref]
    opt_res = build(resumed, False)  # bases come back from the state dict
    opt_res.load_state_dict(_roundtrip(opt_ref.state_dict()))
    assert opt_res.state[resumed[0]]["V"].dtype == torch.float32  # not cast to the param dtype
    assert opt_res.state[resumed[1]]["exp_avg"].dtype == torch.float32
    run(opt_ref, ref, [g[3:] for g in gl])
    run(opt_res, resumed, [g[3:] for g in gl])
    for a, b in zip(ref, resumed):
        assert torch.equal(a, b)
    sd = opt_res.state_dict()
    assert all(isinstance(v, torch.Tensor) for s in sd["state"].values() for v in s.values())


def test_invalid_options_raise():
    w = torch.zeros(OUT, IN, requires_grad=True)
    V = torch.eye(IN)[:, :RANK]
    with pytest.raises(ValueError):
        LockedAdamW([{"params": [w], "rank": 3}])
    with pytest.raises(ValueError):
        LockedAdamW([w], projection="left")
    with pytest.raises(ValueError):
        LockedAdamW([w], lr=-1.0)
    with pytest.raises(ValueError):
        LockedAdamW([w], betas=(0.9, 1.0))
    with pytest.raises(ValueError):
        LockedAdamW([{"params": [w], "basis": [V, V]}])  # not aligned with params
    with pytest.raises(ValueError):
        LockedAdamW([{"params": [w], "basis": [{"V": V, "W": V}]}])
    with pytest.raises(ValueError):
        LockedAdamW([{"params": [w], "basis": [V], "projection": "two_sided"}])  # two_sided needs U
    with pytest.raises(ValueError):
        LockedAdamW([{"params": [w], "basis": [2 * V]}])  # not orthonormal
    with pytest.raises(ValueError):
        LockedAdamW([{"params": [w], "basis": [torch.eye(OUT)[:, :RANK]]}])  # wrong shape
    opt = LockedAdamW([w])
    with pytest.raises(ValueError):
        opt.set_basis(w, V, moments="keep")
    with pytest.raises(ValueError):
        opt.set_basis(torch.zeros(OUT, IN), V)  # not managed
    b = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError):
        LockedAdamW([b]).set_basis(b, torch.eye(3)[:, :1])  # 1-D param


def test_set_basis_projects_or_resets_moments():
    gen = torch.Generator().manual_seed(6)
    V = orth(IN, RANK, gen)
    w = torch.randn(OUT, IN, generator=gen).requires_grad_()
    opt = LockedAdamW([w], **HP)
    run(opt, [w], [grads(3, (OUT, IN), seed=7)])
    m_w, v_w = opt.state[w]["exp_avg"].clone(), opt.state[w]["exp_avg_sq"].clone()
    opt.set_basis(w, V)
    torch.testing.assert_close(opt.state[w]["exp_avg"], m_w @ V, atol=1e-7, rtol=0)
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"], v_w @ (V * V), atol=1e-7, rtol=0)
    assert float(opt.state[w]["step"]) == 3.0
    opt.set_basis(w, None)  # back to full coordinates: m·Vᵀ, v·(V∘V)ᵀ
    torch.testing.assert_close(opt.state[w]["exp_avg"], m_w @ V @ V.T, atol=1e-7, rtol=0)
    assert opt.get_basis(w) == (None, None)
    opt.set_basis(w, V, moments="reset")
    assert set(opt.state[w]) == {"V"}


def test_basis_permutation_continues_identically():
    """Changing the basis to a column permutation of itself is exact for m and v: the trajectory is unchanged."""
    gen = torch.Generator().manual_seed(8)
    U, V = orth(OUT, 3, gen), orth(IN, 3, gen)
    w0 = torch.randn(OUT, IN, generator=gen)
    gl = [grads(6, (OUT, IN), seed=9)]
    a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    opt_a = LockedAdamW([{"params": [a], "basis": [(U, V)], "projection": "two_sided"}], **HP)
    opt_b = LockedAdamW([{"params": [b], "basis": [(U, V)], "projection": "two_sided"}], **HP)
    run(opt_a, [a], [gl[0][:3]])
    run(opt_b, [b], [gl[0][:3]])
    opt_b.set_basis(b, V[:, [2, 0, 1]], U=U[:, [1, 2, 0]])
    run(opt_a, [a], [gl[0][3:]])
    run(opt_b, [b], [gl[0][3:]])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_project_adam_moments_formulas_pinned():
    gen = torch.Generator().manual_seed(11)
    m, v = torch.randn(OUT, IN, generator=gen), torch.rand(OUT, IN, generator=gen)
    U, V = orth(OUT, RANK, gen), orth(IN, RANK, gen)
    m_a, v_a = project_adam_moments(m, v, V)
    torch.testing.assert_close(m_a, m @ V)
    torch.testing.assert_close(v_a, v @ (V * V))
    m_c, v_c = project_adam_moments(m, v, V, U, grad_scale=2.0)
    torch.testing.assert_close(m_c, 2.0 * U.T @ m @ V)
    torch.testing.assert_close(v_c, 4.0 * (U * U).T @ v @ (V * V))
    assert v_c.min() >= 0
    m_id, v_id = change_moment_basis(m, v)
    assert torch.equal(m_id, m) and torch.equal(v_id, v)


def test_second_moment_transfer_matches_expectation_for_independent_gradients():
    """E[(G·V)²] = E[G²]·(V∘V) for independent zero-mean gradient coordinates (Monte Carlo, 40k samples)."""
    gen = torch.Generator().manual_seed(12)
    sigma = torch.rand(OUT, IN, generator=gen, dtype=torch.float64) + 0.1
    V = orth(IN, RANK, gen).double()
    U = orth(OUT, RANK, gen).double()
    samples = torch.randn(40_000, OUT, IN, generator=gen, dtype=torch.float64) * sigma
    emp_right = ((samples @ V) ** 2).mean(0)
    emp_two = ((U.T @ samples @ V) ** 2).mean(0)
    _, v_right = project_adam_moments(torch.zeros_like(sigma), sigma**2, V)
    _, v_two = project_adam_moments(torch.zeros_like(sigma), sigma**2, V, U)
    torch.testing.assert_close(v_right, emp_right, rtol=0.05, atol=0)
    torch.testing.assert_close(v_two, emp_two, rtol=0.05, atol=0)
    # the naive (v·V)² style guess is far off: it is not what we implement
    assert ((sigma**2 @ V) - emp_right).abs().max() > 0.1


def _continued(coefficients, warm, full_params, bases, mode="right", lr=1e-3, betas=(0.9, 0.999), grad_scale=1.0):
    """The coefficient optimizer that continues ``warm`` (what the lock builds: a carry, then LockedAdamW)."""
    bases = {name: SubspaceBasis.coerce(basis, mode) for name, basis in bases.items()}
    carry = WarmupCarry.from_optimizer(warm, full_params, bases, lr_scale=1.0, grad_scale=grad_scale)
    return LockedAdamW.from_carry(coefficients, carry, mode=mode, lr=lr, betas=betas)


@pytest.mark.parametrize("mode", ["right", "two_sided"])
def test_the_continued_optimizer_has_no_jump_on_coordinate_axes(mode):
    """With U, V = columns of identity the diagonal approximation is exact: the continued coefficient optimizer
    is the same as an AdamW that trained the coefficients on the projected gradients from step 1."""
    gen = torch.Generator().manual_seed(13)
    V = torch.eye(IN)[:, [3, 0]]
    U = torch.eye(OUT)[:, [1, 4]]
    reduce = (lambda g: g @ V) if mode == "right" else (lambda g: U.T @ g @ V)
    W = torch.randn(OUT, IN, generator=gen).requires_grad_()
    hp = {"lr": 3e-3, "betas": (0.8, 0.95)}
    warm = torch.optim.AdamW([W], foreach=False, weight_decay=0.0, eps=1e-8, **hp)
    g_w = grads(7, (OUT, IN), seed=14)
    run(warm, [W], [g_w[:4]])

    coef0 = torch.randn(*reduce(torch.zeros(OUT, IN)).shape, generator=gen)
    coef = coef0.clone().requires_grad_()
    opt = _continued({"m": coef}, warm, {"m": W}, {"m": (U, V)}, mode=mode, **hp)
    # reference: AdamW on the coefficients fed with the projected gradients since step 1
    ref = coef0.clone().requires_grad_()
    ref_opt = torch.optim.AdamW([ref], foreach=False, weight_decay=0.0, eps=1e-8, **hp)
    run(ref_opt, [ref], [[reduce(g) for g in g_w[:4]]])
    with torch.no_grad():
        ref.copy_(coef0)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[coef][key], ref_opt.state[ref][key], atol=1e-7, rtol=0)
    assert float(opt.state[coef]["step"]) == 4.0
    run(opt, [coef], [[reduce(g) for g in g_w[4:]]])
    run(ref_opt, [ref], [[reduce(g) for g in g_w[4:]]])
    torch.testing.assert_close(coef, ref, atol=1e-7, rtol=0)
    assert (coef - coef0).abs().max() > 1e-3


def test_the_continued_optimizer_on_a_general_basis_and_its_validation():
    gen = torch.Generator().manual_seed(16)
    U, V = orth(OUT, RANK, gen), orth(IN, RANK, gen)
    W = torch.randn(OUT, IN, generator=gen).requires_grad_()
    warm = torch.optim.AdamW([W], lr=1e-3, foreach=False)
    run(warm, [W], [grads(3, (OUT, IN), seed=17)])
    A = torch.zeros(OUT, RANK, requires_grad=True)
    opt = _continued({"m": A}, warm, {"m": W}, {"m": (U, V)}, lr=5e-4, grad_scale=0.5)
    torch.testing.assert_close(opt.state[A]["exp_avg"], 0.5 * warm.state[W]["exp_avg"] @ V)
    torch.testing.assert_close(opt.state[A]["exp_avg_sq"], 0.25 * warm.state[W]["exp_avg_sq"] @ (V * V))
    assert opt.param_groups[0]["lr"] == 5e-4 and opt.param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError):  # right mode needs A of shape (out, r)
        _continued({"m": torch.zeros(RANK, RANK)}, warm, {"m": W}, {"m": (U, V)})
    with pytest.raises(ValueError):
        _continued({"m": A}, warm, {"m": W}, {"m": (U, V)}, mode="left")
    with pytest.raises(ValueError):  # the carry names a module without coefficients
        _continued({"x": A}, warm, {"m": W}, {"m": (U, V)})
    other = torch.zeros(OUT, IN, requires_grad=True)
    fresh = _continued({"m": A}, torch.optim.AdamW([other], foreach=False), {"m": other}, {"m": (U, V)})
    assert len(fresh.state) == 0  # no warmup steps yet: fresh state
