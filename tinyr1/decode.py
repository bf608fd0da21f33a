"""KV-cached decoding of G completions per prompt with each prompt's K/V stored ONCE.

A GRPO rollout decodes B prompts x G rows. The prompt (system + ~512 video tokens + question) is
most of every row's context, so `PrefixDecoder` keeps, per decoder layer:

- the prompts' K/V once: [B, kv, S, hd] (from one prefill), never repeated to the G rows;
- each row's own K/V in a buffer preallocated for `max_new_tokens`: [B, kv, R, T, hd], written in
  place (no `torch.cat` per token, no reallocation, no allocator fragmentation).

A decode step attends each row's query to its prompt's keys and to its own keys and merges the two
parts exactly: one softmax over both, computed as max-shifted exponentials of each part whose sums
are added (the cascade-attention merge). The G rows' queries of a prompt go through that prompt's
K/V as one [G * heads-per-kv, S] matrix product, so the prefix is read once per prompt, not G times.

Rows live in slots [B_a, R]: the active prompts and up to R rows each. `compact` moves each prompt's
unfinished rows to the front of its slots and drops finished slots and prompts; the sampler calls it
every `sync_every` tokens, together with its only device -> host read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tinyr1.hf_compat import cache_layer_kv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PrefixDecoder:
    """The per-layer caches and the decode step of one sampling call (see the module docstring).

    Built from an HF prefill of the left-padded prompts (its cache holds the prompts' K/V once).
    The decoder layers' own modules (norms, q/k/v/o projections with their LoRA, MLP) run the step;
    only the attention arithmetic is tinyr1's.
    """

    def __init__(
        self, llm: nn.Module, prefix_cache: Any, valid: torch.Tensor, *, group_size: int, max_new_tokens: int
    ) -> None:
        cfg = llm.config
        self.layers = list(llm.model.layers[: cfg.num_hidden_layers])
        for i, layer in enumerate(self.layers):
            if getattr(layer.self_attn, "sliding_window", None) is not None:
                raise NotImplementedError(
                    f"decoder layer {i} uses sliding-window attention, which tinyr1's shared-prefix decode "
                    "does not implement (TinyLLaVA-Video's Qwen2 checkpoints do not use it)"
                )
        self.llm = llm
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.scaling = float(self.layers[0].self_attn.scaling)
        self.per_kv = self.heads // self.kv_heads  # query heads sharing one K/V head
        self.max_new_tokens = max_new_tokens
        kv = cache_layer_kv(prefix_cache, len(self.layers))
        self.prefix_k = [k for k, _ in kv]  # layers x [B, kv, S, hd] (RoPE applied)
        self.prefix_v = [v for _, v in kv]  # layers x [B, kv, S, hd]
        b = valid.shape[0]
        self.prefix_bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)  # [B, S]
        self.prefix_bias.masked_fill_(~valid, float("-inf"))  # padding keys of the left-padded prompts
        k0 = self.prefix_k[0]
        shape = (b, self.kv_heads, group_size, max_new_tokens, self.head_dim)
        self.suffix_k = [k0.new_empty(shape) for _ in self.layers]  # layers x [B_a, kv, R, T, hd]
        self.suffix_v = [k0.new_empty(shape) for _ in self.layers]  # layers x [B_a, kv, R, T, hd]

    @property
    def slots(self) -> tuple[int, int]:
        """(B_a, R): active prompts and row slots per prompt."""
        return self.suffix_k[0].shape[0], self.suffix_k[0].shape[2]

    def step(
        self, tokens: torch.Tensor, positions: torch.Tensor, t: int | torch.Tensor, *, length: int | None = None
    ) -> torch.Tensor:
        """Logits [B_a * R, V] after feeding tokens [B_a, R] at RoPE positions [B_a, R] as new token t.

        `t` is a Python int (eager: attends to the first t + 1 suffix positions) or a 0-d device
        tensor (fixed shapes for CUDA graphs: attends to all `length` positions, masking those > t).
        """
        ba, r = tokens.shape
        x = self.llm.model.embed_tokens(tokens.reshape(-1, 1))  # [B_a*R, 1, D]
        cos, sin = self.llm.model.rotary_emb(x, positions.reshape(-1, 1))  # [B_a*R, 1, hd] each
        cos = cos.view(ba, r, 1, self.head_dim).transpose(1, 2)  # [B_a, 1, R, hd]: broadcast over kv heads
        sin = sin.view(ba, r, 1, self.head_dim).transpose(1, 2)
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)  # [B_a*R, 1, D]
            x = x + self._attention(i, layer.self_attn, h, cos, sin, t, length)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = self.llm.model.norm(x)
        return self.llm.lm_head(x)[:, -1]  # [B_a*R, V]

    def _attention(
        self, i: int, attn: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        t: int | torch.Tensor, length: int | None,
    ) -> torch.Tensor:
        ba, r = self.slots
        kvh, g, hd = self.kv_heads, self.per_kv, self.head_dim
        q = attn.q_proj(h).view(ba, r, kvh, g, hd).permute(0, 2, 1, 3, 4)  # [B_a, kv, R, g, hd]
        k = attn.k_proj(h).view(ba, r, kvh, hd).transpose(1, 2)  # [B_a, kv, R, hd]
        v = attn.v_proj(h).view(ba, r, kvh, hd).transpose(1, 2)  # [B_a, kv, R, hd]
        q = q * cos[:, :, :, None] + rotate_half(q) * sin[:, :, :, None]
        k = k * cos + rotate_half(k) * sin
        sk, sv = self.suffix_k[i], self.suffix_v[i]  # [B_a, kv, R, T, hd]
        if isinstance(t, int):
            sk[:, :, :, t], sv[:, :, :, t] = k, v
            sk, sv = sk[:, :, :, : t + 1], sv[:, :, :, : t + 1]
        else:
            sk.index_copy_(3, t.view(1), k[:, :, :, None])
            sv.index_copy_(3, t.view(1), v[:, :, :, None])
            sk, sv = sk[:, :, :, :length], sv[:, :, :, :length]
        # prefix part: the prompt's K/V once for its R*g queries
        pre = torch.matmul(q.reshape(ba, kvh, r * g, hd), self.prefix_k[i].transpose(-1, -2))  # [B_a, kv, R*g, S]
        pre = pre.float() * self.scaling + self.prefix_bias[:, None, None, :]
        # suffix part: each row's own keys
        suf = torch.matmul(q, sk.transpose(-1, -2)).float() * self.scaling  # [B_a, kv, R, g, t+1]
        if not isinstance(t, int):
            late = torch.arange(suf.shape[-1], device=suf.device) > t  # [T] positions not written yet
            suf = suf.masked_fill(late, float("-inf"))
        pre = pre.view(ba, kvh, r, g, -1)  # [B_a, kv, R, g, S]
        top = torch.maximum(pre.amax(-1, keepdim=True), suf.amax(-1, keepdim=True))  # [B_a, kv, R, g, 1]
        pre, suf = (pre - top).exp_(), (suf - top).exp_()
        total = pre.sum(-1, keepdim=True) + suf.sum(-1, keepdim=True)  # [B_a, kv, R, g, 1]
        dtype = self.prefix_v[i].dtype
        out = torch.matmul(pre.view(ba, kvh, r * g, -1).to(dtype), self.prefix_v[i]).view(ba, kvh, r, g, hd)
        out = (out.float() + torch.matmul(suf.to(dtype), sv).float()) / total  # [B_a, kv, R, g, hd]
        out = out.to(h.dtype).permute(0, 2, 1, 3, 4).reshape(ba * r, 1, kvh * g * hd)  # [B_a*R, 1, H*hd]
        return attn.o_proj(out)

    def compact(self, prompts: torch.Tensor, order: torch.Tensor) -> None:
        """Keep the prompts [B_a'] (indices into the active ones) and, per kept prompt, the slots
        `order` [B_a', R'] (indices into its R slots): finished rows stop costing work."""
        for i in range(len(self.layers)):
            self.prefix_k[i] = self.prefix_k[i][prompts]
            self.prefix_v[i] = self.prefix_v[i][prompts]
            self.suffix_k[i] = _take_slots(self.suffix_k[i][prompts], order)
            self.suffix_v[i] = _take_slots(self.suffix_v[i][prompts], order)
        self.prefix_bias = self.prefix_bias[prompts]


def _take_slots(buffer: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """buffer [B, kv, R, T, hd], order [B, R'] -> [B, kv, R', T, hd] (a fresh, smaller buffer)."""
    b, kv, _, length, hd = buffer.shape
    index = order[:, None, :, None, None].expand(b, kv, order.shape[1], length, hd)
    return torch.gather(buffer, 2, index)


class GraphedStep:
    """`PrefixDecoder.step` replayed from a CUDA graph: one launch per token instead of one per
    kernel (layers x ~30). Shapes change only when the decoder compacts, so a graph is captured per
    slot layout; between compactions the inputs are copied into static tensors and the graph
    replays. The captured step attends over the whole preallocated suffix with the positions after
    t masked (a fixed shape), and the K/V writes index with a device tensor."""

    def __init__(self, decoder: PrefixDecoder) -> None:
        self.decoder = decoder
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured_for: tuple[int, ...] = ()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, t: int) -> torch.Tensor:
        layout = (id(self.decoder.suffix_k[0]), *tokens.shape)
        if self.graph is None or layout != self.captured_for:
            self._capture(tokens, positions, t)
            self.captured_for = layout
        else:
            self.tokens.copy_(tokens)
            self.positions.copy_(positions)
            self.t.fill_(t)
        assert self.graph is not None
        self.graph.replay()
        return self.logits

    def _capture(self, tokens: torch.Tensor, positions: torch.Tensor, t: int) -> None:
        """Warm up on a side stream, then capture. Both write K/V at index t from the same inputs
        as the replay that follows, so running them changes nothing."""
        d, length = self.decoder, self.decoder.max_new_tokens
        self.graph = None  # frees the previous layout's graph and pool
        self.tokens, self.positions = tokens.clone(), positions.clone()
        self.t = torch.full((), t, dtype=torch.long, device=tokens.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            d.step(self.tokens, self.positions, self.t, length=length)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = d.step(self.tokens, self.positions, self.t, length=length)  # [B_a*R, V]
        self.graph = graph
