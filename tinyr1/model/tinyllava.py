"""TinyLLaVA-Video: frozen SigLIP tower -> resampler connector -> video tokens spliced into Qwen2.

The module tree mirrors the original checkpoint (`language_model.`, `vision_tower._vision_tower.`,
`connector._connector.`), so `state_dict()` keys are the on-disk keys. Video features are computed
once per video (`encode_video`) and passed in as `video_tokens`: the rollout reuses them for all G
completions and for every forward of the update.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig

from tinyr1.hf_compat import siglip_core
from tinyr1.model.resampler import Connector

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


def _public(d: dict[str, Any]) -> dict[str, Any]:
    """Drop private keys such as `_attn_implementation_autoset` that old configs carry."""
    return {k: v for k, v in d.items() if not k.startswith("_")}


@dataclass(frozen=True)
class TinyLlavaConfig:
    """The fields of the original `config.json` that define the architecture."""

    text_config: dict[str, Any]
    vision_config: dict[str, Any]
    connector_type: str = "groupresampler"
    group: int = 16
    num_queries: int = 512
    num_resampler_layers: int = 3
    hidden_size: int = 2048
    vision_hidden_size: int = 1152
    image_token_index: int = IMAGE_TOKEN_INDEX
    ignore_index: int = IGNORE_INDEX
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "patch"
    tokenizer_model_max_length: int = 3072
    tokenizer_padding_side: str = "right"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TinyLlavaConfig:
        names = {f.name for f in cls.__dataclass_fields__.values()} - {"raw"}
        kwargs = {k: raw[k] for k in names if k in raw and raw[k] is not None}
        return cls(**kwargs, raw=copy.deepcopy(raw))

    def qwen2(self, attn_implementation: str = "sdpa") -> Qwen2Config:
        """Overlay `text_config` (only non-default values are stored) on `Qwen2Config` defaults."""
        return Qwen2Config(**_public(self.text_config), attn_implementation=attn_implementation)

    def siglip(self, *, attn_implementation: str = "sdpa", truncate: bool = True) -> SiglipVisionConfig:
        """The SigLIP config; with `truncate`, only the layers up to `vision_feature_layer` and no head.

        Features come from `hidden_states[vision_feature_layer]`, so later layers, `post_layernorm`
        and the pooling head never affect the output: dropping them saves memory and compute.
        """
        cfg = SiglipVisionConfig(**_public(self.vision_config), attn_implementation=attn_implementation)
        if truncate:
            cfg.num_hidden_layers = self.feature_depth(cfg.num_hidden_layers)
            cfg.vision_use_head = False
        return cfg

    def feature_depth(self, num_layers: int) -> int:
        """Encoder layers needed for `hidden_states[vision_feature_layer]` (index 0 = embeddings)."""
        layer = self.vision_feature_layer
        return layer if layer >= 0 else num_layers + 1 + layer

    @property
    def image_size(self) -> int:
        return int(self.vision_config.get("image_size", SiglipVisionConfig().image_size))


class _SiglipHolder(nn.Module):
    """Keeps the SigLIP transformer under `vision_model.` whatever the transformers version: the
    original keys are `vision_tower._vision_tower.vision_model.*`, so we hold the core ourselves."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.vision_model: nn.Module = siglip_core(config)


class VisionTower(nn.Module):
    """Frozen SigLIP, stored as `_vision_tower.vision_model` to keep the original key names."""

    def __init__(self, config: SiglipVisionConfig, *, truncated: bool, select_strategy: str) -> None:
        super().__init__()
        self._vision_tower = _SiglipHolder(config)
        self.truncated = truncated
        self.select_strategy = select_strategy
        if truncated:  # the last kept layer's output is the feature: no final LayerNorm
            self._vision_tower.vision_model.post_layernorm = nn.Identity()

    @property
    def core(self) -> nn.Module:
        return self._vision_tower.vision_model

    def forward(self, pixels: torch.Tensor, feature_layer: int) -> torch.Tensor:
        # pixels [T, 3, S, S] -> features [T, P', Dv]
        if self.truncated:
            feats = self.core(pixel_values=pixels).last_hidden_state  # [T, P, Dv]
        else:
            out = self.core(pixel_values=pixels, output_hidden_states=True)
            feats = out.hidden_states[feature_layer]  # [T, P, Dv]
        if self.select_strategy == "patch":  # SigLIP has no CLS token; the original drops token 0 anyway
            feats = feats[:, 1:]
        return feats


class TinyLlavaVideo(nn.Module):
    """The assembled model. `language_model` may be wrapped by PEFT after construction."""

    def __init__(
        self, cfg: TinyLlavaConfig, *, attn_implementation: str = "sdpa", truncate_vision: bool = True
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.language_model: nn.Module = Qwen2ForCausalLM(cfg.qwen2(attn_implementation))
        self.vision_tower = VisionTower(
            cfg.siglip(attn_implementation=attn_implementation, truncate=truncate_vision),
            truncated=truncate_vision,
            select_strategy=cfg.vision_feature_select_strategy,
        )
        self.connector = Connector(
            cfg.connector_type,
            cfg.vision_hidden_size,
            cfg.hidden_size,
            cfg.num_queries,
            cfg.group,
            cfg.num_resampler_layers,
        )

    # ---- parts ------------------------------------------------------------------------------
    @property
    def llm(self) -> Qwen2ForCausalLM:
        """The underlying `Qwen2ForCausalLM`, whether or not PEFT wraps it (LoRA layers are in place)."""
        lm = self.language_model
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # type: ignore[return-value]

    def embed_tokens(self) -> nn.Embedding:
        return self.llm.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens().weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations run in: the LLM's input embeddings' (never quantized, never trained)."""
        return self.embed_tokens().weight.dtype

    @property
    def connector_trains(self) -> bool:
        """Whether the connector's weights take gradients (`model.train_connector`)."""
        return any(p.requires_grad for p in self.connector.parameters())

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen tower, always without gradient: [T, 3, S, S] -> [T*P', Dv]."""
        tower = self.vision_tower
        dtype = tower.core.embeddings.patch_embedding.weight.dtype
        with torch.no_grad():
            feats = tower(pixels.to(self.device, dtype), self.cfg.vision_feature_layer)  # [T, P', Dv]
        return feats.reshape(1, -1, feats.shape[-1])  # [1, T*P', Dv]

    def connect(self, features: torch.Tensor, connector: nn.Module | None = None) -> torch.Tensor:
        """Vision features [1, T*P', Dv] -> video tokens [Q, D]: the one way to run a connector.

        `connector` defaults to the model's own; the trainer passes its frozen copy of the initial
        connector for the KL reference. A trained connector keeps fp32 master weights while the LLM
        computes in bf16/fp16: it then runs under autocast to the compute dtype (matmuls in 16 bits,
        gradients into the fp32 weights). Grad flows when enabled and the weights require it.
        """
        conn = connector if connector is not None else self.connector
        compute = self.compute_dtype
        mixed = conn.dtype != compute and compute != torch.float32
        with torch.autocast(self.device.type, dtype=compute, enabled=mixed):
            return conn(features.to(compute if mixed else conn.dtype))[0]  # [Q, D]

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """[T, 3, S, S] -> video tokens [Q, D]. Grad flows into the connector when it is trainable."""
        return self.connect(self.vision_features(pixels))  # [Q, D]

    def check_length(self, positions: int) -> None:
        """Refuse sequences the original was never trained on (RoPE positions past its maximum)."""
        if positions >= self.cfg.tokenizer_model_max_length:
            raise ValueError(
                f"prompt + completion ({positions} positions) reaches tokenizer_model_max_length "
                f"({self.cfg.tokenizer_model_max_length}); lower rollout.max_new_tokens or video.num_frames"
            )

    # ---- splice -----------------------------------------------------------------------------
    def splice(
        self,
        input_ids: Sequence[torch.Tensor],
        video_tokens: Sequence[torch.Tensor | None],
        labels: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replace each row's `<image>` sentinel (-200) with its video tokens, truncate, right-pad.

        input_ids: per row [L_i] (unpadded, may hold one -200); video_tokens: per row [Q, D] or None.
        Returns inputs_embeds [B, S, D], attention_mask [B, S], labels [B, S] (-100 on video/pad).
        """
        embed = self.embed_tokens()
        rows: list[torch.Tensor] = []
        row_labels: list[torch.Tensor] = []
        for i, ids in enumerate(input_ids):
            ids = ids.to(self.device)
            lab = labels[i].to(self.device) if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            where = (ids == self.cfg.image_token_index).nonzero().flatten().tolist()
            if len(where) > 1:
                raise ValueError(f"row {i} has {len(where)} <image> sentinels; one video per prompt")
            if where:
                p, vid = where[0], video_tokens[i]
                if vid is None:
                    raise ValueError(f"row {i} has an <image> sentinel but no video tokens")
                vid = vid.to(embed.weight.dtype)
                text = embed(torch.cat([ids[:p], ids[p + 1 :]]))  # [L-1, D]
                rows.append(torch.cat([text[:p], vid, text[p:]]))  # [L-1+Q, D]
                video_lab = lab.new_full((vid.shape[0],), IGNORE_INDEX)
                row_labels.append(torch.cat([lab[:p], video_lab, lab[p + 1 :]]))
            else:
                rows.append(embed(ids))
                row_labels.append(lab)
        max_len = self.cfg.tokenizer_model_max_length
        rows = [r[:max_len] for r in rows]
        row_labels = [r[:max_len] for r in row_labels]
        return pad_right(rows, row_labels)

    # ---- forward / generate -----------------------------------------------------------------
    def forward(
        self,
        input_ids: Sequence[torch.Tensor],
        video_tokens: Sequence[torch.Tensor | None],
        labels: Sequence[torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Logits (and loss when labels are given) for a batch of spliced rows."""
        embeds, mask, lab = self.splice(input_ids, video_tokens, labels)
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            labels=lab if labels is not None else None,
            **kwargs,
        )


def pad_right(
    rows: Sequence[torch.Tensor], row_labels: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad embeddings [L_i, D] with zeros and labels with -100; mask marks real positions."""
    b, s, d = len(rows), max(r.shape[0] for r in rows), rows[0].shape[1]
    embeds = rows[0].new_zeros(b, s, d)  # [B, S, D]
    mask = torch.zeros(b, s, dtype=torch.long, device=rows[0].device)  # [B, S]
    labels = torch.full((b, s), IGNORE_INDEX, dtype=torch.long, device=rows[0].device)  # [B, S]
    for i, (r, lab) in enumerate(zip(rows, row_labels)):
        embeds[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
        labels[i, : lab.shape[0]] = lab
    return embeds, mask, labels


def right_to_left_pad(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding to the left: [B, S, D], [B, S] -> same shapes."""
    if bool(mask[:, -1].all()):
        return embeds, mask
    out_e, out_m = torch.zeros_like(embeds), torch.zeros_like(mask)
    for i in range(embeds.shape[0]):
        n = int(mask[i].sum())
        out_e[i, embeds.shape[1] - n :] = embeds[i, :n]
        out_m[i, embeds.shape[1] - n :] = 1
    return out_e, out_m
