#!/usr/bin/env bash
# bash recipes/accelerate/check_fsdp2_gpu.sh        (a machine with >= 2 GPUs)
# The FSDP2 checks that need GPUs: accelerate's FSDP path is GPU-only (accelerate 1.15 on a CPU-only machine turns
# distributed_type FSDP into MULTI_CPU DDP with use_cpu: true, or into two independent processes without it).
# What runs on the CPU is tested there (tests/test_distributed.py: torch's fully_shard on gloo, both phases).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-runs/fsdp2_check}
rm -rf "$out"
nvidia-smi -L
# 1. the TRL path under accelerate FSDP2: warmup sharded with SubspaceLockCallback, then the locked run
accelerate launch --config_file recipes/accelerate/fsdp2.yaml recipes/trl_example.py --gpu \
  --output-dir "$out/trl" --warmup-steps 6 --locked-steps 4
test -f "$out/trl/warmup/basis.safetensors" && test -d "$out/trl/locked/adapter"
# 2. the CPU-tested FSDP2 building blocks (gloo, 2 processes) on this machine too
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/fsdp2_two_process.py "$out" && cat "$out/fsdp2.json"
echo "FSDP2 check passed: $out"
