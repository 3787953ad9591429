"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: TRL warmup with SubspaceLockCallback, then
the locked phase, on tiny models; each rank writes what it locked and trained to ``OUT/rank-<r>.json``.

The ranks are given stability tests that disagree on purpose (rank 1 would call the subspace stable at its first
check, rank 0 only at ``max_warmup_steps``) and different sketch seeds: the callback must still lock every rank at the
main process's step, with the main process's basis.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch


def main(out: Path) -> None:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    import lockedopd  # noqa: F401  (registers the PEFT method)
    from lockedopd.integrations.trl import SubspaceLockCallback
    from lockedopd.models import build_tiny_llama, build_tiny_tokenizer
    from lockedopd.runtime.distributed import init_distributed, weights_fingerprint

    warnings.filterwarnings("ignore")
    tokenizer = build_tiny_tokenizer()
    tokenizer.padding_side = "left"
    student = build_tiny_llama(len(tokenizer), num_layers=2, seed=0, tokenizer=tokenizer)
    teacher = build_tiny_llama(len(tokenizer), num_layers=2, seed=1, tokenizer=tokenizer)
    prompts = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(8) for b in range(8)]})

    def args(name: str, steps: int) -> DistillationConfig:
        return DistillationConfig(
            output_dir=str(out / name), max_steps=steps, per_device_train_batch_size=4, max_completion_length=6,
            learning_rate=3e-3, beta=1.0, logging_steps=100, save_strategy="no", report_to=[], use_cpu=True,
            bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
        )  # fmt: skip

    rank = init_distributed().rank
    threshold = 0.999 if rank == 0 else 1e-6  # disagreeing stability tests: rank 1 alone would lock at step 2
    lock = SubspaceLockCallback(rank=4, check_every=1, patience=1, threshold=threshold, min_warmup_steps=2,
                                max_warmup_steps=4, seed=rank)  # fmt: skip
    warmup = DistillationTrainer(model=student, teacher_model=teacher, args=args("warmup", 6), train_dataset=prompts,
                                 processing_class=tokenizer, callbacks=[lock])  # fmt: skip
    warmup.train()
    phase = lock.locked_phase(warmup.model, lr=3e-3)
    carried = {f"{i}.{k}": v for i, s in enumerate(phase.optimizer.state.values()) for k, v in s.items()}
    locked = DistillationTrainer(
        model=phase.model, optimizers=(phase.optimizer, None), teacher_model=teacher, args=args("locked", 2),
        train_dataset=prompts, processing_class=tokenizer,
    )  # fmt: skip
    locked.train()
    trained = {n: p for n, p in phase.model.named_parameters() if p.requires_grad}
    report = {
        "world_size": init_distributed().world_size,
        "locked_step": lock.locked_step,
        "lock_reason": lock.lock_reason,
        "warmup_steps_run": warmup.state.global_step,
        "carry": weights_fingerprint({k: v for k, v in carried.items() if isinstance(v, torch.Tensor)}),
        "coefficients": weights_fingerprint(trained),
        "coefficient_norm": float(sum(p.detach().double().norm() ** 2 for p in trained.values()) ** 0.5),
        "locked_steps_run": locked.state.global_step,
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
