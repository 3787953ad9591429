"""Memory and speed of OPD training methods, side by side in one run, on one student and one fixed batch.

    python benchmarks/memory_speed.py benchmarks/experiments/smollm2.yaml [--out DIR] [--methods full,lora]

Methods (:data:`METHOD_SPECS`, ``defaults.yaml``): full OPD (AdamW on every target weight); the subspace-locked
adapter, right-sided and two-sided, made by the library's own lock (:func:`lockedopd.lock.phases.enter_locked_phase`)
with the default ``lock.optimizer=factored`` (``locked_right_adamw``: Adam per coefficient, ``LockedAdamW``), alone,
with the loss over chunks of ``objective.chunk_size`` tokens (``_chunked``), with activation checkpointing of the
decoder layers (``_ckpt``, :mod:`lockedopd.runtime.activation_checkpointing`) or both; LoRA on the same targets;
GaLore-style projected full-parameter training (``LockedAdamW`` projected mode, fixed basis); the real GaLore AdamW
when ``galore-torch`` imports; and ``inference``, the floor: the same forward under ``no_grad`` (the student's
log-probs of the completion positions), no optimizer. Each method runs in a fresh process (``isolation: fork``)
that builds the student and the synthetic OPD batch from the same seed, then runs ``steps.warmup`` untimed and
``steps.timed`` timed optimizer steps (forward + the library's exact reverse-KL loss against a fixed teacher
log-prob tensor + backward + optimizer step), then one instrumented step.

Measured per method: trainable parameters, Adam coordinates (entries of one moment tensor), parameter, gradient,
optimizer-state and basis bytes (counted from the tensors themselves, after the steps), their sum (training state);
peak RSS growth over the steps (``VmHWM`` reset through ``/proc/self/clear_refs``; the weights, memory-mapped from
the checkpoint, are read once before the baseline so that it does not count loading them) and the same without
file-backed pages (``peak anon``: code pages the first step maps in); from the
instrumented step, the bytes autograd saves for backward by component (attention, MLP, norms, checkpointed layer
inputs, logits and loss) and the peak of the live tensors the step creates; seconds per step; ratios to full OPD and
to the inference row; and ``lockedopd plan``'s prediction of the same bytes (measured / planned). Writes
``results.json``, ``results.md`` and ``memory.png`` to ``--out`` (default ``benchmarks/results/<experiment>/``).
Timings on a shared CPU are noisy: compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import queue as queue_lib
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lockedopd.lock.params import freeze_all_but, select_target_linears
from lockedopd.optim.galore import load_galore_adamw

BENCH_DIR = Path(__file__).resolve().parent
DEFAULTS = BENCH_DIR / "defaults.yaml"


@dataclass(frozen=True)
class MethodSpec:
    """How one benchmark method trains: its base recipe and the memory options on top.

    ``base``: ``full`` | ``locked`` | ``lora`` | ``projected_right`` | ``galore`` | ``inference``; ``mode`` and
    ``optimizer`` of the locked adapter (``factored`` = the library's default ``lock.optimizer``,
    :class:`~lockedopd.optim.FactoredSubspaceAdamW`; ``coefficients`` = :class:`~lockedopd.LockedAdamW`);
    ``checkpointing``: activation checkpointing of the decoder layers (``runtime.activation_checkpointing``);
    ``chunked``: the loss over chunks of ``objective.chunk_size`` completion tokens
    (:mod:`lockedopd.opd.chunked_loss`); ``lean_malloc``: the worker fixes glibc's mmap threshold at the config's
    ``malloc_mmap_threshold`` first (``runtime.host_allocator``; what ``OPDConfig.malloc_mmap_threshold`` does).
    """

    base: str
    label: str
    mode: str = "right"
    optimizer: str = "factored"
    checkpointing: bool = False
    chunked: bool = False
    lean_malloc: bool = False


METHOD_SPECS: dict[str, MethodSpec] = {
    "full": MethodSpec("full", "full OPD (AdamW)"),
    "locked_right": MethodSpec("locked", "locked right (A·Vᵀ, factored)"),
    "locked_right_chunked": MethodSpec("locked", "locked right + chunked loss", chunked=True),
    "locked_right_ckpt": MethodSpec("locked", "locked right + checkpointing", checkpointing=True),
    "locked_right_ckpt_chunked": MethodSpec(
        "locked", "locked right + checkpointing + chunked", checkpointing=True, chunked=True
    ),
    "locked_right_adamw": MethodSpec("locked", "locked right (A·Vᵀ, LockedAdamW)", optimizer="coefficients"),
    "locked_two_sided": MethodSpec("locked", "locked two-sided (U·C·Vᵀ, factored)", mode="two_sided"),
    "lora": MethodSpec("lora", "LoRA + AdamW"),
    "projected_right": MethodSpec("projected_right", "projected full-param (fixed V)"),
    "galore": MethodSpec("galore", "GaLore AdamW (galore-torch)"),
    "inference": MethodSpec("inference", "inference (forward, no grad)"),
}
# The same methods with glibc's mmap threshold fixed (suffix _mmap): the allocator's effect, side by side in one run
LEAN_MALLOC_SUFFIX = "_mmap"
LEAN_MALLOC_TWINS = (
    "full",
    "locked_right",
    "locked_right_chunked",
    "locked_right_ckpt",
    "locked_right_ckpt_chunked",
    "inference",
)
for _name in LEAN_MALLOC_TWINS:
    _spec = METHOD_SPECS[_name]
    METHOD_SPECS[_name + LEAN_MALLOC_SUFFIX] = dataclasses.replace(
        _spec, label=_spec.label + ", mmap threshold", lean_malloc=True
    )
METHODS = tuple(METHOD_SPECS)
LABELS = {name: spec.label for name, spec in METHOD_SPECS.items()}
ISOLATIONS = ("fork", "spawn", "none")
RATIO_KEYS = (
    "trainable_params",
    "grad_bytes",
    "optimizer_state_bytes",
    "train_overhead_bytes",
    "training_state_bytes",
    "peak_rss_delta_bytes",
    "peak_anon_delta_bytes",
    "peak_live_bytes",
    "saved_bytes",
    "mean_step_s",
    "min_step_s",
)
MALLOC_RATIO_KEYS = ("peak_rss_delta_bytes", "peak_anon_delta_bytes", "mean_step_s", "min_step_s")
INFERENCE_RATIO_KEYS = ("peak_rss_delta_bytes", "peak_anon_delta_bytes", "peak_live_bytes")
#: Per-method quantities that ``lockedopd plan`` predicts: measured key → plan key.
PLAN_KEYS = {
    "saved_bytes": "saved_for_backward_bytes",
    "grad_bytes": "gradients",
    "moment_bytes": "optimizer_state",
    "peak_live_bytes": "step_peak",
}
MIB = 2**20


# ------------------------------------------------------------------------------------------------------- config
def _merge(base: dict, override: dict, where: str, prefix: str = "") -> dict:
    """``base`` with ``override`` applied recursively; keys unknown to the defaults raise ValueError."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise ValueError(
                f"{where}: unknown key {prefix + key!r}; known keys here: {sorted(base)} (see {DEFAULTS.name})."
            )
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {prefix + key!r} must be a mapping, got {value!r}.")
            out[key] = _merge(base[key], value, where, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike, methods: list[str] | None = None) -> dict:
    """Defaults merged with the experiment file at ``path`` (and an optional method list), checked."""
    path = Path(path)
    defaults = yaml.safe_load(DEFAULTS.read_text())
    override = yaml.safe_load(path.read_text()) or {}
    if not isinstance(override, dict):
        raise ValueError(f"{path}: an experiment file must be a YAML mapping of overrides.")
    config = _merge(defaults, override, str(path))
    config["name"] = config["name"] or path.stem
    if methods:
        config["methods"] = methods
    unknown = [m for m in config["methods"] if m not in METHODS]
    if unknown or not config["methods"]:
        raise ValueError(f"methods={config['methods']!r}: each must be one of {list(METHODS)}.")
    if config["isolation"] not in ISOLATIONS:
        raise ValueError(f"isolation={config['isolation']!r} is invalid; allowed: {list(ISOLATIONS)}.")
    if config["model"]["source"] not in ("tiny", "smollm2"):
        raise ValueError(f"model.source={config['model']['source']!r} is invalid; use tiny or smollm2.")
    if config["projected"]["basis"] not in ("grad_svd", "random"):
        raise ValueError(f"projected.basis={config['projected']['basis']!r} is invalid; use grad_svd or random.")
    for key, value in (
        ("objective.chunk_size", config["objective"]["chunk_size"]),
        ("rank", config["rank"]),
        ("steps.warmup", config["steps"]["warmup"]),
        ("steps.timed", config["steps"]["timed"]),
        ("threads", config["threads"]),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} must be a positive integer.")
    return config


# ------------------------------------------------------------------------------------------ memory accounting
def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return t.numel() * t.element_size()


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    """Tensors held by a non-tensor optimizer-state value (e.g. GaLore's projector object)."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for item in obj for t in _tensors_in(item)]
    if hasattr(obj, "__dict__"):
        return [t for value in vars(obj).values() for t in _tensors_in(value)]
    return []


def optimizer_breakdown(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> dict[str, int]:
    """Optimizer-state bytes split into Adam moments, step counters and projection bases, plus Adam coordinates.

    Bases the optimizer shares with ``model``'s buffers (the factored optimizer projects with the adapter's own
    ``V``) are counted once, with the model."""
    out = {"moment_bytes": 0, "step_bytes": 0, "optimizer_basis_bytes": 0, "other_state_bytes": 0, "adam_coords": 0}
    for state in optimizer.state.values():
        for key, value in state.items():
            if key in ("exp_avg", "exp_avg_sq", "row_sq", "col_sq"):  # row/col: the factored second moment
                out["moment_bytes"] += tensor_bytes(value)
                out["adam_coords"] += value.numel() if key == "exp_avg" else 0
            elif key == "step":
                out["step_bytes"] += tensor_bytes(value) if torch.is_tensor(value) else 0
            elif key in ("U", "V") or not torch.is_tensor(value):
                out["optimizer_basis_bytes"] += sum(tensor_bytes(t) for t in _tensors_in(value))
            else:
                out["other_state_bytes"] += tensor_bytes(value)
    shared = set() if model is None else {b.untyped_storage().data_ptr() for b in model.buffers()}
    for basis in getattr(optimizer, "bases", {}).values():  # FactoredSubspaceAdamW's U, V
        for t in (basis.U, basis.V):
            if t is not None and t.untyped_storage().data_ptr() not in shared:
                out["optimizer_basis_bytes"] += tensor_bytes(t)
    out["optimizer_state_bytes"] = (
        out["moment_bytes"] + out["step_bytes"] + out["optimizer_basis_bytes"] + out["other_state_bytes"]
    )
    return out


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------- student and batch
def build_student(config: dict) -> nn.Module:
    """The student of the experiment, in float32 (built in code or loaded from the converted SmolLM2 cache)."""
    m = config["model"]
    if m["source"] == "tiny":
        from lockedopd.models import build_tiny_llama

        return build_tiny_llama(
            m["vocab_size"],
            num_layers=m["num_layers"],
            hidden_size=m["hidden_size"],
            intermediate_size=m["intermediate_size"],
            num_heads=m["num_heads"],
            seed=config["seed"],
            init_std=m["init_std"],
        )
    from lockedopd.models import layers_to_keep, load_smollm2, prune_layers

    model, _ = load_smollm2()
    if m["drop_every"]:
        prune_layers(model, layers_to_keep(model.config.num_hidden_layers, m["drop_every"]))
    return model.float()


@dataclass
class SyntheticBatch:
    """A fixed OPD micro-batch: a rollout layout plus the teacher's full-vocabulary log-probs as its scores."""

    rollout: Any  # lockedopd.opd.rollout.Rollout
    scores: Any  # lockedopd.teachers.base.TeacherScores (token log-probs, mask and the (B, C, V) full log-probs)

    @property
    def teacher_logprobs(self) -> torch.Tensor:
        """The teacher's ``(B, C, V)`` full log-probs."""
        return self.scores.full_logprobs


def synthetic_batch(config: dict, vocab_size: int) -> SyntheticBatch:
    """Random prompts, completions sampled from a fixed random teacher distribution; same for every method."""
    from lockedopd.opd.rollout import Rollout
    from lockedopd.teachers.base import TeacherScores

    b = config["batch"]
    B, P, C = b["batch_size"], b["prompt_tokens"], b["completion_tokens"]
    g = torch.Generator().manual_seed(config["seed"] + 1)
    teacher = torch.log_softmax(torch.randn(B, C, vocab_size, generator=g) * b["teacher_logit_std"], dim=-1)
    completion = torch.multinomial(teacher.exp().view(-1, vocab_size), 1, generator=g).view(B, C)
    prompt = torch.randint(0, vocab_size, (B, P), generator=g)
    rollout = Rollout(
        input_ids=torch.cat([prompt, completion], dim=1),
        attention_mask=torch.ones(B, P + C, dtype=torch.long),
        prompt_width=P,
        completion_ids=completion,
        completion_mask=torch.ones(B, C, dtype=torch.bool),
        prompt_lengths=[P] * B,
        logprobs=torch.zeros(B, C),
    )
    token_logprobs = teacher.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    scores = TeacherScores(token_logprobs=token_logprobs, mask=rollout.completion_mask, full_logprobs=teacher)
    return SyntheticBatch(rollout, scores)


def _orthonormal(rows: int, r: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=torch.float64))[0].float()


# -------------------------------------------------------------------------------------------------- methods
@dataclass
class Setup:
    """A method ready to run: the module, its optimizer (``None``: inference), a hook run before each optimizer
    step, and the objective chunk size of its loss (0 = unchunked)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    before_step: Any = None
    chunk_size: int = 0


def _full_params(model: nn.Module, targets: dict[str, nn.Linear]) -> list[nn.Parameter]:
    return freeze_all_but(model, [m.weight for m in targets.values()])


def _locked_setup(spec: MethodSpec, model: nn.Module, targets: dict[str, nn.Linear], config: dict, workdir: Path,
                  g: torch.Generator) -> tuple[nn.Module, torch.optim.Optimizer]:  # fmt: skip
    """The library's own lock (:func:`lockedopd.lock.phases.enter_locked_phase`) on random orthonormal bases."""
    from lockedopd.lock.phases import enter_locked_phase
    from lockedopd.subspace import save_basis
    from lockedopd.subspace.basis import SubspaceBasis

    r = config["rank"]
    pairs = {n: (_orthonormal(m.out_features, r, g), _orthonormal(m.in_features, r, g)) for n, m in targets.items()}
    basis_path = save_basis(workdir / "basis.safetensors", pairs, {"step": 0})
    bases = {n: SubspaceBasis(V, U if spec.mode == "two_sided" else None, spec.mode) for n, (U, V) in pairs.items()}
    freeze_all_but(model, [])
    phase = enter_locked_phase(model, bases, basis_path, None, lr=config["lr"], optimizer=spec.optimizer)
    return phase.model, phase.optimizer


def setup_method(method: str, model: nn.Module, config: dict, workdir: Path) -> Setup:
    """Wrap/freeze ``model`` and build the optimizer of ``method`` (see :data:`METHOD_SPECS`)."""
    import peft

    from lockedopd.optim import LockedAdamW
    from lockedopd.runtime.activation_checkpointing import enable_activation_checkpointing

    if method not in METHOD_SPECS:
        raise ValueError(f"unknown method {method!r}; allowed: {list(METHODS)}")
    spec = METHOD_SPECS[method]
    r, lr = config["rank"], config["lr"]
    targets = select_target_linears(model, config["target_modules"])
    g = torch.Generator().manual_seed(config["seed"] + 2)
    chunk = config["objective"]["chunk_size"] if spec.chunked else 0
    if spec.base == "inference":
        freeze_all_but(model, [])
        setup = Setup(model, None)
    elif spec.base == "full":
        setup = Setup(model, torch.optim.AdamW(_full_params(model, targets), lr=lr, foreach=False))
    elif spec.base == "locked":
        setup = Setup(*_locked_setup(spec, model, targets, config, workdir, g))
    elif spec.base == "lora":
        lora = peft.LoraConfig(
            r=r, lora_alpha=config["lora"]["alpha"], lora_dropout=0.0, target_modules=list(config["target_modules"])
        )
        wrapped = peft.get_peft_model(model, lora)
        setup = Setup(
            wrapped, torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=lr, foreach=False)
        )
    elif spec.base == "projected_right":
        params = _full_params(model, targets)
        if config["projected"]["basis"] == "random":
            basis = [_orthonormal(p.shape[1], r, g) for p in params]
            setup = Setup(model, LockedAdamW([{"params": params, "basis": basis}], lr=lr, projection="right"))
        else:
            optimizer = LockedAdamW(params, lr=lr, projection="right")

            def set_basis_from_first_gradient() -> None:
                for p in params:
                    if optimizer.get_basis(p)[1] is None and p.grad is not None:
                        vh = torch.linalg.svd(p.grad.float(), full_matrices=False).Vh
                        optimizer.set_basis(p, vh[:r].mT.contiguous())

            setup = Setup(model, optimizer, set_basis_from_first_gradient)
    else:  # galore
        galore_adamw, reason = load_galore_adamw()
        if galore_adamw is None:
            raise _Skip(reason)
        gc_ = config["galore"]
        group = {
            "params": _full_params(model, targets),
            "rank": r,
            "update_proj_gap": gc_["update_proj_gap"],
            "scale": gc_["scale"],
            "proj_type": gc_["proj_type"],
        }
        setup = Setup(model, galore_adamw([group], lr=lr, no_deprecation_warning=True))
    if spec.checkpointing:
        enable_activation_checkpointing(setup.model)
    setup.chunk_size = chunk
    return setup


class _Skip(Exception):
    """The method cannot run here (e.g. an optional package is missing)."""


# -------------------------------------------------------------------------------------------------- a worker
def opd_loss(setup: Setup, batch: SyntheticBatch) -> torch.Tensor:
    """The library's exact reverse-KL OPD loss of ``batch`` (:func:`lockedopd.opd.chunked_loss.rollout_opd_loss`),
    chunked when the method says so."""
    from lockedopd.opd.chunked_loss import rollout_opd_loss
    from lockedopd.opd.config import ObjectiveConfig

    objective = ObjectiveConfig(name="reverse_kl", chunk_size=setup.chunk_size)
    return rollout_opd_loss(setup.model, batch.rollout, batch.scores, objective).loss


def inference_forward(setup: Setup, batch: SyntheticBatch) -> float:
    """The floor: the student's log-probs at the batch's completion positions under ``no_grad`` (the same forward as
    the unchunked step, no loss, no graph); returns the mean log-prob of the sampled tokens (a check value)."""
    from lockedopd.opd.objectives import gather_token_logprobs
    from lockedopd.opd.rollout import student_completion_logprobs

    with torch.no_grad():
        logprobs = student_completion_logprobs(setup.model, batch.rollout)
        return float(gather_token_logprobs(logprobs, batch.rollout.completion_ids).mean())


def train_step(setup: Setup, batch: SyntheticBatch) -> tuple[float, int]:
    """One OPD optimizer step on ``batch``; returns (loss, gradient bytes). For the inference row: one forward;
    returns (mean sampled-token log-prob, 0)."""
    if setup.optimizer is None:
        return inference_forward(setup, batch), 0
    loss = opd_loss(setup, batch)
    loss.backward()
    grad_bytes = sum(tensor_bytes(p.grad) for p in setup.model.parameters() if p.grad is not None)
    if setup.before_step is not None:
        setup.before_step()
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), grad_bytes


def profile_step(setup: Setup, batch: SyntheticBatch) -> dict[str, Any]:
    """One more step, instrumented: saved-for-backward bytes by component of the forward and loss
    (:class:`lockedopd.diagnostics.components.SavedBytesByComponent`) and the peak of live tensors it creates
    (:class:`lockedopd.diagnostics.memory.PeakLiveBytes`; the optimizer state exists already, so it is not in it)."""
    from lockedopd.diagnostics.components import SavedBytesByComponent
    from lockedopd.diagnostics.memory import PeakLiveBytes

    gc.collect()
    if setup.optimizer is None:
        with PeakLiveBytes() as live:
            inference_forward(setup, batch)
        return {"saved_bytes_by_component": None, "saved_bytes": 0, "peak_live_bytes": live.peak_bytes}
    with PeakLiveBytes() as live:
        with SavedBytesByComponent(setup.model, exclude=[batch.teacher_logprobs]) as saved:
            loss = opd_loss(setup, batch)
        loss.backward()
        if setup.before_step is not None:
            setup.before_step()
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
        del loss
    return {
        "saved_bytes_by_component": dict(saved.by_component),
        "saved_bytes": saved.bytes,
        "peak_live_bytes": live.peak_bytes,
    }


def make_resident(model: nn.Module) -> int:
    """Read every parameter and buffer once, so that their pages are resident before the RSS baseline.

    The SmolLM2 student's weights are memory-mapped from the converted checkpoint and paged in on first touch (~378
    MiB): without this the first step's RSS growth counts loading the model, and a method that writes its weights
    (full OPD: copy-on-write) counts it differently from one that only reads them. Returns the bytes read.
    """
    seen: set[int] = set()
    total = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            key = tensor.untyped_storage().data_ptr()
            if key in seen or tensor.numel() == 0:
                continue
            seen.add(key)
            tensor.float().sum()  # reads every page of the storage
            total += tensor.untyped_storage().nbytes()
    return total


def measure_method(method: str, config: dict) -> dict[str, Any]:
    """Build student, batch and method from scratch and measure them (meant to run in a fresh process)."""
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    model = build_student(config)
    model.train()
    shapes = {n: list(m.weight.shape) for n, m in select_target_linears(model, config["target_modules"]).items()}
    batch = synthetic_batch(config, model.get_output_embeddings().weight.shape[0])
    with tempfile.TemporaryDirectory(prefix="lockedopd-bench-") as workdir:
        setup = setup_method(method, model, config, Path(workdir))
        steps = config["steps"]
        make_resident(setup.model)
        gc.collect()
        rss_before = _proc_status_bytes("VmRSS")
        file_before = _proc_status_bytes("RssFile")
        peak_ok = reset_peak_rss() and rss_before is not None
        losses, seconds, grad_bytes = [], [], 0
        for i in range(steps["warmup"] + steps["timed"]):
            started = time.perf_counter()
            loss, grads = train_step(setup, batch)
            elapsed = time.perf_counter() - started
            losses.append(loss)
            grad_bytes = max(grad_bytes, grads)
            if i >= steps["warmup"]:
                seconds.append(elapsed)
        peak = _proc_status_bytes("VmHWM") if peak_ok else None
        rss_after = _proc_status_bytes("VmRSS")
        file_after = _proc_status_bytes("RssFile")
        profile = profile_step(setup, batch)
    params = {id(p): p for p in setup.model.parameters()}.values()
    adapter_buffer_bytes = sum(tensor_bytes(b) for n, b in setup.model.named_buffers() if ".locked_" in n)
    optimizer_state = (
        optimizer_breakdown(setup.optimizer, setup.model)
        if setup.optimizer is not None
        else optimizer_breakdown(_NoOptimizer())
    )
    record: dict[str, Any] = {
        "method": method,
        "label": LABELS[method],
        "options": {
            "optimizer": type(setup.optimizer).__name__ if setup.optimizer is not None else None,
            "activation_checkpointing": METHOD_SPECS[method].checkpointing,
            "chunk_size": setup.chunk_size,
        },
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "param_bytes": sum(tensor_bytes(p) for p in params),
        "grad_bytes": grad_bytes,
        "adapter_buffer_bytes": adapter_buffer_bytes,
        **optimizer_state,
        "peak_rss_delta_bytes": None if peak is None else peak - rss_before,
        "file_rss_growth_bytes": None if file_after is None or file_before is None else file_after - file_before,
        "rss_growth_bytes": None if rss_after is None or rss_before is None else rss_after - rss_before,
        **profile,
        "step_s": seconds,
        "mean_step_s": sum(seconds) / len(seconds),
        "min_step_s": min(seconds),
        "losses": losses if setup.optimizer is not None else [],
        "mean_token_logprobs": losses if setup.optimizer is None else None,  # the inference row's check value
        "target_shapes": shapes,
    }
    record["peak_anon_delta_bytes"] = anonymous_peak_growth(record)
    record["basis_bytes"] = record["optimizer_basis_bytes"] + adapter_buffer_bytes
    record["train_overhead_bytes"] = grad_bytes + record["optimizer_state_bytes"] + adapter_buffer_bytes
    record["training_state_bytes"] = record["param_bytes"] + record["train_overhead_bytes"]
    return record


def anonymous_peak_growth(record: dict[str, Any]) -> int | None:
    """Peak RSS growth without the file-backed pages the steps mapped in: ``peak_rss_delta − file_rss_growth``.

    File-backed pages the steps map in are shared and reclaimable, no memory the method holds: the code of the
    kernels the first step runs, and the weights wherever :func:`make_resident` did not page them in first (~378
    MiB of SmolLM2, memory-mapped from the checkpoint; a method that writes them turns them into private copies).
    File pages only grow and are at their final count at the peak whenever the peak comes after the first step's
    kernels ran, so this is the peak of the process's own (anonymous) memory growth; a lower bound on it otherwise.
    """
    peak, files = record.get("peak_rss_delta_bytes"), record.get("file_rss_growth_bytes")
    return None if peak is None or files is None else peak - files


class _NoOptimizer:
    """Stands in for the optimizer of the inference row (no state)."""

    state: dict = {}


def _worker(method: str, config: dict, queue) -> None:
    try:
        if METHOD_SPECS[method].lean_malloc:
            from lockedopd.runtime.host_allocator import set_malloc_mmap_threshold

            if config["isolation"] == "none":
                raise _Skip("glibc's mmap threshold cannot be undone in-process: run *_mmap methods with fork/spawn")
            if not set_malloc_mmap_threshold(config["malloc_mmap_threshold"]):
                raise _Skip("the C library is not glibc: no mmap threshold to set")
        queue.put(("ok", measure_method(method, config)))
    except _Skip as exc:
        queue.put(("skipped", str(exc)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put(("error", traceback.format_exc()))


def run_method(method: str, config: dict) -> tuple[str, Any]:
    """Measure one method in a fresh process (or in this one for ``isolation: none``)."""
    if config["isolation"] == "none":
        queue: Any = _ListQueue()
        _worker(method, config, queue)
        return queue.items[0]
    ctx = mp.get_context(config["isolation"])
    results = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(method, config, results), name=f"bench-{method}")
    proc.start()
    try:
        while True:
            try:
                return results.get(timeout=5.0)
            except queue_lib.Empty:
                if not proc.is_alive():
                    return "error", f"worker for {method} exited with code {proc.exitcode} without a result"
    finally:
        proc.join(timeout=60)


class _ListQueue:
    def __init__(self) -> None:
        self.items: list = []

    def put(self, item) -> None:
        self.items.append(item)


# ------------------------------------------------------------------------------------------------- reporting
def _ratios(record: dict, ref: dict, keys) -> dict[str, float | None]:
    return {key: (record[key] / ref[key] if record.get(key) is not None and ref.get(key) else None) for key in keys}


def add_ratios(results: dict[str, dict]) -> None:
    """Add ``ratios_to_full`` (value / full OPD's value) when full OPD ran, and ``ratios_to_inference`` (peaks over
    the inference row's) when the inference row ran, each against the reference under the same allocator setting
    (``*_mmap`` methods against ``full_mmap`` / ``inference_mmap``); and for each ``*_mmap`` method whose twin ran,
    ``ratios_to_default_malloc`` (with the mmap threshold / without: memory and seconds per step)."""
    for method, record in results.items():
        lean = METHOD_SPECS[method].lean_malloc
        suffix = LEAN_MALLOC_SUFFIX if lean else ""
        for reference, keys, field in (
            ("full", RATIO_KEYS, "ratios_to_full"),
            ("inference", INFERENCE_RATIO_KEYS, "ratios_to_inference"),
        ):
            ref = results.get(reference + suffix)
            if ref is not None:
                record[field] = _ratios(record, ref, keys)
        twin = results.get(method.removesuffix(LEAN_MALLOC_SUFFIX)) if lean else None
        if twin is not None:
            record["ratios_to_default_malloc"] = _ratios(record, twin, MALLOC_RATIO_KEYS)


def plan_config(config: dict, method: str):
    """The :class:`lockedopd.OPDConfig` of ``method``'s step (what ``lockedopd plan`` reads), or ``None`` for a
    method plan does not model (LoRA, projected, GaLore, inference)."""
    from lockedopd.opd import load_config as load_opd_config

    spec = METHOD_SPECS[method]
    if spec.base not in ("full", "locked"):
        return None
    b, m = config["batch"], config["model"]
    overrides = [
        f"batch_size={b['batch_size']}",
        f"rollout.max_prompt_tokens={b['prompt_tokens']}",
        f"rollout.max_new_tokens={b['completion_tokens']}",
        "objective.name=reverse_kl",
        f"objective.chunk_size={config['objective']['chunk_size'] if spec.chunked else 0}",
        f"gradient_checkpointing={str(spec.checkpointing).lower()}",
        "optimizer=adamw",
        "student.dtype=float32",
        f"target_modules=[{','.join(config['target_modules'])}]",
        "lock.enabled=true",
        f"lock.rank={config['rank']}",
        f"lock.mode={spec.mode}",
        f"lock.optimizer={spec.optimizer}",
    ]
    if m["source"] == "smollm2":
        overrides += ["student.source=smollm2", f"student.drop_every={m['drop_every'] or 'null'}"]
    return load_opd_config(None, overrides)


def planned_bytes(config: dict, method: str) -> dict[str, int] | None:
    """What ``lockedopd plan`` predicts for ``method``'s step, by :data:`PLAN_KEYS` (``None`` if not modelled).

    ``step_peak`` is plan's ``step_peak_bytes`` less one ``(B, C, V)`` float32 copy when unchunked: plan counts the
    teacher's full log-probs at the loss's peak, and here they exist before the step (the measured counterpart,
    ``peak_live_bytes``, counts only tensors the step creates).
    """
    from lockedopd.plan import Architecture, plan_memory

    opd_config = plan_config(config, method)
    if opd_config is None:
        return None
    arch = None
    m = config["model"]
    if m["source"] == "tiny":
        h, heads = m["hidden_size"], m["num_heads"]
        arch = Architecture(m["vocab_size"], h, m["intermediate_size"], m["num_layers"], heads, heads, h // heads)
    plan = plan_memory(opd_config, architecture=arch)
    phase = plan["phases"]["warmup" if method == "full" else "locked"]
    out = {key: phase[key] for key in ("saved_for_backward_bytes", "gradients", "optimizer_state")}
    teacher_copy = 0
    if not METHOD_SPECS[method].chunked:
        b = config["batch"]
        teacher_copy = b["batch_size"] * b["completion_tokens"] * plan["student"]["vocab_size"] * 4
    out["step_peak"] = phase["step_peak_bytes"] - teacher_copy
    return out


def add_plan(results: dict[str, dict], config: dict) -> None:
    """Add ``plan`` (planned bytes) and ``plan_ratio`` (measured / planned, by :data:`PLAN_KEYS`) to each method
    ``lockedopd plan`` models."""
    for method, record in results.items():
        planned = planned_bytes(config, method)
        if planned is None:
            continue
        record["plan"] = planned
        record["plan_ratio"] = {
            key: (record[key] / planned[plan_key] if planned[plan_key] else None)
            for key, plan_key in PLAN_KEYS.items()
        }


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:,.2f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else (f"{value:.4f}" if value < 0.01 else f"{value:.3f}")


def markdown_report(report: dict) -> str:
    """The results as markdown: set-up, an absolute table, ratios to full OPD and to inference, saved-for-backward
    bytes by component, and ``lockedopd plan`` against the measured bytes."""
    from lockedopd.diagnostics.components import COMPONENTS

    c, model, env = report["config"], report["model"], report["environment"]
    b = c["batch"]
    results = report["results"]
    lines = [
        f"# Memory and speed of OPD methods: `{c['name']}`",
        "",
        f"Student: {model['description']}; {model['num_targets']} target matrices "
        f"({', '.join(c['target_modules'])}), {model['target_weights']:,} target weights. Rank r = {c['rank']}. "
        f"One fixed synthetic OPD batch: {b['batch_size']} sequences x ({b['prompt_tokens']} prompt + "
        f"{b['completion_tokens']} completion) tokens, exact reverse KL (the library's loss) against a fixed teacher "
        f"log-prob tensor; chunked methods use objective.chunk_size = {c['objective']['chunk_size']}. "
        f"{c['steps']['warmup']} untimed + {c['steps']['timed']} timed steps per method, each method in a fresh "
        f"process ({c['isolation']}); torch {env['torch']}, {c['threads']} torch thread(s), {env['cpu_count']} CPUs "
        f"(load average {env['load_average']} at start), glibc MALLOC_MMAP_THRESHOLD_ "
        f"{env.get('malloc_mmap_threshold') or 'unset (dynamic)'}. Memory is counted from the tensors; seconds are "
        "wall time on a shared CPU (the minimum over the timed steps is the least disturbed), so compare ratios.",
        "",
        "| method | trainable params | Adam coords | params MiB | grads MiB | optimizer state MiB | bases MiB "
        "| training state MiB | saved MiB | peak live MiB | peak RSS Δ MiB | peak anon Δ MiB | s/step mean "
        "| s/step min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        lines.append(
            f"| {r['label']} | {r['trainable_params']:,} | {r['adam_coords']:,} | {_mib(r['param_bytes'])} "
            f"| {_mib(r['grad_bytes'])} | {_mib(r['optimizer_state_bytes'])} | {_mib(r['basis_bytes'])} "
            f"| {_mib(r['training_state_bytes'])} | {_mib(r.get('saved_bytes'))} | {_mib(r.get('peak_live_bytes'))} "
            f"| {_mib(r['peak_rss_delta_bytes'])} | {_mib(r.get('peak_anon_delta_bytes'))} | {r['mean_step_s']:.3f} "
            f"| {r['min_step_s']:.3f} |"
        )
    if any(r.get("ratios_to_full") for r in results.values()):
        lines += [
            "",
            "Ratios to full OPD (training overhead = gradients + optimizer state + adapter bases; rows with the mmap "
            "threshold against full OPD with it):",
            "",
            "| method | trainable | grads | optimizer state | training overhead | training state | peak RSS Δ "
            "| peak anon Δ | peak live | saved | s/step mean | s/step min |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results.values():
            if q := r.get("ratios_to_full"):
                lines.append(f"| {r['label']} | " + " | ".join(_ratio(q[k]) for k in RATIO_KEYS) + " |")
    if any(r.get("ratios_to_inference") for r in results.values()):
        lines += [
            "",
            "Ratios to the inference row (the floor: the same forward under no_grad, no optimizer; rows with the mmap "
            "threshold against the inference row with it):",
            "",
            "| method | peak RSS Δ | peak anon Δ | peak live |",
            "|---|---:|---:|---:|",
        ]
        for r in results.values():
            if q := r.get("ratios_to_inference"):
                lines.append(f"| {r['label']} | " + " | ".join(_ratio(q[k]) for k in INFERENCE_RATIO_KEYS) + " |")
    lean = [r for r in results.values() if r.get("ratios_to_default_malloc")]
    if lean:
        lines += [
            "",
            f"glibc's mmap threshold fixed at {c['malloc_mmap_threshold']:,} bytes (`malloc_mmap_threshold`) against "
            "the same method with glibc's default dynamic threshold, same run:",
            "",
            "| method | peak RSS Δ | peak anon Δ | s/step mean | s/step min |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in lean:
            q = r["ratios_to_default_malloc"]
            lines.append(f"| {r['label']} | " + " | ".join(_ratio(q[k]) for k in MALLOC_RATIO_KEYS) + " |")
    trained = [r for r in results.values() if r.get("saved_bytes_by_component")]
    if trained:
        lines += [
            "",
            "Saved for backward by component (MiB, by storage, one forward + loss; *layer inputs* = what activation "
            "checkpointing keeps per decoder layer) and the optimizer state:",
            "",
            "| method | " + " | ".join(name.replace("_", " ") for name in COMPONENTS) + " | saved total | optimizer |",
            "|---|" + "---:|" * (len(COMPONENTS) + 2),
        ]
        for r in trained:
            parts = r["saved_bytes_by_component"]
            lines.append(
                f"| {r['label']} | " + " | ".join(_mib(parts[name]) for name in COMPONENTS)
                + f" | {_mib(r['saved_bytes'])} | {_mib(r['optimizer_state_bytes'])} |"
            )  # fmt: skip
    planned = [r for r in results.values() if r.get("plan")]
    if planned:
        lines += [
            "",
            "`lockedopd plan` against the measured step (MiB measured / planned; *step peak* = live tensors one step "
            "creates: activations, loss tensors, gradients):",
            "",
            "| method | saved for backward | gradients | optimizer moments | step peak (live) |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in planned:
            cells = [
                f"{_mib(r[key])} / {_mib(r['plan'][plan_key])} ({_ratio(r['plan_ratio'][key])})"
                for key, plan_key in PLAN_KEYS.items()
            ]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    for method, reason in report["skipped"].items():
        lines += ["", f"Skipped `{method}`: {reason}."]
    lines += [
        "",
        "Columns: *Adam coords* = entries of one Adam moment tensor (the dimension the optimizer works in); "
        "*optimizer state* = moments (factored: m and the row and column sums of v) + step counters + bases the "
        "optimizer holds (projected, GaLore, factored); *bases* = frozen projection matrices wherever they live "
        "(adapter buffers or optimizer state); *training state* = all parameters (frozen included) + gradients + "
        "optimizer state + adapter buffers; *saved* = bytes autograd saves for backward in one forward + loss; *peak "
        "live* = peak of the tensors one step creates (after the first step: the optimizer state already exists); "
        "*peak RSS Δ* = peak resident memory during the steps minus the resident memory before them, with the "
        "weights already resident (activations, gradients, optimizer state, allocator slack, code pages the first "
        "step maps in); *peak anon Δ* = peak RSS Δ minus the growth of file-backed resident pages: the process's own "
        "memory.",
        "",
    ]
    return "\n".join(lines)


def plot_memory(report: dict, path: Path) -> None:
    """Grouped bars: memory per component per method (left), and seconds per step (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lockedopd.runtime.plotting import distinct_colours, save_figure

    results = list(report["results"].values())
    components = [
        ("parameters", "param_bytes"),
        ("gradients", "grad_bytes"),
        ("Adam moments\n+ steps", None),
        ("bases", "basis_bytes"),
        ("saved for\nbackward", "saved_bytes"),
        ("peak live\ntensors", "peak_live_bytes"),
        ("peak anon\nRSS Δ", "peak_anon_delta_bytes"),
        ("peak RSS Δ\n(measured)", "peak_rss_delta_bytes"),
    ]
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(20, 5.5), gridspec_kw={"width_ratios": [4, 1]})
    width = 0.8 / max(1, len(results))
    # one colour per method; a *_mmap method takes its twin's colour, hatched
    colours = distinct_colours(r["method"].removesuffix(LEAN_MALLOC_SUFFIX) for r in results)
    for i, r in enumerate(results):
        lean = METHOD_SPECS[r["method"]].lean_malloc
        style = {
            "color": colours[r["method"].removesuffix(LEAN_MALLOC_SUFFIX)],
            "hatch": "///" if lean else None,
            "edgecolor": "white" if lean else None,
        }
        values = []
        for _, key in components:
            value = r["moment_bytes"] + r["step_bytes"] if key is None else r.get(key)
            values.append(0.0 if value is None else value / MIB)
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(components))]
        bars = ax.bar(xs, values, width, label=r["label"], **style)
        ax.bar_label(
            bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values], fontsize=6, rotation=90, padding=2
        )
        ax_t.bar(i, r["min_step_s"], **style)
    ax.set_xticks(range(len(components)), [name for name, _ in components])
    ax.set_ylabel("MiB")
    ax.set_title(f"{report['config']['name']}: memory per component (r = {report['config']['rank']})")
    ax.legend(fontsize=7, loc="upper left", ncol=2 if len(results) > 9 else 1)
    ax.margins(y=0.15)
    ax_t.set_xticks(range(len(results)), [r["method"] for r in results], rotation=45, ha="right", fontsize=8)
    ax_t.set_ylabel("seconds per step (min over timed steps)")
    ax_t.set_title("time per step (fwd + bwd + optimizer)")
    save_figure(fig, path, dpi=120)


def _model_summary(config: dict, shapes: dict[str, list[int]]) -> dict[str, Any]:
    m = config["model"]
    if m["source"] == "tiny":
        description = (
            f"tiny random Llama ({m['num_layers']} layers, hidden {m['hidden_size']}, "
            f"intermediate {m['intermediate_size']}, vocab {m['vocab_size']})"
        )
    else:
        layers = len({n.split(".layers.")[1].split(".")[0] for n in shapes})
        d = m["drop_every"]
        drop = f"; layers {d}, {2 * d}, ... (1-based) dropped" if d else ""
        description = f"SmolLM2-135M-Instruct ({layers} of 30 layers{drop})"
    return {
        "description": description,
        "num_targets": len(shapes),
        "target_weights": sum(o * i for o, i in shapes.values()),
    }


def _environment() -> dict[str, Any]:
    import peft
    import transformers

    galore = importlib.util.find_spec("galore_torch")
    try:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "galore_torch_installed": galore is not None,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        # glibc's allocator: unset = dynamic mmap threshold (freed mid-sized blocks stay resident); a number = fixed
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def preload_modules() -> None:
    """Import what the workers need once, so that forked workers start in milliseconds.

    Imports only: a process that has run torch's parallel kernels must not fork (OpenMP then hangs the child).
    """
    import peft  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import lockedopd.adapter  # noqa: F401
    import lockedopd.models  # noqa: F401
    import lockedopd.opd.objectives  # noqa: F401
    import lockedopd.opd.rollout  # noqa: F401
    import lockedopd.optim  # noqa: F401
    import lockedopd.subspace  # noqa: F401


def run(config: dict, out_dir: Path, progress: bool = True) -> dict:
    """Run every configured method, write results.json / results.md / memory.png to ``out_dir``; return the report.

    With ``isolation: fork`` call this from a process that has not run torch kernels yet (e.g. the CLI): forking
    after OpenMP has started hangs the workers. Use ``spawn`` otherwise.
    """
    from tqdm.auto import tqdm

    if config["isolation"] == "fork":
        preload_modules()
    environment = _environment()
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    bar = tqdm(config["methods"], desc=f"memory/speed {config['name']}", unit="method", disable=not progress)
    for method in bar:
        bar.set_postfix(method=method)
        status, payload = run_method(method, config)
        if status == "skipped":
            skipped[method] = payload
        elif status == "error":
            raise RuntimeError(f"benchmark method {method!r} failed:\n{payload}")
        else:
            results[method] = payload
    bar.close()
    if not results:
        raise RuntimeError(f"every method was skipped: {skipped}")
    add_ratios(results)
    add_plan(results, config)
    shapes = next(iter(results.values()))["target_shapes"]
    for record in results.values():
        record.pop("target_shapes")
    report = {
        "config": config,
        "environment": environment,
        "model": _model_summary(config, shapes),
        "target_shapes": shapes,
        "results": results,
        "skipped": skipped,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown_report(report))
    plot_memory(report, out_dir / "memory.png")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="experiment YAML (overrides of benchmarks/defaults.yaml)")
    p.add_argument("--out", default=None, help="output directory (default: benchmarks/results/<experiment>/)")
    p.add_argument("--methods", default=None, help=f"comma list, a subset of {','.join(METHODS)}")
    p.add_argument("--isolation", choices=ISOLATIONS, default=None, help="override the config's isolation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--rerender", action="store_true", help="only rewrite results.md and memory.png from results.json")
    args = p.parse_args(argv)
    if args.rerender:
        out_dir = Path(args.out) if args.out else BENCH_DIR / "results" / Path(args.experiment).stem
        report = json.loads((out_dir / "results.json").read_text())
        (out_dir / "results.md").write_text(markdown_report(report))
        plot_memory(report, out_dir / "memory.png")
        print(markdown_report(report))
        return 0
    config = load_config(args.experiment, args.methods.split(",") if args.methods else None)
    if args.isolation:
        config["isolation"] = args.isolation
    out_dir = Path(args.out) if args.out else BENCH_DIR / "results" / config["name"]
    report = run(config, out_dir, progress=not args.no_progress)
    print(markdown_report(report))
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'memory.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
