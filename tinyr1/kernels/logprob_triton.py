"""Triton kernels for the fused linear log-prob (see `logprob.py` for the maths and the torch oracle).

Layout: a program owns BLOCK_N tokens and a contiguous range of vocabulary tiles (a "split"; several
splits per token block keep all SMs busy when N is small). Logit tiles [BLOCK_N, BLOCK_V] are built
with tl.dot over BLOCK_H slices of the hidden size, accumulating in fp32, and never leave registers.

- forward: per split, online max / sum-exp / entropy sums / target logit -> [splits, N] partials,
  combined in torch (O(splits x N)).
- backward dh: recompute each tile, dz = g_lp (1[j=t] - p) - g_ent p (z - E[z]), dh += dz W / T into an
  fp32 [N, H] buffer (atomic adds when several splits share a token block).
- backward dW (only if the lm_head requires grad): one program per vocabulary tile, looping over
  token blocks, dW += dz^T h / T.

Launch plan: `cuda_plan` picks block sizes, num_warps and the vocabulary split from the shapes, the
dtype and the GPU's SM count. It is the only plan: under the interpreter (TRITON_INTERPRET=1, the CPU
tests) the same function runs with `INTERPRETER_SMS`, so the CPU tests execute what a GPU executes.

Interpreter pitfalls, handled here: its tl.dot multiplies bf16 operands as raw uint16 bit patterns
(garbage), so on interpreted kernels (`INTERPRETED`) 16-bit operands are upcast to fp32 right at the
dot (`EMULATE_DOT`): exact products with fp32 accumulation, which is what the tensor cores compute,
and every bf16 rounding the GPU does (e.g. of dz before the backward GEMMs) still happens.
Temperature enters as a plain float multiplier (1/T), never through `.to()`; no autotune.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, n_hidden, s_hn, s_hk, s_wv, s_wk, inv_t,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr, EMULATE_DOT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """z = h[rows] @ W[cols]^T / T in fp32, [BLOCK_N, BLOCK_V]; padded rows/cols read as 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, n_hidden, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks < n_hidden
        hb = tl.load(h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hk, mask=rmask[:, None] & kmask[None, :], other=0.0)
        wb = tl.load(w_ptr + cols[:, None] * s_wv + ks[None, :] * s_wk, mask=cmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(hb.to(tl.float32), tl.trans(wb.to(tl.float32)), acc, input_precision=PRECISION)
        elif EMULATE_DOT:  # the interpreter: the same bf16/fp16 values, multiplied in fp32
            acc = tl.dot(hb.to(tl.float32), tl.trans(wb.to(tl.float32)), acc, input_precision="ieee")
        else:  # bf16/fp16 operands, fp32 accumulation
            acc = tl.dot(hb, tl.trans(wb), acc)
    return acc * inv_t


@triton.jit
def _dlogits(z, cols, cmask, tgt, lse, g_lp, g_ent, mean_z, inv_t, HAS_GENT: tl.constexpr):
    """d(loss)/d(h W^T) for one tile: (g_lp (1[j=t] - p_j) - g_ent p_j (z_j - E[z])) / T."""
    p = tl.where(cmask[None, :], tl.exp(z - lse[:, None]), 0.0)
    if HAS_GENT:
        dz = -p * (g_lp[:, None] + g_ent[:, None] * (z - mean_z[:, None]))
    else:
        dz = -p * g_lp[:, None]
    dz += tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0)
    return dz * inv_t


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, a_ptr, zt_ptr,
                n_rows, n_vocab, n_hidden, tiles_per_split, s_hn, s_hk, s_wv, s_wk, inv_t,
                WITH_ENT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, EMULATE_DOT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of z
    s = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m)
    a = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m) (z - m)
    z_t = tl.zeros((BLOCK_N,), tl.float32)  # target logit (0 unless in this split)
    v_start = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_start + tiles_per_split * BLOCK_V, n_vocab)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_end
        z = _logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, n_hidden, s_hn, s_hk, s_wv, s_wk, inv_t,
                        UPCAST, PRECISION, EMULATE_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
        z = tl.where(cmask[None, :], z, float("-inf"))
        z_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        zs = z - m_new[:, None]
        e = tl.exp(zs)  # 0 on padded columns
        if WITH_ENT:
            corr = s * tl.where(s > 0, m - m_new, 0.0)  # s == 0 while m is still -inf
            a = alpha * (a + corr) + tl.sum(e * tl.where(cmask[None, :], zs, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = pid_s * n_rows + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(zt_ptr + out, z_t, mask=rmask)
    if WITH_ENT:
        tl.store(a_ptr + out, a, mask=rmask)


@triton.jit
def _bwd_dh_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, meanz_ptr, glp_ptr, gent_ptr, dh_ptr,
                   n_rows, n_vocab, n_hidden, tiles_per_split, s_hn, s_hk, s_wv, s_wk, s_dn, s_dk, inv_t,
                   HAS_GENT: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   EMULATE_DOT: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=rmask, other=0.0)
    g_ent = tl.load(gent_ptr + rows, mask=rmask, other=0.0)
    mean_z = tl.load(meanz_ptr + rows, mask=rmask, other=0.0)
    v_start = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_start + tiles_per_split * BLOCK_V, n_vocab)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_end
        z = _logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, n_hidden, s_hn, s_hk, s_wv, s_wk, inv_t,
                        UPCAST, PRECISION, EMULATE_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
        dz = _dlogits(z, cols, cmask, tgt, lse, g_lp, g_ent, mean_z, inv_t, HAS_GENT)
        for k0 in range(0, n_hidden, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            kmask = ks < n_hidden
            wb = tl.load(w_ptr + cols[:, None] * s_wv + ks[None, :] * s_wk, mask=cmask[:, None] & kmask[None, :], other=0.0)
            if UPCAST:
                part = tl.dot(dz, wb.to(tl.float32), input_precision=PRECISION)
            elif EMULATE_DOT:  # dz rounded to bf16/fp16 as on the GPU, then multiplied in fp32
                part = tl.dot(dz.to(wb.dtype).to(tl.float32), wb.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(dz.to(wb.dtype), wb)
            ptrs = dh_ptr + rows[:, None] * s_dn + ks[None, :] * s_dk
            msk = rmask[:, None] & kmask[None, :]
            if ATOMIC:
                tl.atomic_add(ptrs, part, mask=msk)
            else:
                tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + part, mask=msk)


@triton.jit
def _bwd_dw_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, meanz_ptr, glp_ptr, gent_ptr, dw_ptr,
                   n_rows, n_vocab, n_hidden, s_hn, s_hk, s_wv, s_wk, s_dv, s_dk, inv_t,
                   HAS_GENT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, EMULATE_DOT: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < n_vocab
    for n0 in range(0, n_rows, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < n_rows
        tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        g_lp = tl.load(glp_ptr + rows, mask=rmask, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=rmask, other=0.0)
        mean_z = tl.load(meanz_ptr + rows, mask=rmask, other=0.0)
        z = _logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, n_hidden, s_hn, s_hk, s_wv, s_wk, inv_t,
                        UPCAST, PRECISION, EMULATE_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
        dz = _dlogits(z, cols, cmask, tgt, lse, g_lp, g_ent, mean_z, inv_t, HAS_GENT)
        for k0 in range(0, n_hidden, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            kmask = ks < n_hidden
            hb = tl.load(h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hk, mask=rmask[:, None] & kmask[None, :], other=0.0)
            if UPCAST:
                part = tl.dot(tl.trans(dz), hb.to(tl.float32), input_precision=PRECISION)
            elif EMULATE_DOT:
                part = tl.dot(tl.trans(dz.to(hb.dtype).to(tl.float32)), hb.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(tl.trans(dz.to(hb.dtype)), hb)
            ptrs = dw_ptr + cols[:, None] * s_dv + ks[None, :] * s_dk
            msk = cmask[:, None] & kmask[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + part, mask=msk)


# Kernels built under TRITON_INTERPRET=1 (decided by triton when this module was imported).
INTERPRETED = isinstance(_fwd_kernel, InterpretedFunction)
# SM count the plan assumes for tensors on the CPU (interpreter only): an RTX 4060-class GPU (24 SMs).
INTERPRETER_SMS = 24


@dataclass(frozen=True)
class Plan:
    """How one call is launched: tile sizes, warps and the vocabulary split (fixed, no autotune)."""

    upcast: bool  # fp32 operands in tl.dot (fp32 inputs); else bf16/fp16 operands, fp32 accumulation
    precision: str  # tl.dot input_precision for fp32 operands: "ieee", exact rather than TF32
    block_n: int  # tokens per program
    block_v: int  # vocabulary columns per tile
    block_h: int  # hidden-size slice per tl.dot
    num_warps: int
    row_blocks: int  # programs along the tokens
    tiles_per_split: int  # vocabulary tiles per program
    splits: int  # programs along the vocabulary per token block (> 1: dh by atomic adds)

    def consts(self) -> dict[str, Any]:
        """Compile-time arguments of every kernel launch (EMULATE_DOT: see the module docstring)."""
        return {"UPCAST": self.upcast, "PRECISION": self.precision, "EMULATE_DOT": INTERPRETED,
                "BLOCK_N": self.block_n, "BLOCK_V": self.block_v, "BLOCK_H": self.block_h,
                "num_warps": self.num_warps}


def cuda_plan(n_rows: int, n_vocab: int, dtype: torch.dtype, sms: int,
              block_v: int | None = None, splits: int | None = None) -> Plan:
    """The launch plan for [n_rows, H] `dtype` hidden states and a vocabulary of n_vocab on a GPU with
    `sms` SMs; `block_v` (chunk_size) and `splits` override the defaults. Public so that the CPU tests
    run exactly this plan under the interpreter."""
    block_n, block_h = 64, 64
    block_v = block_v or 128
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"chunk_size for the triton backend must be a power of two >= 16, got {block_v}")
    row_blocks = triton.cdiv(n_rows, block_n)
    n_tiles = triton.cdiv(n_vocab, block_v)
    if splits is None:  # enough programs for ~2 waves over the SMs
        splits = triton.cdiv(2 * sms, row_blocks)
    splits = max(1, min(splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return Plan(
        upcast=dtype == torch.float32, precision="ieee", block_n=block_n, block_v=block_v, block_h=block_h,
        num_warps=8 if block_n * block_v >= 8192 else 4, row_blocks=row_blocks, tiles_per_split=tiles_per_split,
        splits=triton.cdiv(n_tiles, tiles_per_split),  # no empty split
    )


def plan_for(hidden: torch.Tensor, n_vocab: int, block_v: int | None = None, splits: int | None = None) -> Plan:
    """`cuda_plan` for this call: the device's SM count on CUDA, `INTERPRETER_SMS` for CPU tensors."""
    if hidden.device.type == "cuda":
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
    else:
        sms = INTERPRETER_SMS
    return cuda_plan(hidden.shape[0], n_vocab, hidden.dtype, sms, block_v, splits)


def _combine(m: torch.Tensor, s: torch.Tensor, a: torch.Tensor, z_t: torch.Tensor, with_entropy: bool) -> tuple[torch.Tensor, ...]:
    """Merge per-split partials [S, N] into lse, logp, entropy [N]."""
    m_all = m.amax(0)  # [N]
    scale = torch.exp(m - m_all)  # [S, N]
    s_all = (s * scale).sum(0)  # [N]
    log_s = torch.log(s_all)
    lse = m_all + log_s
    logp = z_t.sum(0) - lse
    if not with_entropy:
        return lse, logp, torch.zeros_like(lse)
    a_all = (scale * (a + s * (m - m_all))).sum(0)  # [N]
    return lse, logp, log_s - a_all / s_all


class _TritonLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                with_entropy: bool, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        n_rows, n_hidden = hidden.shape
        n_vocab = weight.shape[0]
        parts = torch.zeros(4, plan.splits, n_rows, dtype=torch.float32, device=hidden.device)  # m, s, a, z_t
        inv_t = 1.0 / temperature
        _fwd_kernel[(plan.row_blocks, plan.splits)](
            hidden, weight, targets, parts[0], parts[1], parts[2], parts[3],
            n_rows, n_vocab, n_hidden, plan.tiles_per_split,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), inv_t,
            WITH_ENT=with_entropy, **plan.consts(),
        )
        lse, logp, ent = _combine(*parts, with_entropy=with_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.plan, ctx.inv_t = plan, inv_t
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx: Any, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None) -> tuple[Any, ...]:
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None, None, None, None)
        if g_lp is None and g_ent is None:
            return (None, None, *none)
        plan: Plan = ctx.plan
        n_rows, n_hidden = hidden.shape
        n_vocab = weight.shape[0]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()  # [N]
        has_gent = g_ent is not None
        g_ent = g_ent.float().contiguous() if has_gent else torch.zeros_like(lse)  # [N]
        mean_z = (lse - ent).contiguous()  # E_p[z], [N]
        common = (hidden, weight, targets, lse, mean_z, g_lp, g_ent)
        dh = dw = None
        if need_h:
            dh = torch.zeros(n_rows, n_hidden, dtype=torch.float32, device=hidden.device)  # [N, H]
            _bwd_dh_kernel[(plan.row_blocks, plan.splits)](
                *common, dh, n_rows, n_vocab, n_hidden, plan.tiles_per_split,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dh.stride(0), dh.stride(1),
                ctx.inv_t, HAS_GENT=has_gent, ATOMIC=plan.splits > 1, **plan.consts(),
            )
            dh = dh.to(hidden.dtype)
        if need_w:
            dw = torch.zeros(n_vocab, n_hidden, dtype=torch.float32, device=weight.device)  # [V, H]
            _bwd_dw_kernel[(triton.cdiv(n_vocab, plan.block_v),)](
                *common, dw, n_rows, n_vocab, n_hidden,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dw.stride(0), dw.stride(1),
                ctx.inv_t, HAS_GENT=has_gent, **plan.consts(),
            )
            dw = dw.to(weight.dtype)
        return (dh, dw, *none)


def triton_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    chunk_size: int | None,
    splits: int | None = None,
    plan: Plan | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton path of `token_logprobs` (inputs already checked). `splits` overrides the vocabulary
    split; `plan` replaces `plan_for(...)` altogether (the tests: a given GPU's plan on the CPU)."""
    if plan is None:
        plan = plan_for(hidden, weight.shape[0], chunk_size, splits)
    logp, ent = _TritonLogprob.apply(hidden, weight, targets.contiguous(), temperature, with_entropy, plan)
    return logp, (ent if with_entropy else None)
