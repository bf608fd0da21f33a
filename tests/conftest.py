"""Test set-up: the Triton interpreter only where there is no GPU, decided before triton is imported.

Without CUDA, `TRITON_INTERPRET=1` runs the Triton kernels on CPU tensors (with the CUDA launch
plan, see `tinyr1.kernels.logprob_triton`). With CUDA the kernels must be compiled, so the
interpreter is switched off even when the environment exports it (`.ci/run` does, for CPU CI):
the `gpu` tests then run what training runs. `TINYR1_TEST_INTERPRET=1` keeps the interpreter on a
GPU machine (debugging a kernel). `torch.cuda.is_available()` creates no CUDA context, and importing
torch does not import triton, so both can happen before the decision.
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA or os.environ.get("TINYR1_TEST_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    mode = "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled (CUDA)"
    return f"tinyr1: CUDA {'available' if CUDA else 'absent'}; Triton kernels run {mode}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a "gpu" in a test id
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():  # noqa: ANN201 - a generator fixture
    """A tiny model is slower on oversubscribed threads than on one; restore the setting after.

    Opt in per module: `pytestmark = [..., pytest.mark.usefixtures("one_thread")]`.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
