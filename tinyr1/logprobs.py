"""Per-token log-probs of a Rollout's completions under the model as it is now: what the update
differentiates.

A group's G completions share their prompt (system + ~512 video tokens + question), which is most
of every row. So a micro-batch runs each of its prompts ONCE per decoder layer and its completions
against that prompt's K/V (`shared_prefix_hidden`); the log-prob head then scores the completion
positions from the final hidden states without building [tokens x vocab] logits (`kernels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from tinyr1.hf_compat import CACHE_KW, layer_checkpointing_off
from tinyr1.kernels import token_logprobs
from tinyr1.model.tinyllava import TinyLlavaVideo, right_to_left_pad
from tinyr1.offload import layer_checkpoint
from tinyr1.rollout import Rollout


def completion_logprobs(
    model: TinyLlavaVideo,
    rollout: Rollout,
    rows: torch.Tensor,
    *,
    temperature: float,
    backend: str,
    with_entropy: bool = False,
    reference: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p of the completions `rows` [n] of `rollout`: ([n, L], entropies [n, L] or None).

    With grad enabled and a trainable connector, the video tokens are recomputed from the rollout's
    frozen features so the connector gets its gradient; otherwise the rollout's tokens are reused.
    `reference`: the KL reference's video tokens (the initial connector's) where the rollout has
    them; the caller switches the LoRA adapters off.
    """
    prompts, local = torch.unique(rollout.row_prompt[rows.cpu()], sorted=True, return_inverse=True)  # [B_p], [n]
    index = prompts.tolist()
    if reference and rollout.reference_video_tokens is not None:
        video = [rollout.reference_video_tokens[p] for p in index]  # B_p x [Q, D]
    elif torch.is_grad_enabled() and model.connector_trains:
        video = [model.connect(rollout.features[p]) for p in index]  # B_p x [Q, D], with grad
    else:
        video = [rollout.video_tokens[p] for p in index]  # B_p x [Q, D]
    ids = rollout.completion_ids[rows]  # [n, L]
    hidden = shared_prefix_hidden(model, [rollout.prompt_ids[p] for p in index], video, ids, local)  # [n, L, D]
    return head_logprobs(model, hidden, ids, temperature=temperature, backend=backend, with_entropy=with_entropy)


def head_logprobs(
    model: TinyLlavaVideo,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float,
    backend: str,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final hidden states [n, L, D] -> log p(ids) [n, L] under softmax(lm_head(h) / T) (and entropies).

    T <= 0 (greedy) scores under T = 1. The fused kernel tiles the vocabulary, so the 151,936-column
    logits of Qwen2.5 never exist in memory.
    """
    n, length, d = hidden.shape
    weight = model.llm.get_output_embeddings().weight  # [V, D], frozen
    logp, ent = token_logprobs(
        hidden.reshape(n * length, d), weight, ids.reshape(-1), temperature if temperature > 0 else 1.0,
        with_entropy=with_entropy, backend=backend,
    )
    return logp.view(n, length), (ent.view(n, length) if ent is not None else None)


def shared_prefix_hidden(
    model: TinyLlavaVideo,
    prompt_ids: Sequence[torch.Tensor],
    video_tokens: Sequence[torch.Tensor],
    completion_ids: torch.Tensor,
    row_prompt: torch.Tensor,
) -> torch.Tensor:
    """Final hidden states that predict each completion token [n, L, D], each prompt run ONCE.

    `prompt_ids`/`video_tokens` hold the B_p distinct prompts, `row_prompt` [n] the prompt of each
    completion row (an index into them). Per decoder layer, the left-padded prompts run once (with
    grad when enabled: LoRA and the connector's video tokens see the prompt too), their K/V are
    repeated to the rows, and the completions run against them. The state predicting token 0 is the
    prompt's last position; token j >= 1 is predicted by completion position j - 1. Layers that HF
    would checkpoint are checkpointed here (prefix + suffix together), so memory follows
    `gradient_checkpointing` (`"offload"`: the checkpointed inputs wait in host RAM, `tinyr1.offload`).
    """
    llm = model.llm
    n, length = completion_ids.shape
    embeds, mask, _ = model.splice(prompt_ids, video_tokens)  # [B_p, S, D], [B_p, S]
    embeds, mask = right_to_left_pad(embeds, mask)
    model.check_length(embeds.shape[1] + length)
    rows = row_prompt.to(embeds.device)
    suffix_ids = completion_ids[:, : max(length - 1, 1)]  # the last token predicts nothing we need
    hs = model.embed_tokens()(suffix_ids)  # [n, L', D]
    s, ls = embeds.shape[1], hs.shape[1]
    pos_p = (mask.cumsum(-1) - 1).clamp(min=0)  # [B_p, S]
    pos_s = mask.sum(-1)[rows][:, None] + torch.arange(ls, device=hs.device)  # [n, L']
    valid = mask.bool()  # [B_p, S]
    causal_s = torch.ones(ls, ls, dtype=torch.bool, device=hs.device).tril()  # [L', L']
    allowed_s = torch.cat([valid[rows][:, None, :].expand(n, ls, s), causal_s.expand(n, ls, ls)], -1)  # [n, L', S+L']
    prefix_kw = {"attention_mask": _additive_mask(prefix_mask(valid), embeds.dtype),  # [B_p, 1, S, S]
                 "position_embeddings": llm.model.rotary_emb(embeds, pos_p), "position_ids": pos_p}
    suffix_kw = {"attention_mask": _additive_mask(allowed_s, hs.dtype),  # [n, 1, L', S+L']
                 "position_embeddings": llm.model.rotary_emb(hs, pos_s), "position_ids": pos_s}
    hp = embeds
    for layer in llm.model.layers[: llm.config.num_hidden_layers]:
        args = (layer, hp, hs, rows, llm.config, prefix_kw, suffix_kw)
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            hp, hs = layer_checkpoint(layer)(_prefix_then_suffix, *args)
        else:
            hp, hs = _prefix_then_suffix(*args)
    first = hp[:, -1:][rows]  # [n, 1, D] the prompt's last position predicts token 0
    return llm.model.norm(torch.cat([first, hs[:, : length - 1]], dim=1))  # [n, L, D]


def _prefix_then_suffix(
    layer: torch.nn.Module, hp: torch.Tensor, hs: torch.Tensor, rows: torch.Tensor, config: Any,
    prefix_kw: dict[str, Any], suffix_kw: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer: the prompts [B_p, S, D], then the completions [n, L', D] against the prompts'
    K/V repeated to their rows (an index: autograd sums the rows' gradients back into each prompt)."""
    cache = DynamicCache(config=config)  # fresh per call: a checkpoint replay starts clean
    with layer_checkpointing_off(layer):
        hp = _layer_out(layer(hp, use_cache=True, **prefix_kw, **{CACHE_KW: cache}))  # [B_p, S, D]
        cache.batch_select_indices(rows)  # K/V [B_p, kv, S, hd] -> [n, kv, S, hd]
        hs = _layer_out(layer(hs, use_cache=True, **suffix_kw, **{CACHE_KW: cache}))  # [n, L', D]
    return hp, hs


def _layer_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def prefix_mask(valid: torch.Tensor) -> torch.Tensor:
    """Which keys each prompt position attends to: bool [B, S] (left-padded, True = real) -> [B, S, S].

    Causal over the real positions; a padding position attends to itself only, so no query row is
    fully masked (a fully masked row is NaN on some attention backends, and NaN values of padding
    positions would then leak into real rows through 0 * NaN). Real rows are plain causal.
    """
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()  # [S, S]
    itself = torch.eye(s, dtype=torch.bool, device=valid.device)  # [S, S]
    return (causal & valid[:, None, :]) | (itself & ~valid[:, :, None])  # [B, S, S]


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [.., q, k] -> additive [.., 1, q, k] (0 / dtype min): valid for both eager and SDPA attention."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
