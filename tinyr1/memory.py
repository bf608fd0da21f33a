"""The VRAM planner behind `tinyr1 plan`: peak GPU memory of the rollout and update phases, by component.

Everything is plain arithmetic on an architecture (`Arch`) and the run's shapes (`RunShape`, both in
`tinyr1.memory_arch`), so the real 3B model can be planned from constants without loading a byte.
This module adds the weights and training state to the activation moments of `tinyr1.memory_phases`,
takes each phase's peak, and judges and advises against a card size. The activation terms follow
the code as it runs (tinyr1.rollout, trainer, kernels; HF Qwen2/SigLIP; PEFT LoRA; bitsandbytes): a
phase is a few *moments* (encode a video, prefill, decode; log-prob forward, backward through one
checkpointed layer, reference forward) and the phase's peak is the largest. Inside a checkpointed
layer, the backward is walked op by op (`memory_phases.layer_ops`): what each op saves for backward stays alive
until its own backward runs. tests/test_memory.py checks these numbers against peak live tensor
bytes measured on the CPU (`tinyr1.memory_measure`). What only a CUDA allocator adds (context,
fragmentation) is modelled separately and is not part of that check.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tinyr1.config import Config
from tinyr1.config_io import list_presets, load_config
from tinyr1.errors import ConfigError
from tinyr1.memory_arch import (
    ADAPTER,
    CUDA_CONTEXT,
    FRAGMENTATION,
    MARGIN,
    Arch,
    RunShape,
    connector_params,
    connector_tensors,
    lora_params,
    vision_params,
)
from tinyr1.memory_phases import offloaded_bytes, rollout_moments, update_moments

GiB = 1024**3
PRESET_BUDGET = 0.75  # a GPU preset needs at most this share of its card: headroom until GPU-measured


@dataclass(frozen=True)
class Line:
    """One component: bytes at each phase's peak (None = not present in that phase)."""

    name: str
    kind: Literal["weights", "state", "kept", "activation", "overhead", "host"]  # host: RAM, not the GPU
    rollout: int | None
    update: int | None
    note: str = ""


@dataclass(frozen=True)
class Estimate:
    lines: list[Line]
    rollout_moment: str
    update_moment: str
    moments: dict[str, int] = field(default_factory=dict)  # every moment's total, for the curious

    def phase_total(self, phase: str, kinds: tuple[str, ...] = ("weights", "state", "kept", "activation")) -> int:
        return sum(getattr(ln, phase) or 0 for ln in self.lines if ln.kind in kinds)

    @property
    def allocated_peak(self) -> int:
        """Peak of tensor bytes (what torch.cuda.max_memory_allocated reports)."""
        return max(self.phase_total("rollout"), self.phase_total("update"))

    @property
    def total(self) -> int:
        """Allocated peak + allocator fragmentation + CUDA context: what the card must hold."""
        return self.allocated_peak + self.phase_total("rollout", ("overhead",))


# ---------------------------------------------------------------- weights and training state


def nf4_bytes(numel: int) -> int:
    """bitsandbytes NF4 with double quantization: 4-bit codes, 8-bit absmax per 64 weights, fp32 absmax
    per 256 of those, two fp32 code tables (16 + 256 entries) and an fp32 offset per tensor."""
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)


def vision_bytes(arch: Arch, c: int) -> int:
    return vision_params(arch) * c + arch.patches * 8  # + the int64 position_ids buffer


def optimizer_bytes(numels: list[int], param_bytes: int, optimizer: str) -> int:
    """AdamW: two states like the parameter. bitsandbytes 8-bit: uint8 states + fp32 absmax per 256
    for tensors of at least 4096 elements, fp32 states below that (its min_8bit_size)."""
    if optimizer == "adamw":
        return sum(2 * n * param_bytes for n in numels)
    qmaps = 2 * 256 * 4  # the two shared quantization maps
    return qmaps + sum(2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 8 * n for n in numels)


def weight_lines(arch: Arch, run: RunShape) -> list[Line]:
    c, d, kv, f = run.c, arch.hidden, arch.kv_dim, arch.ffn
    lin = [d * d, d * kv, d * kv, d * d, d * f, d * f, f * d]  # q k v o gate up down
    small = (3 * d + 2 * kv + 2 * d) * c  # q/k/v biases + two RMSNorm weights per layer
    if run.quant == "nf4":
        llm = arch.layers * (sum(nf4_bytes(n) for n in lin) + small)
        note = "4-bit codes + double-quantized absmax (bitsandbytes)"
    else:
        llm = arch.layers * (sum(lin) * c + small)
        note = f"{run.dtype}, not quantized"
    emb = arch.vocab * d * c * (1 if arch.tied else 2) + d * c
    lora = lora_params(arch, run)
    lora_b = sum(lora) * ADAPTER
    conn = connector_params(arch)
    numels = lora + (connector_tensors(arch) if run.train_connector else [])
    opt = optimizer_bytes(numels, ADAPTER, run.optimizer)  # every trainable weight is an fp32 master weight
    conn_b = conn * (ADAPTER if run.train_connector else c)
    grads = lora_b + (conn * ADAPTER if run.train_connector else 0)
    reference = conn * c if run.train_connector and run.beta > 0 else 0  # frozen initial connector (KL)
    return [
        Line("LLM decoder linears", "weights", llm, llm, note),
        Line("embeddings / lm_head", "weights", emb, emb, "tied: one matrix" if arch.tied else "two matrices"),
        Line("vision tower (frozen)", "weights", vision_bytes(arch, c), vision_bytes(arch, c),
             f"{arch.vision_layers} SigLIP layers that run"),
        Line("connector", "weights", conn_b, conn_b, "trained, fp32 master weights" if run.train_connector else "frozen"),
        *([Line("reference connector", "weights", reference, reference, "frozen copy of the initial connector")]
          if reference else []),
        Line("LoRA weights", "weights", lora_b, lora_b, f"r={run.lora_r}, fp32"),
        Line("gradients", "state", None, grads, "LoRA fp32" + (" + connector" if run.train_connector else "")),
        Line("optimizer states", "state", opt, opt,
             f"{run.optimizer}, {sum(numels) / 1e6:.1f}M trainable" + (" (paged)" if "paged" in run.optimizer else "")),
    ]


# ---------------------------------------------------------------- the estimate


def _peak(moments: dict[str, dict[str, tuple[str, int, str]]]) -> tuple[str, dict[str, tuple[str, int, str]]]:
    name = max(moments, key=lambda k: sum(v[1] for v in moments[k].values()))
    return name, moments[name]


def estimate(arch: Arch, run: RunShape) -> Estimate:
    """Peak bytes of each phase, by component (see the module docstring for the model)."""
    r_moments, u_moments = rollout_moments(arch, run), update_moments(arch, run)
    r_name, r_peak = _peak(r_moments)
    u_name, u_peak = _peak(u_moments)
    lines = weight_lines(arch, run)
    for name in dict.fromkeys([*r_peak, *u_peak]):
        kind, r, u = "activation", None, None
        note = ""
        if name in r_peak:
            kind, r, note = r_peak[name]
        if name in u_peak:
            kind, u, unote = u_peak[name]
            note = note or unote
        if (r or 0) or (u or 0):
            lines.append(Line(name, kind, r, u, note))  # type: ignore[arg-type]
    all_moments = {f"rollout: {k}": sum(v[1] for v in m.values()) for k, m in r_moments.items()}
    all_moments.update({f"update: {k}": sum(v[1] for v in m.values()) for k, m in u_moments.items()})
    if run.grad_checkpointing == "offload":
        lines.append(Line("offloaded checkpoints (host RAM)", "host", None, offloaded_bytes(arch, run),
                          "pinned host memory, not on the GPU"))
    est = Estimate(lines, r_name, u_name, all_moments)
    if run.device == "cuda":
        frag_r = int(FRAGMENTATION * est.phase_total("rollout"))
        frag_u = int(FRAGMENTATION * est.phase_total("update"))
        lines.append(Line("allocator fragmentation", "overhead", frag_r, frag_u, f"~{FRAGMENTATION:.0%} of tensors"))
        lines.append(Line("CUDA context", "overhead", CUDA_CONTEXT, CUDA_CONTEXT, "driver, cuBLAS, kernels"))
    return est


def need_bytes(est: Estimate) -> int:
    """What the card must hold: the worse phase's tensors + its fragmentation + the context."""
    return max(est.phase_total(p, ("weights", "state", "kept", "activation", "overhead")) for p in ("rollout", "update"))


def verdict(need: int, gpu_bytes: int) -> str:
    """'fits' (with the margin), 'tight' (fits, less than the margin left) or 'does not fit'."""
    if need <= (1 - MARGIN) * gpu_bytes:
        return "fits"
    return "tight" if need <= gpu_bytes else "does not fit"


# ---------------------------------------------------------------- advice and the config glue

# Knobs in order of what they cost the recipe: micro-batch only costs speed; frames cost the most.
KNOBS: tuple[tuple[str, str, tuple[Any, ...]], ...] = (
    ("train.micro_batch_size", "micro_batch", (8, 4, 2, 1)),
    ("grpo.beta", "beta", (0.0,)),
    ("lora.r", "lora_r", (64, 32, 16, 8, 4)),
    ("model.train_connector", "train_connector", (False,)),
    ("rollout.max_new_tokens", "max_new_tokens", (512, 384, 256, 192, 128, 96, 64)),
    ("rollout.prompts_per_step", "prompts", (8, 6, 4, 2, 1)),
    ("rollout.num_generations", "group_size", (8, 6, 4, 3, 2)),
    ("video.num_frames", "frames", (16, 12, 8, 6, 4, 2)),
)


@dataclass(frozen=True)
class Fix:
    sets: tuple[tuple[str, Any], ...]  # (config key, value) pairs
    need: int

    def flags(self, gpus: int = 1) -> str:
        """The --set flags; a per-GPU prompt count is given as the global `prompts_per_step` (x gpus)."""
        out = []
        for key, value in self.sets:
            v = str(value).lower() if isinstance(value, bool) else value
            if key == "rollout.prompts_per_step":
                v = value * gpus
            out.append(f"--set {key}={v}")
            if key == "video.num_frames":
                out.append(f"--set video.max_frames={v}")
        return " ".join(out)


def _smaller(run: RunShape, field_name: str, values: tuple[Any, ...]) -> list[Any]:
    cur = getattr(run, field_name)
    if isinstance(cur, bool):
        return [v for v in values if v != cur]
    return [v for v in values if v < cur]


def advise(arch: Arch, run: RunShape, gpu_bytes: int) -> list[Fix]:
    """Single changes that make the run fit with the margin (mildest value each, cheapest knob first);
    when none does, one greedy combination."""
    limit = (1 - MARGIN) * gpu_bytes
    fixes: list[Fix] = []
    for key, name, values in KNOBS:
        for v in _smaller(run, name, values):
            need = need_bytes(estimate(arch, replace(run, **{name: v})))
            if need <= limit:
                fixes.append(Fix(((key, v),), need))
                break
    if fixes:
        return fixes
    sets: dict[str, Any] = {}
    cur = run
    while need_bytes(estimate(arch, cur)) > limit:
        best: tuple[int, str, str, Any] | None = None
        for key, name, values in KNOBS:
            options = _smaller(cur, name, values)
            if options:
                need = need_bytes(estimate(arch, replace(cur, **{name: options[0]})))
                if best is None or need < best[0]:
                    best = (need, key, name, options[0])
        if best is None:
            break
        sets[best[1]] = best[3]
        cur = replace(cur, **{best[2]: best[3]})
    return [Fix(tuple(sets.items()), need_bytes(estimate(arch, cur)))] if sets else []


def arch_for_config(cfg: Config) -> Arch:
    """The checkpoint's own config.json when the folder is local, else the released 3B architecture."""
    if (Path(cfg.model.path) / "config.json").is_file():
        from tinyr1.model.loading import read_config  # heavy (torch, transformers): only for local folders

        return Arch.from_tinyllava(read_config(Path(cfg.model.path)))
    return Arch.qwen25_3b()


def nominal_gpu_gb(preset: str) -> float | None:
    """'12gb' -> 12.0: the card a preset is named for."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)gb", preset)
    return float(found.group(1)) if found else None


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def check_fits(cfg: Config, gpu_bytes: int, prompt_tokens: int = 160, *, gpus: int = 1) -> Estimate:
    """Raise ConfigError (with the peaks and the cheapest fixes) when the run cannot fit `gpu_bytes`;
    with `gpus` data-parallel ranks, one rank's share of the prompts on one GPU of `gpu_bytes`."""
    arch, run = arch_for_config(cfg), RunShape.from_config(cfg, prompt_tokens, gpus=gpus)
    est = estimate(arch, run)
    need = need_bytes(est)
    if verdict(need, gpu_bytes) != "does not fit":
        return est
    fixes = advise(arch, run, gpu_bytes)
    advice = "; ".join(f"{f.flags(gpus)} (-> {gib(f.need)})" for f in fixes[:4]) or "none found: use a larger GPU"
    raise ConfigError(
        f"preset '{cfg.preset}' does not fit this GPU: the planner estimates {gib(need)}"
        f"{f' per GPU ({run.prompts} of {cfg.rollout.prompts_per_step} prompts on each of {gpus})' if gpus > 1 else ''} "
        f"(rollout peak {gib(est.phase_total('rollout'))} at {est.rollout_moment}, update peak "
        f"{gib(est.phase_total('update'))} at {est.update_moment}, + allocator and CUDA context) "
        f"for a {gib(gpu_bytes)} card. Cheapest changes that fit with {MARGIN:.0%} margin: {advice}. "
        f"See `tinyr1 plan --preset {cfg.preset}` for the table; --no-check skips this check."
    )


def gpu_presets() -> list[str]:
    """Names of the presets made for a card size ('24gb', '16gb', ...), largest card first."""
    sized = [(nominal_gpu_gb(name), name) for name, _ in list_presets()]
    return [name for gb, name in sorted((x for x in sized if x[0] is not None), reverse=True)]


def auto_preset(gpu_bytes: int, overrides: list[str] | tuple[str, ...] = (),
                prompt_tokens: int = 160) -> tuple[str | None, list[str]]:
    """The largest GPU preset for a card of `gpu_bytes`, and one line per preset tried saying why.

    Pure arithmetic (no GPU needed): each preset, with `overrides` applied, is planned as `tinyr1
    plan` plans it. The first (largest) whose need stays within PRESET_BUDGET of the card wins, the
    headroom the presets are sized with; failing that, the largest the planner says 'fits' (within
    1 - MARGIN), for cards a little smaller than their nominal size. None when nothing fits.
    """
    tried: list[tuple[str, int]] = []
    for name in gpu_presets():
        cfg = load_config(name, list(overrides))
        tried.append((name, need_bytes(estimate(arch_for_config(cfg), RunShape.from_config(cfg, prompt_tokens)))))
    chosen = next((n for n, need in tried if need <= PRESET_BUDGET * gpu_bytes), None)
    if chosen is None:
        chosen = next((n for n, need in tried if verdict(need, gpu_bytes) == "fits"), None)
    reasons = []
    for name, need in tried:
        share = f"{name} needs {gib(need)} ({need / gpu_bytes:.0%})"
        if need <= PRESET_BUDGET * gpu_bytes:
            why = f"fits, within the {PRESET_BUDGET:.0%} presets are sized for"
        elif verdict(need, gpu_bytes) == "fits":
            why = f"fits, but above the {PRESET_BUDGET:.0%} presets are sized for"
        else:
            why = verdict(need, gpu_bytes)  # 'tight' or 'does not fit'
        reasons.append(f"{share}: {why}" + (" -> chosen" if name == chosen else ""))
        if name == chosen:
            break
    return chosen, reasons
