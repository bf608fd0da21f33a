"""Read and write the original TinyLLaVA-Video checkpoint layout; NF4 quantization; LoRA.

Plain transformers cannot load this layout (`model_type: tinyllava`, no `auto_map`), and
`trust_remote_code` is never an option, so we parse config.json and the safetensors ourselves and
assemble `TinyLlavaVideo` from stock HF parts. Everything comes from the folder: hub ids written
inside config.json are never resolved.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import init_empty_weights
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from tinyr1.errors import CheckpointError, ConfigError, DeviceError
from tinyr1.hf_compat import enable_gradient_checkpointing
from tinyr1.model.adapter_check import check_adapter, module_shapes
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo
from tinyr1.offload import enable_offload
from tinyr1.tokenizer import load_tokenizer as read_tokenizer

# peft and bitsandbytes are imported where used: bitsandbytes logs a notice on import that the
# filter below must be registered for first (peft imports bitsandbytes).

VISION_PREFIX = "vision_tower._vision_tower.vision_model."
LLM_PREFIX = "language_model."
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class _DropMissingKernelsNotice(logging.Filter):
    """bitsandbytes logs a WARNING on import (on CPUs with AVX512-BF16) when the optional `kernels`
    package is absent, then uses its built-in CPU path, which is what we test and run: noise for users.
    Registered before bitsandbytes (or peft, which imports it) is first imported by tinyr1."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMissingKernelsNotice())


@dataclass
class LoadedModel:
    """A model ready for training or inference, with what was needed to build it."""

    model: TinyLlavaVideo
    tokenizer: Any
    cfg: TinyLlavaConfig
    path: Path
    quant: str
    dtype: torch.dtype


# ---- locating files --------------------------------------------------------------------------
def resolve_model_dir(path: str | Path) -> Path:
    """A local folder, or a hub id fetched once into the usual HF cache."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    looks_like_hub_id = isinstance(path, str) and path.count("/") == 1 and not path.startswith((".", "/"))
    if not looks_like_hub_id:
        raise CheckpointError(f"model folder {p} does not exist; pass a local folder or a hub id (owner/name)")
    try:
        return Path(snapshot_download(repo_id=str(path)))
    except Exception as err:  # offline, unknown repo, auth ...
        raise CheckpointError(
            f"could not fetch model {path!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            f"Download it once with `huggingface-cli download {path} --local-dir DIR` and set "
            f"model.path=DIR, or create a tiny test model with `tinyr1 init-tiny DIR`."
        ) from None


def read_config(model_dir: Path) -> TinyLlavaConfig:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{model_dir} has no config.json: it is not a TinyLLaVA-Video checkpoint folder "
            "(expected config.json, model.safetensors or model.safetensors.index.json, tokenizer files)"
        )
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    missing = [k for k in ("text_config", "vision_config") if not isinstance(raw.get(k), dict)]
    if missing:
        raise CheckpointError(f"{cfg_path}: missing {', '.join(missing)} (a TinyLLaVA-Video config has both)")
    return TinyLlavaConfig.from_dict(raw)


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [s for s in shards if not (model_dir / s).is_file()]
        if absent:
            raise CheckpointError(f"{model_dir}: shards listed in {index.name} are missing: {', '.join(absent)}")
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{model_dir} has no weights: expected model.safetensors or model.safetensors.index.json with its "
        "shards (pickle .bin files are not read for safety; convert them to safetensors)"
    )


def read_weights(model_dir: Path, keep: Callable[[str], bool] = lambda _: True) -> dict[str, torch.Tensor]:

    out: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                if keep(key):
                    out[key] = fh.get_tensor(key)
    return out


# ---- building ----------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            "this preset needs a CUDA GPU but none is visible (torch.cuda.is_available() is False). "
            "On a CPU machine run the demo instead: `tinyr1 train --preset tiny`."
        )
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype: `auto` = bf16 on a CUDA GPU that supports it, fp16 (with loss scaling in
    training) on one that does not (T4, RTX 20xx), fp32 on the CPU. bf16 asked for on a GPU without
    it is refused with the card's name."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if dtype == "auto":
            return torch.bfloat16 if bf16 else torch.float16
        if dtype == "bf16" and not bf16:
            raise DeviceError(f"{torch.cuda.get_device_name(device)} has no bf16 support: set model.dtype = "
                              "\"fp16\" (or \"auto\", which picks fp16 with loss scaling there)")
    if dtype == "auto":
        return torch.float32
    return DTYPES[dtype]


def _skipped_vision_key(key: str, cfg: TinyLlavaConfig, depth: int) -> bool:
    """Tensors that cannot affect `hidden_states[feature_layer]`: later layers, post-LN, head."""
    if not key.startswith(VISION_PREFIX):
        return False
    rest = key[len(VISION_PREFIX) :]
    if rest.startswith(("post_layernorm.", "head.")):
        return True
    if rest.startswith("encoder.layers."):
        return int(rest.split(".")[2]) >= depth
    return False


def build_model(
    cfg: TinyLlavaConfig,
    state: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    truncate_vision: bool = True,
    source: str = "checkpoint",
) -> TinyLlavaVideo:
    """Assemble the model without random init (parameters on meta, then assigned from `state`)."""

    with init_empty_weights(include_buffers=False):
        model = TinyLlavaVideo(cfg, attn_implementation=attn_implementation, truncate_vision=truncate_vision)
    own = model.state_dict()  # meta tensors: names and shapes the config implies
    expected = own.keys()
    tied = bool(cfg.qwen2().tie_word_embeddings)
    lm_head = LLM_PREFIX + "lm_head.weight"
    missing = [k for k in expected if k not in state and not (tied and k == lm_head)]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise CheckpointError(f"{source}: weights missing for {shown}; the checkpoint does not match its config.json")
    wrong = [f"{k} {tuple(state[k].shape)} (config: {tuple(own[k].shape)})"
             for k in own if k in state and state[k].shape != own[k].shape]
    if wrong:
        shown = ", ".join(wrong[:4]) + (f" and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        raise CheckpointError(f"{source}: tensor shapes do not match config.json: {shown}")
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items() if k in expected}
    model.load_state_dict(cast, strict=False, assign=True)
    if tied:
        model.llm.lm_head.weight = model.llm.get_input_embeddings().weight
    return model


def load_tinyllava(
    path: str | Path,
    *,
    quant: Literal["nf4", "none"] = "none",
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "sdpa",
    truncate_vision: bool = True,
    load_tokenizer: bool = True,
) -> LoadedModel:
    """Load a checkpoint folder (original layout) for training or inference; frozen by default."""
    model_dir = resolve_model_dir(path)
    cfg = read_config(model_dir)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    depth = cfg.feature_depth(cfg.siglip(truncate=False).num_hidden_layers)
    skip = (lambda k: _skipped_vision_key(k, cfg, depth)) if truncate_vision else (lambda k: False)
    state = read_weights(model_dir, keep=lambda k: not skip(k))
    model = build_model(
        cfg, state, dtype=torch_dtype, attn_implementation=attn_implementation,
        truncate_vision=truncate_vision, source=str(model_dir),
    )
    del state
    model.requires_grad_(False)
    if quant == "nf4":
        quantize_llm_nf4(model.llm, compute_dtype=torch_dtype, device=dev)
    model.to(dev)
    model.eval()
    tokenizer = None
    if load_tokenizer:
        tokenizer = read_tokenizer(model_dir)
    return LoadedModel(model, tokenizer, cfg, model_dir, quant, torch_dtype)


# ---- 4-bit, LoRA, adapters -----------------------------------------------------------------------
def quantize_llm_nf4(llm: nn.Module, *, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace the decoder layers' nn.Linear with bitsandbytes NF4 `Linear4bit` (double quantization).

    Embeddings and lm_head stay unquantized. Layers are quantized one at a time on `device`, so the
    full-precision LLM never has to fit there. Returns the number of replaced layers.
    """
    import bitsandbytes as bnb

    count = 0
    for layer in llm.model.layers:
        for name, lin in list(layer.named_modules()):
            if not isinstance(lin, nn.Linear):
                continue
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=lin.bias is not None,
                compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.data.to(compute_dtype).cpu(), requires_grad=False,
                quant_type="nf4", compress_statistics=True,
            )
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
            # On CPUs with AVX512-BF16, bitsandbytes repacks weights for inference the first time the
            # layer runs in eval mode and keeps that layout; the packed path has no autograd, so a
            # later training forward breaks. Generation and updates alternate here: keep one layout.
            q.support_avx512bf16_for_cpu = False
            q = q.to(device)  # quantization happens on this transfer
            parent_name, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, child, q)
            count += 1
    llm.is_loaded_in_4bit = True  # the flag transformers sets; PEFT then picks its 4-bit LoRA layers
    return count


def add_lora(
    model: TinyLlavaVideo, *, r: int, alpha: float, dropout: float, target_modules: list[str] | tuple[str, ...]
) -> None:
    """Wrap the LLM with PEFT LoRA in place; the adapter saves/loads with plain `peft`."""
    from peft import LoraConfig, get_peft_model

    names = [n for n, mod in model.language_model.named_modules() if isinstance(mod, nn.Linear)]  # NF4 too
    linear = sorted({n.rsplit(".", 1)[-1] for n in names})
    absent = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if absent:
        near = {t: difflib.get_close_matches(t, linear, n=1, cutoff=0.5) for t in absent}
        hints = "".join(f" ('{t}': did you mean '{m[0]}'?)" for t, m in near.items() if m)
        raise ConfigError(
            f"lora.target_modules = {list(target_modules)}: the LLM has no linear layer named {', '.join(absent)}"
            f"{hints}; its linear layers are {', '.join(linear)}"
        )
    lora = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
        task_type="CAUSAL_LM", bias="none",
    )
    model.language_model = get_peft_model(model.language_model, lora)


def load_adapter(model: TinyLlavaVideo, adapter_dir: str | Path, *, trainable: bool = False) -> None:
    """Attach a saved LoRA adapter (and connector weights, if the adapter folder has them)."""
    from peft import PeftModel

    adir = Path(adapter_dir)
    own = model.connector.resampler.state_dict()
    check_adapter(adir, module_shapes(model.language_model), "this model",
                  {k: tuple(v.shape) for k, v in own.items()})  # PEFT would drop unknown modules silently
    try:
        model.language_model = PeftModel.from_pretrained(model.language_model, str(adir), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"adapter {adir} does not match the base model: {err}") from None
    conn = adir / "connector.safetensors"
    if conn.is_file():
        model.connector.resampler.load_state_dict(load_file(str(conn)), strict=True)


@contextlib.contextmanager
def adapters_disabled(model: TinyLlavaVideo) -> Iterator[None]:
    """The reference policy: the same weights with LoRA switched off (no second copy)."""
    lm = model.language_model
    if hasattr(lm, "disable_adapter"):
        with lm.disable_adapter():
            yield
    else:
        yield


def prepare_for_training(
    model: TinyLlavaVideo, *, train_connector: bool, gradient_checkpointing: bool | Literal["offload"],
) -> None:
    """Freeze everything but LoRA (and the connector when asked); vision tower stays in eval mode.

    Trainable weights are fp32 master weights whatever the compute dtype: an AdamW step at lr 1e-5
    on bf16 weights rounds most updates away. PEFT already keeps LoRA in fp32; a trained connector
    is cast here and computes under autocast (`TinyLlavaVideo.connect`).
    """
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if train_connector:
        model.connector.float().requires_grad_(True)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model.llm)
    if gradient_checkpointing == "offload":  # checkpointed layer inputs wait in host RAM (tinyr1.offload)
        enable_offload(model.llm.model.layers)
    model.train()
    model.vision_tower.eval()


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
