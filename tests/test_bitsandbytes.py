"""bitsandbytes: the 8-bit warmup optimizer and its carry, quantized frozen bases after the lock, the 4-bit trap."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from lockedopd.lock.params import build_adamw, optimizer_state_bytes  # noqa: E402
from lockedopd.models import build_tiny_llama  # noqa: E402
from lockedopd.optim import WarmupCarry  # noqa: E402
from lockedopd.runtime.quantization import (  # noqa: E402
    adam_state_fp32,
    build_adamw8bit,
    dense_weight,
    quantize_linears,
)
from lockedopd.subspace.basis import SubspaceBasis  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_adamw8bit_keeps_8bit_moments_and_the_carry_reads_them_back():
    generator = torch.Generator().manual_seed(0)
    shape = (128, 64)
    exact, quantized = (nn.Parameter(torch.randn(shape, generator=generator)) for _ in range(2))
    with torch.no_grad():
        quantized.copy_(exact)
    adamw = build_adamw([exact], lr=1e-2)
    adamw8 = build_adamw8bit([quantized], lr=1e-2)
    for _ in range(5):
        grad = torch.randn(shape, generator=generator)
        exact.grad, quantized.grad = grad.clone(), grad.clone()
        adamw.step()
        adamw8.step()
    state8 = adamw8.state[quantized]
    assert state8["state1"].dtype == torch.uint8 and state8["state2"].dtype == torch.uint8
    moments = adam_state_fp32(state8)
    assert float(moments["step"]) == 5.0
    assert _rel(moments["exp_avg"], adamw.state[exact]["exp_avg"]) < 0.05
    assert _rel(moments["exp_avg_sq"], adamw.state[exact]["exp_avg_sq"]) < 0.05
    assert _rel(quantized.detach(), exact.detach()) < 0.01
    # bytes: 2 × 8192 uint8 moments + 2 × 32 block scales + 2 × 256-entry code books, against 2 × 8192 float32
    numel = shape[0] * shape[1]
    assert optimizer_state_bytes(adamw8) == 2 * numel + 2 * (numel // 256) * 4 + 2 * 256 * 4
    assert optimizer_state_bytes(adamw) == 2 * numel * 4 + 4  # + the step
    assert optimizer_state_bytes(adamw8) < 0.3 * optimizer_state_bytes(adamw)
    # the lock's carry: moments in coefficient space and lr scales, from either optimizer
    basis = SubspaceBasis.random(*shape, rank=8, mode="right", generator=generator)
    carry = WarmupCarry.from_optimizer(adamw, {"w": exact}, {"w": basis})
    carry8 = WarmupCarry.from_optimizer(adamw8, {"w": quantized}, {"w": basis})
    assert carry8.steps == carry.steps == {"w": 5.0}
    assert _rel(carry8.exp_avg["w"], carry.exp_avg["w"]) < 0.05
    assert _rel(carry8.exp_avg_sq["w"], carry.exp_avg_sq["w"]) < 0.05
    assert carry8.lr_scales["w"] == pytest.approx(carry.lr_scales["w"], rel=0.05)


@pytest.mark.parametrize(("base_dtype", "max_error"), [("bf16", 0.005), ("int8", 0.02), ("nf4", 0.12)])
def test_quantized_bases_compute_with_their_dequantized_weights(base_dtype, max_error):
    model = build_tiny_llama(64, num_layers=1, hidden_size=64, intermediate_size=128, seed=0)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS]
    exact = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    report = quantize_linears(model, names, base_dtype)
    assert sorted(report.error_norm) == sorted(names)
    assert 0 < report.relative_error() < max_error
    assert report.bytes_after < report.bytes_before / (1.9 if base_dtype == "bf16" else 3.5)
    x = torch.randn(3, 64)
    for name in names:
        layer, dense = model.get_submodule(name), dense_weight(model.get_submodule(name))
        assert _rel(dense, exact[name]) == pytest.approx(report.error_norm[name] / float(exact[name].norm()))
        with torch.no_grad():
            inputs = x if dense.shape[1] == 64 else torch.randn(3, dense.shape[1])
            tol = 2e-2 if base_dtype == "bf16" else 1e-4
            assert torch.allclose(layer(inputs), inputs @ dense.T, atol=tol, rtol=tol), name


def _first_layer_input_gradient(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    x = x.clone().requires_grad_(True)
    layer.train()
    layer(x).square().sum().backward()
    return x.grad


def test_4bit_base_keeps_its_input_gradient_after_an_eval_forward():
    """The trap: a Linear4bit run in eval mode without gradients (sampling) must still pass gradients afterwards."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=generator)
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    quantize_linears(model, ["0"], "nf4")
    layer = model[0]
    reference = _first_layer_input_gradient(layer, x)
    expected = 2 * (x @ dense_weight(layer).T) @ dense_weight(layer)
    assert torch.allclose(reference, expected, atol=1e-4)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64, generator=generator))  # what HF generate does to every layer
    after_eval = _first_layer_input_gradient(layer, x)
    assert after_eval is not None and torch.allclose(after_eval, reference, atol=1e-6)

    # the same sequence on a Linear4bit left as bitsandbytes makes it loses the gradient on AVX512-BF16 CPUs
    if bnb.functional.has_avx512bf16():
        plain = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        plain.weight = bnb.nn.Params4bit(dense_weight(layer).clone(), requires_grad=False, quant_type="nf4")
        plain = plain.to("cpu").eval()
        with torch.no_grad():
            plain(torch.randn(2, 64, generator=generator))
        with pytest.warns(UserWarning, match="autograd kernel was not registered"):
            lost = _first_layer_input_gradient(plain, x)
        assert lost is None or float(lost.abs().max()) == 0.0


def _held_out_kl(model, teacher_scores, rollout) -> float:
    from lockedopd.opd.chunked_loss import rollout_opd_loss
    from lockedopd.opd.config import ObjectiveConfig

    with torch.no_grad():
        return rollout_opd_loss(model, rollout, teacher_scores, ObjectiveConfig(name="reverse_kl")).exact_reverse_kl


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_locked_phase_on_a_quantized_base_has_exact_gradients_and_lowers_held_out_kl(tmp_path, base_dtype):
    """Coefficients over an int8 / nf4 base get the gradients of the same model with the dequantized weights, and
    OPD steps on them (sampling in eval mode in between, as the loop does) lower the KL on held-out samples."""
    import copy

    import peft

    from lockedopd import SubspaceLockedConfig
    from lockedopd.opd.chunked_loss import rollout_opd_loss
    from lockedopd.opd.config import ObjectiveConfig
    from lockedopd.opd.rollout import generate_rollout
    from lockedopd.subspace.basis_io import save_basis
    from lockedopd.teachers import HFTeacher

    student = build_tiny_llama(64, num_layers=2, hidden_size=64, intermediate_size=128, seed=0, init_std=0.2)
    teacher = HFTeacher(build_tiny_llama(64, num_layers=2, seed=1, init_std=0.2))
    names = [n for n, m in student.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS]
    generator = torch.Generator().manual_seed(0)
    bases = {}
    for n in names:
        out_f, in_f = student.get_submodule(n).weight.shape
        q = [torch.linalg.qr(torch.randn(d, 4, generator=generator, dtype=torch.float64))[0] for d in (out_f, in_f)]
        bases[n] = (q[0].float().contiguous(), q[1].float().contiguous())
    save_basis(tmp_path / "basis.safetensors", bases, {"step": 1})
    config = SubspaceLockedConfig(r=4, target_modules=TARGETS, basis_path=str(tmp_path / "basis.safetensors"))
    dense = copy.deepcopy(student)
    quantize_linears(student, names, base_dtype)
    with torch.no_grad():
        for n in names:
            dense.get_submodule(n).weight.copy_(dense_weight(student.get_submodule(n)))
    models = [peft.get_peft_model(m, copy.deepcopy(config)) for m in (student, dense)]
    prompts = [[3 + i, 10 + i] for i in range(8)]

    def rollout(model, seed):
        return generate_rollout(model, prompts, 0, None, 10, seed=seed)  # eval mode, no grad

    rollout(models[0], 98)  # one eval-mode pass without gradients over the quantized layers (the 4-bit trap)
    held_out = rollout(models[1], 99)
    held_out_scores = teacher.score(held_out.sequences(), held_out.prompt_lengths, full_logprobs=True)
    before = _held_out_kl(models[0], held_out_scores, held_out)
    optimizer = torch.optim.Adam([p for p in models[0].parameters() if p.requires_grad], lr=1e-2)
    for step in range(6):
        batch = rollout(models[1], step)  # the dense twin samples the same distribution, faster
        scores = teacher.score(batch.sequences(), batch.prompt_lengths, full_logprobs=True)
        grads = []
        for model in models:
            model.train()
            model.zero_grad(set_to_none=True)
            rollout_opd_loss(model, batch, scores, ObjectiveConfig(name="reverse_kl")).loss.backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        for quantized_grad, dense_grad in zip(*grads):
            assert quantized_grad.abs().max() > 0
            assert torch.allclose(quantized_grad, dense_grad, rtol=1e-4, atol=1e-7)
        optimizer.step()
        with torch.no_grad():  # the dense twin follows the same coefficients
            for q, d in zip(*[[p for p in m.parameters() if p.requires_grad] for m in models]):
                d.copy_(q)
    after = _held_out_kl(models[0], held_out_scores, held_out)
    assert after < before - 0.05, (before, after)


def test_8bit_warmup_then_nf4_locked_phase_lower_held_out_kl(tmp_path):
    """The tiny recipe with a 64-wide student (every target ≥ 4096 entries, so its moments really are 8-bit), then
    QLoRA-style coefficients over an nf4 base."""
    base_dtype = "nf4"
    from lockedopd.opd import OPDTrainer, load_config
    from tests.conftest import TINY_CONFIG

    overrides = [
        f"output_dir={tmp_path}", "progress=false", "optimizer=adamw8bit", "student.hidden_size=64",
        "student.intermediate_size=128", f"lock.base_dtype={base_dtype}", "monitor.enabled=false", "max_steps=8",
        "eval_steps=4", "save_steps=0", "lock.min_warmup_steps=4", "lock.max_warmup_steps=4", "eval_fixed_text=true",
    ]  # fmt: skip
    trainer = OPDTrainer.from_config(load_config(TINY_CONFIG, overrides))
    summary = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # KL on fixed text (the teacher's greedy completions of the held-out prompts): no sampling noise
    kl = {r["step"]: r["eval_fixed_text_kl"] for r in records if "eval_fixed_text_kl" in r}
    assert summary["lock_step"] == 4 and sorted(kl) == [0, 4, 8]
    assert kl[4] < kl[0] - 0.05  # the 8-bit warmup learns
    assert kl[8] < kl[4] - 0.02  # and so does the locked phase on the quantized base
    warmup_state = records[1]["optimizer_state_bytes"]
    targets = 2 * (4 * 64 * 64 + 3 * 64 * 128)
    assert warmup_state < 0.3 * (8 * targets)  # float32 AdamW would hold 8 bytes per trained weight
    quantized = json.loads((tmp_path / "lock.json").read_text())["base_quantization"]
    assert quantized["base_dtype"] == base_dtype and 0 < quantized["relative_error"] < 0.12
    layer = trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[base_dtype]
    # checkpoints and vLLM syncs see plain dense weights
    weights = trainer.effective_state_dict()
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
