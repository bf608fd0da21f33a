"""Process-level device settings that must be made before CUDA is first used.

`configure_cuda_allocator`: PyTorch's caching allocator with `expandable_segments:True` grows one
segment in place instead of carving fixed-size blocks, which removes most of the fragmentation of
a GRPO step (generation's KV cache, then the update's activations, in alternation) - on an 8 GB
card that fragmentation is the difference between fitting and OOM. The allocator reads its
setting once, when CUDA initializes, so the call has to come first. It is harmless on CPU.

PYTORCH_CUDA_ALLOC_CONF is the variable set: every torch >= 2.4 honours it. PYTORCH_ALLOC_CONF
(its newer name) is respected when the user set it, but not set here: torch 2.9.1 ignored
expandable_segments in it for CUDA (pytorch/pytorch#183387). torch 2.8-2.11 print a one-time
deprecation warning for the old name.
"""

from __future__ import annotations

import os

import torch

EXPANDABLE_SEGMENTS = "expandable_segments:True"
ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def configure_cuda_allocator() -> str:
    """Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the user set an allocator config
    or CUDA is already initialized (then it could no longer apply). Returns what happened, one line
    for the run log."""
    for var in ALLOC_CONF_VARS:
        if var in os.environ:
            return f"CUDA allocator: {var}={os.environ[var]} (set by the user, left as is)"
    if torch.cuda.is_initialized():
        return (f"CUDA allocator: not configured ({EXPANDABLE_SEGMENTS} needs to be set before CUDA "
                "initializes; call configure_cuda_allocator earlier)")
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    return f"CUDA allocator: PYTORCH_CUDA_ALLOC_CONF={EXPANDABLE_SEGMENTS}"
