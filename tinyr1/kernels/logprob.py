"""Per-token log-probs (and entropies) straight from hidden states, without a [tokens x vocab] tensor.

GRPO needs log softmax(h @ W^T / T)[target] for every completion token. With Qwen2.5's 151,936-word
vocabulary the full logits (and their gradient) dominate memory, so both paths here stream the
vocabulary in tiles with an online log-sum-exp, accumulating in fp32:

- `torch` (this module): tiles of `chunk_size` vocabulary rows over all N tokens; the CPU path and the
  test oracle. Its backward needs no second pass in the common case (see `_TorchLogprob`).
- `triton` (`logprob_triton.py`): forward and backward kernels, the CUDA path.

`token_logprobs` is the one entry point; `resolve_backend` maps the config value
`kernels = "auto" | "triton" | "torch"` onto a backend for a device.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Literal

import torch

from tinyr1.errors import ConfigError, DeviceError

Backend = Literal["auto", "triton", "torch"]

# Elements of one [N, tile] fp32 temporary in the torch path (16 MiB); the tile is derived from N.
_TILE_ELEMENTS = 1 << 22
_MIN_TILE, _MAX_TILE = 256, 16384


def triton_available() -> bool:
    """True when `triton` can be imported (without importing it: that is slow and fixes TRITON_INTERPRET)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device | str) -> Literal["triton", "torch"]:
    """Map the config value `kernels` onto the backend that runs on `device`.

    "auto" picks Triton on CUDA when triton is importable, torch otherwise. "triton" on a CPU tensor
    is allowed only under the Triton interpreter (TRITON_INTERPRET=1: the tests).
    """
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise DeviceError(
                'kernels = "triton" but the triton package is not installed; '
                'install it (pip install "tinyr1[kernels]") or set kernels = "auto".'
            )
        if device.type != "cuda" and not _interpreting():
            raise DeviceError(
                f'kernels = "triton" needs CUDA tensors, got device {device}; set kernels = "auto" '
                '(torch on CPU) or run with TRITON_INTERPRET=1 (slow, for tests).'
            )
        return "triton"
    raise ConfigError(f'kernels = "{backend}" is not a backend; use one of "auto", "triton", "torch".')


def default_tile(n_tokens: int, vocab: int) -> int:
    """Vocabulary tile so one [N, tile] fp32 temporary stays near 16 MiB."""
    return max(_MIN_TILE, min(_MAX_TILE, vocab, _TILE_ELEMENTS // max(n_tokens, 1)))


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, weight, targets on different devices: {hidden.device}, {weight.device}, {targets.device}")
    if hidden.device.type == "cpu" and targets.numel() > 0:  # on CUDA this check would sync
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"targets must lie in [0, {weight.shape[0]}), got values in [{lo}, {hi}]")


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
    backend: Backend = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight^T / temperature)[targets] per token, and optionally the entropy.

    hidden [N, H] (bf16/fp16/fp32), weight [V, H] (the lm_head), targets [N] in [0, V).
    Returns (logp [N] fp32, entropy [N] fp32 or None). Differentiable in `hidden` (and in `weight`
    when it requires grad), through both outputs. `chunk_size` is the vocabulary tile width
    (torch: any positive int; triton: a power of two >= 16).
    """
    _check_inputs(hidden, weight, targets, temperature)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    resolved = resolve_backend(backend, hidden.device)
    if hidden.shape[0] == 0:  # nothing to launch; keep the graph connected for a later backward
        empty = hidden.float().sum(1)  # [0]
        return empty, (empty.clone() if with_entropy else None)
    if resolved == "triton":
        from tinyr1.kernels.logprob_triton import triton_token_logprobs

        return triton_token_logprobs(hidden, weight, targets.long(), float(temperature), with_entropy, chunk_size)
    targets = targets.long()
    tile = chunk_size or default_tile(hidden.shape[0], weight.shape[0])
    keep_mean_w = torch.is_grad_enabled() and hidden.requires_grad
    logp, ent = _TorchLogprob.apply(hidden, weight, targets, float(temperature), tile, with_entropy, keep_mean_w)
    return logp, (ent if with_entropy else None)


def _target_in_tile(targets: torch.Tensor, c0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose target falls in columns [c0, c0+width) and the (clamped) column index in the tile."""
    local = targets - c0  # [N]
    inside = (local >= 0) & (local < width)  # [N]
    return inside, local.clamp(0, width - 1).unsqueeze(1)  # [N], [N, 1]


class _TorchLogprob(torch.autograd.Function):
    """Vocabulary-tiled log-probs with an online log-sum-exp.

    Backward without a second pass: d logp / dh = (W_t - sum_j p_j W_j) / T, so the forward also
    accumulates A = sum_{j != t} p_j W_j ([N, H], the size of `hidden`) and backward is
    dh = g * ((1 - p_t) W_t - A) / T, with 1 - p_t = -expm1(logp) exact even for confident tokens.
    The cost is one extra GEMM in the forward instead of two (recompute + dh) in the backward.
    Gradients through the entropy or into the weight recompute each tile (`_recompute_backward`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        tile: int,
        with_entropy: bool,
        keep_mean_w: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, v = hidden.shape[0], weight.shape[0]
        inv_t = 1.0 / temperature
        h32 = hidden.float()  # [N, H]
        m = torch.empty(n, dtype=torch.float32, device=hidden.device)  # running max of z
        s = torch.zeros_like(m)  # sum exp(z - m)
        a = torch.zeros_like(m)  # sum exp(z - m) * (z - m)   (entropy)
        z_t = torch.zeros_like(m)  # target logit
        mean_w = torch.zeros_like(h32) if keep_mean_w else None  # [N, H], sum_{j!=t} exp(z_j - m) W_j
        for c0 in range(0, v, tile):
            w = weight[c0 : c0 + tile].float()  # [C, H]
            z = torch.mm(h32, w.t()).mul_(inv_t)  # [N, C]
            inside, col = _target_in_tile(targets, c0, w.shape[0])
            z_t = torch.where(inside, z.gather(1, col).squeeze(1), z_t)
            m_tile = z.amax(1)  # [N]
            if c0 == 0:
                m_new, alpha = m_tile, torch.zeros_like(m)
            else:
                m_new = torch.maximum(m, m_tile)
                alpha = torch.exp(m - m_new)  # rescales what was summed under the old max
            z.sub_(m_new.unsqueeze(1))  # z - m_new
            e = torch.exp(z)  # [N, C]
            if with_entropy:
                a = alpha * (a + s * (m - m_new)) if c0 else a
                a = a + z.mul_(e).sum(1)
            s = alpha * s + e.sum(1)
            if mean_w is not None:
                e.scatter_(1, col, torch.where(inside.unsqueeze(1), 0.0, e.gather(1, col)))
                mean_w.mul_(alpha.unsqueeze(1)).addmm_(e, w)
            m = m_new
            del z, e, w
        log_s = torch.log(s)
        lse = m + log_s  # [N]
        logp = z_t - lse  # [N]
        ent = log_s - a / s if with_entropy else torch.zeros_like(lse)  # [N]
        if mean_w is not None:
            mean_w.div_(s.unsqueeze(1))
        ctx.save_for_backward(hidden, weight, targets, lse, logp, ent, mean_w)
        ctx.temperature, ctx.tile = temperature, tile
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx: Any, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None) -> tuple[Any, ...]:
        hidden, weight, targets, lse, logp, ent, mean_w = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None, None, None, None, None)
        if (g_lp is None and g_ent is None) or not (need_h or need_w):
            return (None, None, *none)
        if g_ent is None and not need_w and mean_w is not None:
            w_t = weight[targets].float()  # [N, H]
            one_minus_p = -torch.expm1(logp)  # [N]
            dh = w_t.mul_(one_minus_p.unsqueeze(1)).sub_(mean_w).mul_((g_lp.float() / ctx.temperature).unsqueeze(1))
            return (dh.to(hidden.dtype), None, *none)
        dh, dw = _recompute_backward(hidden, weight, targets, lse, lse - ent, g_lp, g_ent, ctx.temperature, ctx.tile, need_w)
        return (dh.to(hidden.dtype) if need_h else None, dw, *none)


def _recompute_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    mean_z: torch.Tensor,
    g_lp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    temperature: float,
    tile: int,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradient tile by tile: dz_j = g_lp (1[j=t] - p_j) - g_ent p_j (z_j - E_p[z]), then dh += dz W / T.

    `mean_z` is E_p[z] = lse - entropy (only read when g_ent is given).
    """
    inv_t = 1.0 / temperature
    h32 = hidden.float()  # [N, H]
    g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float()  # [N]
    dh = torch.zeros_like(h32)  # [N, H]
    dw = torch.empty_like(weight) if need_w else None  # [V, H]
    for c0 in range(0, weight.shape[0], tile):
        w = weight[c0 : c0 + tile].float()  # [C, H]
        z = torch.mm(h32, w.t()).mul_(inv_t)  # [N, C]
        p = torch.exp(z - lse.unsqueeze(1))  # [N, C]
        if g_ent is not None:  # z <- g_lp + g_ent (z - E[z])
            z.sub_(mean_z.unsqueeze(1)).mul_(g_ent.float().unsqueeze(1)).add_(g_lp.unsqueeze(1))
        else:
            z.copy_(g_lp.unsqueeze(1).expand_as(z))
        dz = z.mul_(p).neg_()  # [N, C]
        del p
        inside, col = _target_in_tile(targets, c0, w.shape[0])
        dz.scatter_add_(1, col, torch.where(inside, g_lp, 0.0).unsqueeze(1))
        dz.mul_(inv_t)
        dh.addmm_(dz, w)
        if dw is not None:
            dw[c0 : c0 + tile] = torch.mm(dz.t(), h32).to(weight.dtype)
    return dh, dw


def naive_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The O(N x V) formulation everyone starts from (full logits -> log_softmax -> gather): the baseline."""
    logits = (hidden @ weight.t()).float() / temperature  # [N, V]
    logp_all = torch.log_softmax(logits, dim=-1)  # [N, V]
    logp = logp_all.gather(1, targets.long().unsqueeze(1)).squeeze(1)  # [N]
    ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None  # [N]
    return logp, ent
