"""What `tinyr1 doctor` reports about the machine: Python, torch and its CUDA build, the GPU and its
driver, and the versions of the packages training uses (unsloth without importing it)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

import torch

from tinyr1 import __version__
from tinyr1.memory import GiB

PACKAGES = ("transformers", "peft", "accelerate", "bitsandbytes", "triton", "liger-kernel", "decord", "av")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _driver() -> str:
    """The NVIDIA driver version (nvidia-smi), or how far we got."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi not found"
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as err:
        return f"nvidia-smi failed: {err}"
    return out[0] if out else "unknown"


def environment() -> list[tuple[str, str]]:
    """(what, value) rows: Python, torch and its CUDA build, the GPU, and the packages training uses."""
    rows = [
        ("tinyr1", __version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", f"{platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"),
        ("torch", f"{torch.__version__}, CUDA build {torch.version.cuda or 'none (CPU-only build)'}"),
    ]
    if torch.cuda.is_available():
        rows.append(("driver", _driver()))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"GPU {i}", f"{p.name}, {p.total_memory / GiB:.1f} GiB, compute capability "
                                     f"{p.major}.{p.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    else:
        rows.append(("GPU", "none visible (torch.cuda.is_available() is False): GPU checks SKIP"))
    rows += [(name, package_version(name)) for name in PACKAGES]
    rows.append(("unsloth", _unsloth_row()))
    if os.environ.get("TRITON_INTERPRET") == "1":
        rows.append(("TRITON_INTERPRET", "1: Triton kernels are interpreted (fine for tests on a CPU, not for training)"))
    return rows


def _unsloth_row() -> str:
    """unsloth's version and whether its kernels are active in this process, without importing it."""
    from tinyr1.backends.unsloth import UNSLOTH_VERSION, unsloth_version

    version = unsloth_version()
    if version is None:
        return "not installed (optional: model.backend = 'unsloth', pip install 'tinyr1[unsloth]')"
    pinned = "" if version == UNSLOTH_VERSION else f", tinyr1 is tested with {UNSLOTH_VERSION}"
    active = "imported in this process" if "unsloth" in sys.modules else "not imported yet"
    return (f"{version} (unsloth_zoo {package_version('unsloth_zoo')}{pinned}); kernels {active}: "
            "the 'unsloth' check binds them on a GPU")
