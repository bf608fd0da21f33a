"""`model.backend = "unsloth"`: unsloth's fused LoRA kernels bound onto TinyLLaVA-Video's Qwen2 layers.

unsloth's model loader does not know TinyLLaVA-Video (SigLIP + resampler + Qwen2), but its fused
LoRA autograd functions (`unsloth.kernels.fast_lora`) only need PEFT-wrapped projections:

- `apply_lora_qkv(attn, X)` -> Q, K, V: the three base matmuls (NF4 dequantized on the fly) plus
  their LoRA branches in one autograd function that saves only X for the backward;
- `apply_lora_o(attn, X)`: the same for o_proj;
- `apply_lora_mlp_swiglu(mlp, X)`: gate/up/down + SwiGLU, saving X and the gate and up outputs
  (SwiGLU is recomputed in the backward by a Triton kernel).

`bind_unsloth` replaces the `forward` of each decoder layer's `self_attn` and `mlp` *instances* with
forwards that call them. The projection modules stay the PEFT modules they were (same identity,
same state dict), so code that calls `self_attn.q_proj` or `mlp` directly (the rollout sampler, a
reference pass with adapters off, `tinyr1 merge`) and the saved adapter folder are unchanged.

Qwen2's q/k/v projections carry a (frozen) base bias, which `LoRA_QKV` does not add; unsloth's own
loader therefore leaves Qwen2's q/k/v unfused. Here the fused function runs with the base bias
detached from the projections and the bias is added to its outputs afterwards: exact, since the
bias is frozen and enters after the matmul. unsloth falls back to the PEFT modules in cases it does
not fuse (adapters off with grad, autocast to another dtype): with the bias detached those calls
also return the bias-free result, so adding it afterwards is right on both paths.

Importing unsloth runs its package initialisation, which patches parts of torch, transformers, PEFT
and TRL process-wide (on a CUDA machine more than on a CPU) and prints a banner. So this module
imports it lazily, only when a run selects the backend (`check_unsloth` / `bind_unsloth`), and
nothing else in tinyr1 imports this module at module level. On a CPU, unsloth runs in its fallback
mode: the fused functions work on unquantized weights with the Triton kernels interpreted
(`TRITON_INTERPRET=1`), but its NF4 dequantization calls bitsandbytes' native CUDA functions,
which bitsandbytes' CPU build lacks: CPU + NF4 + unsloth is refused with that reason.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import io
import os
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyr1.errors import ConfigError, DeviceError
from tinyr1.hf_compat import update_cache

UNSLOTH_VERSION = "2026.10.9"  # what the [unsloth] extra pins and CI tests (with unsloth_zoo of the same version)
INSTALL_HINT = (f"pip install 'tinyr1[unsloth]' (unsloth=={UNSLOTH_VERSION}, unsloth_zoo=={UNSLOTH_VERSION}, "
                "transformers 5.17, trl 1.15; see the README, 'The unsloth backend')")
BOUND = "_tinyr1_unsloth"  # on a bound decoder layer: which fused functions it runs
_CACHE_NAMES = ("cache", "past_key_values")  # the decoder's cache keyword in 5.2x / 5.17


@dataclass(frozen=True)
class Kernels:
    """The three fused functions of `unsloth.kernels.fast_lora` tinyr1 binds, and unsloth's version."""

    qkv: Any
    o: Any
    mlp: Any
    version: str


def unsloth_version() -> str | None:
    """The installed unsloth's version, without importing it (None when it is not installed)."""
    try:
        return importlib.metadata.version("unsloth")
    except importlib.metadata.PackageNotFoundError:
        return None


def _interpreter_ready_for_cpu() -> None:
    """On a CPU unsloth's Triton kernels (SwiGLU) run only interpreted, and the interpreter must be
    switched on before triton is first imported: set it here when triton is not loaded yet."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise DeviceError("model.backend = 'unsloth' on a CPU runs unsloth's Triton kernels in the Triton "
                          "interpreter, but triton was imported without it; fix: start with TRITON_INTERPRET=1 "
                          "in the environment (or use model.backend = 'peft' on a CPU)")
    os.environ["TRITON_INTERPRET"] = "1"


@functools.cache
def _load() -> Kernels:
    """Import unsloth once (its banner and import-order warning go nowhere: tinyr1 imports it late
    on purpose; its generated-code cache goes to the user cache) and take the fused functions."""
    # unsloth writes generated modules to ./unsloth_compiled_cache unless told otherwise: not into
    # the user's working directory (a repository, a run folder), into the user cache
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinyr1" / "unsloth_compiled_cache"
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(cache))
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.filterwarnings("ignore", message=".*Unsloth should be imported before.*")
        import unsloth
        from unsloth.kernels.fast_lora import apply_lora_mlp_swiglu, apply_lora_o, apply_lora_qkv
    return Kernels(apply_lora_qkv, apply_lora_o, apply_lora_mlp_swiglu, str(getattr(unsloth, "__version__", "?")))


@functools.cache
def unsloth_unavailable_reason(device_type: str = "cuda") -> str | None:
    """None when unsloth imports here with the fused functions tinyr1 binds; else why not, with the fix.

    `device_type` "cpu" switches the Triton interpreter on first (see `_interpreter_ready_for_cpu`).
    """
    version = unsloth_version()
    if version is None or importlib.util.find_spec("unsloth") is None:
        return f"unsloth is not installed: {INSTALL_HINT}"
    if device_type == "cpu":
        _interpreter_ready_for_cpu()
    try:
        _load()
    except Exception as err:  # ImportError, or whatever an incompatible install raises while importing
        return f"unsloth {version} is installed but does not import here ({type(err).__name__}: {err}); {INSTALL_HINT}"
    return None


def kernels(device_type: str = "cuda") -> Kernels:
    """The fused functions, or a DeviceError with the reason and the install line."""
    reason = unsloth_unavailable_reason(device_type)
    if reason is not None:
        raise DeviceError(f"model.backend = 'unsloth': {reason} (or set model.backend = 'peft')")
    return _load()


def nf4_unsupported_reason(device: torch.device) -> str | None:
    """None when unsloth dequantizes a bitsandbytes NF4 weight on `device` exactly as bitsandbytes
    does; else why not. A real probe on a 64 x 64 weight, not a guess from the device type."""
    import bitsandbytes as bnb
    from unsloth.kernels.utils import fast_dequantize

    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    param = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True).to(device)
    try:
        ours = fast_dequantize(param.t(), param.quant_state)  # how LoRA_* call it: the transposed view
        ref = bnb.functional.dequantize_4bit(param.data, param.quant_state)
        ok = torch.equal(ours.t().float().cpu(), ref.float().cpu()) or torch.equal(ours.float().cpu(), ref.float().cpu())
    except Exception as err:  # the CPU build raises from unsloth's bitsandbytes stub
        cpu = (" On a CPU it calls bitsandbytes' native NF4 dequantize functions (cdequantize_blockwise_*_nf4), "
               "which bitsandbytes' CPU build does not provide." if device.type == "cpu" else "")
        return f"unsloth's NF4 dequantization fails on {device} ({type(err).__name__}: {err}).{cpu}"
    return None if ok else f"unsloth's NF4 dequantization differs from bitsandbytes' on {device}"


def check_unsloth(device: torch.device, quant: str) -> str:
    """Refuse, before any weights load, a setup the backend cannot run; returns unsloth's version."""
    k = kernels(device.type)
    if quant == "nf4" and (why := nf4_unsupported_reason(device)) is not None:
        raise DeviceError(f"model.backend = 'unsloth' with model.quant = 'nf4': {why} Fix: model.quant = 'none' "
                          "(the fused kernels run on unquantized weights), or model.backend = 'peft'.")
    return k.version


# ---------------------------------------------------------------- binding


def _lora_problem(proj: nn.Module) -> str | None:
    """Why the fused functions cannot run this projection as plain LoRA (None: they can)."""
    if not hasattr(proj, "lora_A"):
        return "no LoRA adapter (not in lora.target_modules)"
    adapters = list(proj.lora_A.keys())
    if len(adapters) != 1:
        return f"{len(adapters)} adapters (one is supported)"
    name = adapters[0]
    if not isinstance(proj.lora_dropout[name], nn.Identity):
        return "LoRA dropout > 0 (set lora.dropout = 0)"
    if proj.lora_B[name].bias is not None:
        return "a LoRA bias (bias must be 'none')"
    if getattr(proj, "use_dora", {}).get(name, False):
        return "DoRA"
    return None


@contextlib.contextmanager
def _base_bias_detached(projs: tuple[nn.Module, ...]) -> Iterator[tuple[torch.Tensor | None, ...]]:
    """The projections' frozen base biases, detached from their base layers while the fused function
    runs (so its PEFT fallback leaves them out too), then put back."""
    bases = [getattr(p, "base_layer", p) for p in projs]
    biases = tuple(b.bias for b in bases)
    for b in bases:
        if b.bias is not None:
            b.bias = None
    try:
        yield biases
    finally:
        for b, bias in zip(bases, biases):
            if bias is not None:
                b.bias = bias


def _attention_forward(self: nn.Module, hidden_states: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor],
                       attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Qwen2Attention.forward (transformers 5.17 to 5.2x) with q/k/v and o through unsloth's fused
    LoRA functions; rotary, the KV cache and the attention kernel are HF's own."""
    from transformers.models.qwen2.modeling_qwen2 import (
        ALL_ATTENTION_FUNCTIONS,
        apply_rotary_pos_emb,
        eager_attention_forward,
    )

    found = [c for c in (kwargs.pop(name, None) for name in _CACHE_NAMES) if c is not None]
    cache = found[0] if found else None  # (an empty DynamicCache is falsy: no `or` here)
    fused = getattr(self, BOUND)
    k = _load()
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    if "qkv" in fused:
        projs = (self.q_proj, self.k_proj, self.v_proj)
        with _base_bias_detached(projs) as biases:
            qkv = k.qkv(self, hidden_states)
        q, key, value = (x if b is None else x + b for x, b in zip(qkv, biases))
    else:
        q, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    q, key, value = (x.view(shape).transpose(1, 2) for x in (q, key, value))  # [B, H, S, hd]
    cos, sin = position_embeddings
    q, key = apply_rotary_pos_emb(q, key, cos, sin)
    if cache is not None:
        key, value = update_cache(cache, key, value, self.layer_idx, kwargs)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attend(self, q, key, value, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                          scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
    out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()  # [B, S, H * hd]
    out = k.o(self, out) if "o" in fused else self.o_proj(out)
    return out, weights


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) as one fused autograd function."""
    return _load().mlp(self, x)


def _decoder_layers(llm: nn.Module) -> list[nn.Module]:
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return list(base.model.layers)


def bind_unsloth(llm: nn.Module) -> dict[str, int]:
    """Bind the fused functions onto every decoder layer of a PEFT-wrapped Qwen2 (after LoRA is added).

    Per layer, q/k/v are fused when all three carry plain LoRA, o and the MLP likewise; returns how
    many layers got each. A layer whose projections are not plain LoRA (dropout, LoRA bias, DoRA,
    several adapters) stops the run with the reason; a projection without an adapter (not in
    lora.target_modules) leaves its group on the PEFT path.
    """
    k = kernels(next(llm.parameters()).device.type)
    config = getattr(llm, "config", None)
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"model.backend = 'unsloth' fuses SwiGLU, but this LLM's hidden_act is {act!r}")
    counts = {"layers": 0, "qkv": 0, "o": 0, "mlp": 0}
    for i, layer in enumerate(_decoder_layers(llm)):
        attn, mlp = layer.self_attn, layer.mlp
        groups = {"qkv": (attn.q_proj, attn.k_proj, attn.v_proj), "o": (attn.o_proj,),
                  "mlp": (mlp.gate_proj, mlp.up_proj, mlp.down_proj)}
        fused = set()
        for group, projs in groups.items():
            problems = [p for p in map(_lora_problem, projs) if p is not None]
            if not problems:
                fused.add(group)
            elif any(not p.startswith("no LoRA adapter") for p in problems):
                raise ConfigError(f"model.backend = 'unsloth': layer {i} {group}: {problems[0]}")
        if not fused:
            continue
        setattr(attn, BOUND, frozenset(fused))
        attn.forward = types.MethodType(_attention_forward, attn)
        if "mlp" in fused:
            mlp.forward = types.MethodType(_mlp_forward, mlp)
        setattr(layer, BOUND, frozenset(fused))
        counts["layers"] += 1
        for group in fused:
            counts[group] += 1
    if counts["layers"] == 0:
        raise ConfigError("model.backend = 'unsloth' found no decoder layer with LoRA on q/k/v, o or gate/up/down; "
                          "fix: keep those names in lora.target_modules")
    counts["version"] = k.version  # type: ignore[assignment]
    return counts


def bound_layers(llm: nn.Module) -> dict[str, int]:
    """How many decoder layers run each fused function now (all zero: the backend is not active)."""
    counts = {"layers": 0, "qkv": 0, "o": 0, "mlp": 0}
    for layer in _decoder_layers(llm):
        fused = getattr(layer, BOUND, frozenset())
        counts["layers"] += bool(fused)
        for group in fused:
            counts[group] += 1
    return counts


def describe(counts: dict[str, Any]) -> str:
    """One line for the run log: which fused functions run where."""
    return (f"unsloth {counts.get('version', unsloth_version())}: fused LoRA kernels on {counts['layers']} decoder "
            f"layers (q/k/v {counts['qkv']}, o {counts['o']}, MLP {counts['mlp']})")
