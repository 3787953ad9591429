"""Locked on-policy distillation with TRL's ``DistillationTrainer``: a full-parameter warmup, then the locked phase.

Runs on CPU in well under a minute with tiny random Llamas and a character tokenizer built in code (no downloads):

    python recipes/trl_example.py [--output-dir runs/trl_example] [--rank 4] [--warmup-steps 20] [--locked-steps 10]
    torchrun --nproc_per_node 2 recipes/trl_example.py          # 2 processes, DDP on the CPU (gloo)
    accelerate launch --config_file recipes/accelerate/fsdp2.yaml recipes/trl_example.py --gpu   # FSDP2, GPUs

Run 1 trains all student weights on-policy against the teacher with a ``SubspaceLockCallback``; once the top-r
subspace of ``ΔW = W_t - W_0`` is stable (or at ``--warmup-steps``) it writes ``basis.safetensors`` and stops.
Run 2 continues from the warmed-up weights in the locked phase (``lock.locked_phase``): the subspace-locked PEFT
adapter, and the coefficient optimizer (``FactoredSubspaceAdamW``, the default) over the r-dimensional coefficients
with the warmup's moments, as ``lockedopd distill`` does.  Swap in real models (same vocabulary for student and
teacher) and a real prompt dataset for actual use.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/trl_example")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=20, help="upper bound of the warmup (max_warmup_steps)")
    parser.add_argument("--locked-steps", type=int, default=10)
    parser.add_argument("--mode", choices=["right", "two_sided"], default="right")
    parser.add_argument("--gpu", action="store_true", help="train on the GPUs (e.g. under an FSDP2 or ZeRO config)")
    opts = parser.parse_args(argv)

    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    import lockedopd  # noqa: F401  (registers the SUBSPACE_LOCKED PEFT method)
    from lockedopd.integrations.trl import SubspaceLockCallback
    from lockedopd.models import build_tiny_llama, build_tiny_tokenizer

    warnings.filterwarnings("ignore", module="trl")
    out = Path(opts.output_dir)
    tokenizer = build_tiny_tokenizer()
    tokenizer.padding_side = "left"  # the on-policy trainer generates from left-padded prompts
    # student and teacher share the character vocabulary, as DistillationTrainer requires
    student = build_tiny_llama(len(tokenizer), num_layers=2, hidden_size=64, intermediate_size=128, seed=0,
                               tokenizer=tokenizer)  # fmt: skip
    teacher = build_tiny_llama(len(tokenizer), num_layers=2, hidden_size=64, intermediate_size=128, seed=1,
                               tokenizer=tokenizer)  # fmt: skip
    prompts = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(10) for b in range(10)]})

    def config(output_dir: Path, max_steps: int) -> DistillationConfig:
        return DistillationConfig(
            output_dir=str(output_dir),
            max_steps=max_steps,
            per_device_train_batch_size=8,
            max_completion_length=8,
            learning_rate=3e-3,
            beta=1.0,  # reverse KL, the usual OPD objective
            logging_steps=5,
            save_strategy="no",
            report_to=[],
            use_cpu=not opts.gpu,
            bf16=False,
            gradient_checkpointing=False,
            disable_tqdm=True,
        )

    # ---- run 1: full-parameter warmup; the callback writes the basis and stops the run when the subspace locks
    lock = SubspaceLockCallback(rank=opts.rank, check_every=2, patience=2, threshold=0.9,
                                max_warmup_steps=opts.warmup_steps, mode=opts.mode)  # fmt: skip
    warmup = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(out / "warmup", max_steps=opts.warmup_steps + opts.locked_steps),
        train_dataset=prompts,
        processing_class=tokenizer,
        callbacks=[lock],
    )
    warmup.train()
    print(f"warmup: locked at step {lock.locked_step} ({lock.lock_reason}); basis -> {lock.basis_path}")

    # ---- run 2: the locked phase on the warmed-up model; only the subspace coefficients train, the coefficient
    # optimizer continuing the warmup optimizer (moments and lr scales from the files written at the lock)
    warmed = warmup.model
    if any(type(p).__name__ == "DTensor" for p in warmed.parameters()):  # FSDP2 shards: the lock needs whole weights
        from lockedopd.runtime.distributed import full_tensor

        whole = {key: full_tensor(value.detach()).cpu() for key, value in warmed.state_dict().items()}
        warmed = build_tiny_llama(len(tokenizer), num_layers=2, hidden_size=64, intermediate_size=128, seed=0,
                                  tokenizer=tokenizer)  # fmt: skip
        warmed.load_state_dict(whole)
    phase = lock.locked_phase(warmed, lr=3e-3)
    locked = DistillationTrainer(
        model=phase.model,
        optimizers=(phase.optimizer, None),
        teacher_model=teacher,
        args=config(out / "locked", max_steps=opts.locked_steps),
        train_dataset=prompts,
        processing_class=tokenizer,
    )
    n_train = sum(p.numel() for p in locked.model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in locked.model.parameters())
    print(f"locked phase: training {n_train:,} of {n_total:,} parameters (rank {opts.rank}, {opts.mode})")
    locked.train()
    locked.save_model(str(out / "locked" / "adapter"))  # a PEFT adapter; the bases travel inside it
    print(f"adapter saved to {out / 'locked' / 'adapter'}")
    return {
        "locked_step": lock.locked_step,
        "lock_reason": lock.lock_reason,
        "basis_path": str(lock.basis_path),
        "trainable_parameters": n_train,
    }


if __name__ == "__main__":
    main()
