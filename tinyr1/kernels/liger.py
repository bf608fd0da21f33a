"""liger-kernel's fused RMSNorm and SwiGLU on one Qwen2 model instance, CUDA only.

Why instance-level module swaps instead of `apply_liger_kernel_to_qwen2(model=...)`: that function
also rebinds `Qwen2RMSNorm`, `Qwen2MLP` and `apply_rotary_pos_emb` inside transformers' qwen2
module, so every Qwen2 model built later in the process (a CPU tiny model in a test, an eval model)
would run liger's Triton kernels too. Here only the given instance changes:

- each `*RMSNorm` submodule becomes a `liger_kernel.transformers.LigerRMSNorm` sharing the same
  weight Parameter (state-dict keys unchanged);
- each decoder `mlp` becomes `_LigerSwiGLUMLP`, which keeps the original gate/up/down projections
  (plain, 4-bit or LoRA-wrapped alike) and fuses silu(gate) * up with liger's `liger_swiglu`.

RoPE is not fused: transformers applies it through a module-level function, so the only public way
to fuse it is liger's process-wide swap, which this module exists to avoid.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util

import torch
from torch import nn

# The oldest liger-kernel whose `liger_kernel.transformers` imports with transformers 5: 0.5.0-0.5.6
# import names transformers 5 removed (e.g. `_CONFIG_FOR_DOC` from modeling_gemma) at package import.
LIGER_MIN_VERSION = "0.5.7"
INSTALL_HINT = f"pip install -U 'liger-kernel>={LIGER_MIN_VERSION}' (or 'tinyr1[kernels]')"


@functools.cache
def liger_unavailable_reason() -> str | None:
    """None when every liger name tinyr1 uses imports; else why not (one sentence with the fix).

    Imports what `apply_liger` and `tinyr1 bench kernels` will use, because finding the package is
    not enough: an old liger-kernel is found and then fails inside its own imports. Cached: the import
    takes seconds and its outcome cannot change within a process.
    """
    if importlib.util.find_spec("triton") is None:
        return f"liger-kernel needs triton, which is not installed: {INSTALL_HINT}"
    if importlib.util.find_spec("liger_kernel") is None:
        return f"liger-kernel is not installed: {INSTALL_HINT}"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerRMSNorm  # noqa: F401
        from liger_kernel.transformers.functional import liger_swiglu  # noqa: F401
    except Exception as err:  # ImportError, or whatever an incompatible version raises while importing
        try:
            version = importlib.metadata.version("liger-kernel")
        except importlib.metadata.PackageNotFoundError:
            version = "(unknown version)"
        return (f"liger-kernel {version} is installed but does not import here "
                f"({type(err).__name__}: {err}); {INSTALL_HINT}")
    return None


def liger_available() -> bool:
    """True when the liger-kernel names tinyr1 uses import (see `liger_unavailable_reason`)."""
    return liger_unavailable_reason() is None


class _LigerSwiGLUMLP(nn.Module):
    """Qwen2 MLP with the activation product fused: down(silu(gate(x)) * up(x))."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj
        for name in ("config", "hidden_size", "intermediate_size"):
            if hasattr(mlp, name):
                setattr(self, name, getattr(mlp, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        from liger_kernel.transformers.functional import liger_swiglu

        return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def _unwrap(model: nn.Module) -> nn.Module:
    """PeftModel -> the underlying transformers model (LoRA layers stay in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _liger_rms_norm(norm: nn.Module) -> nn.Module:
    from liger_kernel.transformers import LigerRMSNorm

    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    fused = LigerRMSNorm(norm.weight.shape[0], eps=eps, casting_mode="llama")
    fused.weight = norm.weight  # share the Parameter: same state dict, same optimizer entry
    return fused


def _patch_instance(model: nn.Module) -> tuple[int, int]:
    """Swap RMSNorm and MLP submodules of `model` in place; returns (#norms, #mlps) replaced."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "qwen2":
        raise ValueError(f"apply_liger expects a Qwen2 model, got model_type={getattr(config, 'model_type', None)!r}")
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"liger SwiGLU needs hidden_act silu, got {config.hidden_act!r}")
    norms = mlps = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            if kind.endswith("RMSNorm") and kind != "LigerRMSNorm" and hasattr(child, "weight"):
                setattr(parent, name, _liger_rms_norm(child))
                norms += 1
            elif name == "mlp" and kind != "_LigerSwiGLUMLP" and hasattr(child, "gate_proj") and hasattr(child, "up_proj"):
                setattr(parent, name, _LigerSwiGLUMLP(child))
                mlps += 1
    return norms, mlps


def apply_liger(model_llm: nn.Module) -> bool:
    """Fuse RMSNorm and SwiGLU of this Qwen2ForCausalLM-like instance with liger-kernel, on CUDA.

    Returns False and changes nothing when the model is not on CUDA or liger is missing. Call it
    once, before or after LoRA wrapping; the lm_head is untouched (log-probs use
    `tinyr1.kernels.token_logprobs`).
    """
    param = next(model_llm.parameters(), None)
    if param is None or param.device.type != "cuda" or not liger_available():
        return False
    norms, mlps = _patch_instance(_unwrap(model_llm))
    return norms + mlps > 0
