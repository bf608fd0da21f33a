"""The configuration schema: one frozen dataclass per TOML section, each field with its help and bounds.

Each default is written once, here. A preset or user TOML only lists what it changes; `--set
section.key=value` uses the same spelling. This module only describes the schema; checking a raw
TOML dict against it is `config_validate.py`, reading presets and writing run configs is
`config_io.py`. Optional fields always default to None, so a saved config (which omits None values)
reads back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

TOP_LEVEL_KEYS = ("base", "description", "preset")  # the keys a TOML may hold outside any section
SEED_MAX = 2**32 - 1  # torch's generators take 64 bits, and seeds are combined (seed * 100003 + epoch)
SEED_WHY = "a 32-bit seed; torch's random generators take at most 64 bits and tinyr1 derives seeds from it"


def _f(default: Any = None, help: str = "", *, factory: Any = None, **check: Any) -> Any:
    """A field with its one-line help and optional bounds (ge/gt/le/lt, why, nonempty)."""
    meta = {"help": help, **check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    path: str = _f(
        "Zhang199/TinyLLaVA-Video-Coldstart_NextQA_16",
        "checkpoint folder in the original TinyLLaVA-Video layout, or a hub id",
        nonempty=True,
    )
    synth: bool = _f(False, "create a tiny random checkpoint at `path` when it is missing (the CPU demo)")
    quant: Literal["nf4", "none"] = _f(
        "nf4", "LLM weights: nf4 = 4-bit QLoRA base (bitsandbytes), none = dtype weights"
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "compute dtype; auto = bf16 on CUDA, fp32 on CPU"
    )
    attn_implementation: Literal["sdpa", "eager"] = _f("sdpa", "attention kernel of the LLM and vision tower")
    backend: Literal["peft", "unsloth"] = _f(
        "peft",
        "how the LoRA layers compute: peft = PEFT LoRA over bitsandbytes; unsloth = unsloth's fused LoRA "
        "kernels bound onto the Qwen2 layers (needs lora.dropout = 0; pip install 'tinyr1[unsloth]')",
    )
    gradient_checkpointing: bool | Literal["offload"] = _f(
        True, "recompute LLM activations in the backward pass (less memory, ~30% slower); "
        "offload = also keep the checkpointed layer inputs in host RAM until the backward",
    )
    train_connector: bool = _f(
        True, "also train the connector (full weights) besides the LoRA adapters, as the paper"
    )
    kernels: Literal["auto", "triton", "torch"] = _f(
        "auto", "fused log-prob kernel: triton on CUDA, torch reference; auto picks"
    )
    liger: Literal["auto", "on", "off"] = _f(
        "auto", "Liger RMSNorm/SwiGLU kernels in the LLM; auto = on when CUDA + liger-kernel"
    )
    device: Literal["auto", "cuda", "cpu"] = _f("auto", "where to run; auto = cuda when available, else cpu")


def _all_linear() -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(16, "LoRA rank", ge=1)
    alpha: float = _f(32.0, "LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: float = _f(0.05, "dropout on the LoRA input", ge=0, lt=1)
    target_modules: list[str] = _f(
        help="LLM linear layers that get adapters (names inside each Qwen2 layer)",
        factory=_all_linear,
        nonempty=True,
    )


@dataclass(frozen=True)
class DataConfig:
    train: str | None = _f(
        None,
        "GRPO training set (JSONL/JSON: R1 problem/solution rows, LLaVA or generic); paths are relative to the working dir",
    )
    eval: str | None = _f(None, "held-out set for evaluation during/after training; none = no evaluation")
    coldstart: str | None = _f(None, "cold-start SFT set (LLaVA-style JSON with <think>/<answer> answers)")
    video_root: str | None = _f(
        None,
        "folder that relative video paths in the data are resolved against; none = the data file's folder",
    )
    format: Literal["auto", "r1", "llava", "generic"] = _f(
        "auto", "row format of the data files; auto detects from the first row"
    )
    max_bad_fraction: float = _f(
        0.05,
        "abort when more than this fraction of samples is unreadable (bad rows/videos are skipped and counted)",
        ge=0,
        le=1,
    )
    synth: bool = _f(
        False, "write a synthetic video QA set at data.train/eval/coldstart when missing (the CPU demo)"
    )
    synth_n: int = _f(2000, "synthetic training samples", ge=1)
    synth_eval_n: int = _f(500, "synthetic held-out samples", ge=0)
    synth_seed: int = _f(0, "seed of the synthetic data (independent of train.seed)", ge=0, le=SEED_MAX,
                         why=SEED_WHY)
    synth_tasks: list[str] = _f(
        help="synthetic question types, mixed evenly: color, count, position (one frame answers them) or "
        "first, last, direction, changes (they need several frames); \"temporal\" = the last four",
        factory=lambda: ["color"], nonempty=True,
    )
    synth_coldstart_n: int = _f(64, "annotated synthetic clips for the cold start", ge=0)


@dataclass(frozen=True)
class VideoConfig:
    num_frames: int = _f(
        16, "frames sampled uniformly per video (np.linspace over all frames) when fps is none", ge=1
    )
    fps: float | None = _f(
        None, "sample at this rate instead, capped at max_frames; none = uniform num_frames", gt=0
    )
    max_frames: int = _f(16, "upper bound on frames per video", ge=1)
    image_size: int | None = _f(
        None, "square frame size fed to the vision tower; none = from the checkpoint (384)", ge=1
    )


@dataclass(frozen=True)
class RolloutConfig:
    num_generations: int = _f(
        8,
        "G: completions sampled per prompt (the group)",
        ge=2,
        why="the advantage divides by the group's std",
    )
    max_new_tokens: int = _f(512, "longest completion; longer ones are truncated", ge=1)
    temperature: float = _f(1.0, "sampling temperature", gt=0)
    top_p: float = _f(1.0, "nucleus sampling threshold (1 = off)", gt=0, le=1)
    top_k: int = _f(50, "sample among the k most likely tokens (0 = off)", ge=0)
    prompts_per_step: int = _f(
        8, "prompts (videos + questions) per GRPO step; completions per step = prompts_per_step * G", ge=1
    )
    sync_every: int = _f(
        16,
        "decode tokens between the sampler's checks for finished rows (its only device -> host reads)",
        ge=1,
        why="finished rows are dropped from the batch at those checks; between them the GPU never waits for Python",
    )
    cuda_graphs: bool = _f(
        False,
        "replay each decode step from a captured CUDA graph (one launch per token; CUDA only, ignored on CPU)",
    )


@dataclass(frozen=True)
class GrpoConfig:
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = _f(
        "grpo",
        "token aggregation: grpo = mean per sequence then over sequences; bnpo/dapo = over all tokens; dr_grpo = / (G * max_new_tokens)",
    )
    beta: float = _f(
        0.01, "KL coefficient vs. the adapters-off reference (k3 estimator); 0 = no reference forward", ge=0
    )
    epsilon: float = _f(0.2, "lower clip range of the ratio (acts only when num_iterations > 1)", gt=0, lt=1)
    epsilon_high: float | None = _f(None, "upper clip range (DAPO clip-higher); none = epsilon", gt=0)
    num_iterations: int = _f(1, "policy updates per rollout batch (1 = on-policy, ratio is 1)", ge=1)
    scale_rewards: Literal["group", "batch", "none"] = _f(
        "group", "advantage = (R - mean_G) / (std + 1e-4) with std of the group, the batch, or not scaled"
    )
    noise_std: float = _f(
        0.02, "std of Gaussian noise added to advantages (keeps zero-variance groups moving)", ge=0
    )
    mask_truncated_completions: bool = _f(False, "drop completions that hit max_new_tokens from the loss")
    kl_clamp: float | None = _f(
        None, "clamp the per-token KL to [-kl_clamp, kl_clamp]; none = no clamp", gt=0
    )


@dataclass(frozen=True)
class RewardsConfig:
    """The [rewards] table is the weights mapping itself: `name = weight`, e.g. `r1 = 1.0`."""

    weights: dict[str, float] = _f(
        help='reward name (built-in, or "module:function") -> weight; the whole [rewards] table; weight 0 = logged only',
        factory=lambda: {"r1": 1.0},
    )


@dataclass(frozen=True)
class ColdstartConfig:
    enabled: bool = _f(False, "run cold-start SFT on data.coldstart before GRPO")
    epochs: int = _f(1, "passes over the cold-start set (when steps is none)", ge=1)
    steps: int | None = _f(None, "optimizer steps instead of epochs; none = use epochs", ge=1)
    lr: float = _f(1e-5, "constant learning rate of the cold start", gt=0)
    batch_size: int = _f(4, "samples per optimizer step (the paper: 1 x 4 GPUs)", ge=1)


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = _f(None, "total GRPO steps; none = one epoch over data.train", ge=1)
    lr: float = _f(1e-5, "peak learning rate (paper, full fine-tuning: 1e-6; LoRA wants more)", gt=0)
    lr_scheduler: Literal["cosine", "constant", "linear"] = _f("cosine", "decay after warmup")
    warmup_ratio: float = _f(0.03, "fraction of steps with linear warmup", ge=0, lt=1)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0 = no clipping)", ge=0)
    micro_batch_size: int = _f(4, "completions per forward/backward in the update (memory knob)", ge=1)
    optimizer: Literal["paged_adamw8bit", "adamw8bit", "adamw"] = _f(
        "paged_adamw8bit", "optimizer; the 8-bit ones keep state in bitsandbytes blockwise 8-bit"
    )
    seed: int = _f(0, "seed of sampling, noise and data order", ge=0, le=SEED_MAX, why=SEED_WHY)
    output_dir: str = _f(
        "runs/{preset}-{time}", "run folder; {preset} and {time} are filled in at start", nonempty=True
    )
    save_every: int = _f(50, "checkpoint every N steps (0 = only at the end)", ge=0)
    eval_every: int = _f(0, "evaluate on data.eval every N steps (0 = only at the end)", ge=0)
    eval_limit: int | None = _f(None, "evaluate on at most this many samples; none = all", ge=1)
    eval_samples: int = _f(
        4, "completions per clip for the sampled accuracy (at the rollout's temperature/top-k/top-p; "
        "at most rollout.num_generations)", ge=1,
    )


@dataclass(frozen=True)
class LogConfig:
    completions_every: int = _f(
        10, "write sample completions to completions.jsonl every N steps (0 = never)", ge=0
    )
    num_completions: int = _f(4, "completions written each time", ge=0)
    progress: bool = _f(True, "show a rich progress bar")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "video": VideoConfig,
    "rollout": RolloutConfig,
    "grpo": GrpoConfig,
    "rewards": RewardsConfig,
    "coldstart": ColdstartConfig,
    "train": TrainConfig,
    "log": LogConfig,
}
TABLE_FIELDS = {"rewards": "weights"}  # sections whose whole table fills one mapping field


@dataclass(frozen=True)
class Config:
    """A whole run: one instance per section, plus the preset's name and description."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    coldstart: ColdstartConfig = field(default_factory=ColdstartConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    preset: str = "custom"
    description: str = ""


# Where each raw value came from, for error messages: (section, key) -> "file:line" or "--set ...";
# top-level keys and whole sections use section "".
Origins = dict[tuple[str, str], str]
