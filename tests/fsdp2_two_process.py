"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: an FSDP2 (``fully_shard``) warmup on the
CPU (gloo) with the subspace tracker on the sharded weights, beside the same warmup unsharded in the main process.

Both processes train on the same batch, so FSDP2's averaged gradient is the unsharded one. The tracker gathers one
matrix at a time from its shards, and the warmup carry gathers the sharded AdamW moments. Then the locked phase:
the warmed-up weights gathered, the lock files written, the PEFT model sharded (frozen base and coefficients; the
bases stay whole) and LockedAdamW continuing the carry (moments moved onto the shards), for two steps. The main
process writes ``OUT/fsdp2.json``: the largest differences between the sharded and the unsharded run's weights,
bases, carried moments and locked coefficients, the stability checks of both, and the share of each matrix a
process holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
STEPS = 4


def warmup(model, sharded: bool):
    from lockedopd.subspace import SubspaceTracker
    from lockedopd.subspace.basis import SubspaceBasis

    if sharded:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    tracker = SubspaceTracker(model, target_modules=TARGETS, rank=4, check_every=1, patience=1, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(3, 60, (4, 12), generator=torch.Generator().manual_seed(0))
    for step in range(1, STEPS + 1):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracker.observe(step)
    bases = SubspaceBasis.from_pairs(tracker.bases(), "right")
    return model, tracker, optimizer, bases


def locked(model, basis_file: Path, sharded: bool):
    from lockedopd.lock.phases import load_locked_phase
    from lockedopd.runtime.distributed import full_tensor
    from lockedopd.runtime.fsdp import shard_locked_phase

    phase = load_locked_phase(model, basis_file, lr=3e-3, optimizer="coefficients")  # the carry file's moments
    if sharded:  # (the trainer's test, fsdp=true, runs the default factored optimizer)
        phase = shard_locked_phase(phase)
    batch = torch.randint(3, 60, (4, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(2):
        loss = phase.model(input_ids=batch, labels=batch).loss
        loss.backward()
        phase.optimizer.step()
        phase.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    coefficients = {name: full_tensor(p.detach()) for name, p in phase.coefficients().items()}
    frozen = [p for p in phase.model.parameters() if not p.requires_grad]
    return phase, coefficients, losses, frozen


def main(out: Path) -> None:
    from lockedopd.lock.phases import write_lock_files
    from lockedopd.models import build_tiny_llama, build_tiny_tokenizer
    from lockedopd.optim import WarmupCarry
    from lockedopd.runtime.distributed import full_tensor, init_distributed

    dist = init_distributed()
    tokenizer = build_tiny_tokenizer()

    def student():
        return build_tiny_llama(len(tokenizer), num_layers=2, seed=0, init_std=0.2, tokenizer=tokenizer)

    model, tracker, optimizer, bases = warmup(student(), sharded=True)
    names = sorted(bases)
    shard_rows = {name: model.get_submodule(name).weight.to_local().shape[0] for name in names}
    weights = {name: full_tensor(model.get_submodule(name).weight.detach()) for name in names}
    params = {name: model.get_submodule(name).weight for name in names}
    carry = WarmupCarry.from_optimizer(optimizer, params, bases)
    basis_file = out / "basis.safetensors"
    if dist.is_main:
        write_lock_files(basis_file, bases, {"step": STEPS}, carry)
    dist.barrier()
    warmed = {key: full_tensor(value.detach()) for key, value in model.state_dict().items()}
    plain = student()
    plain.load_state_dict(warmed)
    phase, coefficients, losses, frozen = locked(plain, basis_file, sharded=True)
    bases_whole = all(not hasattr(b, "device_mesh") for b in phase.model.buffers())
    coefficient_rows = {n: int(c.to_local().shape[0]) for n, c in phase.coefficients().items()}
    if not dist.is_main:
        dist.barrier()
        return
    ref_model, ref_tracker, ref_optimizer, ref_bases = warmup(student(), sharded=False)
    ref_params = {name: ref_model.get_submodule(name).weight for name in names}
    ref_carry = WarmupCarry.from_optimizer(ref_optimizer, ref_params, ref_bases)
    _, ref_coefficients, ref_losses, _ = locked(ref_model, basis_file, sharded=False)

    def max_diff(a, b):
        return max(float((a[n].double() - b[n].double()).abs().max()) for n in names)

    report = {
        "world_size": dist.world_size,
        "weight_max_abs_diff": max_diff(weights, {n: p.detach() for n, p in ref_params.items()}),
        "weight_max_abs_change": max(
            float((ref_params[n].detach() - student().get_submodule(n).weight).abs().max()) for n in names
        ),  # fmt: skip
        "basis_V_max_abs_diff": max_diff({n: bases[n].V for n in names}, {n: ref_bases[n].V for n in names}),
        "carry_exp_avg_max_abs_diff": max_diff(carry.exp_avg, ref_carry.exp_avg),
        "carry_exp_avg_max_abs": max(float(ref_carry.exp_avg[n].abs().max()) for n in names),
        "lr_scales_max_rel_diff": max(abs(carry.lr_scales[n] / ref_carry.lr_scales[n] - 1) for n in names),
        "similarities": [h.get("median_similarity") for h in tracker.history],
        "ref_similarities": [h.get("median_similarity") for h in ref_tracker.history],
        "locked_losses": losses,
        "ref_locked_losses": ref_losses,
        "coefficient_max_abs_diff": max_diff(coefficients, ref_coefficients),
        "coefficient_max_abs": max(float(c.abs().max()) for c in ref_coefficients.values()),
        "coefficient_rows": coefficient_rows,
        "frozen_sharded": all(hasattr(p, "device_mesh") for p in frozen) and len(frozen) > 0,
        "bases_whole": bases_whole,
        "shard_rows": shard_rows,
        "full_rows": {n: int(ref_params[n].shape[0]) for n in names},
    }
    (out / "fsdp2.json").write_text(json.dumps(report, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
