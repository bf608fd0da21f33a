"""Everything one training run holds for its whole length, built from a `Config` in one place.

`build_context(cfg, total_steps=...)` is the only way the trainer, the cold start, `tinyr1 bench`
and the benchmarks get a model, optimizer and schedule, so what they measure is what `train` runs.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tinyr1.config import Config
from tinyr1.data import Sample, load_dataset
from tinyr1.errors import DeviceError
from tinyr1.hf_compat import quiet_peft
from tinyr1.kernels import apply_liger, liger_unavailable_reason, resolve_backend
from tinyr1.model.loading import (
    add_lora,
    load_tinyllava,
    prepare_for_training,
    resolve_device,
    trainable_parameters,
)
from tinyr1.model.tinyllava import TinyLlavaVideo
from tinyr1.optim import make_optimizer, make_scheduler
from tinyr1.rewards import RewardFn, resolve_rewards
from tinyr1.video import load_frames


@dataclass(kw_only=True)
class Context:
    """What every GRPO step needs; built once per run by `build_context`."""

    cfg: Config
    model: TinyLlavaVideo  # NF4 LLM + LoRA (+ trainable connector), frozen vision tower
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # sampling + advantage noise, on the CPU: the same draws on any device
    reward_funcs: list[tuple[str, float, RewardFn]]  # (name, weight, function)
    backend: str  # the log-prob kernel really used: "torch" | "triton"
    reference_connector: nn.Module | None = None  # frozen initial connector (connector trains, beta > 0)
    scaler: torch.amp.GradScaler | None = None  # loss scaling when the compute dtype is fp16


def build_context(cfg: Config, *, total_steps: int, rewards_path: Sequence[str | os.PathLike[str]] = ()) -> Context:
    """Model, optimizer, a schedule over `total_steps` GRPO steps, sampler RNG and rewards (custom
    reward modules only from the `rewards_path` folders).

    The global torch seed is set first: LoRA's initialization (and with it the whole run) is a
    function of `train.seed`.
    """
    reward_funcs = resolve_rewards(cfg.rewards.weights, rewards_path)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = build_model(cfg)
    t = cfg.train
    optimizer = make_optimizer(t.optimizer, list(trainable_parameters(model).values()), lr=t.lr,
                               weight_decay=t.weight_decay, device=model.device)
    scheduler = make_scheduler(optimizer, kind=t.lr_scheduler, warmup_ratio=t.warmup_ratio,
                               total=total_steps * cfg.grpo.num_iterations)
    return Context(
        cfg=cfg, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
        generator=torch.Generator().manual_seed(t.seed), reward_funcs=reward_funcs,
        backend=resolve_backend(cfg.model.kernels, model.device),
        reference_connector=reference_connector(model) if cfg.grpo.beta > 0 and model.connector_trains else None,
        scaler=torch.amp.GradScaler(model.device.type) if model.compute_dtype == torch.float16 else None,
    )


def reference_connector(model: TinyLlavaVideo) -> nn.Module:
    """A frozen copy of the connector as loaded, in the compute dtype: the KL reference is the
    initial policy, and "adapters off" alone would leave the trained connector without an anchor.
    Made before any update or resume, so it always holds the checkpoint's weights."""
    return copy.deepcopy(model.connector).to(model.compute_dtype).requires_grad_(False).eval()


def build_model(cfg: Config) -> tuple[TinyLlavaVideo, Any]:
    """Load the checkpoint (NF4 when configured), add LoRA, freeze the rest: (model, tokenizer)."""
    m = cfg.model
    why_not = liger_unavailable_reason() if m.liger == "on" else None
    if why_not is not None:  # refuse before loading any weights
        raise DeviceError(f"model.liger = \"on\": {why_not} "
                          "(or set model.liger = \"auto\" to run unfused without it)")
    if m.backend == "unsloth":  # imported here only: importing unsloth patches torch/transformers process-wide
        from tinyr1.backends.unsloth import check_unsloth

        check_unsloth(resolve_device(m.device), m.quant)  # missing package, CPU + NF4: before any weights load
    loaded = load_tinyllava(m.path, quant=m.quant, dtype=m.dtype, device=m.device, attn_implementation=m.attn_implementation)
    cuda = loaded.model.device.type == "cuda"
    if m.liger == "on" or (m.liger == "auto" and cuda and m.backend == "peft"):  # unsloth fuses the MLP itself
        apply_liger(loaded.model.llm)
    with quiet_peft():
        add_lora(loaded.model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                 target_modules=cfg.lora.target_modules)
    if m.backend == "unsloth":
        from tinyr1.backends.unsloth import bind_unsloth

        bind_unsloth(loaded.model.llm)  # `session.describe_run` reports what got fused
    prepare_for_training(loaded.model, train_connector=m.train_connector, gradient_checkpointing=m.gradient_checkpointing)
    return loaded.model, loaded.tokenizer


def frames_loader(cfg: Config, image_size: int) -> Callable[[Sample], torch.Tensor]:
    """sample -> pixels [T, 3, S, S], sampled as `[video]` says."""
    v = cfg.video

    def load(sample: Sample) -> torch.Tensor:
        return load_frames(sample.video, v.num_frames, image_size, fps=v.fps, max_frames=v.max_frames)

    return load


def load_split(cfg: Config, path: str | None) -> list[Sample]:
    """The samples of one data file (none when the path is unset)."""
    if path is None:
        return []
    return load_dataset(path, video_root=cfg.data.video_root, fmt=cfg.data.format)


def total_steps(cfg: Config, n_train: int) -> int:
    """`train.steps`, or one pass over the training set."""
    return cfg.train.steps or max(n_train // cfg.rollout.prompts_per_step, 1)
