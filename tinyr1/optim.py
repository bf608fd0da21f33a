"""The optimizer and the learning-rate schedule, from plain arguments (cold start and GRPO share them)."""

from __future__ import annotations

import math

import torch


def make_optimizer(
    name: str, params: list[torch.nn.Parameter], *, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """bitsandbytes 8-bit AdamW (paged on CUDA) or torch AdamW.

    8-bit states are a quarter of AdamW's fp32 pair; paging lets them spill to host memory under
    pressure, which needs CUDA unified memory, so elsewhere the plain 8-bit optimizer is used.
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb  # heavy, and only for the 8-bit optimizers

    if name == "paged_adamw8bit" and device.type == "cuda":
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: str, warmup_ratio: float, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `ceil(warmup_ratio * total)` steps, then cosine / linear decay to 0, or constant."""
    warmup = int(math.ceil(warmup_ratio * total))

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (i - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else max(1.0 - progress, 0.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
