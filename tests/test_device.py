"""tinyr1.device: the CUDA allocator setting, made before CUDA initializes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tinyr1.device import EXPANDABLE_SEGMENTS, configure_cuda_allocator


@pytest.fixture
def no_alloc_conf(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Neither allocator variable set; monkeypatch restores the environment afterwards."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    return monkeypatch


def test_sets_expandable_segments(no_alloc_conf: pytest.MonkeyPatch) -> None:
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is already initialized in this test process")
    assert "expandable_segments:True" in configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == EXPANDABLE_SEGMENTS == "expandable_segments:True"


@pytest.mark.parametrize("var", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_a_users_setting_is_left_alone(no_alloc_conf: pytest.MonkeyPatch, var: str) -> None:
    no_alloc_conf.setenv(var, "max_split_size_mb:128")
    assert "set by the user" in configure_cuda_allocator()
    assert os.environ[var] == "max_split_size_mb:128"
    assert ("PYTORCH_CUDA_ALLOC_CONF" in os.environ) == (var == "PYTORCH_CUDA_ALLOC_CONF")


def test_too_late_once_cuda_is_initialized(no_alloc_conf: pytest.MonkeyPatch) -> None:
    no_alloc_conf.setattr(torch.cuda, "is_initialized", lambda: True)  # a CPU machine cannot get there
    assert "call configure_cuda_allocator earlier" in configure_cuda_allocator()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ  # no setting that silently does nothing


@pytest.mark.gpu
def test_cuda_allocator_uses_expandable_segments() -> None:
    """In a fresh process (CUDA not yet initialized), as `tinyr1 train` starts."""
    code = ("from tinyr1.device import configure_cuda_allocator; configure_cuda_allocator(); import torch; "
            "torch.zeros(1, device='cuda'); "
            "print(torch.cuda.memory._snapshot().get('allocator_settings', {}).get('expandable_segments'))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    if out.strip() == "None":
        pytest.skip("this torch does not report allocator settings in its memory snapshot")
    assert out.strip() == "True"
