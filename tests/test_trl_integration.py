"""TRL integration: the locked PEFT config inside TRL trainers, and the warmup callback (two-run design)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import lockedopd  # noqa: E402,F401  (registers SUBSPACE_LOCKED with PEFT)
from lockedopd.adapter import SubspaceLockedConfig  # noqa: E402
from lockedopd.integrations.trl import SubspaceLockCallback, locked_peft_config  # noqa: E402
from lockedopd.models import build_tiny_llama, build_tiny_tokenizer  # noqa: E402
from lockedopd.subspace import load_basis, save_basis  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

RANK = 2
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tiny_tokenizer()
    tok.padding_side = "left"
    return tok


def _model(tokenizer, seed: int) -> nn.Module:
    return build_tiny_llama(
        len(tokenizer), num_layers=1, hidden_size=32, intermediate_size=64, seed=seed, tokenizer=tokenizer
    )


def _prompts(n: int = 8):
    return datasets.Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(4)][:n]})


def _random_basis(model: nn.Module, path, rank: int = RANK, seed: int = 0) -> dict:
    """Random orthonormal (U, V) for every targeted Linear, saved with save_basis."""
    gen = torch.Generator().manual_seed(seed)
    bases = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in TARGETS:
            out_f, in_f = module.weight.shape
            U, _ = torch.linalg.qr(torch.randn(out_f, rank, generator=gen, dtype=torch.float64))
            V, _ = torch.linalg.qr(torch.randn(in_f, rank, generator=gen, dtype=torch.float64))
            bases[name] = (U.float(), V.float())
    save_basis(path, bases, {"step": 0})
    return bases


def _common_args(output_dir, max_steps: int) -> dict:
    return dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def _distillation_trainer(model, teacher, tokenizer, output_dir, max_steps, **kwargs):
    from trl import DistillationConfig, DistillationTrainer

    args = DistillationConfig(**_common_args(output_dir, max_steps), max_completion_length=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DistillationTrainer(
            model=model,
            teacher_model=teacher,
            args=args,
            train_dataset=_prompts(),
            processing_class=tokenizer,
            **kwargs,
        )


def _assert_locked_training(peft_model, base_before: dict, bases: dict, mode: str = "right"):
    """Only the coefficients changed, base weights are bit-identical, and the merged ΔW lies in the subspace."""
    coeff_names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert coeff_names and all((".locked_A." in n or ".locked_C." in n) for n in coeff_names), coeff_names
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad and p.detach().abs().max() > 0]
    assert changed, "no coefficient moved away from its zero init"

    base = peft_model.get_base_model()
    for name, param in base.named_parameters():
        if ".locked_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(param.detach(), base_before[key]), f"base weight {key} changed"

    merged = peft_model.merge_and_unload()
    for name, (U, V) in bases.items():
        delta = merged.get_submodule(name).weight.detach().double() - base_before[f"{name}.weight"].double()
        assert delta.abs().max() > 0, f"{name}: no update"
        V = V.double()
        assert torch.linalg.matrix_norm(delta - delta @ V @ V.T) < 1e-5, name
        if mode == "two_sided":
            U = U.double()
            assert torch.linalg.matrix_norm(delta - U @ U.T @ delta) < 1e-5, name


def _snapshot(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------- (a) PEFT
def test_sft_trainer_accepts_subspace_locked_config(tmp_path, tokenizer):
    from trl import SFTConfig, SFTTrainer

    model = _model(tokenizer, seed=0)
    bases = _random_basis(model, tmp_path / "basis.safetensors")
    before = _snapshot(model)
    data = datasets.Dataset.from_dict({"text": [f"{a}+{b}={a + b}" for a in range(4) for b in range(4)]})
    args = SFTConfig(**_common_args(tmp_path / "sft", 2), max_length=16)
    config = SubspaceLockedConfig(
        r=RANK, mode="two_sided", target_modules=TARGETS, basis_path=str(tmp_path / "basis.safetensors")
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=config)
    trainer.train()
    assert trainer.state.global_step == 2
    _assert_locked_training(trainer.model, before, bases, mode="two_sided")


def test_on_policy_distillation_trainer_accepts_subspace_locked_config(tmp_path, tokenizer):
    student, teacher = _model(tokenizer, seed=0), _model(tokenizer, seed=1)
    bases = _random_basis(student, tmp_path / "basis.safetensors")
    before = _snapshot(student)
    config = SubspaceLockedConfig(
        r=RANK, mode="right", target_modules=TARGETS, basis_path=str(tmp_path / "basis.safetensors")
    )
    trainer = _distillation_trainer(student, teacher, tokenizer, tmp_path / "opd", 2, peft_config=config)
    trainer.train()
    assert trainer.state.global_step == 2
    _assert_locked_training(trainer.model, before, bases, mode="right")


def test_gkd_trainer_fully_on_policy_accepts_subspace_locked_config(tmp_path, tokenizer):
    gkd = pytest.importorskip("trl.experimental.gkd")
    student, teacher = _model(tokenizer, seed=0), _model(tokenizer, seed=1)
    bases = _random_basis(student, tmp_path / "basis.safetensors")
    before = _snapshot(student)
    data = datasets.Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": f"{a + b}"}]
                for a in range(4)
                for b in range(2)
            ]
        }
    )
    args = gkd.GKDConfig(**_common_args(tmp_path / "gkd", 2), lmbda=1.0, max_new_tokens=6, max_length=32)
    config = SubspaceLockedConfig(
        r=RANK, mode="two_sided", target_modules=TARGETS, basis_path=str(tmp_path / "basis.safetensors")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = gkd.GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=config,
        )
    trainer.train()
    assert trainer.state.global_step == 2
    _assert_locked_training(trainer.model, before, bases, mode="two_sided")


# ---------------------------------------------------------------------------------------------------- (b)+(c) two runs
def test_callback_warmup_then_locked_phase(tmp_path, tokenizer):
    student, teacher = _model(tokenizer, seed=0), _model(tokenizer, seed=1)
    initial = _snapshot(student)
    lock = SubspaceLockCallback(rank=RANK, check_every=1, at_step=2)
    warmup = _distillation_trainer(student, teacher, tokenizer, tmp_path / "warmup", 5, callbacks=[lock])
    warmup.train()

    # (b) stopped at the pinned step, wrote the basis into output_dir, logged the checks
    assert warmup.state.global_step == 2
    assert lock.locked_step == 2 and lock.lock_reason == "at_step"
    assert lock.basis_path == tmp_path / "warmup" / "basis.safetensors" and lock.basis_path.is_file()
    bases, meta = load_basis(lock.basis_path)
    linears = {n for n, m in student.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert set(bases) == linears
    assert meta["rank"] == str(RANK) and meta["step"] == "2"
    logged = [h for h in warmup.state.log_history if "subspace/fraction_stable" in h]
    assert logged and "subspace/median_similarity" in logged[-1] and logged[-1]["subspace/locked_step"] == 2

    config = locked_peft_config(lock.basis_path)
    assert config.r == RANK and set(config.target_modules) == linears and config.mode == "right"
    assert lock.locked_peft_config(mode="two_sided").mode == "two_sided"

    # (c) the second run starts from the warmed-up weights, not the initial ones, and stays in the subspace
    warmed = _snapshot(warmup.model)
    assert not torch.equal(
        warmed["model.layers.0.self_attn.q_proj.weight"], initial["model.layers.0.self_attn.q_proj.weight"]
    )
    locked = _distillation_trainer(warmup.model, teacher, tokenizer, tmp_path / "locked", 2, peft_config=config)
    locked.train()
    assert locked.state.global_step == 2
    _assert_locked_training(locked.model, warmed, bases, mode="right")


# ---------------------------------------------------------------------------------------------------- callback units
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 12, bias=False)
        self.b = nn.Linear(12, 16, bias=False)
        self.lm_head = nn.Linear(16, 8, bias=False)


def _state(step: int = 0):
    from transformers import TrainerState

    state = TrainerState()
    state.global_step = step
    return state


def test_callback_stops_when_stable_and_logs(tmp_path):
    from transformers import TrainerControl, TrainingArguments

    model = _Tiny()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    cb = SubspaceLockCallback(rank=2, check_every=1, patience=2, min_warmup_steps=1)
    state, control = _state(), TrainerControl()
    cb.on_train_begin(args, state, control, model=model)
    gen = torch.Generator().manual_seed(1)
    dirs = {
        n: (torch.randn(m.weight.shape[0], 2, generator=gen), torch.randn(m.weight.shape[1], 2, generator=gen))
        for n, m in (("a", model.a), ("b", model.b))
    }
    for step in range(1, 10):
        with torch.no_grad():  # updates inside a fixed rank-2 subspace
            for n, (L, R) in dirs.items():
                getattr(model, n).weight += 1e-2 * L @ torch.diag(torch.rand(2, generator=gen) + 0.5) @ R.T
        state.global_step = step
        cb.on_step_end(args, state, control, model=model)
        if control.should_training_stop:
            break
    assert control.should_training_stop and cb.lock_reason == "stable"
    assert cb.locked_step == step and step <= 4
    bases, _ = load_basis(tmp_path / "basis.safetensors")
    assert set(bases) == {"a", "b"}  # lm_head excluded
    logs = {"loss": 1.0}
    state.log_history.append({**logs, "step": step})
    cb.on_log(args, state, control, logs=logs)
    assert logs["subspace/locked_step"] == step and logs["subspace/fraction_stable"] == 1.0
    assert state.log_history[-1]["subspace/locked_step"] == step


def test_callback_train_end_unwrap_and_resume(tmp_path):
    from transformers import TrainerControl, TrainingArguments

    model = _Tiny()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    cb = SubspaceLockCallback(rank=2, check_every=1, at_step=50, basis_path=tmp_path / "custom" / "b.safetensors")
    state, control = _state(), TrainerControl()
    wrapped = torch.compile(model, backend="eager") if hasattr(torch, "compile") else model
    cb.on_train_begin(args, state, control, model=wrapped)
    assert cb.tracker.model is model and cb.tracker.module_names == ["a", "b"]
    for step in (1, 2):
        with torch.no_grad():
            model.a.weight += 1e-2 * torch.randn_like(model.a.weight)
            model.b.weight += 1e-2 * torch.randn_like(model.b.weight)
        state.global_step = step
        cb.on_step_end(args, state, control, model=wrapped)
    assert not control.should_training_stop and cb.locked_step is None

    # a checkpoint at step 2 carries the tracker state; a resumed run restores it
    (tmp_path / "checkpoint-2").mkdir()
    cb.on_save(args, state, control, model=model)
    assert (tmp_path / "checkpoint-2" / "subspace_tracker.pt").is_file()
    resumed = SubspaceLockCallback(rank=2, check_every=1, at_step=50, basis_path=tmp_path / "custom" / "b.safetensors")
    resumed.on_train_begin(args, _state(2), TrainerControl(), model=model)
    assert resumed.tracker.last_step == 2 and len(resumed.tracker.history) == len(cb.tracker.history)

    # the run ends before at_step: the basis of the final weights is still written
    cb.on_train_end(args, state, control, model=model)
    assert cb.lock_reason == "train_end" and (tmp_path / "custom" / "b.safetensors").is_file()

    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match="PeftModel"):
        cb.on_train_begin(args, _state(), control, model=get_peft_model(_Tiny(), LoraConfig(target_modules=["a"])))


def test_locked_peft_config_checks_rank(tmp_path, tokenizer):
    model = _model(tokenizer, seed=0)
    bases = _random_basis(model, tmp_path / "basis.safetensors", rank=3)
    config = locked_peft_config(tmp_path / "basis.safetensors", mode="two_sided", init_scale=0.0)
    assert config.r == 3 and config.mode == "two_sided" and set(config.target_modules) == set(bases)
    assert config.basis_path == str(tmp_path / "basis.safetensors")
    with pytest.raises(ValueError, match="rank 3"):
        locked_peft_config(tmp_path / "basis.safetensors", r=4)
    with pytest.raises(ValueError, match="at_step"):
        SubspaceLockCallback(at_step=0)


def _prompt_distillation_trainer(out, steps, model, teacher, prompts, tokenizer, **kwargs):
    """A TRL DistillationTrainer on the tiny models: batch 8, lr 3e-3 constant, 10-token completions."""
    from trl import DistillationConfig, DistillationTrainer

    args = DistillationConfig(
        **{**_common_args(out, steps), "per_device_train_batch_size": 8, "learning_rate": 3e-3, "logging_steps": 100},
        max_completion_length=10, beta=1.0, lr_scheduler_type="constant",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=prompts,
                                   processing_class=tokenizer, **kwargs)  # fmt: skip


def test_trl_locked_phase_uses_locked_adamw_with_opd_trainers_lr_scale(tmp_path, tokenizer):
    """The TRL two-run path locks as OPDTrainer does: LockedAdamW, the warmup's moments, the same per-matrix lr
    scales (one function computes them for both loops); and it lowers held-out KL clearly more than the plain
    AdamW the trainer would build from ``peft_config``."""
    import copy

    from lockedopd.opd.evaluation import evaluate_reverse_kl
    from lockedopd.opd.rollout import encode_prompts
    from lockedopd.optim import LockedAdamW, WarmupCarry
    from lockedopd.teachers import HFTeacher

    def tiny(seed):
        return build_tiny_llama(
            len(tokenizer), num_layers=2, hidden_size=32, intermediate_size=64, seed=seed, init_std=0.2,
            tokenizer=tokenizer,
        )  # fmt: skip

    prompts = datasets.Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(10) for b in range(10)]})
    teacher = tiny(1)
    scorer = HFTeacher(teacher)
    eval_ids = encode_prompts(tokenizer, [f"{a}*{b}=" for a in range(4) for b in range(4)], False, 32)

    def held_out_kl(model):
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        return evaluate_reverse_kl(model, scorer, eval_ids, pad, eos, 10, 16, seed=5).reverse_kl

    def trainer(model, out, steps, **kwargs):
        return _prompt_distillation_trainer(tmp_path / out, steps, model, teacher, prompts, tokenizer, **kwargs)

    lock = SubspaceLockCallback(rank=4, check_every=2, at_step=6, optimizer="coefficients")
    warmup = trainer(tiny(0), "warmup", 14, callbacks=[lock])
    warmup.train()
    assert lock.locked_step == 6 and lock.lock_reason == "at_step"
    warmed = copy.deepcopy(warmup.model)
    kl_lock = held_out_kl(warmed)

    phase = lock.locked_phase(copy.deepcopy(warmed), lr=3e-3)
    assert isinstance(phase.optimizer, LockedAdamW)
    # the scales are the ones OPDTrainer computes from its warmup optimizer (WarmupCarry.from_optimizer)
    warm_opt = getattr(warmup.optimizer, "optimizer", warmup.optimizer)
    full = {name: warmup.model.get_submodule(name).weight for name in phase.bases}
    expected = WarmupCarry.from_optimizer(warm_opt, full, phase.bases)
    scales = phase.lr_scales()
    assert scales.keys() == expected.lr_scales.keys() and len(scales) == 14
    for name, scale in scales.items():
        assert scale == pytest.approx(expected.lr_scales[name], rel=1e-12)
    assert min(scales.values()) > 1.2  # a real rescaling, not the identity
    for group in phase.optimizer.param_groups:
        assert group["lr"] == pytest.approx(3e-3 * group["lr_scale"])
    name = "model.layers.0.self_attn.q_proj"
    coef = phase.coefficients()[name]
    torch.testing.assert_close(phase.optimizer.state[coef]["exp_avg"], expected.exp_avg[name].to(coef.dtype))

    trainer(phase.model, "locked", 8, optimizers=(phase.optimizer, None)).train()
    gain_locked = kl_lock - held_out_kl(phase.model)
    plain = trainer(copy.deepcopy(warmed), "plain", 8, peft_config=locked_peft_config(lock.basis_path))
    plain.train()
    gain_plain = kl_lock - held_out_kl(plain.model)
    # measured: 0.160 vs 0.079 nats/token; full-parameter continuation 0.327
    assert gain_locked > 1.5 * gain_plain > 0
    bases = {n: (b.U, b.V) for n, b in phase.bases.items()}
    _assert_locked_training(phase.model, _snapshot(warmed), bases, mode="right")


def test_trl_locked_phase_with_the_factored_optimizer(tmp_path, tokenizer):
    """``optimizer="factored"``: the locked phase continues with FactoredSubspaceAdamW at the warmup's lr (scale 1),
    from the warmup's first moment and the row/column sums of its second moment, and trains inside span(V)."""
    import copy

    from lockedopd.optim import FactoredSubspaceAdamW

    teacher = build_tiny_llama(len(tokenizer), num_layers=2, hidden_size=32, intermediate_size=64, seed=1,
                               init_std=0.2, tokenizer=tokenizer)  # fmt: skip
    prompts = datasets.Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(10) for b in range(10)]})

    def trainer(model, out, steps, **kwargs):
        return _prompt_distillation_trainer(tmp_path / out, steps, model, teacher, prompts, tokenizer, **kwargs)

    with pytest.raises(ValueError, match="optimizer='adam' is not one of"):
        SubspaceLockCallback(rank=4, optimizer="adam")
    lock = SubspaceLockCallback(rank=4, check_every=2, at_step=4, optimizer="factored")
    student = build_tiny_llama(len(tokenizer), num_layers=2, hidden_size=32, intermediate_size=64, seed=0,
                               init_std=0.2, tokenizer=tokenizer)  # fmt: skip
    warmup = trainer(student, "warmup", 10, callbacks=[lock])
    warmup.train()
    warmed = copy.deepcopy(warmup.model)
    phase = lock.locked_phase(copy.deepcopy(warmed), lr=3e-3)
    assert isinstance(phase.optimizer, FactoredSubspaceAdamW)
    assert set(phase.lr_scales().values()) == {1.0}
    name = "model.layers.0.self_attn.q_proj"
    coef = phase.coefficients()[name]
    warm_opt = getattr(warmup.optimizer, "optimizer", warmup.optimizer)
    v_w = warm_opt.state[warmup.model.get_submodule(name).weight]["exp_avg_sq"]
    torch.testing.assert_close(phase.optimizer.state[coef]["row_sq"], v_w.sum(1))
    torch.testing.assert_close(phase.optimizer.state[coef]["col_sq"], v_w.sum(0))
    trainer(phase.model, "locked", 4, optimizers=(phase.optimizer, None)).train()
    bases = {n: (b.U, b.V) for n, b in phase.bases.items()}
    _assert_locked_training(phase.model, _snapshot(warmed), bases, mode="right")
