"""GRPO advantages, policy-loss variants and the k3 KL: pure functions on tensors.

The formulas follow TRL 1.16 `GRPOTrainer` (advantages in `_generate_and_score_completions`, the loss
in `_compute_loss`) and the TinyLLaVA-Video-R1 paper (Gaussian advantage noise, KL clamp). One
deliberate difference: `policy_loss` takes the *step-wide* normalizers as arguments, so the trainer
can split the B*G completions of a step into micro-batches of any (uneven) sizes, call backward on
each, and get exactly the gradient of the full-batch loss. TRL instead divides per micro-batch
and by the number of accumulation steps, which is exact only for equal micro-batch sizes.

Normalizers per loss type (`S` = sum over the masked per-token losses of the whole step):

- grpo:    mean over sequences of each sequence's masked token mean = sum_i(S_i / T_i) / total_sequences
- bnpo:    S / total_tokens, "batch" = every completion of this optimizer step (under torchrun the
           trainer passes the counts of all ranks and sums the ranks' gradients, so N ranks give
           one process's loss). (TRL's bnpo uses the tokens of each *micro-batch* and averages over
           micro-batches, so its value depends on the micro-batch split; on one process without
           accumulation, TRL's bnpo and dapo coincide, and here they coincide whenever `world_tokens`
           is not given.)
- dr_grpo: S / (total_sequences * max_completion_length)
- dapo:    S / (active tokens of the whole generation batch over all data-parallel ranks / world size),
           TRL's `num_items_in_batch / num_processes`; after DDP averages the gradients across ranks
           this is S_all / world_tokens.

`total_sequences` counts every row, including rows whose mask is all zero (truncated completions
with `mask_truncated_completions`), as TRL's `.mean()` and `per_token_loss.size(0)` do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")


def _is_eos(completion_ids: torch.Tensor, eos_id: int | Sequence[int]) -> torch.Tensor:
    ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    eos = torch.tensor(ids, dtype=completion_ids.dtype, device=completion_ids.device)
    return torch.isin(completion_ids, eos)  # [N, L]


def truncated_rows(completion_ids: torch.Tensor, eos_id: int | Sequence[int]) -> torch.Tensor:
    """Rows that never produced an end token: generation hit `max_new_tokens` (TRL's is_truncated)."""
    return ~_is_eos(completion_ids, eos_id).any(dim=1)  # [N] bool


def completion_mask(
    completion_ids: torch.Tensor,  # [N, L] long
    eos_id: int | Sequence[int],
    *,
    mask_truncated: bool = False,
) -> torch.Tensor:
    """1 for tokens up to and including the first EOS (all 1 if none), else 0; int64 [N, L].

    Padding after the first EOS (pad = eos for Qwen2.5) is masked out. With `mask_truncated`
    (TRL's `mask_truncated_completions`) rows without an EOS are masked out entirely, so the policy
    is not pushed towards (or away from) answers that were cut off.
    """
    is_eos = _is_eos(completion_ids, eos_id)  # [N, L]
    # Number of EOS tokens strictly before each position: 0 means "still inside the completion".
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # [N, L]
    mask = (eos_before == 0).long()  # [N, L]
    if mask_truncated:
        mask = mask * (~truncated_rows(completion_ids, eos_id)).long().unsqueeze(1)
    return mask


def group_advantages(
    rewards: torch.Tensor,  # [B*G], groups contiguous: rows g*G .. g*G+G-1 share a prompt
    group_size: int,
    *,
    scale: ScaleRewards = "group",
    noise_std: float = 0.0,
    eps: float = 1e-4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Group-relative advantages `(R - mean_G) / (std + eps) + N(0, noise_std^2)`.

    `scale="group"` divides by each group's unbiased std (the paper and TRL's default), "batch" by
    the std of all rewards of the step (TRL: more robust when groups are small), "none" does not
    divide (Dr. GRPO). The noise is the paper's trick to keep zero-variance groups moving; 0 turns it
    off. Returned metrics use TRL's names: `reward`, `reward_std` (unbiased, over all rewards) and
    `frac_reward_zero_std` = fraction of *groups* whose rewards are all equal (no learning signal;
    TRL reports the global std's test instead when scale="batch").
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {SCALE_REWARDS}, got {scale!r}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}"
        )
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))  # [B*G]
    grouped = r.view(-1, group_size)  # [B, G]
    mean_g = grouped.mean(dim=1, keepdim=True)  # [B, 1]
    if group_size > 1:
        std_g = grouped.std(dim=1, keepdim=True)  # [B, 1] unbiased
    else:
        std_g = torch.zeros_like(mean_g)  # [B, 1]
    std_all = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)

    adv = grouped - mean_g  # [B, G]
    if scale == "group":
        adv = adv / (std_g + eps)
    elif scale == "batch":
        adv = adv / (std_all + eps)
    adv = adv.reshape(-1)  # [B*G]
    if noise_std > 0:
        dev = generator.device if generator is not None else adv.device
        noise = torch.randn(adv.shape, generator=generator, dtype=adv.dtype, device=dev)  # [B*G]
        adv = adv + noise_std * noise.to(adv.device)

    zero_std = torch.isclose(std_g, torch.zeros_like(std_g)).float()  # [B, 1]
    metrics = {
        "reward": r.mean().item(),
        "reward_std": std_all.item(),
        "frac_reward_zero_std": zero_std.mean().item(),
    }
    return adv, metrics


def k3_kl(
    logp: torch.Tensor,  # [n, L]
    ref_logp: torch.Tensor,  # [n, L]
    clamp: float | None = None,
) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(d) - d - 1 with d = ref - logp (>= 0).

    `clamp` bounds it to [-clamp, clamp] as the original R1 code does with 100.
    """
    d = ref_logp - logp  # [n, L]
    kl = torch.exp(d) - d - 1  # [n, L]
    if clamp is not None:
        kl = torch.clamp(kl, min=-clamp, max=clamp)
    return kl


def policy_loss(
    logp: torch.Tensor,  # [n, L] log-probs of the sampled tokens under the current policy (with grad)
    advantages: torch.Tensor,  # [n]
    mask: torch.Tensor,  # [n, L] 1 = token counts
    *,
    old_logp: torch.Tensor | None,  # [n, L] log-probs at rollout time; None = on-policy (mu = 1)
    ref_logp: torch.Tensor | None,  # [n, L] adapters-off reference; needed only when beta != 0
    loss_type: LossType,
    beta: float,
    epsilon: float,
    epsilon_high: float | None,
    total_sequences: int,
    total_tokens: int,
    max_completion_length: int,
    kl_clamp: float | None = None,
    entropy: torch.Tensor | None = None,  # [n, L] per-token entropy, for the metric only
    world_tokens: int | None = None,
    world_size: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO surrogate (+ beta * k3 KL) for one micro-batch, normalized for the whole step.

    `total_sequences` / `total_tokens` are the rows and active (mask = 1) tokens of *all* micro-batches
    of this optimizer step on this process; then the sum of the returned losses over the micro-batches
    is the full-batch loss. `world_tokens` / `world_size` matter for dapo under DDP only (active tokens
    over all ranks / number of ranks); they default to this process.

    Per token: coef_1 = exp(logp - old_logp), coef_2 = clamp(coef_1, 1 - epsilon, 1 + epsilon_high),
    loss = -min(coef_1 * A, coef_2 * A) + beta * KL. With `old_logp=None` the ratio is
    exp(logp - logp.detach()) = 1 with the policy gradient of logp (the paper's form).

    The metrics are normalized the same way, so summing them over micro-batches (`sum_metrics`)
    gives the step value: `kl`, `entropy` and `clip_ratio/{low,high,region}_mean` are means over the
    step's active tokens (TRL's global masked mean).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp (the adapters-off reference log-probs)")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    dtype = torch.promote_types(logp.dtype, torch.float32)
    active = mask.bool()  # [n, L]
    m = active.to(dtype)  # [n, L]
    zero = torch.zeros((), dtype=dtype, device=logp.device)

    # Masked positions may hold garbage (padding, -inf): zero them before exp so no NaN/inf can leak
    # into the loss or its gradient.
    lp = torch.where(active, logp.to(dtype), zero)  # [n, L]
    old = lp.detach() if old_logp is None else torch.where(active, old_logp.to(dtype), zero)  # [n, L]
    adv = advantages.to(dtype).unsqueeze(1)  # [n, 1]

    coef_1 = torch.exp(lp - old)  # [n, L]
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + eps_high)  # [n, L]
    per_token = -torch.minimum(coef_1 * adv, coef_2 * adv)  # [n, L]
    kl = None
    if beta != 0.0:
        ref = torch.where(active, ref_logp.to(dtype), zero)  # [n, L]
        kl = k3_kl(lp, ref, kl_clamp)  # [n, L]
        per_token = per_token + beta * kl
    per_token = per_token * m  # [n, L]

    if loss_type == "grpo":
        seq = per_token.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # [n]
        loss = seq.sum() / total_sequences
    elif loss_type == "bnpo":
        loss = per_token.sum() / max(total_tokens, 1)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (total_sequences * max_completion_length)
    else:  # dapo
        tokens = total_tokens if world_tokens is None else world_tokens
        loss = per_token.sum() / max(tokens / world_size, 1.0)

    denom = float(max(total_tokens, 1))
    with torch.no_grad():
        low = (coef_1 < 1 - epsilon) & (adv < 0) & active  # [n, L]
        high = (coef_1 > 1 + eps_high) & (adv > 0) & active  # [n, L]
        metrics: dict[str, torch.Tensor] = {
            "clip_ratio/low_mean": low.sum().to(dtype) / denom,
            "clip_ratio/high_mean": high.sum().to(dtype) / denom,
            "clip_ratio/region_mean": (low | high).sum().to(dtype) / denom,
        }
        if kl is not None:
            metrics["kl"] = (kl * m).sum() / denom
        if entropy is not None:
            ent = torch.where(active, entropy.to(dtype), zero)  # [n, L]
            metrics["entropy"] = ent.sum() / denom
        metrics["loss"] = loss.detach()
    return loss, metrics


def sum_metrics(parts: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Add up the per-micro-batch metrics of `policy_loss` into the step's values."""
    out: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0.0) + float(value)
    return out
