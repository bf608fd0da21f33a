"""Write checkpoints in the original TinyLLaVA-Video layout, and tiny random ones for tests/demo.

The layout (docs/ORIGINAL.md §1): config.json with `text_config`/`vision_config` holding only values
that differ from the HF class defaults, safetensors (sharded with an index above a size limit)
with the original key names and *without* the tied `language_model.lm_head.weight`,
generation_config.json, and the tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tinyr1.model.tinyllava import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TinyLlavaConfig, TinyLlavaVideo
from tinyr1.tokenizer import build_tiny_tokenizer, load_tokenizer

TOKENIZER_FILES = (
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json",
)
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def shard_state(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        n = state[key].numel() * state[key].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += n
    return shards


def write_checkpoint(
    out_dir: str | Path,
    state: dict[str, torch.Tensor],
    raw_config: dict[str, Any],
    *,
    tokenizer_dir: str | Path | None,
    dtype: torch.dtype,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write `state` (original key names) + config + tokenizer files into `out_dir`."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tied = bool(raw_config.get("text_config", {}).get("tie_word_embeddings", False))
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
        for k, v in state.items()
        if not (tied and k == "language_model.lm_head.weight")
    }
    shards = shard_state(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = dict(raw_config, torch_dtype=DTYPE_NAMES[dtype])
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    text = raw_config.get("text_config", {})
    gen = {"bos_token_id": text.get("bos_token_id"), "eos_token_id": text.get("eos_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
    return out


def tiny_config(vocab_size: int, eos_id: int, *, image_size: int = 32, frames: int = 8,
                connector: str = "groupresampler") -> dict[str, Any]:
    """config.json of a tiny TinyLLaVA-Video (SigLIP 32px/patch 8/64 wide, Qwen2 128 wide x 4)."""
    hidden = 128
    return {
        "model_type": "tinyllava",
        "architectures": ["TinyLlavaForConditionalGeneration"],
        "connector_type": connector,
        "group": frames,
        "num_queries": frames * 4,
        "num_resampler_layers": 2,
        "hidden_size": hidden,
        "vision_hidden_size": 64,
        "image_token_index": IMAGE_TOKEN_INDEX,
        "ignore_index": IGNORE_INDEX,
        "image_aspect_ratio": "square",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "patch",
        "llm_model_name_or_path": "tiny-qwen2",
        "tokenizer_name_or_path": "tiny-qwen2",
        "vision_model_name_or_path": "tiny-siglip",
        "tokenizer_model_max_length": 1024,
        "tokenizer_padding_side": "right",
        "tokenizer_use_fast": False,
        "pad_token": "<|endoftext|>",
        "tune_type_llm": "frozen",
        "tune_type_connector": "full",
        "tune_type_vision_tower": "frozen",
        "use_cache": True,
        "text_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": hidden,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            "max_position_embeddings": 2048,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
            # Tied, frozen embeddings at the usual 0.02 cap the logit range near +-3 for a 128-wide
            # model: LoRA could never make a confident choice. A wider init keeps the demo learnable.
            "initializer_range": 0.1,
            "bos_token_id": eos_id,
            "eos_token_id": eos_id,
            "_attn_implementation_autoset": True,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
    }


def write_tiny_checkpoint(
    out_dir: str | Path, *, seed: int = 0, frames: int = 8, image_size: int = 32, max_shard_bytes: int | None = None,
    connector: str = "groupresampler",
) -> Path:
    """A randomly initialised tiny checkpoint in the exact original layout, tokenizer included."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(out)
    tok = load_tokenizer(out)
    raw = tiny_config(len(tok), tok.eos_token_id, image_size=image_size, frames=frames, connector=connector)
    torch.manual_seed(seed)
    model = TinyLlavaVideo(TinyLlavaConfig.from_dict(raw), truncate_vision=False)
    state = model.state_dict()
    limit = max_shard_bytes if max_shard_bytes is not None else 2 * 1024**3
    return write_checkpoint(out, state, raw, tokenizer_dir=None, dtype=torch.float32, max_shard_bytes=limit)
