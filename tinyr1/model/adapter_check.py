"""One check of a LoRA adapter folder against the model it is applied to, for `eval`, `generate`
and `merge` alike.

PEFT applies an adapter whose modules the model lacks without a word (an 8-layer adapter on a
4-layer model loads, with layers 4-7 silently dropped), so before anything is applied every LoRA
tensor is matched against the model's linear layers: the module must exist and its in/out widths
must agree. The folder itself is checked too: the safetensors weights must be there (pickle
`adapter_model.bin` files are never loaded) and readable (a truncated file is named).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from tinyr1.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
CONNECTOR_FILE = "connector.safetensors"
LORA_SUFFIXES = {
    ".lora_A.weight": "in", ".lora_B.weight": "out",
    ".lora_embedding_A": "emb_in", ".lora_embedding_B": "emb_out",
}
PEFT_PREFIX = "base_model.model."
Shapes = dict[str, tuple[int, ...]]  # LLM weight key ("model.layers.0.self_attn.q_proj.weight") -> shape


@dataclass(frozen=True)
class AdapterInfo:
    """What `check_adapter` learned about an adapter folder."""

    path: Path
    config: dict[str, Any]  # adapter_config.json
    modules: list[str]  # LLM module paths the adapter changes ("model.layers.0.self_attn.q_proj")
    has_connector: bool


def lora_module(key: str) -> tuple[str, str] | None:
    """PEFT key -> (LLM module path, kind) for LoRA A/B tensors; None for other tensors."""
    body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for suffix, kind in LORA_SUFFIXES.items():
        if body.endswith(suffix):
            return body[: -len(suffix)], kind
    return None


def module_shapes(llm: nn.Module) -> Shapes:
    """The weight shapes of an LLM's linear and embedding layers as stored ([out, in]; [num, dim]),
    from the modules themselves: right for NF4 layers too, whose packed weight has another shape."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    shapes: Shapes = {}
    for name, mod in base.named_modules():
        name = name.replace(".base_layer", "")
        if isinstance(mod, nn.Embedding):
            shapes[f"{name}.weight"] = (mod.num_embeddings, mod.embedding_dim)
        elif hasattr(mod, "in_features") and hasattr(mod, "out_features"):
            shapes.setdefault(f"{name}.weight", (int(mod.out_features), int(mod.in_features)))
    return shapes


def _read_config(adir: Path) -> dict[str, Any]:
    cfg_file, weights = adir / ADAPTER_CONFIG, adir / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [n for n in PICKLE_WEIGHTS if (adir / n).is_file()]
        if pickled and cfg_file.is_file():
            raise CheckpointError(
                f"{adir} holds its weights as {pickled[0]} (a pickle, which can run code when loaded): tinyr1 reads "
                f"adapters only from {ADAPTER_WEIGHTS}. Convert it where you trust the file: "
                "`PeftModel.from_pretrained(...).save_pretrained(DIR, safe_serialization=True)`"
            )
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{adir} is not a LoRA adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}); "
            "pass RUN/final or RUN/checkpoints/step-N/adapter written by `tinyr1 train`"
        )
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{cfg_file}: unreadable ({err}); the adapter folder is damaged") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file}: not a JSON object; the adapter folder is damaged")
    return config


def _tensor_shapes(path: Path) -> Shapes:
    """Key -> shape from a safetensors header; a truncated or corrupt file is a CheckpointError."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    except Exception as err:  # noqa: BLE001 - SafetensorError and OSError alike mean "unreadable"
        raise CheckpointError(
            f"{path} is unreadable ({' '.join(str(err).split())[:160]}): truncated or corrupt; copy it again "
            "from where it was trained"
        ) from None


def check_adapter(adapter_dir: str | Path, llm_shapes: Shapes, model_name: str,
                  connector_shapes: Shapes | None = None) -> AdapterInfo:
    """Refuse an adapter that does not fit the model called `model_name`: unreadable files, target
    modules or LoRA modules the model lacks, widths that differ, connector tensors that differ."""
    adir = Path(adapter_dir)
    config = _read_config(adir)
    targets = config.get("target_modules") or []
    if isinstance(targets, list):
        absent = [t for t in targets
                  if not any(k == f"{t}.weight" or k.endswith(f".{t}.weight") for k in llm_shapes)]
        if absent:
            raise CheckpointError(
                f"adapter {adir} targets module(s) {absent} that {model_name} does not have: it was trained "
                "on a different architecture; use it with the model it was trained on"
            )
    problems: list[str] = []
    modules: set[str] = set()
    for key, shape in _tensor_shapes(adir / ADAPTER_WEIGHTS).items():
        found = lora_module(key)
        if found is None:
            continue
        module, kind = found
        modules.add(module)
        base = llm_shapes.get(module + ".weight")
        if base is None:
            problems.append(f"{key}: {model_name} has no {module}")
            continue
        want = {"in": base[-1], "out": base[0], "emb_in": base[0], "emb_out": base[-1]}[kind]
        got = shape[1] if kind in ("in", "emb_in") else shape[0]
        if got != want:
            problems.append(f"{key} has shape {list(shape)} but {module}.weight is {list(base)}")
    conn = adir / CONNECTOR_FILE
    if conn.is_file():
        stored = _tensor_shapes(conn)
        if connector_shapes is not None:
            problems += [f"{CONNECTOR_FILE}: {k} has shape {list(v)}, the model's {list(connector_shapes[k])}"
                         for k, v in stored.items() if k in connector_shapes and connector_shapes[k] != v]
            problems += [f"{CONNECTOR_FILE}: {k}: the model's connector has no such tensor"
                         for k in stored if k not in connector_shapes]
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(
            f"adapter {adir} does not match {model_name}:\n  {shown}\n"
            "use it with the checkpoint it was trained on (see base_model_name_or_path in adapter_config.json)"
        )
    if not modules:
        raise CheckpointError(f"{adir}/{ADAPTER_WEIGHTS} holds no LoRA tensors; nothing to apply")
    return AdapterInfo(adir, config, sorted(modules), conn.is_file())
