"""The TinyLLaVA-Video connectors: GroupResampler (the released model's) and the naive resampler.

Both are Flamingo-style Perceiver resamplers. Parameter names and module nesting follow the
original checkpoints exactly (`layers.N.0.to_kv.weight`, `layers.N.1.1.weight`, ...), so a
`state_dict()` of these modules *is* the on-disk layout under `connector._connector.`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DIM_HEAD = 64  # fixed in the original code, whatever the LLM width
HEADS = 8
FF_MULT = 4


def sinusoidal_encoding(seq_len: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Sine/cosine position table, built in fp16 as the original does (its rounding moves logits ~3.5e-3)."""
    pe = torch.zeros(seq_len, dim, dtype=torch.float16, device=device)  # [S, D]
    position = torch.arange(0, seq_len, device=device).unsqueeze(1).float()  # [S, 1]
    div_term = torch.exp(torch.arange(0, dim, 2, device=device).float() * -(math.log(10000.0) / dim))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe  # [S, D] fp16


class PerceiverAttention(nn.Module):
    """Latents attend to `cat(media, latents)`; Q from latents only."""

    def __init__(self, dim: int, dim_head: int = DIM_HEAD, heads: int = HEADS) -> None:
        super().__init__()
        inner = dim_head * heads
        self.scale = dim_head**-0.5
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # media [B, M, D], latents [B, Q, D]
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        b, nq, _ = latents.shape
        q = self.to_q(latents)  # [B, Q, inner]
        k, v = self.to_kv(torch.cat((media, latents), dim=1)).chunk(2, dim=-1)  # [B, M+Q, inner] each

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # [B, h, n, d]

        q, k, v = heads(q) * self.scale, heads(k), heads(v)
        sim = q @ k.transpose(-1, -2)  # [B, h, Q, M+Q]
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = sim.softmax(dim=-1) @ v  # [B, h, Q, d]
        out = out.transpose(1, 2).reshape(b, nq, -1)  # [B, Q, inner]
        return self.to_out(out)  # [B, Q, D]


def feed_forward(dim: int, mult: int = FF_MULT) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear (indices 0,1,2,3 match the checkpoint keys)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class _Resampler(nn.Module):
    def __init__(self, vision_dim: int, dim: int, num_latents: int, depth: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.linear = nn.Linear(vision_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim), feed_forward(dim)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def _resample(self, media: torch.Tensor) -> torch.Tensor:
        # media [B, M, D] -> latents [B, Q, D]
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(media, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class GroupResampler(_Resampler):
    """Split the frame tokens into `group` contiguous chunks; each chunk is resampled by the same
    `num_queries / group` latents; the outputs are concatenated and a sinusoidal position encoding
    is added after resampling."""

    def __init__(self, vision_dim: int, dim: int, num_queries: int, group: int, depth: int) -> None:
        if num_queries % group:
            raise ValueError(f"num_queries ({num_queries}) must be divisible by group ({group})")
        super().__init__(vision_dim, dim, num_queries // group, depth)
        self.group = group

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features [B, T*P, Dv] -> video tokens [B, num_queries, D]
        x = self.linear(features)  # [B, T*P, D]
        n = x.shape[1]
        base, rem = divmod(n, self.group)
        sizes = [base + 1] * rem + [base] * (self.group - rem)  # the original's near-equal split
        out = torch.cat([self._resample(chunk) for chunk in torch.split(x, sizes, dim=1)], dim=1)
        pe = sinusoidal_encoding(out.shape[1], out.shape[2], out.device).to(out.dtype)
        return out + pe


class NaiveResampler(_Resampler):
    """All `num_queries` latents attend to all frame tokens at once; position encoding on the inputs."""

    def __init__(self, vision_dim: int, dim: int, num_queries: int, depth: int) -> None:
        super().__init__(vision_dim, dim, num_queries, depth)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features [B, T*P, Dv] -> video tokens [B, num_queries, D]
        x = self.linear(features)  # [B, T*P, D]
        x = x + sinusoidal_encoding(x.shape[1], x.shape[2], x.device).to(x.dtype)
        return self._resample(x)


class Connector(nn.Module):
    """Holds the resampler as `_connector`, so weights live under `connector._connector.`."""

    def __init__(
        self, connector_type: str, vision_dim: int, dim: int, num_queries: int, group: int, depth: int
    ) -> None:
        super().__init__()
        if connector_type == "groupresampler":
            self._connector: nn.Module = GroupResampler(vision_dim, dim, num_queries, group, depth)
        elif connector_type == "naiveresampler":
            self._connector = NaiveResampler(vision_dim, dim, num_queries, depth)
        else:
            raise ValueError(
                f"connector_type {connector_type!r} is not supported; use 'groupresampler' or 'naiveresampler'"
            )

    @property
    def resampler(self) -> nn.Module:
        """The resampler itself: its `state_dict()` has the keys saved after `connector._connector.`."""
        return self._connector

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the connector computes in (its input projection's weight)."""
        return self._connector.linear.weight.dtype

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self._connector(features)
