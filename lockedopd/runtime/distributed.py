"""More than one process: who this process is, and the few collectives the OPD loop and the lock need.

``torchrun --nproc_per_node N -m lockedopd distill CONFIG`` and ``accelerate launch`` (a multi-process config) set
``WORLD_SIZE`` / ``RANK`` in the environment; :func:`init_distributed` then starts the process group through
accelerate's :class:`accelerate.PartialState` (``cpu=True``: gloo, since the loop's tensors live on the CPU) and
returns a :class:`DistContext`. Without those variables it returns the one-process context, whose collectives do
nothing, so the single-process loop runs exactly the code it ran before.

Data parallelism in :class:`lockedopd.OPDTrainer` is plain and explicit: every process holds the whole student,
samples and scores its share of the global batch, and the gradients are summed (:meth:`DistContext.sum_gradients`)
before clipping and the optimizer step, so every process takes the same step and keeps the same weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DistContext",
    "check_world_size",
    "fsdp_from_launcher",
    "share_of_micro_batch",
    "full_tensor",
    "init_distributed",
    "is_row_sharded",
    "shard_bounds",
    "shard_like",
    "shutdown_distributed",
    "weights_fingerprint",
]


logger = logging.getLogger(__name__)


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run.

    Attributes:
        world_size: number of processes (1 = a plain single-process run; every collective is then a no-op).
        rank: this process's index (0 = the main process, which writes files, metrics and progress bars).
    """

    world_size: int = 1
    rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes the run directory (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (no-op with one process)."""
        if self.enabled:
            torch.distributed.barrier()

    def shard(self, items: Sequence[Any]) -> tuple[int, list[Any]]:
        """This process's contiguous share of ``items`` and the global index of its first item."""
        start, stop = shard_bounds(len(items), self.world_size, self.rank)
        return start, list(items[start:stop])

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over all processes, in place (one flat all-reduce).

        Every process must pass the same parameters in the same order; a parameter without a gradient takes part
        as zeros (and then holds the summed gradient).
        """
        if not self.enabled:
            return
        params = list(params)
        if not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of a list of floats over all processes (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor.tolist()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as process ``src`` holds it, on every process (pickled; tensors travel on the CPU)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def broadcast_parameters(self, module: torch.nn.Module, src: int = 0) -> None:
        """Overwrite every parameter and buffer of ``module`` with process ``src``'s, in place."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                torch.distributed.broadcast(tensor.data, src=src)

    def check_same(self, what: str, value: str) -> None:
        """Raise ``RuntimeError`` unless every process holds the same string ``value`` (e.g. a checksum)."""
        if not self.enabled:
            return
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        if len(set(values)) != 1:
            raise RuntimeError(
                f"{what} differs between processes ({', '.join(str(v)[:12] for v in values)}): the processes have "
                "diverged. Check that every process runs the same code, config and data, and report it if they do."
            )


def shard_bounds(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of process ``rank``'s contiguous share of ``total`` items (sizes differ by at most one)."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a ``DTensor``: all-gathered, so every process must call it in the
    same order); any other tensor as it is."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def is_row_sharded(tensor: torch.Tensor) -> bool:
    """True for an FSDP2 shard split by rows (a ``DTensor`` placed ``Shard(0)`` on a 1-D mesh)."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(tensor, DTensor) and tuple(tensor.placements) == (Shard(0),)


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole, the same on every process) sharded as ``like`` is when ``like`` is an FSDP2 ``DTensor``
    (each process keeps its own slice, no communication); ``tensor`` itself otherwise."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return tensor
    if not isinstance(like, DTensor):
        return tensor
    return distribute_tensor(tensor, like.device_mesh, like.placements, src_data_rank=None)


def weights_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the named tensors' bytes (sorted by name): equal on every process when their weights are."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(
            full_tensor(tensors[name]).detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


_CONTEXT: DistContext | None = None


def init_distributed(cpu: bool = True) -> DistContext:
    """The :class:`DistContext` of this process, starting the process group when launched with several.

    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) the group is started once, through
    ``accelerate.PartialState(cpu=cpu)``: gloo for a student on the CPU (``cpu=True``, the default: GPU work, if any,
    happens inside vLLM), NCCL for one on the GPUs (``device: cuda``). An already started
    ``torch.distributed`` group (e.g. by the caller's own ``Accelerator`` or a ``transformers.Trainer``) is used as
    it is.
    """
    global _CONTEXT
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_world_size(), dist.get_rank())
    if _env_world_size() <= 1:
        if _CONTEXT is None:
            _CONTEXT = DistContext()
        return _CONTEXT
    try:
        from accelerate import PartialState
    except ImportError as exc:  # pragma: no cover - accelerate is a dependency
        raise ImportError(
            "lockedopd: WORLD_SIZE > 1 but accelerate is not installed; pip install accelerate, or run one process."
        ) from exc
    state = PartialState(cpu=cpu)
    _CONTEXT = DistContext(state.num_processes, state.process_index)
    return _CONTEXT


def shutdown_distributed() -> None:
    """End the process group :func:`init_distributed` started (a no-op otherwise, or with one process).

    Call it once, when the processes are done: a gloo group left open at interpreter exit can abort the process
    (``terminate called without an active exception``, seen under ``accelerate launch``).
    """
    global _CONTEXT
    dist = torch.distributed
    if _CONTEXT is not None and _CONTEXT.enabled and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _CONTEXT = None


def share_of_micro_batch(dist: DistContext, out: Any, prompts: int) -> Any:
    """This process's part of a micro-batch split over processes, as the loss to back-propagate.

    ``out`` is the objective's output on this process's ``prompts`` prompts
    (:class:`lockedopd.opd.loss.LossOutput`). The objective is a mean over the micro-batch's loss tokens; a
    process's mean is weighted by its share of them (summed gradients then equal the whole micro-batch's). The logged
    statistics become the micro-batch's: token-weighted KLs, summed token counts, the prompt-weighted reward.
    """
    exact = out.exact_reverse_kl
    reward = out.reward_mean
    kept, tokens, kl_sum, exact_sum, reward_sum, rows = dist.sum_floats(
        [
            out.kept_tokens,
            out.tokens,
            out.reverse_kl * out.tokens,
            (exact or 0.0) * out.tokens,
            (reward or 0.0) * prompts,
            prompts,
        ]
    )
    return dataclasses.replace(
        out,
        loss=out.loss * (out.kept_tokens / max(kept, 1.0)),
        reverse_kl=kl_sum / max(tokens, 1.0),
        tokens=int(tokens),
        kept_tokens=int(kept),
        exact_reverse_kl=None if exact is None else exact_sum / max(tokens, 1.0),
        reward_mean=None if reward is None else reward_sum / max(rows, 1.0),
    )


def fsdp_from_launcher(config: Any) -> Any:
    """``config`` (an :class:`lockedopd.OPDConfig`) with ``fsdp`` on when ``accelerate launch`` runs an FSDP config
    (``ACCELERATE_USE_FSDP=true``)."""
    if config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("true", "1"):
        return config
    logger.info("accelerate launch with an FSDP config (ACCELERATE_USE_FSDP=true): training with fsdp=true")
    return dataclasses.replace(config, fsdp=True)


def check_world_size(config: Any, dist: DistContext) -> None:
    """Refuse settings of ``config`` (an :class:`lockedopd.OPDConfig`) that cannot mean the same run when
    ``batch_size`` prompts are split over ``dist``'s processes."""
    if config.fsdp and not dist.enabled:
        raise ValueError(
            "fsdp=true shards the student over processes, but this is one process; launch several (torchrun "
            "--nproc_per_node 2 -m lockedopd distill CONFIG fsdp=true) or set fsdp=false."
        )
    if not dist.enabled:
        return
    if config.rollout.backend == "hf" and config.rollout.seeding != "prompt":
        raise ValueError(
            f"{dist.world_size} processes: rollout.seeding=batch samples a micro-batch from one random stream, which "
            "cannot be split over processes; set rollout.seeding=prompt (each prompt its own stream; use it at one "
            "process too for the same run)."
        )
    if config.batch_size < dist.world_size:
        raise ValueError(
            f"batch_size={config.batch_size} prompts cannot be split over {dist.world_size} processes (each needs at "
            f"least one); raise batch_size to >= {dist.world_size} or start fewer processes."
        )
    per_process = []
    if config.objective.token_keep_fraction < 1.0:
        per_process.append("objective.token_keep_fraction (the kept tokens are chosen among each process's)")
    if config.objective.reward_lambda < 1.0:
        per_process.append("objective.reward_lambda (rewards are normalised over each process's prompts)")
    if per_process:
        logger.warning(
            "with %d processes these act per process, so the run differs from a one-process run: %s",
            dist.world_size,
            "; ".join(per_process),
        )
