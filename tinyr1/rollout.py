"""The `Rollout` the update reads, and the sampler that produces its completions.

The B prompts (system + video tokens + question) are prefilled ONCE and decoded G times each by
`tinyr1.decode.PrefixDecoder`: each prompt's K/V is stored once, each row's own K/V in a buffer
preallocated for `max_new_tokens`, and finished rows are compacted away every `sync_every` tokens.

Sampling uses inverse-CDF draws from one uniform per row and step (`torch.rand(T, B*G)` up front),
so a fixed seed gives the same tokens as an unshared, uncached reference sampler and as the
sampler before the shared-prefix decode (benchmarks/sampler_v1.py) — which the tests check.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tinyr1.decode import GraphedStep, PrefixDecoder
from tinyr1.hf_compat import cache_of
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

    Inverse CDF in vocabulary order over the filtered probabilities (HF order: top-k, then top-p);
    logp is under the unfiltered softmax(logits / T) — what the update recomputes. T = 0 is greedy
    (logp then under T = 1). With top-k the CDF runs over the candidates only (the top 2k logits,
    so ties at the k-th value are kept as HF keeps them, up to k of them), in vocabulary order:
    the same tokens as a CDF over all V columns, without its [N, V] softmax, cumsum and masks.
    """
    logits = logits.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, logits.gather(1, tok[:, None])[:, 0] - logits.logsumexp(-1)
    scaled = logits if temperature == 1.0 else logits / temperature  # [N, V]
    lse = scaled.logsumexp(-1)  # [N]
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        vals, ids = scaled.topk(min(2 * top_k, vocab), dim=-1)  # [N, C] descending
        vals = vals.masked_fill(vals < vals[:, top_k - 1 : top_k], float("-inf"))  # top-k, ties kept
        ids, order = ids.sort(-1)  # [N, C] vocabulary order, as a CDF over all columns runs
        vals = filter_logits(vals.gather(1, order), 0, top_p)  # [N, C]
    else:
        ids, vals = None, filter_logits(scaled, 0, top_p)  # [N, V]
    cdf = vals.softmax(-1).cumsum(-1)  # [N, C or V]
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(1)  # [N, 1]
    pick = torch.searchsorted(cdf, target, right=True)  # [N, 1]
    pick = torch.minimum(pick, torch.searchsorted(cdf, cdf[:, -1:].contiguous()))  # u * total rounded up to total: last candidate
    tok = (ids.gather(1, pick) if ids is not None else pick)[:, 0]  # [N]
    return tok, scaled.gather(1, tok[:, None])[:, 0] - lse


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
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    sync_every: int = 16,
    cuda_graphs: bool = False,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample G completions for each prompt. Returns ids [B*G, L] (eos-padded) and logp [B*G, L].

    The only decode loop of tinyr1 (rollouts, evaluation, `generate`). Each prompt's K/V is stored
    once (`PrefixDecoder`); finished rows are compacted away every `sync_every` tokens, which is
    also the only time the loop reads from the device (a CUDA GPU never waits for Python between
    tokens). `cuda_graphs` replays each decode step from a captured CUDA graph (CUDA only; ignored
    elsewhere). `on_step(ids [B*G])` sees each step's tokens (streaming; costs a read per token).
    Randomness: exactly `max_new_tokens * B*G` uniforms from `generator`, row i at step t taking
    u[t, i], however early rows finish. A list of B generators gives prompt b's rows
    `torch.rand(T, G)` from generator b: what a call with that prompt alone would draw, so a
    prompt's completions do not depend on the batch it is sampled in (data-parallel ranks).
    """
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    llm, dev = model.llm, model.device
    b, steps = len(prompt_ids), max_new_tokens
    n = b * group_size
    embeds, mask, _ = model.splice(prompt_ids, video_tokens)  # [B, S, D], [B, S]
    embeds, mask = right_to_left_pad(embeds, mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    decoder = PrefixDecoder(llm, cache_of(out), mask.bool(), group_size=group_size, max_new_tokens=steps)
    step = GraphedStep(decoder) if cuda_graphs and dev.type == "cuda" else decoder.step
    logits = out.logits[:, -1].repeat_interleave(group_size, 0)  # [B*G, V]
    del out, embeds
    if isinstance(generator, Sequence):
        if len(generator) != b:
            raise ValueError(f"{len(generator)} generators for {b} prompts: pass one per prompt")
        uniforms = torch.cat([torch.rand(steps, group_size, generator=g, device=g.device).to(dev)
                              for g in generator], dim=1)  # [T, B*G]
    else:
        gen_device = "cpu" if generator is None else generator.device
        uniforms = torch.rand(steps, n, generator=generator, device=gen_device).to(dev)  # [T, B*G]
    row = torch.arange(n, device=dev).view(b, group_size)  # [B_a, R] the completion in each slot
    done = torch.zeros(b, group_size, dtype=torch.bool, device=dev)  # [B_a, R]
    next_pos = mask.sum(-1)[:, None].expand(b, group_size)  # [B_a, R] RoPE position of the next token
    ids = torch.full((n, steps), eos_id, dtype=torch.long, device=dev)  # [B*G, T]
    logp = torch.zeros(n, steps, device=dev)  # [B*G, T]
    last = steps - 1
    for t in range(steps):
        tok, lp = sample_tokens(logits, uniforms[t][row.flatten()], temperature=temperature, top_k=top_k, top_p=top_p)
        tok, lp = tok.view_as(row), lp.view_as(row)  # [B_a, R]
        ids[row, t] = torch.where(done, eos_id, tok)
        logp[row, t] = torch.where(done, 0.0, lp)
        done = done | (tok == eos_id)
        if on_step is not None:
            on_step(ids[:, t])
        last = t
        if t == steps - 1:
            break
        if (t + 1) % sync_every == 0:
            alive = (~done).sum(1).tolist()  # [B_a]: the loop's one device -> host read per sync_every tokens
            if not any(alive):
                break
            if min(alive) == 0 or max(alive) < row.shape[1]:
                prompts = torch.tensor([p for p, a in enumerate(alive) if a], device=dev)  # [B_a']
                order = torch.argsort(done[prompts].to(torch.int8), dim=1, stable=True)[:, : max(alive)]  # [B_a', R']
                decoder.compact(prompts, order)
                row, done = row[prompts].gather(1, order), done[prompts].gather(1, order)
                tok, next_pos = tok[prompts].gather(1, order), next_pos[prompts].gather(1, order)
        logits = step(tok, next_pos, t)  # [B_a*R, V]
        next_pos = next_pos + 1
    del decoder, step
    length = _completion_length(ids[:, : last + 1], eos_id)
    return ids[:, :length], logp[:, :length]


def _completion_length(ids: torch.Tensor, eos_id: int) -> int:
    """Columns up to the last row's first EOS (all of them when a row has none): ids [n, T]."""
    is_eos = ids == eos_id  # [n, T]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, ids.shape[1])  # [n]
    return int(first.max()) if ids.shape[0] else 0
