"""`tinyr1 bench --preset NAME`: real GRPO steps at a preset's shapes, measured beside the planner.

Why: `tinyr1 plan` is arithmetic; this runs the same code `tinyr1 train` runs (loader with NF4,
LoRA, gradient checkpointing, kernels; `trainer.rollout_step` + `trainer.update_step`) on a
randomly initialised checkpoint of the preset's architecture (written with the project's own
writer, so nothing is downloaded) and synthetic videos, and reports seconds per phase, generated
tokens per second and peak memory next to the planner's estimate for the very shapes that ran.

On a CPU a 3B model at the full shapes is out of reach, so non-tiny presets run at a stated reduced
scale there (fewer/narrower layers, fewer prompts, shorter completions; frames, image size, video
tokens, G, micro-batch, LoRA rank and vocabulary stay). The estimate is computed for the reduced
shapes (apples to apples) and the full-size estimate is shown for reference.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from tinyr1.config import Config
from tinyr1.config_io import apply_overrides, load_config
from tinyr1.context import Context, build_context, frames_loader, load_split
from tinyr1.errors import ConfigError, DeviceError
from tinyr1.feed import SampleFeeder
from tinyr1.log import peak_memory_bytes
from tinyr1.loss import completion_mask
from tinyr1.memory import Estimate, arch_for_config, estimate, need_bytes
from tinyr1.memory_arch import Arch, RunShape
from tinyr1.memory_measure import measure_phases, resident_bytes
from tinyr1.model.loading import resolve_device
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo
from tinyr1.model.writing import DTYPE_NAMES, tiny_config, write_checkpoint
from tinyr1.rollout import Rollout
from tinyr1.synth import write_synthetic
from tinyr1.tokenizer import build_tiny_tokenizer, load_tokenizer
from tinyr1.trainer import Batch, rollout_step, update_step

# Reduced scale (CPU): architecture knobs, and run-shape changes as `--set` strings (the user's
# own --set values are applied after these, so they win).
REDUCED_ARCH: dict[str, int] = {"layers": 2, "hidden": 256, "vision_layers": 1, "vision_hidden": 128}
REDUCED_RUN = {"rollout.prompts_per_step": 2, "rollout.max_new_tokens": 32}
ARCH_KNOBS = ("layers", "hidden", "vision_layers", "vision_hidden", "vocab")


def _round(x: float, step: int) -> int:
    return max(step, int(round(x / step)) * step)


def reduce_arch(arch: Arch, **knobs: int | None) -> Arch:
    """The architecture with fewer/narrower LLM or vision layers (or a smaller vocabulary).

    Head width and the heads : KV-heads and width : FFN ratios are kept, so a reduced model is a
    scaled-down copy of the real one. Knobs: layers, hidden, vision_layers, vision_hidden, vocab.
    """
    unknown = set(knobs) - set(ARCH_KNOBS)
    if unknown:
        raise TypeError(f"unknown knobs {sorted(unknown)}")
    out = arch
    if knobs.get("hidden"):
        h = int(knobs["hidden"])  # type: ignore[arg-type]
        heads = max(1, round(h / arch.head_dim))
        while h % heads:
            heads -= 1
        kv = max(1, heads * arch.kv_heads // arch.heads)
        while heads % kv:
            kv -= 1
        out = replace(out, hidden=h, heads=heads, kv_heads=kv, ffn=_round(h * arch.ffn / arch.hidden, 32))
    if knobs.get("vision_hidden"):
        vh = int(knobs["vision_hidden"])  # type: ignore[arg-type]
        vheads = max(1, round(vh / (arch.vision_hidden / arch.vision_heads)))
        while vh % vheads:
            vheads -= 1
        out = replace(out, vision_hidden=vh, vision_heads=vheads,
                      vision_ffn=_round(vh * arch.vision_ffn / arch.vision_hidden, 32))
    for knob, name in (("layers", "layers"), ("vision_layers", "vision_layers"), ("vocab", "vocab")):
        if knobs.get(knob):
            out = replace(out, **{name: int(knobs[knob])})  # type: ignore[arg-type]
    return out


def raw_config_for(arch: Arch, eos_id: int, *, frames: int, demo: bool) -> dict[str, Any]:
    """config.json (original layout) of `arch`: the tiny writer's config with the architecture laid
    over it. `demo` keeps the tiny demo's wide init and short context; otherwise Qwen2.5's."""

    raw = tiny_config(arch.vocab, eos_id, image_size=arch.image_size, frames=frames)
    raw.update(
        connector_type="groupresampler" if arch.group > 1 else "naiveresampler", group=arch.group,
        num_queries=arch.num_queries, num_resampler_layers=arch.resampler_layers, hidden_size=arch.hidden,
        vision_hidden_size=arch.vision_hidden, vision_feature_select_strategy="patch" if arch.drop_first_patch else "cls_patch",
    )  # fmt: skip
    raw["text_config"].update(
        hidden_size=arch.hidden, intermediate_size=arch.ffn, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads, vocab_size=arch.vocab,
        tie_word_embeddings=arch.tied,
    )  # fmt: skip
    raw["vision_config"].update(
        hidden_size=arch.vision_hidden, intermediate_size=arch.vision_ffn, num_attention_heads=arch.vision_heads,
        num_hidden_layers=arch.vision_layers + 1,  # feature layer -2: the last layer never runs
        image_size=arch.image_size, patch_size=arch.patch_size,
    )  # fmt: skip
    if not demo:
        raw["tokenizer_model_max_length"] = 3072
        raw["text_config"]["max_position_embeddings"] = 32768
        del raw["text_config"]["initializer_range"]  # Qwen2's 0.02
    return raw


def tiny_arch(frames: int, image_size: int, vocab: int) -> Arch:
    """The architecture `tinyr1 train --preset tiny` creates (model.synth)."""

    return Arch.from_tinyllava(TinyLlavaConfig.from_dict(tiny_config(vocab, 0, image_size=image_size, frames=frames)))


def write_random_checkpoint(out: Path, raw: dict[str, Any], *, seed: int, dtype: torch.dtype) -> Path:
    """Random weights for `raw` in the original layout + the offline tiny tokenizer; reused when
    `out` already holds a checkpoint with the same config (the GPU script benches four presets)."""


    cfg_file = out / "config.json"
    if cfg_file.is_file() and json.loads(cfg_file.read_text()) == dict(raw, torch_dtype=DTYPE_NAMES[dtype]):
        return out
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 3B model initialises in bf16 without an fp32 copy
    try:
        model = TinyLlavaVideo(TinyLlavaConfig.from_dict(raw), truncate_vision=False)
    finally:
        torch.set_default_dtype(old)
    write_checkpoint(out, model.state_dict(), raw, tokenizer_dir=None, dtype=dtype)
    return out


class NeverEosTokenizer:
    """The tokenizer with an end-of-sequence id no sampled token can equal, so every completion runs
    to max_new_tokens: the planner's worst case, and a fixed amount of work per step."""

    eos_token_id = -1

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tok(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


@dataclass
class BenchResult:
    """Measured numbers of one preset bench; seconds are per step (lists: one per timed step)."""

    preset: str
    device: str
    machine: str
    scale: str | None  # None = full scale; else what was reduced
    arch: dict[str, Any]
    shape: dict[str, Any]
    rollout_s: list[float]
    update_s: list[float]
    new_tokens: list[int]  # generated completion tokens per step (up to and including EOS)
    measured: dict[str, int]  # phase -> peak bytes
    memory_method: str
    estimate: dict[str, Any]
    full_estimate: dict[str, Any] | None = None
    peak_rss: int | None = None
    load_avg: tuple[float, float, float] | None = None
    prompt_tokens: int = 0
    overrides: list[str] = field(default_factory=list)  # the user's --set values (they apply at full size too)
    notes: list[str] = field(default_factory=list)

    def mean(self, phase: str) -> float:
        vals = self.rollout_s if phase == "rollout" else self.update_s if phase == "update" else [
            r + u for r, u in zip(self.rollout_s, self.update_s)]
        return sum(vals) / len(vals)

    @property
    def mean_new_tokens(self) -> float:
        return sum(self.new_tokens) / len(self.new_tokens)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["seconds"] = {p: self.mean(p) for p in ("rollout", "update", "step")}
        out["tokens_per_s"] = {p: self.mean_new_tokens / self.mean(p) for p in ("rollout", "update", "step")}
        out["mean_new_tokens"] = self.mean_new_tokens
        out["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
        return out


def _estimate_dict(est: Estimate, run: RunShape) -> dict[str, Any]:

    return {"rollout": est.phase_total("rollout"), "update": est.phase_total("update"), "step": est.allocated_peak,
            "rollout_moment": est.rollout_moment, "update_moment": est.update_moment, "need": need_bytes(est),
            "shape": dataclasses.asdict(run)}


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def bench_config(preset: str, overrides: list[str], *, scale: str, device: str) -> tuple[Config, Config, bool]:
    """(the preset as written, the config that runs, reduced?) — reduced scale applies REDUCED_RUN
    (never raising a value) before the user's --set values."""

    if scale not in ("auto", "full", "reduced"):
        raise ConfigError(f"--scale must be auto, full or reduced, got {scale!r}")
    full = load_config(preset, overrides)
    dev = device if device != "auto" else full.model.device

    dev_type = resolve_device(dev).type
    reduced = scale == "reduced" or (scale == "auto" and dev_type == "cpu" and not full.model.synth)
    sets = [f"model.device={dev_type}"]
    if reduced:
        for key, value in REDUCED_RUN.items():
            section, name = key.split(".")
            sets.append(f"{key}={min(value, getattr(getattr(full, section), name))}")
        rows = min(REDUCED_RUN["rollout.prompts_per_step"], full.rollout.prompts_per_step) * full.rollout.num_generations
        if rows % full.train.micro_batch_size:  # the micro-batch must divide the rows
            sets.append(f"train.micro_batch_size={math.gcd(rows, full.train.micro_batch_size)}")
    run = apply_overrides(load_config(preset), sets + list(overrides))
    return full, run, reduced


def _arch_of(cfg: Config, vocab: int) -> Arch:

    if cfg.model.synth:
        return tiny_arch(cfg.video.num_frames, cfg.video.image_size or 32, vocab)
    return arch_for_config(cfg)


def run_preset_bench(
    preset: str,
    *,
    steps: int = 3,
    scale: str = "auto",
    knobs: dict[str, int | None] | None = None,
    overrides: list[str] | None = None,
    device: str = "auto",
    seed: int = 0,
    allow_eos: bool = False,
    checkpoint_dir: str | Path | None = None,
    on_status: Any = None,
) -> BenchResult:
    """Build, run 1 warm-up + `steps` timed GRPO steps, measure; see the module docstring."""

    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    say = on_status or (lambda _msg: None)
    full_cfg, cfg, reduced = bench_config(preset, overrides or [], scale=scale, device=device)
    user = {k: v for k, v in (knobs or {}).items() if v}
    with tempfile.TemporaryDirectory(prefix="tinyr1-bench-") as tmp:
        model_dir = Path(checkpoint_dir) if checkpoint_dir else Path(tmp) / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        build_tiny_tokenizer(model_dir)
        tok = load_tokenizer(model_dir)
        full_arch = _arch_of(full_cfg, len(tok))
        knobs = dict(user)
        if reduced:  # the defaults never enlarge the preset's architecture; the user's knobs apply as given
            own = {"layers": full_arch.layers, "hidden": full_arch.hidden, "vision_layers": full_arch.vision_layers,
                   "vision_hidden": full_arch.vision_hidden}
            knobs = {**{k: v for k, v in REDUCED_ARCH.items() if v < own[k]}, **user}
        arch = reduce_arch(full_arch, **knobs) if knobs else full_arch
        raw = raw_config_for(arch, tok.eos_token_id, frames=cfg.video.num_frames, demo=cfg.model.synth)
        dtype = torch.bfloat16 if cfg.model.device == "cuda" else torch.float32
        say(f"writing a random checkpoint ({arch.layers} LLM layers x {arch.hidden}, vocab {arch.vocab}) to {model_dir}")
        write_random_checkpoint(model_dir, raw, seed=seed, dtype=dtype)
        cfg = replace(cfg, model=replace(cfg.model, path=str(model_dir), synth=False),
                      grpo=replace(cfg.grpo, mask_truncated_completions=cfg.grpo.mask_truncated_completions and allow_eos))
        result = _run(cfg, arch, Path(tmp), steps=steps, seed=seed, allow_eos=allow_eos, say=say)
    result.preset, result.overrides = full_cfg.preset, list(overrides or [])
    if knobs or reduced:
        parts = [", ".join(f"{k}={v}" for k, v in knobs.items())]
        if reduced:
            parts.append(", ".join(f"{k}={getattr(getattr(cfg, k.split('.')[0]), k.split('.')[1])}" for k in REDUCED_RUN))
        result.scale = "; ".join(p for p in parts if p)
        full_run = RunShape.from_config(full_cfg, result.prompt_tokens if full_cfg.model.synth else 160)

        result.full_estimate = _estimate_dict(estimate(full_arch, full_run), full_run)
    return result


BACKENDS = ("peft", "unsloth")


def run_backend_comparison(preset: str, backends: list[str], *, overrides: list[str] | None = None,
                           checkpoint_dir: str | Path | None = None, on_status: Any = None,
                           **kwargs: Any) -> list[BenchResult]:
    """`run_preset_bench` once per backend on the same random checkpoint, seed and shapes.

    peft runs first: importing unsloth patches torch/transformers for the rest of the process, so
    a peft run after it would not measure plain peft. When unsloth is among them and the preset has
    LoRA dropout, every backend runs with lora.dropout = 0 (unsloth's fused path has none), so
    the comparison is like for like (a note says so)."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ConfigError(f"--backends: unknown {unknown or 'empty list'}; choose from {', '.join(BACKENDS)}")
    say = on_status or (lambda _msg: None)
    sets, notes = list(overrides or []), []
    if "unsloth" in backends and load_config(preset, sets).lora.dropout != 0:
        sets.append("lora.dropout=0")
        notes.append("lora.dropout = 0 for every backend (unsloth's fused kernels run without dropout)")
    order = sorted(dict.fromkeys(backends), key=lambda b: b != "peft")
    results = []
    with tempfile.TemporaryDirectory(prefix="tinyr1-bench-") as tmp:
        shared = Path(checkpoint_dir) if checkpoint_dir else Path(tmp) / "model"  # written once, reused
        for backend in order:
            say(f"backend {backend}")
            res = run_preset_bench(preset, overrides=[*sets, f"model.backend={backend}"], checkpoint_dir=shared,
                                   on_status=on_status, **kwargs)
            res.notes += notes
            results.append(res)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results


def print_comparison(results: list[BenchResult], console: Any) -> None:
    """The backends side by side: seconds per phase, measured peaks and the planner's estimates."""
    first = results[0]
    s = first.shape
    title = (f"bench {first.preset} on {first.machine}, backends side by side: B={s['prompts']} x G={s['group_size']}, "
             f"{s['frames']} frames, {s['max_new_tokens']} new tokens, micro-batch {s['micro_batch']}, "
             f"{s['quant']}/{s['dtype']}; mean of {len(first.rollout_s)} steps after 1 warm-up each")
    table = Table(title=title, title_justify="left")
    for col in ("backend", "rollout s", "update s", "step s", "new tokens / s", "rollout peak", "update peak",
                "planned update", "update / peft"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    base = next((r for r in results if r.shape.get("backend") == "peft"), None)
    for r in results:
        ratio = f"{r.mean('update') / base.mean('update'):.2f}x time, " \
                f"{r.measured['update'] / base.measured['update']:.2f}x memory" if base is not None else "-"
        table.add_row(str(r.shape.get("backend")), f"{r.mean('rollout'):.3f}", f"{r.mean('update'):.3f}",
                      f"{r.mean('step'):.3f}", f"{r.mean_new_tokens / r.mean('step'):.1f}",
                      _gib(r.measured["rollout"]), _gib(r.measured["update"]), _gib(r.estimate["update"]), ratio)
    console.print(table)
    if first.scale:
        console.print(f"reduced scale: {first.scale}")
    console.print(f"memory: {first.memory_method}")
    for note in dict.fromkeys(n for r in results for n in r.notes):
        console.print(f"note: {note}")


def bench_context(cfg: Config, data_dir: Path, seed: int, allow_eos: bool) -> tuple[Context, SampleFeeder]:
    """The run's Context (built as `train` builds it, seeded with `seed`) and a SampleFeeder over
    synthetic clips at the run's shapes; without `allow_eos` the EOS never comes (the planner's worst case)."""
    cfg = replace(cfg, train=replace(cfg.train, seed=seed))
    ctx = build_context(cfg, total_steps=1000)
    size = cfg.video.image_size or ctx.model.cfg.image_size
    paths = write_synthetic(data_dir, cfg.rollout.prompts_per_step, seed, frames=cfg.video.num_frames, size=size,
                            eval_n=0, coldstart_n=0)
    cfg = replace(cfg, data=replace(cfg.data, train=str(paths["train"]), video_root=str(data_dir), eval=None))
    ctx = replace(ctx, cfg=cfg, tokenizer=ctx.tokenizer if allow_eos else NeverEosTokenizer(ctx.tokenizer))
    feeder = SampleFeeder(load_split(cfg, cfg.data.train), frames_loader(cfg, size), seed=seed,
                          max_bad_fraction=cfg.data.max_bad_fraction)
    return ctx, feeder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_cuda(device: torch.device, reset: bool) -> int:
    if device.type != "cuda":
        return 0
    _sync(device)
    peak = int(torch.cuda.max_memory_allocated(device))
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def measured_step(ctx: Context, feeder: SampleFeeder) -> tuple[float, float, int, dict[str, int], Rollout]:
    """One GRPO step as `grpo_loop` runs it: (rollout s, update s, new tokens, CUDA peaks, rollout).

    The rollout time includes decoding the videos (as train's time/rollout). Peaks: CUDA
    max_memory_allocated per phase (0 on the CPU: see `measure_phases`)."""
    dev = ctx.model.device
    _peak_cuda(dev, reset=True)
    t0 = time.perf_counter()
    batch = feeder.next_batch(ctx.cfg.rollout.prompts_per_step)
    ro = rollout_step(ctx, batch)
    _sync(dev)
    t1 = time.perf_counter()
    peaks = {"rollout": _peak_cuda(dev, reset=True)}
    update_step(ctx, ro)
    _sync(dev)
    t2 = time.perf_counter()
    peaks["update"] = _peak_cuda(dev, reset=False)
    return t1 - t0, t2 - t1, new_tokens(ctx, ro), peaks, ro


def new_tokens(ctx: Context, ro: Rollout) -> int:
    """Tokens generated in a rollout, up to and including each row's first EOS."""
    return int(completion_mask(ro.completion_ids, ctx.tokenizer.eos_token_id).sum())


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM (peak RSS)
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass

    return peak_memory_bytes("cpu")


def _run(cfg: Config, arch: Arch, tmp: Path, *, steps: int, seed: int, allow_eos: bool, say: Any) -> BenchResult:

    ctx, feeder = bench_context(cfg, tmp / "data", seed, allow_eos)
    try:
        return _measure(ctx, feeder, cfg, arch, steps=steps, allow_eos=allow_eos, say=say)
    except torch.cuda.OutOfMemoryError as err:

        need = need_bytes(estimate(arch, RunShape.from_config(cfg)))
        raise DeviceError(f"out of GPU memory during the bench of '{cfg.preset}' ({err}); the planner estimated "
                          f"{_gib(need)} for these shapes. Try `tinyr1 plan --preset {cfg.preset}` for smaller "
                          "settings and pass them with --set.") from None


def _measure(ctx: Context, feeder: SampleFeeder, cfg: Config, arch: Arch, *, steps: int, allow_eos: bool, say: Any) -> BenchResult:

    dev = ctx.model.device
    say("warm-up step (not timed)")
    *_, ro = measured_step(ctx, feeder)
    rss_reset = _reset_peak_rss()
    rollout_s, update_s, tokens, peaks = [], [], [], {"rollout": 0, "update": 0}
    for i in range(steps):
        say(f"timed step {i + 1}/{steps}")
        r, u, n, p, ro = measured_step(ctx, feeder)
        rollout_s.append(r)
        update_s.append(u)
        tokens.append(n)
        peaks = {k: max(peaks[k], p[k]) for k in peaks}
    rss = _peak_rss() if dev.type == "cpu" else None
    if dev.type == "cuda":
        method = "torch.cuda.max_memory_allocated per phase, max over the timed steps"
    else:
        say("memory step (live tensor bytes, not timed)")
        base = resident_bytes(ctx.model, ctx.optimizer)
        # On a GPU the decoded frames are host memory and each video is copied to the device (in the
        # compute dtype) only while the tower encodes it. Emulate that: decode before the tracker
        # counts, and hand the frames over in float64 so the tower's `.to(device, dtype)` makes that
        # per-video copy here too (on the CPU in fp32 it would otherwise read them in place).
        batch: Batch = [(sample, frames.double()) for sample, frames in feeder.next_batch(cfg.rollout.prompts_per_step)]
        rollout_peak, update_peak, ro = measure_phases(ctx, batch)
        del batch
        peaks = {"rollout": base + rollout_peak, "update": base + update_peak}
        method = ("live tensor bytes: weights + optimizer state + the peak of a TorchDispatchMode tracker over one "
                  "extra step; decoded frames are held outside it, as host memory on a GPU")
    peaks["step"] = max(peaks["rollout"], peaks["update"])
    prompt_tokens = round(sum(p.numel() - 1 for p in ro.prompt_ids) / len(ro.prompt_ids))
    shape = RunShape.from_config(cfg, prompt_tokens)
    notes = [] if allow_eos else ["EOS suppressed: every completion runs to max_new_tokens (the planner's worst case)"]
    if dev.type == "cuda" and cfg.train.optimizer == "paged_adamw8bit":
        notes.append("paged optimizer states live in CUDA unified memory, outside max_memory_allocated; "
                     "the estimate counts them")
    if dev.type == "cpu":
        notes.append(f"peak RSS {'during the timed steps' if rss_reset else 'of the whole process'} includes "
                     "Python, torch and the loader, so it is not comparable to the tensor estimate")
    return BenchResult(
        preset=cfg.preset, device=str(dev), machine=_machine(dev), scale=None, arch=dataclasses.asdict(arch),
        shape=dataclasses.asdict(shape), rollout_s=rollout_s, update_s=update_s, new_tokens=tokens, measured=peaks,
        memory_method=method, estimate=_estimate_dict(estimate(arch, shape), shape), peak_rss=rss,
        load_avg=os.getloadavg() if hasattr(os, "getloadavg") else None, prompt_tokens=prompt_tokens, notes=notes,
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def print_result(res: BenchResult, console: Any) -> None:
    """The rich table: seconds, tokens/s, measured peak, planner estimate, ratio; then the notes."""

    s = res.shape
    if res.scale:
        console.print(f"[bold yellow]{res.device.upper().split(':')[0]}: reduced scale:[/] {res.scale} "
                      "(everything else at the preset's values)")
    title = (f"bench {res.preset} on {res.machine}: B={s['prompts']} x G={s['group_size']}, {s['frames']} frames, "
             f"{s['max_new_tokens']} new tokens, micro-batch {s['micro_batch']}, {s['quant']}/{s['dtype']}; "
             f"LLM {res.arch['layers']} x {res.arch['hidden']}, vocab {res.arch['vocab']}; "
             f"mean of {len(res.rollout_s)} steps after 1 warm-up")
    table = Table(title=title, title_justify="left")
    for col in ("phase", "s / step", "new tokens / s", "measured peak", "planner estimate", "measured / estimate"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    est = res.estimate
    for phase in ("rollout", "update", "step"):
        moment = f" ({est[phase + '_moment']})" if phase != "step" else ""
        table.add_row(phase, f"{res.mean(phase):.3f}", f"{res.mean_new_tokens / res.mean(phase):.1f}",
                      _gib(res.measured[phase]), _gib(est[phase]) + moment, f"{res.measured[phase] / est[phase]:.2f}")
    console.print(table)
    console.print(f"new tokens per step: {res.mean_new_tokens:.0f} (= {res.mean_new_tokens / (s['prompts'] * s['group_size']):.1f} "
                  f"per completion); prompt: {res.prompt_tokens} text tokens + {res.arch['num_queries']} video tokens")
    console.print(f"memory: {res.memory_method}")
    if res.device.startswith("cuda"):
        console.print(f"planner total with allocator fragmentation + CUDA context: {_gib(est['need'])}")
    if res.peak_rss is not None:
        console.print(f"peak RSS: {_gib(res.peak_rss)}")
    if res.full_estimate is not None:
        f = res.full_estimate
        sets = "".join(f" --set {o}" for o in res.overrides)
        console.print(f"full-size planner estimate (as `tinyr1 plan --preset {res.preset}{sets}`): rollout {_gib(f['rollout'])}, "
                      f"update {_gib(f['update'])}, with overheads {_gib(f['need'])}")
    if res.load_avg is not None:
        console.print(f"load average during the run: {res.load_avg[0]:.2f} {res.load_avg[1]:.2f} {res.load_avg[2]:.2f}")
    for note in res.notes:
        console.print(f"note: {note}")
