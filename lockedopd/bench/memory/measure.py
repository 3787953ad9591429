"""One method measured: build student, batch and method from scratch, run its steps, count its bytes and seconds.

Meant to run in a fresh process (:mod:`lockedopd.bench.memory.workers`): the peak-RSS numbers are the process's.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lockedopd.bench.memory.accounting import (
    anonymous_peak_growth,
    make_resident,
    optimizer_breakdown,
    proc_status_bytes,
    reset_peak_rss,
    tensor_bytes,
)
from lockedopd.bench.memory.methods import Setup, method_spec, setup_method
from lockedopd.bench.memory.student import SyntheticBatch, build_student, synthetic_batch
from lockedopd.lock.params import select_target_linears

__all__ = ["inference_forward", "measure_method", "opd_loss", "profile_step", "train_step"]


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


def _step(setup: Setup) -> None:
    if setup.before_step is not None:
        setup.before_step()
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)


def train_step(setup: Setup, batch: SyntheticBatch) -> tuple[float, int]:
    """One OPD optimizer step on ``batch``; returns (loss, gradient bytes). For the inference row: one forward;
    returns (mean sampled-token log-prob, 0)."""
    if setup.optimizer is None:
        return inference_forward(setup, batch), 0
    loss = opd_loss(setup, batch)
    loss.backward()
    grad_bytes = sum(tensor_bytes(p.grad) for p in setup.model.parameters() if p.grad is not None)
    _step(setup)
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
        _step(setup)
        del loss
    return {
        "saved_bytes_by_component": dict(saved.by_component),
        "saved_bytes": saved.bytes,
        "peak_live_bytes": live.peak_bytes,
    }


def _difference(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def _cuda_device(setup: Setup) -> torch.device | None:
    device = next(setup.model.parameters()).device
    return device if device.type == "cuda" else None


def timed_steps(setup: Setup, batch: SyntheticBatch, steps: dict[str, int]) -> dict[str, Any]:
    """``steps.warmup`` untimed then ``steps.timed`` timed steps, with the RSS growth over them (weights resident
    first): losses, seconds of the timed steps, the largest gradient bytes, peak / final / file-backed RSS growth.

    On a CUDA student also the caching allocator's peak over the steps (``torch.cuda.max_memory_allocated``): its
    growth over the bytes allocated before them (gradients, optimizer state, activations: what RSS is on the CPU)
    and the peak itself (weights included); each step's seconds end at a ``torch.cuda.synchronize``."""
    cuda = _cuda_device(setup)
    make_resident(setup.model)
    gc.collect()
    rss_before, file_before = proc_status_bytes("VmRSS"), proc_status_bytes("RssFile")
    peak_ok = reset_peak_rss() and rss_before is not None
    if cuda is not None:
        torch.cuda.synchronize(cuda)
        torch.cuda.reset_peak_memory_stats(cuda)
        allocated_before = torch.cuda.memory_allocated(cuda)
    losses, seconds, grad_bytes = [], [], 0
    for i in range(steps["warmup"] + steps["timed"]):
        started = time.perf_counter()
        loss, grads = train_step(setup, batch)  # float(loss) waits for the forward; the optimizer step may not
        if cuda is not None:
            torch.cuda.synchronize(cuda)
        elapsed = time.perf_counter() - started
        losses.append(loss)
        grad_bytes = max(grad_bytes, grads)
        if i >= steps["warmup"]:
            seconds.append(elapsed)
    peak = proc_status_bytes("VmHWM") if peak_ok else None
    record = {
        "losses": losses,
        "seconds": seconds,
        "grad_bytes": grad_bytes,
        "peak_rss_delta_bytes": _difference(peak, rss_before),
        "file_rss_growth_bytes": _difference(proc_status_bytes("RssFile"), file_before),
        "rss_growth_bytes": _difference(proc_status_bytes("VmRSS"), rss_before),
    }
    if cuda is not None:
        record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(cuda)
        record["cuda_peak_delta_bytes"] = record["cuda_peak_bytes"] - allocated_before
        record["cuda_reserved_peak_bytes"] = torch.cuda.max_memory_reserved(cuda)
        record["device_name"] = torch.cuda.get_device_name(cuda)
    return record


def measure_method(method: str, config: dict) -> dict[str, Any]:
    """Build student, batch and ``method`` from scratch and measure them (meant to run in a fresh process).

    Returns the method's record: sizes counted from the tensors after the steps, RSS growth, the instrumented
    step's saved and live bytes, seconds per step, losses, and the target shapes (the run pops them)."""
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    model = build_student(config)
    model.train()
    shapes = {n: list(m.weight.shape) for n, m in select_target_linears(model, config["target_modules"]).items()}
    batch = synthetic_batch(config, model.get_output_embeddings().weight.shape[0])
    with tempfile.TemporaryDirectory(prefix="lockedopd-bench-") as workdir:
        setup = setup_method(method, model, config, Path(workdir))
        run = timed_steps(setup, batch, config["steps"])
        profile = profile_step(setup, batch)
    seconds, losses, inference = run.pop("seconds"), run.pop("losses"), setup.optimizer is None
    params = {id(p): p for p in setup.model.parameters()}.values()
    adapter_buffer_bytes = sum(tensor_bytes(b) for n, b in setup.model.named_buffers() if ".locked_" in n)
    record: dict[str, Any] = {
        "method": method,
        "label": method_spec(method).label,
        "options": {
            "optimizer": None if inference else type(setup.optimizer).__name__,
            "activation_checkpointing": method_spec(method).checkpointing,
            "chunk_size": setup.chunk_size,
        },
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "param_bytes": sum(tensor_bytes(p) for p in params),
        "grad_bytes": run.pop("grad_bytes"),
        "adapter_buffer_bytes": adapter_buffer_bytes,
        **optimizer_breakdown(setup.optimizer, setup.model),
        **run,
        **profile,
        "step_s": seconds,
        "mean_step_s": sum(seconds) / len(seconds),
        "min_step_s": min(seconds),
        "losses": [] if inference else losses,
        "mean_token_logprobs": losses if inference else None,  # the inference row's check value
        "target_shapes": shapes,
    }
    record["peak_anon_delta_bytes"] = anonymous_peak_growth(record)
    record["basis_bytes"] = record["optimizer_basis_bytes"] + adapter_buffer_bytes
    record["train_overhead_bytes"] = record["grad_bytes"] + record["optimizer_state_bytes"] + adapter_buffer_bytes
    record["training_state_bytes"] = record["param_bytes"] + record["train_overhead_bytes"]
    return record
