"""The VRAM planner behind `tinyr1 plan`: peak GPU memory of the rollout and update phases, by component.

Everything is plain arithmetic on an architecture (`Arch`) and the run's shapes (`RunShape`), so
the real 3B model can be planned from constants without loading a byte. The activation terms follow
the code as it runs (tinyr1.rollout, trainer, kernels; HF Qwen2/SigLIP; PEFT LoRA; bitsandbytes): a
phase is a few *moments* (encode a video, prefill, decode; log-prob forward, backward through one
checkpointed layer, reference forward) and the phase's peak is the largest. Inside a checkpointed
layer, the backward is walked op by op (`layer_ops`): what each op saves for backward stays alive
until its own backward runs. tests/test_memory.py checks these numbers against peak live tensor
bytes measured on the CPU (`tinyr1.memory_measure`). What only a CUDA allocator adds (context,
fragmentation) is modelled separately and is not part of that check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

GiB = 1024**3
CUDA_CONTEXT = 512 * 1024**2  # CUDA context + cuBLAS/cuDNN workspaces + kernel images (~0.4-0.6 GiB)
FRAGMENTATION = 0.12  # caching-allocator blocks reserved but not allocated, fraction of the peak
MARGIN = 0.10  # "fits" means the total stays below 90% of the card (display, other processes)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ADAPTER = 4  # PEFT keeps LoRA weights in fp32 (autocast_adapter_dtype), so their inputs are cast to fp32


@dataclass(frozen=True)
class Arch:
    """Plain numbers describing a TinyLLaVA-Video model (REFERENCE.md §1 for the real one)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    tied: bool
    vision_hidden: int
    vision_layers: int  # encoder layers that run (truncated at the feature layer)
    vision_ffn: int
    vision_heads: int
    image_size: int
    patch_size: int
    num_queries: int
    group: int  # 1 for the naive resampler
    resampler_layers: int
    connector_heads: int = 8
    connector_dim_head: int = 64
    connector_ff_mult: int = 4
    drop_first_patch: bool = True  # strategy "patch": token 0 dropped

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def kept_patches(self) -> int:
        return self.patches - int(self.drop_first_patch)

    @classmethod
    def qwen25_3b(cls) -> Arch:
        """TinyLLaVA-Video-Qwen2.5-3B: Qwen2.5-3B + SigLIP so400m (26 of 27 layers run) + group resampler."""
        return cls(vocab=151936, hidden=2048, layers=36, heads=16, kv_heads=2, ffn=11008, tied=True,
                   vision_hidden=1152, vision_layers=26, vision_ffn=4304, vision_heads=16, image_size=384,
                   patch_size=14, num_queries=512, group=16, resampler_layers=3)

    @classmethod
    def from_tinyllava(cls, cfg: Any) -> Arch:
        """From a `TinyLlavaConfig` (read_config of a checkpoint folder, or a tiny_config dict)."""
        text, vis = cfg.qwen2(), cfg.siglip(truncate=True)
        return cls(vocab=text.vocab_size, hidden=text.hidden_size, layers=text.num_hidden_layers,
                   heads=text.num_attention_heads, kv_heads=text.num_key_value_heads, ffn=text.intermediate_size,
                   tied=bool(text.tie_word_embeddings), vision_hidden=vis.hidden_size,
                   vision_layers=vis.num_hidden_layers, vision_ffn=vis.intermediate_size,
                   vision_heads=vis.num_attention_heads, image_size=vis.image_size, patch_size=vis.patch_size,
                   num_queries=cfg.num_queries, group=cfg.group if cfg.connector_type == "groupresampler" else 1,
                   resampler_layers=cfg.num_resampler_layers,
                   drop_first_patch=cfg.vision_feature_select_strategy == "patch")


@dataclass(frozen=True)
class RunShape:
    """The run's shapes and switches; `from_config` maps a tinyr1 Config onto it."""

    prompts: int = 8  # B
    group_size: int = 8  # G
    frames: int = 16
    prompt_tokens: int = 160  # text tokens of one prompt (template + question + options + suffix)
    max_new_tokens: int = 512
    micro_batch: int = 4
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_dropout: float = 0.05
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    quant: Literal["nf4", "none"] = "nf4"
    beta: float = 0.0
    num_iterations: int = 1
    grad_checkpointing: bool = True
    train_connector: bool = True
    optimizer: Literal["paged_adamw8bit", "adamw8bit", "adamw"] = "paged_adamw8bit"
    device: Literal["cuda", "cpu"] = "cuda"
    logprob_backend: Literal["triton", "torch"] = "triton"
    liger: bool = True
    attn: Literal["sdpa", "eager"] = "sdpa"
    top_k: int = 50
    top_p: float = 1.0
    kv_expand_decode: bool = True  # transformers <= 5.2x repeats K/V to all heads when decoding with a mask

    @property
    def c(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def rows(self) -> int:
        return self.prompts * self.group_size

    @classmethod
    def from_config(cls, cfg: Any, prompt_tokens: int = 160) -> RunShape:
        m, ro = cfg.model, cfg.rollout
        cuda = m.device != "cpu"
        dtype = m.dtype if m.dtype != "auto" else ("bf16" if cuda else "fp32")
        backend = m.kernels if m.kernels != "auto" else ("triton" if cuda else "torch")
        return cls(prompts=ro.prompts_per_step, group_size=ro.num_generations,
                   frames=min(cfg.video.num_frames, cfg.video.max_frames), prompt_tokens=prompt_tokens,
                   max_new_tokens=ro.max_new_tokens, micro_batch=cfg.train.micro_batch_size, lora_r=cfg.lora.r,
                   lora_targets=tuple(cfg.lora.target_modules), lora_dropout=cfg.lora.dropout, dtype=dtype,
                   quant=m.quant, beta=cfg.grpo.beta, num_iterations=cfg.grpo.num_iterations,
                   grad_checkpointing=m.gradient_checkpointing, train_connector=m.train_connector,
                   optimizer=cfg.train.optimizer, device="cuda" if cuda else "cpu", logprob_backend=backend,
                   liger=cuda and m.liger != "off", attn=m.attn_implementation, top_k=ro.top_k, top_p=ro.top_p)


@dataclass(frozen=True)
class Line:
    """One component: bytes at each phase's peak (None = not present in that phase)."""

    name: str
    kind: Literal["weights", "state", "kept", "activation", "overhead"]
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


def _lora_shapes(arch: Arch, targets: tuple[str, ...]) -> list[tuple[int, int]]:
    """(in, out) of every adapted linear in the LLM."""
    d, kv, f = arch.hidden, arch.kv_dim, arch.ffn
    dims = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    return [dims[t] for t in targets if t in dims] * arch.layers


def lora_params(arch: Arch, run: RunShape) -> list[int]:
    """numel of each LoRA matrix (A: r x in, B: out x r)."""
    out: list[int] = []
    for din, dout in _lora_shapes(arch, run.lora_targets):
        out += [run.lora_r * din, dout * run.lora_r]
    return out


def nf4_bytes(numel: int) -> int:
    """bitsandbytes NF4 with double quantization: 4-bit codes, 8-bit absmax per 64 weights, fp32 absmax
    per 256 of those, two fp32 code tables (16 + 256 entries) and an fp32 offset per tensor."""
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)


def connector_tensors(arch: Arch) -> list[int]:
    """numel of each connector tensor (linear, latents, per layer: 2 LayerNorms, to_q/kv/out, FF)."""
    d, inner, dv = arch.hidden, arch.connector_heads * arch.connector_dim_head, arch.vision_hidden
    ff = arch.connector_ff_mult * d
    layer = [d, d, d, d, d * inner, 2 * d * inner, inner * d, d, d, d * ff, ff * d]
    return [dv * d, d, arch.num_queries // arch.group * d, *layer * arch.resampler_layers, d, d]


def connector_params(arch: Arch) -> int:
    return sum(connector_tensors(arch))


def vision_params(arch: Arch) -> int:
    dv, fv = arch.vision_hidden, arch.vision_ffn
    layer = 4 * (dv * dv + dv) + 2 * dv * fv + fv + dv + 4 * dv
    return 3 * arch.patch_size**2 * dv + dv + arch.patches * dv + arch.vision_layers * layer


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
    opt = optimizer_bytes(lora + (connector_tensors(arch) if run.train_connector else []), ADAPTER, run.optimizer)
    if run.train_connector and run.optimizer == "adamw":  # torch AdamW states take the parameter's dtype
        opt += 2 * connector_params(arch) * (c - ADAPTER)
    grads = lora_b + (conn * c if run.train_connector else 0)
    return [
        Line("LLM decoder linears", "weights", llm, llm, note),
        Line("embeddings / lm_head", "weights", emb, emb, "tied: one matrix" if arch.tied else "two matrices"),
        Line("vision tower (frozen)", "weights", vision_bytes(arch, c), vision_bytes(arch, c),
             f"{arch.vision_layers} SigLIP layers that run"),
        Line("connector", "weights", conn * c, conn * c, "trained" if run.train_connector else "frozen"),
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
    from tinyr1.memory_phases import rollout_moments, update_moments

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

    def flags(self) -> str:
        out = []
        for key, value in self.sets:
            v = str(value).lower() if isinstance(value, bool) else value
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


def arch_for_config(cfg: Any) -> Arch:
    """The checkpoint's own config.json when the folder is local, else the released 3B architecture."""
    from pathlib import Path

    if (Path(cfg.model.path) / "config.json").is_file():
        from tinyr1.model.loading import read_config

        return Arch.from_tinyllava(read_config(Path(cfg.model.path)))
    return Arch.qwen25_3b()


def nominal_gpu_gb(preset: str) -> float | None:
    """'12gb' -> 12.0: the card a preset is named for."""
    import re

    found = re.fullmatch(r"(\d+(?:\.\d+)?)gb", preset)
    return float(found.group(1)) if found else None


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def check_fits(cfg: Any, gpu_bytes: int, prompt_tokens: int = 160) -> Estimate:
    """Raise ConfigError (with the peaks and the cheapest fixes) when the run cannot fit `gpu_bytes`."""
    from tinyr1.errors import ConfigError

    arch, run = arch_for_config(cfg), RunShape.from_config(cfg, prompt_tokens)
    est = estimate(arch, run)
    need = need_bytes(est)
    if verdict(need, gpu_bytes) != "does not fit":
        return est
    fixes = advise(arch, run, gpu_bytes)
    advice = "; ".join(f"{f.flags()} (-> {gib(f.need)})" for f in fixes[:4]) or "none found: use a larger GPU"
    raise ConfigError(
        f"preset '{cfg.preset}' does not fit this GPU: the planner estimates {gib(need)} "
        f"(rollout peak {gib(est.phase_total('rollout'))} at {est.rollout_moment}, update peak "
        f"{gib(est.phase_total('update'))} at {est.update_moment}, + allocator and CUDA context) "
        f"for a {gib(gpu_bytes)} card. Cheapest changes that fit with {MARGIN:.0%} margin: {advice}. "
        f"See `tinyr1 plan --preset {cfg.preset}` for the table; --no-check skips this check."
    )
