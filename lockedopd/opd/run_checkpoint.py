"""An OPD run's directory: the per-step log, checkpoints of the loop's state, the resume checks, the summary.

A run directory holds ``config.yaml``, ``metrics.jsonl`` (:class:`MetricsLog`) and ``checkpoints/step-*``
(``runtime.checkpoint``: atomic). :func:`save_run` writes the trainer's state at its current step (weights,
optimizer, RNG, phase and whatever its :class:`~lockedopd.opd.callbacks.TrainingCallback` adds);
:func:`resume_run` restores the newest complete one after :func:`check_config_drift` has refused settings that would
make the resumed run another run. A run killed at any point resumes to the same result.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lockedopd.opd.callbacks import CheckpointParts
from lockedopd.opd.config import RESUMABLE_CHANGES, config_changes
from lockedopd.runtime.atomic_io import atomic_write_text, recover_interrupted_writes
from lockedopd.runtime.checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint, save_checkpoint

#: What these functions take as ``trainer``: an :class:`lockedopd.OPDTrainer` (its public attributes only).
Trainer = Any

__all__ = ["MetricsLog", "check_config_drift", "resume_note", "resume_run", "save_run", "write_summary"]

logger = logging.getLogger(__name__)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per step, appended and flushed to disk as each step ends.

    On resume the entries after the resumed step are dropped (they are recomputed), and a torn last line — what a
    kill in the middle of an append leaves — is dropped with a warning. A damaged line elsewhere is refused: the
    log is not ours to guess at.
    """

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            atomic_write_text(path, "")
        else:
            kept = [line for line, record in self._parse() if record.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def _parse(self) -> list[tuple[str, dict[str, Any]]]:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        parsed = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                parsed.append((line, json.loads(line)))
            except json.JSONDecodeError as exc:
                if number == len(lines):
                    logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", self.path,
                                   len(line))  # fmt: skip
                    continue
                raise ValueError(
                    f"{self.path} line {number} is not JSON ({exc.msg}); the log is damaged before its last line: "
                    "restore it, or start the run again in a new output_dir."
                ) from exc
        return parsed

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to disk."""
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        """All records so far."""
        return [record for _, record in self._parse()]


def save_run(trainer: Trainer) -> Path:
    """Write checkpoint ``step-{step}`` of ``trainer`` atomically (weights, optimizer, RNG, phase, its callback's).

    With several processes the main process writes it (their weights and optimizer states are the same) and the
    others wait until it is complete. With ``fsdp`` every process first gathers the shards (weights, optimizer
    state, coefficients), so the checkpoint holds whole tensors, as an unsharded run's does.
    """
    dist = trainer.dist
    if not dist.is_main and not trainer.fsdp:
        dist.barrier()
        return checkpoint_dir(trainer.run_dir, trainer.step)
    tensors = {"model": trainer.effective_state_dict()}  # (a collective with fsdp, as is the optimizer's gather)
    if trainer.fsdp:
        from lockedopd.runtime.fsdp import gather_optimizer_state_dict

        optimizer_state = gather_optimizer_state_dict(trainer.optimizer)
    else:
        optimizer_state = trainer.optimizer.state_dict()
    parts = CheckpointParts(
        tensors=tensors,
        states={
            "optimizer": optimizer_state,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "pyv": random.getstate()[0]},
        },
        trainer_state={"step": trainer.step, "phase": trainer.phase, "world_size": dist.world_size},
    )
    trainer.lock.state_dict(parts)
    if not dist.is_main:
        dist.barrier()
        return checkpoint_dir(trainer.run_dir, trainer.step)
    path = save_checkpoint(trainer.run_dir, trainer.step, parts.tensors, parts.states, parts.trainer_state)
    dist.barrier()
    return path


def write_summary(trainer: Trainer, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the finished run's ``summary.json`` (with its callback's facts) and ``curves.png`` from its
    ``records`` (metrics.jsonl); returns the summary."""
    evals = [r for r in records if "eval_reverse_kl" in r]
    times = [r["step_time_s"] for r in records if "step_time_s" in r]
    summary = {
        "output_dir": str(trainer.run_dir),
        "steps": trainer.step,
        "initial_reverse_kl": evals[0]["eval_reverse_kl"] if evals else None,
        "final_reverse_kl": evals[-1]["eval_reverse_kl"] if evals else None,
        "eval_kl_exact": evals[-1]["eval_kl_exact"] if evals else None,
        "mean_step_time_s": sum(times) / len(times) if times else None,
        "world_size": trainer.dist.world_size,
        **trainer.lock.summary(),
    }
    atomic_write_text(trainer.run_dir / "summary.json", json.dumps(summary, indent=2))
    from lockedopd.opd.plots import plot_training_curves

    plot_training_curves(records, trainer.run_dir / "curves.png", lock_step=summary.get("lock_step"))
    return summary


def resume_run(trainer: Trainer) -> int | None:
    """Restore ``trainer`` from the newest complete checkpoint when ``resume`` is set; returns its step or None.

    Without ``resume`` a run directory that already holds checkpoints is refused (nothing is overwritten).
    """
    run_dir, dist, config = trainer.run_dir, trainer.dist, trainer.config
    if dist.is_main:  # a kill mid-write leaves temporaries and set-aside directories
        recover_interrupted_writes(run_dir)
    dist.barrier()
    if not config.resume:
        if list_checkpoints(run_dir):
            raise FileExistsError(
                f"{run_dir} already holds checkpoints; pass resume=true to continue that run or choose another "
                "output_dir."
            )
        return None
    found = list_checkpoints(run_dir)
    if not found:
        logger.info("resume=true but %s has no checkpoint: starting fresh", run_dir)
        return None
    step, path = found[-1]
    check_config_drift(run_dir, config, step, write=dist.is_main)
    tensors, states, trainer_state = load_checkpoint(path)
    parts = CheckpointParts(tensors, states, trainer_state)
    trainer.step = int(trainer_state["step"])
    if not trainer.lock.owns_phase(trainer_state.get("phase", "full")):
        _load_plain_state(trainer, parts, path)
    change = trainer.lock.load_state_dict(trainer.base_model, parts)
    if change is not None:
        trainer.apply_phase_change(change)
    rng = states["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["pyv"], tuple(rng["python"]), None))
    saved_world = int(trainer_state.get("world_size", 1))
    if saved_world != dist.world_size:  # the step does not depend on the split (distributed.check_world_size)
        logger.info("resuming a run trained by %d processes with %d", saved_world, dist.world_size)
    logger.info("resumed %s from step %d (%s)", run_dir, trainer.step, trainer.phase)
    return step


def _load_plain_state(trainer: Trainer, parts: CheckpointParts, path: Path) -> None:
    """The student's weights and the full-parameter optimizer's state of a checkpoint outside a callback's phase."""
    model = trainer.base_model
    if trainer.fsdp:  # whole tensors onto this process's shards
        from lockedopd.runtime.fsdp import load_full_state_dict

        missing, unexpected = load_full_state_dict(model, parts.tensors["model"])
    else:
        missing, unexpected = model.load_state_dict(parts.tensors["model"], strict=False)
    missing = [m for m in missing if not _is_tied_duplicate(model, m)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the student (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "resume with the config that wrote it."
        )
    trainer.optimizer.load_state_dict(parts.states["optimizer"])
    if trainer.fsdp:
        from lockedopd.runtime.fsdp import shard_optimizer_state

        shard_optimizer_state(trainer.optimizer)


def check_config_drift(run_dir: Path, config: Any, step: int, write: bool = True) -> None:
    """Refuse to resume ``run_dir`` with settings other than the run's (except
    :data:`~lockedopd.opd.config.RESUMABLE_CHANGES`), before anything is loaded or written; with ``write``, record
    the allowed changes in ``config_changes.jsonl`` (``config.yaml`` stays as it was)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return
    saved = yaml.safe_load(path.read_text()) or {}
    changes = config_changes(saved, config)
    refused = {key: change for key, change in changes.items() if key not in RESUMABLE_CHANGES}
    if refused:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(refused.items())[:6])
        raise ValueError(
            f"resume: the config differs from the one {run_dir} was trained with ({listed}); resume with the run's "
            f"own settings (see {path}) — only {sorted(RESUMABLE_CHANGES)} may change — or start a new output_dir."
        )
    allowed = {key: list(change) for key, change in changes.items() if key != "resume"}
    if allowed and write:
        log = Path(run_dir) / "config_changes.jsonl"
        earlier = log.read_text() if log.is_file() else ""
        atomic_write_text(log, earlier + json.dumps({"resumed_from_step": step, "changes": allowed}) + "\n")


def resume_note(run_dir: Path, step: int, max_steps: int) -> str:
    """Where a run that failed during step ``step + 1`` stopped, and how to continue from its last checkpoint."""
    saved = list_checkpoints(run_dir)
    where = f"the last complete checkpoint, {saved[-1][1]}, is intact" if saved else "no checkpoint was written"
    return (
        f"training stopped during step {step + 1} of {max_steps}; {where}: fix the cause and rerun the same command "
        "with resume=true to continue from it."
    )


def _is_tied_duplicate(model: nn.Module, name: str) -> bool:
    """True for a weight shared with another (e.g. a tied lm_head), which safetensors stores once."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    return out is not None and name.endswith("lm_head.weight")


def load_run_model(run_dir: str | Path, step: int | None = None) -> tuple[nn.Module, Any, int]:
    """A run's student as its checkpoint ``step`` holds it (``None``: the latest complete one), the locked update
    folded in, with its tokenizer, built from the run's own ``config.yaml``: ``(model, tokenizer, step)``.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``config.yaml`` or no complete checkpoint (at ``step``).
        ValueError: the checkpoint's weights do not fit the student the config builds.
    """
    from safetensors.torch import load_file

    from lockedopd.opd.builders import build_model
    from lockedopd.opd.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml); give the output_dir of a run.")
    found = dict(list_checkpoints(run_dir))
    chosen = max(found) if step is None and found else step
    if chosen not in found:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint{'' if step is None else f' at step {step}'}.")
    model, tokenizer = build_model(load_config(run_dir / "config.yaml").student)
    missing, unexpected = model.load_state_dict(load_file(str(found[chosen] / "model.safetensors")), strict=False)
    missing = [m for m in missing if not _is_tied_duplicate(model, m)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {found[chosen]} does not fit the student of {run_dir / 'config.yaml'} (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]})."
        )
    return model, tokenizer, chosen
