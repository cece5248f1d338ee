"""Shared fixtures: tiny local models and tokenizers (nothing is downloaded), quiet logs, deterministic CPU runs."""

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not import triton)

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which must be switched on before
# triton is first imported (relex_callback imports it through transformers). On CPU nothing else here runs Triton,
# so the whole test run (and its child processes) can have it on; with a GPU the kernels run natively.
if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py could enable its interpreter"
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs the tests in parallel (pytest-xdist, one worker per core): each worker, and the processes it
# starts, then computes on one thread; oversubscribed cores make OpenMP's waiting threads spin (several times slower).
_THREADS = max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
torch.set_num_threads(_THREADS)


@pytest.fixture
def tokenizer():
    from relex_callback.examples.toy import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    from relex_callback.examples.toy import build_model

    return build_model(tokenizer)


@pytest.fixture
def subprocess_env():
    """Environment for child processes (CLI, torchrun, accelerate launch): this checkout first on the path."""
    from helpers import cli_env  # here, not at the top: helpers imports the package, after triton's set-up above

    return cli_env()
