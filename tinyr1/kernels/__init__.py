"""Fused ops, each with a pure-torch reference that is the CPU path and the test oracle.

- `token_logprobs`: per-token log-probs / entropies from hidden states and the frozen lm_head,
  without materializing [tokens x vocab] logits (Triton on CUDA, chunked torch elsewhere).
- `resolve_backend`: the config value `kernels = "auto" | "triton" | "torch"` -> backend.
- `apply_liger`: liger-kernel's fused RMSNorm / SwiGLU on one Qwen2 model instance (CUDA only).
"""

from tinyr1.kernels.liger import apply_liger, liger_available, liger_unavailable_reason
from tinyr1.kernels.logprob import naive_token_logprobs, resolve_backend, token_logprobs

__all__ = ["apply_liger", "liger_available", "liger_unavailable_reason", "naive_token_logprobs", "resolve_backend",
           "token_logprobs"]
