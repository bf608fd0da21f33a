"""Group sampling with a shared prompt prefix, and per-token log-probs of completions.

The prompt (system + video tokens + question) of each of the B prompts is prefilled ONCE; its KV
cache is then repeated to G rows and all B*G completions decode together in one batch. Rows that
reach EOS are dropped from the cache, so finished completions stop costing work. The update's
log-probs share the prompt the same way (`shared_prefix_hidden`), with grad where it trains.

Sampling uses inverse-CDF draws from one uniform per row and step (`torch.rand(B*G)` every step,
whatever rows are still active), so a fixed seed gives the same tokens as an unshared, uncached
reference sampler — which the tests check.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from transformers import DynamicCache, Qwen2ForCausalLM

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
    """Final hidden states that predict each completion token, one full row per completion: [n, L, D].

    The unshared reference path (and the path when no two rows share a prompt). Row i is
    `prompt_ids[i]` (video spliced in) followed by `completion_ids[i]`; the state at position p
    predicts token p + 1, so completion token j is predicted at `P'_i - 1 + j`.
    """
    n, length = completion_ids.shape
    rows = [torch.cat([p.to(completion_ids.device), c]) for p, c in zip(prompt_ids, completion_ids)]
    embeds, mask, _ = model.splice(rows, video_tokens)  # [n, S, D]
    _check_length(model, embeds.shape[1])
    hidden = model.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # [n, S, D]
    q = [v.shape[0] for v in video_tokens]
    starts = torch.tensor([p.numel() - 1 + qi - 1 for p, qi in zip(prompt_ids, q)], device=hidden.device)
    index = starts[:, None] + torch.arange(length, device=hidden.device)[None, :]  # [n, L]
    return hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [n, L, D]


def _check_length(model: TinyLlavaVideo, positions: int) -> None:
    if positions >= model.cfg.tokenizer_model_max_length:
        raise ValueError(
            f"prompt + completion ({positions} positions) reaches tokenizer_model_max_length "
            f"({model.cfg.tokenizer_model_max_length}); lower rollout.max_new_tokens or video.num_frames"
        )


@contextlib.contextmanager
def _hf_checkpointing_off(layer: torch.nn.Module) -> Iterator[None]:
    """HF's checkpointed layers drop a cache passed to them in training mode (5.17: even without
    grad), so while we call a layer with our prefix cache its flag is off; we checkpoint ourselves.
    Entered inside the checkpointed function, so the backward replay runs the same way."""
    on = bool(getattr(layer, "gradient_checkpointing", False))
    if on:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        if on:
            layer.gradient_checkpointing = True


def _layer_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _prefix_then_suffix(
    layer: torch.nn.Module, hp: torch.Tensor, hs: torch.Tensor, rows: torch.Tensor, config: Any,
    prefix_kw: dict[str, Any], suffix_kw: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer: the prompts [B_p, S, D], then the completions [n, L', D] against the prompts'
    K/V repeated to their rows (an index: autograd sums the rows' gradients back into each prompt)."""
    cache = DynamicCache(config=config)  # fresh per call: a checkpoint replay starts clean
    with _hf_checkpointing_off(layer):
        hp = _layer_out(layer(hp, use_cache=True, **prefix_kw, **{_CACHE_KW: cache}))  # [B_p, S, D]
        cache.batch_select_indices(rows)  # K/V [B_p, kv, S, hd] -> [n, kv, S, hd]
        hs = _layer_out(layer(hs, use_cache=True, **suffix_kw, **{_CACHE_KW: cache}))  # [n, L', D]
    return hp, hs


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [.., q, k] -> additive [.., 1, q, k] (0 / dtype min): valid for both eager and SDPA attention."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def shared_prefix_hidden(
    model: TinyLlavaVideo,
    prompt_ids: Sequence[torch.Tensor],
    video_tokens: Sequence[torch.Tensor | None],
    completion_ids: torch.Tensor,
    row_prompt: torch.Tensor,
) -> torch.Tensor:
    """Final hidden states that predict each completion token [n, L, D], each prompt run ONCE.

    `prompt_ids`/`video_tokens` hold the B_p distinct prompts, `row_prompt` [n] the prompt of each
    completion row. Per decoder layer, the left-padded prompts run once (with grad when enabled: LoRA
    and the connector's video tokens see the prompt too), their K/V are repeated to the rows, and
    the completions run against them. The state predicting token 0 is the prompt's last position;
    token j >= 1 is predicted by completion position j - 1. Layers that HF would checkpoint are
    checkpointed here (prefix + suffix together), so memory follows `gradient_checkpointing`.
    """
    llm = model.llm
    n, length = completion_ids.shape
    embeds, mask, _ = model.splice(prompt_ids, video_tokens)  # [B_p, S, D], [B_p, S]
    embeds, mask = right_to_left_pad(embeds, mask)
    _check_length(model, embeds.shape[1] + length)
    rows = row_prompt.to(embeds.device)
    suffix_ids = completion_ids[:, : max(length - 1, 1)]  # the last token predicts nothing we need
    hs = model.embed_tokens()(suffix_ids)  # [n, L', D]
    s, ls = embeds.shape[1], hs.shape[1]
    pos_p = (mask.cumsum(-1) - 1).clamp(min=0)  # [B_p, S]
    pos_s = mask.sum(-1)[rows][:, None] + torch.arange(ls, device=hs.device)  # [n, L']
    valid = mask.bool()  # [B_p, S]
    causal_p = torch.ones(s, s, dtype=torch.bool, device=hs.device).tril()  # [S, S]
    causal_s = torch.ones(ls, ls, dtype=torch.bool, device=hs.device).tril()  # [L', L']
    allowed_s = torch.cat([valid[rows][:, None, :].expand(n, ls, s), causal_s.expand(n, ls, ls)], -1)  # [n, L', S+L']
    prefix_kw = {"attention_mask": _additive_mask(causal_p & valid[:, None, :], embeds.dtype),  # [B_p, 1, S, S]
                 "position_embeddings": llm.model.rotary_emb(embeds, pos_p), "position_ids": pos_p}
    suffix_kw = {"attention_mask": _additive_mask(allowed_s, hs.dtype),  # [n, 1, L', S+L']
                 "position_embeddings": llm.model.rotary_emb(hs, pos_s), "position_ids": pos_s}
    hp = embeds
    layers = list(llm.model.layers[: llm.config.num_hidden_layers])
    for layer in layers:
        args = (layer, hp, hs, rows, llm.config, prefix_kw, suffix_kw)
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            hp, hs = torch.utils.checkpoint.checkpoint(_prefix_then_suffix, *args, use_reentrant=False)
        else:
            hp, hs = _prefix_then_suffix(*args)
    first = hp[:, -1:][rows]  # [n, 1, D] the prompt's last position predicts token 0
    return llm.model.norm(torch.cat([first, hs[:, : length - 1]], dim=1))  # [n, L, D]


def _prompt_groups(
    prompt_ids: Sequence[torch.Tensor], video_tokens: Sequence[torch.Tensor | None]
) -> tuple[list[int], torch.Tensor]:
    """Rows whose prompt and video tensors are the same objects share a prompt: (first row of each
    distinct prompt, [n] index of each row's prompt among them)."""
    group: dict[tuple[int, int], int] = {}
    firsts: list[int] = []
    for row, key in enumerate(zip(map(id, prompt_ids), map(id, video_tokens))):
        if key not in group:
            group[key] = len(firsts)
            firsts.append(row)
    index = [group[key] for key in zip(map(id, prompt_ids), map(id, video_tokens))]
    return firsts, torch.tensor(index, dtype=torch.long)


def completion_logprobs(
    model: TinyLlavaVideo,
    prompt_ids: Sequence[torch.Tensor],
    video_tokens: Sequence[torch.Tensor],
    completion_ids: torch.Tensor,
    *,
    temperature: float,
    backend: str = "auto",
    with_entropy: bool = False,
    share_prefix: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p of the completions [n, L] (and entropies), never building [n*L, V] logits.

    Rows whose prompt and video tensors are the same objects (a group's G completions) run the
    prompt once (`shared_prefix_hidden`). `share_prefix`: None = whenever two rows share a prompt;
    False = one full row per completion (the reference path the tests compare against).
    """
    from tinyr1.kernels import token_logprobs

    firsts, row_prompt = _prompt_groups(prompt_ids, video_tokens)
    if share_prefix is None:
        share_prefix = len(firsts) < len(prompt_ids)
    if share_prefix:
        hidden = shared_prefix_hidden(model, [prompt_ids[r] for r in firsts], [video_tokens[r] for r in firsts],
                                      completion_ids, row_prompt)  # [n, L, D]
    else:
        hidden = completion_hidden(model, prompt_ids, video_tokens, completion_ids)  # [n, L, D]
    n, length, d = hidden.shape
    weight = model.llm.get_output_embeddings().weight  # [V, D], frozen
    logp, ent = token_logprobs(
        hidden.reshape(n * length, d), weight, completion_ids.reshape(-1),
        temperature if temperature > 0 else 1.0, with_entropy=with_entropy, backend=backend,
    )
    return logp.view(n, length), (ent.view(n, length) if ent is not None else None)
