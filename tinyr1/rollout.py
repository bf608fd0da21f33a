"""Group sampling with a shared prompt prefix, and the `Rollout` it produces for the update.

The prompt (system + video tokens + question) of each of the B prompts is prefilled ONCE; its KV
cache is then repeated to G rows and all B*G completions decode together in one batch. Rows that
reach EOS are dropped from the cache, so finished completions stop costing work.

Sampling uses inverse-CDF draws from one uniform per row and step (`torch.rand(B*G)` every step,
whatever rows are still active), so a fixed seed gives the same tokens as an unshared, uncached
reference sampler — which the tests check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tinyr1.hf_compat import CACHE_KW, cache_of
from tinyr1.model.tinyllava import TinyLlavaVideo, right_to_left_pad


@dataclass(frozen=True)
class Rollout:
    """One step's prompts, completions and scores: everything the update reads, nothing else.

    B prompts with G completions each: n = B*G rows, L = the longest completion. Row i belongs to
    prompt `row_prompt[i]`; the update runs each prompt of a micro-batch once and its rows against it.
    There are no old log-probs: with `num_iterations` = 1 the ratio's denominator is the update's own
    (detached) log-probs, which is exact; sampling-time log-probs come from the KV-cached decode and
    differ from the update's forward by rounding. With `num_iterations` > 1 the update recomputes them.
    `reference_video_tokens` exist when the connector trains and beta > 0: the KL reference is the
    initial policy, so its video tokens come from a frozen copy of the initial connector.
    """

    features: list[torch.Tensor]  # B x [1, T*P', Dv] frozen vision features; the connector re-runs on them when it trains
    video_tokens: list[torch.Tensor]  # B x [Q, D] the connector's output at sampling time, no grad
    prompt_ids: list[torch.Tensor]  # B x [P_b] token ids with one -200 <image> sentinel
    row_prompt: torch.Tensor  # [n] long (CPU): the prompt of each row
    completion_ids: torch.Tensor  # [n, L] eos-padded after the first EOS
    completion_mask: torch.Tensor  # [n, L] 1 on the tokens the loss counts (up to and including the first EOS)
    truncated: torch.Tensor  # [n] bool: no EOS within max_new_tokens
    texts: list[str]  # n decoded completions (special tokens dropped)
    rewards: torch.Tensor  # [n, R] per reward function (unweighted)
    reward_total: torch.Tensor  # [n] weighted sum
    advantages: torch.Tensor  # [n] on the model's device
    reward_stats: dict[str, float]  # reward, reward_std, frac_reward_zero_std (group_advantages)
    reference_video_tokens: list[torch.Tensor] | None = None  # B x [Q, D] from the initial connector (KL reference)

    @property
    def group_size(self) -> int:
        return self.completion_ids.shape[0] // len(self.prompt_ids)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """HF order: top-k, then nucleus (top-p). logits [N, V] already divided by temperature."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)  # [N, V] ascending
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor, u: torch.Tensor, *, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from logits [N, V] with uniforms u [N]; return (ids [N], logp [N]).

    logp is under the unfiltered softmax(logits / T) — what the update recomputes. T = 0 is greedy
    (logp then under T = 1).
    """
    logits = logits.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(1, tok[:, None])[:, 0]
    scaled = logits / temperature  # [N, V]
    probs = filter_logits(scaled, top_k, top_p).softmax(-1)  # [N, V]
    cdf = probs.cumsum(-1)  # [N, V]
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(1)  # [N, 1]
    tok = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=logits.shape[-1] - 1)
    tok = torch.where(probs.gather(1, tok[:, None])[:, 0] > 0, tok, probs.argmax(-1))  # fp edge safety
    return tok, scaled.log_softmax(-1).gather(1, tok[:, None])[:, 0]


@torch.no_grad()
def sample_group(
    model: TinyLlavaVideo,
    prompt_ids: Sequence[torch.Tensor],
    video_tokens: Sequence[torch.Tensor],
    *,
    group_size: int,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample G completions for each prompt. Returns ids [B*G, L] (eos-padded) and logp [B*G, L]."""
    llm = model.llm
    dev = model.device
    embeds, mask, _ = model.splice(prompt_ids, video_tokens)  # [B, S, D], [B, S]
    embeds, mask = right_to_left_pad(embeds, mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = cache_of(out)
    cache.batch_repeat_interleave(group_size)
    n = len(prompt_ids) * group_size
    logits = out.logits[:, -1].repeat_interleave(group_size, 0)  # [B*G, V]
    mask = mask.repeat_interleave(group_size, 0)  # [B*G, S]
    next_pos = pos[:, -1].repeat_interleave(group_size, 0) + 1  # [B*G]
    ids = torch.full((n, max_new_tokens), eos_id, dtype=torch.long, device=dev)  # [B*G, L]
    logp = torch.zeros(n, max_new_tokens, device=dev)  # [B*G, L]
    active = torch.arange(n, device=dev)  # rows still in the cache
    steps = 0
    for t in range(max_new_tokens):
        u = torch.rand(n, generator=generator, device="cpu" if generator is None else generator.device)
        tok, lp = sample_tokens(logits, u.to(dev)[active], temperature=temperature, top_k=top_k, top_p=top_p)
        ids[active, t] = tok
        logp[active, t] = lp
        steps = t + 1
        keep = (tok != eos_id).nonzero().flatten()
        if t == max_new_tokens - 1 or keep.numel() == 0:
            break
        if keep.numel() < active.numel():  # drop finished rows from the batch and the cache
            cache.batch_select_indices(keep)
            active, tok, mask, next_pos = active[keep], tok[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = llm(
            input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
            use_cache=True, **{CACHE_KW: cache},
        )
        logits = out.logits[:, -1]  # [active, V]
        next_pos = next_pos + 1
    del cache, out
    return ids[:, :steps], logp[:, :steps]
