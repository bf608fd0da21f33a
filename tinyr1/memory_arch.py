"""What the memory planner plans for: the model's architecture (`Arch`), the run's shapes
(`RunShape`), the planner's constants, and parameter counts derived from the architecture.

Plain numbers only, no torch: the real 3B model is described from constants. Both the weight lines
(`tinyr1.memory`) and the activation moments (`tinyr1.memory_phases`) read from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # annotations only: the planner must not import torch to plan
    from tinyr1.config import Config
    from tinyr1.model.tinyllava import TinyLlavaConfig

CUDA_CONTEXT = 512 * 1024**2  # CUDA context + cuBLAS/cuDNN workspaces + kernel images (~0.4-0.6 GiB)
FRAGMENTATION = 0.12  # caching-allocator blocks reserved but not allocated, fraction of the peak
MARGIN = 0.10  # "fits" means the total stays below 90% of the card (display, other processes)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ADAPTER = 4  # PEFT keeps LoRA weights in fp32 (autocast_adapter_dtype), so their inputs are cast to fp32


@dataclass(frozen=True)
class Arch:
    """Plain numbers describing a TinyLLaVA-Video model (docs/ORIGINAL.md §1 for the real one)."""

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
    def from_tinyllava(cls, cfg: TinyLlavaConfig) -> Arch:
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
    grad_checkpointing: bool | Literal["offload"] = True  # offload: checkpointed inputs in host RAM
    backend: Literal["peft", "unsloth"] = "peft"  # unsloth: fused LoRA autograd functions (memory_phases)
    train_connector: bool = True
    optimizer: Literal["paged_adamw8bit", "adamw8bit", "adamw"] = "paged_adamw8bit"
    device: Literal["cuda", "cpu"] = "cuda"
    logprob_backend: Literal["triton", "torch"] = "triton"
    liger: bool = True
    attn: Literal["sdpa", "eager"] = "sdpa"
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 1.0

    @property
    def c(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def rows(self) -> int:
        return self.prompts * self.group_size

    @classmethod
    def from_config(cls, cfg: Config, prompt_tokens: int = 160, *, gpus: int = 1) -> RunShape:
        """The shape one GPU sees; with `gpus` > 1 (data-parallel, torchrun) each rolls out and
        updates prompts_per_step / gpus prompts, and everything else is per GPU as before."""
        m, ro = cfg.model, cfg.rollout
        cuda = m.device != "cpu"
        dtype = m.dtype if m.dtype != "auto" else ("bf16" if cuda else "fp32")
        backend = m.kernels if m.kernels != "auto" else ("triton" if cuda else "torch")
        return cls(prompts=max(ro.prompts_per_step // gpus, 1), group_size=ro.num_generations,
                   frames=min(cfg.video.num_frames, cfg.video.max_frames), prompt_tokens=prompt_tokens,
                   max_new_tokens=ro.max_new_tokens, micro_batch=cfg.train.micro_batch_size, lora_r=cfg.lora.r,
                   lora_targets=tuple(cfg.lora.target_modules), lora_dropout=cfg.lora.dropout, dtype=dtype,
                   quant=m.quant, beta=cfg.grpo.beta, num_iterations=cfg.grpo.num_iterations,
                   grad_checkpointing=m.gradient_checkpointing, train_connector=m.train_connector,
                   optimizer=cfg.train.optimizer, device="cuda" if cuda else "cpu", logprob_backend=backend,
                   liger=cuda and (m.liger == "on" or (m.liger == "auto" and m.backend == "peft")),
                   backend=m.backend, attn=m.attn_implementation, top_k=ro.top_k, top_p=ro.top_p,
                   temperature=ro.temperature)


# ---------------------------------------------------------------- parameter counts


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
