"""Typed configuration: one frozen dataclass per TOML section, presets, --set overrides, save/load.

Each default is written once, here. A preset or user TOML only lists what it changes; `--set
section.key=value` uses the same spelling. Everything is checked before any weights load, and
all problems are reported in one `ConfigError` (see `config_validate.py` for the checks).
Optional fields always default to None, so a saved config (which omits None values) reads back
exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from tinyr1.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PRESETS_DIR = Path(__file__).resolve().parent / "presets"  # package data: works in any install
TOP_LEVEL_KEYS = ("base", "description", "preset")


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
    gradient_checkpointing: bool = _f(
        True, "recompute LLM activations in the backward pass (less memory, ~30% slower)"
    )
    train_connector: bool = _f(
        True, "also train the connector (full weights) besides the LoRA adapters, as the paper"
    )
    kernels: Literal["auto", "triton", "torch"] = _f(
        "auto", "fused log-prob kernel: triton on CUDA, torch reference; auto picks"
    )
    liger: Literal["auto", "on", "off"] = _f(
        "auto", "Liger RMSNorm/RoPE/SwiGLU kernels in the LLM; auto = on when CUDA + liger-kernel"
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
    synth_seed: int = _f(0, "seed of the synthetic data (independent of train.seed)", ge=0)


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
    seed: int = _f(0, "seed of sampling, noise and data order", ge=0)
    output_dir: str = _f(
        "runs/{preset}-{time}", "run folder; {preset} and {time} are filled in at start", nonempty=True
    )
    save_every: int = _f(50, "checkpoint every N steps (0 = only at the end)", ge=0)
    eval_every: int = _f(0, "evaluate on data.eval every N steps (0 = only at the end)", ge=0)
    eval_limit: int | None = _f(None, "evaluate on at most this many samples; none = all", ge=1)


@dataclass(frozen=True)
class LogConfig:
    every: int = _f(1, "write metrics every N steps", ge=1)
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


# ---------------------------------------------------------------- reading TOML with origins

Origins = dict[tuple[str, str], str]  # (section, key) -> "file:line" or "--set ..."


def _show_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _key_lines(text: str) -> dict[tuple[str, str], int]:
    """Line of each `key =` per section; tomllib gives no positions, messages want them."""
    lines: dict[tuple[str, str], int] = {}
    section = ""
    for no, line in enumerate(text.splitlines(), start=1):
        head = re.match(r"\s*\[\s*([^\]]+?)\s*\]", line)
        if head:
            section = head.group(1).strip("\"'")
            lines.setdefault(("", section), no)
            continue
        kv = re.match(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_.:-]+)\s*=""", line)
        if kv:
            lines.setdefault((section, kv.group(1).strip("\"'")), no)
    return lines


def preset_path(name: str) -> Path:
    return PRESETS_DIR / f"{name}.toml"


def _resolve_source(source: str, relative_to: Path | None = None) -> Path:
    """A preset name, a TOML path, or a run folder holding config.toml."""
    path = Path(source)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.is_dir() and (path / "config.toml").is_file():
        return path / "config.toml"
    if path.is_file():
        return path
    if "/" not in source and not source.endswith(".toml") and preset_path(source).is_file():
        return preset_path(source)
    names = [n for n, _ in list_presets()]
    near = difflib.get_close_matches(source, names, n=1, cutoff=0.5)
    hint = f"did you mean '{near[0]}'? " if near else ""
    raise ConfigError(
        f"no preset or TOML file '{source}'; {hint}presets: {', '.join(names)} "
        f"(a path must point to a .toml file or a run folder with config.toml)"
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{_show_path(path)}: not valid TOML: {err}; fix the syntax there") from err
    except OSError as err:
        raise ConfigError(f"{_show_path(path)}: cannot read: {err}") from err


def _load_raw(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Origins]:
    """Read a TOML and, via `base = ...`, the files it inherits; later files win key by key."""
    if path.resolve() in chain:
        loop = " -> ".join(_show_path(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"{_show_path(path)}: `base` forms a loop ({loop}); remove one `base`")
    text = path.read_text(encoding="utf-8")
    data = _read_toml(path)
    lines = _key_lines(text)
    shown = _show_path(path)
    merged: dict[str, Any] = {}
    origins: Origins = {}
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{shown}: base must be a preset name or a TOML path (a string), got {base!r}")
        merged, origins = _load_raw(_resolve_source(base, path.parent), (*chain, path.resolve()))
        merged.pop("preset", None)
        merged.pop("description", None)
        for name in TABLE_FIELDS:  # a child's [rewards] adds to what it inherits, default included
            merged.setdefault(name, dict(getattr(SECTIONS[name](), TABLE_FIELDS[name])))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
        origins[("", key)] = f"{shown}:{lines.get(('', key), '?')}"
        if isinstance(value, dict):
            for sub in value:
                origins[(key, sub)] = f"{shown}:{lines.get((key, sub), '?')}"
    return merged, origins


def _header_description(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            if text:
                return text
        elif line.strip():
            break
    return ""


# ---------------------------------------------------------------- public API


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every presets/*.toml: tiny first, then by card size, then the rest."""

    def order(name: str) -> tuple[int, int, str]:
        gb = re.fullmatch(r"(\d+)gb", name)
        return (0, 0, name) if name == "tiny" else (1, int(gb.group(1)), name) if gb else (2, 0, name)

    out = []
    for path in sorted(PRESETS_DIR.glob("*.toml"), key=lambda p: order(p.stem)):
        try:
            desc = tomllib.loads(path.read_text(encoding="utf-8")).get("description", "")
        except tomllib.TOMLDecodeError:
            desc = ""
        out.append((path.stem, str(desc) if desc else _header_description(path)))
    return out


def load_config(preset_or_path: str, overrides: list[str] | None = None) -> Config:
    """Preset name, TOML path or run folder -> validated Config; raises one ConfigError listing every problem."""
    from tinyr1.config_validate import build_config, parse_overrides

    path = _resolve_source(preset_or_path)
    data, origins = _load_raw(path)
    is_preset = path.parent.resolve() == PRESETS_DIR.resolve() and path.stem == preset_or_path
    name = preset_or_path if is_preset else path.stem if path.name != "config.toml" else path.parent.name
    problems = parse_overrides(overrides or [], data, origins)
    label = (f"preset {name}" if is_preset else _show_path(path)) + (" + --set" if overrides else "")
    return build_config(
        data, origins, default_name=str(data.get("preset", name)), label=label, problems=problems
    )


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`section.key=value` strings applied to an existing config, re-validated as a whole."""
    from tinyr1.config_validate import build_config, parse_overrides

    data = config_to_dict(cfg)
    origins: Origins = {}
    problems = parse_overrides(overrides, data, origins)
    return build_config(
        data,
        origins,
        default_name=cfg.preset,
        label=cfg.preset + (" + --set" if overrides else ""),
        problems=problems,
    )


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain dict {section: {key: value}} plus `preset` and `description`; rewards is its weights table."""
    out: dict[str, Any] = {"preset": cfg.preset, "description": cfg.description}
    for name in SECTIONS:
        section = getattr(cfg, name)
        if name in TABLE_FIELDS:
            out[name] = dict(getattr(section, TABLE_FIELDS[name]))
        else:
            out[name] = {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
    return out


def _plain(value: Any) -> Any:
    return (
        list(value) if isinstance(value, (list, tuple)) else dict(value) if isinstance(value, dict) else value
    )


def resolve_output_dir(cfg: Config, now: datetime | None = None) -> Config:
    """Fill {preset} and {time} in train.output_dir (the run stores the result)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    out = cfg.train.output_dir.format(preset=re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.preset), time=stamp)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=out))


def check_trainable(cfg: Config) -> None:
    """What `load_config` cannot demand (presets leave data open): training needs data.train."""
    if cfg.data.train is None:
        raise ConfigError(
            "data.train is not set: GRPO needs a training set; fix: --set data.train=path/to/train.jsonl "
            "(and --set data.video_root=videos/ if its video paths are relative to another folder)"
        )


# ---------------------------------------------------------------- writing TOML

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def config_to_toml(cfg: Config) -> str:
    """Fully resolved TOML with each field's help as a comment; None values are omitted (their default)."""
    data = config_to_dict(cfg)
    lines = [
        "# tinyr1 configuration, fully resolved. Load with: tinyr1 train --preset path/to/this.toml",
        f"preset = {_toml_value(cfg.preset)}",
        f"description = {_toml_value(cfg.description)}",
    ]
    for name, cls in SECTIONS.items():
        lines += ["", f"[{name}]"]
        helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
        for key, value in data[name].items():
            if value is None:
                lines.append(f"# {key} = none  ({helps.get(key, '')})")
            else:
                comment = f"  # {helps[key]}" if helps.get(key) else ""
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}{comment}")
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config atomically (temp file, then rename): a run folder's config.toml."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(config_to_toml(cfg), encoding="utf-8")
    os.replace(tmp, target)
    return target
