#!/usr/bin/env bash
# The first thing to run on a CUDA machine: 2-step runs of the real code paths, one PASS / FAIL / SKIP line each.
#   bash scripts/gpu_smoke.sh [WORK_DIR]        (PYTHON=... to pick the interpreter; default .venv/bin/python)
# Checks: the student on the GPU with the lock at step 1; the vLLM teacher (SmolLM2, exact full-vocabulary KL from
# its hidden states) and vLLM student rollouts; FSDP2 over 2 processes (needs 2 GPUs); bitsandbytes' 8-bit AdamW in
# the warmup and the int8 and nf4 frozen bases after the lock; `lockedopd eval` with vLLM generating; the TRL recipe
# (DistillationTrainer with the lock callback, then the locked PEFT adapter) on the GPU. Each check's
# log is kept in WORK_DIR; the exit status is the number of failed checks. Without a CUDA GPU it says so and exits 0.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WORK=${1:-$(mktemp -d -t lockedopd-gpu-smoke-XXXX)}
mkdir -p "$WORK"
STEPS=(max_steps=2 lock.at_step=1 save_steps=1 eval_steps=0 eval_at_start=false progress=false device=cuda)
failed=0

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
if [ -z "$gpus" ] || [ "$gpus" = 0 ]; then
  echo "gpu_smoke: no CUDA GPU here (torch.cuda.is_available() is False with $PYTHON); nothing to check."
  exit 0
fi
echo "gpu_smoke: $gpus CUDA GPU(s), $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))'); logs in $WORK"

check() {  # check NAME COMMAND...: run it, print one line
  local name=$1; shift
  local log="$WORK/$name.log" start=$SECONDS
  if timeout 900 "$@" > "$log" 2>&1; then
    echo "PASS $name ($((SECONDS - start)) s)"
  else
    failed=$((failed + 1))
    echo "FAIL $name ($((SECONDS - start)) s): $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200)  [log: $log]"
  fi
}

skip() { echo "SKIP $1: $2"; }

LOCKEDOPD=("$PYTHON" -m lockedopd)  # an array, not a function: `check` runs it under timeout(1), which needs a program

check student_on_gpu_lock_at_step_1 "${LOCKEDOPD[@]}" distill recipes/configs/tiny.yaml "${STEPS[@]}" \
  output_dir="$WORK/runs/gpu"
check resume_on_gpu "${LOCKEDOPD[@]}" distill recipes/configs/tiny.yaml "${STEPS[@]}" max_steps=3 resume=true \
  output_dir="$WORK/runs/gpu"
check bnb_adamw8bit_warmup "${LOCKEDOPD[@]}" distill recipes/configs/tiny.yaml "${STEPS[@]}" optimizer=adamw8bit \
  output_dir="$WORK/runs/adamw8bit"
check bnb_int8_base "${LOCKEDOPD[@]}" distill recipes/configs/tiny.yaml "${STEPS[@]}" lock.base_dtype=int8 \
  monitor.enabled=false output_dir="$WORK/runs/int8"
check bnb_nf4_base "${LOCKEDOPD[@]}" distill recipes/configs/tiny.yaml "${STEPS[@]}" lock.base_dtype=nf4 \
  monitor.enabled=false output_dir="$WORK/runs/nf4"
if "$PYTHON" -c "import vllm" > /dev/null 2>&1; then
  SMALL=(batch_size=4 rollout.max_new_tokens=16 data.eval_size=4 teacher.batch_size=4)
  check vllm_teacher "${LOCKEDOPD[@]}" distill recipes/configs/smollm2_pruned.yaml "${STEPS[@]}" "${SMALL[@]}" \
    teacher.backend=vllm output_dir="$WORK/runs/vllm_teacher"
  check vllm_student_rollouts "${LOCKEDOPD[@]}" distill recipes/configs/smollm2_pruned.yaml "${STEPS[@]}" "${SMALL[@]}" \
    teacher.backend=vllm rollout.backend=vllm output_dir="$WORK/runs/vllm_rollouts"
  head -n 8 recipes/data/prompts_eval.jsonl > "$WORK/problems.jsonl"
  check eval_with_vllm "${LOCKEDOPD[@]}" eval "$WORK/runs/vllm_teacher" --data "$WORK/problems.jsonl" \
    --verifier contains_answer --samples 2 --backend vllm --json "$WORK/eval.json"
else
  skip vllm_teacher "vLLM does not import with $PYTHON (pip install vllm)"
fi
if "$PYTHON" -c "import trl, datasets" > /dev/null 2>&1; then
  check trl_peft_on_gpu "$PYTHON" recipes/trl_example.py --gpu --output-dir "$WORK/runs/trl" --warmup-steps 2 \
    --locked-steps 2
else
  skip trl_peft_on_gpu "TRL or datasets does not import with $PYTHON (pip install trl)"
fi
if [ "$gpus" -ge 2 ]; then
  check fsdp2_two_processes "$PYTHON" -m torch.distributed.run --nproc_per_node 2 -m lockedopd distill \
    recipes/configs/tiny.yaml "${STEPS[@]}" fsdp=true output_dir="$WORK/runs/fsdp2"
else
  skip fsdp2_two_processes "FSDP2 shards over >= 2 processes, one GPU each; this machine has $gpus"
fi
echo "gpu_smoke: $failed check(s) failed"
exit "$failed"
