"""Every transformers-version difference tinyr1 meets, in one place.

tinyr1 supports transformers 5.17 (the GPU image) through 5.2x (the CPU machines). The rest of the
package speaks one dialect and calls these helpers where the versions disagree; when support for
an old version is dropped, its branch here is the only code to delete.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn
from transformers import Qwen2ForCausalLM, SiglipVisionModel

# 5.2x renamed the decoder's `past_key_values` keyword (and output field) to `cache`.
CACHE_KW = "cache" if "cache" in inspect.signature(Qwen2ForCausalLM.forward).parameters else "past_key_values"


def cache_of(out: Any) -> Any:
    """The KV cache of a model output, under whichever field name this version uses."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_layer_kv(cache: Any, layers: int) -> list[tuple[Any, Any]]:
    """(keys, values) [B, kv, S, hd] of each layer of a DynamicCache: `cache.layers[i].keys` since
    the cache-layer refactor, `key_cache[i]` before it."""
    if hasattr(cache, "layers"):
        return [(cache.layers[i].keys, cache.layers[i].values) for i in range(layers)]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(layers)]


def update_cache(cache: Any, key: Any, value: Any, layer_idx: int, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """Append one attention layer's K/V to `cache` as that version's Qwen2 attention does: 5.2x hands
    the attention keyword arguments along (static caches read them), 5.17 does not."""
    if CACHE_KW == "cache":
        return cache.update(key, value, layer_idx, kwargs=kwargs)
    return cache.update(key, value, layer_idx)


def siglip_core(config: Any) -> nn.Module:
    """The SigLIP transformer itself: older versions nest it as `SiglipVisionModel.vision_model`,
    newer ones flatten it into the model. The original checkpoint keys expect the nested module."""
    hf = SiglipVisionModel(config)
    return getattr(hf, "vision_model", hf)


def enable_gradient_checkpointing(llm: nn.Module) -> None:
    """Non-reentrant gradient checkpointing: 5.2x renamed the method and its keyword argument."""
    if hasattr(llm, "activation_checkpointing_enable"):
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def layer_checkpointing_off(layer: nn.Module) -> Iterator[None]:
    """HF's checkpointed decoder layers drop a cache passed to them in training mode (5.17: even
    without grad). While tinyr1 calls a layer with its own prefix cache (and checkpoints the call
    itself), the layer's flag is off; entered inside the checkpointed function, so the backward
    replay runs the same way."""
    on = bool(getattr(layer, "gradient_checkpointing", False))
    if on:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        if on:
            layer.gradient_checkpointing = True


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT asks transformers' deprecated `is_gradient_checkpointing` (a FutureWarning on >= 5.2x)
    when it wraps or loads an adapter: noise for users, who cannot act on it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
