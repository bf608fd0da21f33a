"""The sampler before issue #12, frozen for `benchmarks/rollout.py` and the equality tests.

Prefill once, `cache.batch_repeat_interleave(G)` (the prompt's K/V copied to every row), one
`torch.cat` of the mask and cache per token, and a device -> host read (`nonzero`) per token.
tinyr1 itself no longer uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tinyr1.hf_compat import CACHE_KW, cache_of
from tinyr1.model.tinyllava import TinyLlavaVideo, right_to_left_pad
from tinyr1.rollout import filter_logits


def sample_tokens_v1(
    logits: torch.Tensor, u: torch.Tensor, *, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token sampler before issue #12 (six [N, V] buffers at its peak); see tinyr1.rollout.sample_tokens.

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
def sample_group_v1(
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
        tok, lp = sample_tokens_v1(logits, u.to(dev)[active], temperature=temperature, top_k=top_k, top_p=top_p)
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
