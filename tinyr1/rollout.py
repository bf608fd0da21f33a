"""Group sampling with a shared prompt prefix, and per-token log-probs of completions.

The prompt (system + video tokens + question) of each of the B prompts is prefilled ONCE; its KV
cache is then repeated to G rows and all B*G completions decode together in one batch. Rows that
reach EOS are dropped from the cache, so finished completions stop costing work.

Sampling uses inverse-CDF draws from one uniform per row and step (`torch.rand(B*G)` every step,
whatever rows are still active), so a fixed seed gives the same tokens as an unshared, uncached
reference sampler — which the tests check.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Qwen2ForCausalLM

from tinyr1.model.tinyllava import TinyLlavaVideo, right_to_left_pad

# transformers renamed `past_key_values` to `cache` (5.2x); speak whichever this version speaks.
_CACHE_KW = "cache" if "cache" in inspect.signature(Qwen2ForCausalLM.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass(frozen=True)
class Rollout:
    """One step's prompts and completions. B prompts, G completions each, L = longest completion."""

    prompt_ids: list[torch.Tensor]  # B x [P_i] with one -200 sentinel
    video_tokens: list[torch.Tensor]  # B x [Q, D], detached (recomputed when the connector trains)
    group_size: int  # G
    completion_ids: torch.Tensor  # [B*G, L], eos-padded after the first EOS
    completion_mask: torch.Tensor  # [B*G, L] 1 up to and including the first EOS
    sample_logprobs: torch.Tensor  # [B*G, L] log p(token) under softmax(logits / T) at sampling time
    truncated: torch.Tensor  # [B*G] bool: no EOS within max_new_tokens
    texts: list[str]  # B*G decoded completions (special tokens dropped)
    rewards: torch.Tensor | None = None  # [B*G, R] per reward function (unweighted)
    reward_total: torch.Tensor | None = None  # [B*G] weighted sum
    advantages: torch.Tensor | None = None  # [B*G]
    reward_stats: dict[str, float] = field(default_factory=dict)  # reward, reward_std, frac_reward_zero_std

    @property
    def prompt_index(self) -> torch.Tensor:
        """[B*G] index of each completion's prompt."""
        n = len(self.prompt_ids)
        return torch.arange(n).repeat_interleave(self.group_size)


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
    cache = _cache_of(out)
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
            use_cache=True, **{_CACHE_KW: cache},
        )
        logits = out.logits[:, -1]  # [active, V]
        next_pos = next_pos + 1
    del cache, out
    return ids[:, :steps], logp[:, :steps]


def completion_hidden(
    model: TinyLlavaVideo,
    prompt_ids: Sequence[torch.Tensor],
    video_tokens: Sequence[torch.Tensor],
    completion_ids: torch.Tensor,
) -> torch.Tensor:
    """Final hidden states that predict each completion token: [n, L, D].

    Row i is `prompt_ids[i]` (video spliced in) followed by `completion_ids[i]`; the state at
    position p predicts token p + 1, so completion token j is predicted at `P'_i - 1 + j`.
    """
    n, length = completion_ids.shape
    rows = [torch.cat([p.to(completion_ids.device), c]) for p, c in zip(prompt_ids, completion_ids)]
    embeds, mask, _ = model.splice(rows, video_tokens)  # [n, S, D]
    if embeds.shape[1] >= model.cfg.tokenizer_model_max_length:
        raise ValueError(
            f"prompt + completion ({embeds.shape[1]} positions) reaches tokenizer_model_max_length "
            f"({model.cfg.tokenizer_model_max_length}); lower rollout.max_new_tokens or video.num_frames"
        )
    hidden = model.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # [n, S, D]
    q = [v.shape[0] for v in video_tokens]
    starts = torch.tensor([p.numel() - 1 + qi - 1 for p, qi in zip(prompt_ids, q)], device=hidden.device)
    index = starts[:, None] + torch.arange(length, device=hidden.device)[None, :]  # [n, L]
    return hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [n, L, D]


def completion_logprobs(
    model: TinyLlavaVideo,
    prompt_ids: Sequence[torch.Tensor],
    video_tokens: Sequence[torch.Tensor],
    completion_ids: torch.Tensor,
    *,
    temperature: float,
    backend: str = "auto",
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p of the completions [n, L] (and entropies), never building [n*L, V] logits."""
    from tinyr1.kernels import token_logprobs

    hidden = completion_hidden(model, prompt_ids, video_tokens, completion_ids)  # [n, L, D]
    n, length, d = hidden.shape
    weight = model.llm.get_output_embeddings().weight  # [V, D], frozen
    logp, ent = token_logprobs(
        hidden.reshape(n * length, d), weight, completion_ids.reshape(-1),
        temperature if temperature > 0 else 1.0, with_entropy=with_entropy, backend=backend,
    )
    return logp.view(n, length), (ent.view(n, length) if ent is not None else None)
