"""What FSDP2's gathers cost in ``fsdp=true`` runs: the whole student before each rollout vs the tracker's per-matrix
gathers (and a tracker check) during the warmup.

``torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_gather.py [HIDDEN LAYERS]`` shards a random Llama
student (``fully_shard_layers``, gloo on the CPU) and times, as medians over repeats on the main process:

* ``unshard_s``: ``fsdp.unsharded`` entered and left (every layer all-gathered, then resharded) — what
  every rollout and evaluation pays;
* ``per_matrix_s``: every target matrix gathered one at a time with ``full_tensor`` — what one tracker observation
  gathers;
* ``tracker_observe_s``: a whole :meth:`SubspaceTracker.observe` at a check step (gathers plus sketches).

It prints one JSON line.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.distributed.barrier()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(hidden: int, layers: int, repeats: int = 9) -> None:
    from lockedopd.lock.params import select_target_linears
    from lockedopd.models import build_tiny_llama, build_tiny_tokenizer
    from lockedopd.opd.config import DEFAULT_TARGET_MODULES
    from lockedopd.runtime.distributed import full_tensor, init_distributed, shutdown_distributed
    from lockedopd.runtime.fsdp import fully_shard_layers, unsharded
    from lockedopd.subspace import SubspaceTracker

    dist = init_distributed()
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer), num_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                             seed=0, tokenizer=tokenizer)  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    fully_shard_layers(model, sum_gradients=True)
    targets = list(select_target_linears(model, DEFAULT_TARGET_MODULES))
    target_params = sum(model.get_submodule(n).weight.numel() for n in targets)

    def whole():
        with unsharded(model):
            pass

    def per_matrix():
        for name in targets:
            full_tensor(model.get_submodule(name).weight.detach())

    tracker = SubspaceTracker(model, target_modules=targets, rank=4, check_every=1, patience=1, seed=0)
    step = iter(range(1, 10_000))
    report = {
        "world_size": dist.world_size,
        "hidden": hidden,
        "layers": layers,
        "params": params,
        "target_params": target_params,
        "targets": len(targets),
        "unshard_s": _median_seconds(whole, repeats),
        "per_matrix_s": _median_seconds(per_matrix, repeats),
        "tracker_observe_s": _median_seconds(lambda: tracker.observe(next(step)), repeats),
    }
    if dist.is_main:
        print(json.dumps(report))
    shutdown_distributed()


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    main(*(args or [32, 2]))
