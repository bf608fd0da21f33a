"""LoRA (+ trained connector) -> full weights in the original TinyLLaVA-Video layout, for release.

The base is always loaded **unquantized**: adding a LoRA delta to NF4 weights and re-quantizing
rounds most of the small update away (TRL #3466, #4973; PEFT #2586), so a 4-bit base is refused.
The merged folder has exactly the base's key names (tensors the loader skips, such as the unused
last SigLIP layer, are copied unchanged from the base files), config.json, generation_config.json,
the tokenizer files and a README.md model card. It is written into a temporary folder and renamed
into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tinyr1.errors import CheckpointError
from tinyr1.hf_compat import quiet_peft
from tinyr1.model.adapter_check import AdapterInfo
from tinyr1.model.adapter_check import check_adapter as check_lora_adapter
from tinyr1.model.loading import (
    DTYPES,
    LLM_PREFIX,
    load_adapter,
    load_tinyllava,
    read_config,
    read_weights,
    resolve_model_dir,
    weight_files,
)
from tinyr1.model.tinyllava import TinyLlavaVideo
from tinyr1.model.writing import write_checkpoint
from tinyr1.storage import check_writable, disk_error

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

QUANTIZED_NAMES = ("nf4", "fp4", "int4", "int8", "4bit", "8bit", "q4", "q8")
_QUANT_KEY_MARKERS = (".absmax", ".quant_map", ".quant_state", ".nested_absmax", ".SCB", ".weight_format")
WHY_NOT_4BIT = (
    "merging a LoRA adapter into 4-bit (NF4) weights rounds the merged weights back onto the 4-bit grid, "
    "which erases most of the adapter's small update (a known failure of other tools: TRL #3466, #4973, "
    "PEFT #2586). tinyr1 merges into the unquantized base instead: pass the original bf16/fp32 checkpoint "
    "with --dtype bf16, fp16 or fp32 (quantize the merged model afterwards if you need 4-bit inference)"
)
# ---- refusals ----------------------------------------------------------------------------------
def refuse_quantized_dtype(dtype: str) -> None:
    """A 4/8-bit merge target is refused with the reason; bf16/fp16/fp32/auto pass."""
    if dtype.lower() in QUANTIZED_NAMES or "bit" in dtype.lower():
        raise CheckpointError(f"--dtype {dtype} is refused: {WHY_NOT_4BIT}")
    if dtype != "auto" and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)} (or auto)")


def base_tensor_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in the base files, read from the headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in weight_files(base_dir):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                shapes[key] = tuple(fh.get_slice(key).get_shape())
    return shapes


def refuse_quantized_base(base_dir: Path, raw: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """A base saved in 4/8-bit (config says so, or bitsandbytes state tensors are present)."""
    quant = raw.get("quantization_config") or raw.get("text_config", {}).get("quantization_config")
    if quant or raw.get("load_in_4bit") or raw.get("load_in_8bit"):
        raise CheckpointError(f"{base_dir}/config.json describes a quantized checkpoint ({quant}): {WHY_NOT_4BIT}")
    found = [k for k in shapes if k.endswith(_QUANT_KEY_MARKERS) or "quant_state" in k]
    if found:
        raise CheckpointError(f"{base_dir} holds bitsandbytes-quantized tensors (e.g. {found[0]}): {WHY_NOT_4BIT}")


def refuse_quantized_model(model: TinyLlavaVideo) -> None:
    """A model whose LLM runs on bitsandbytes 4/8-bit layers cannot be merged faithfully."""
    llm = model.llm
    quantized = getattr(llm, "is_loaded_in_4bit", False) or getattr(llm, "is_loaded_in_8bit", False)
    kinds = {type(m).__name__ for m in llm.modules()}
    if quantized or kinds & {"Linear4bit", "Linear8bitLt"}:
        raise CheckpointError(f"this model's LLM is quantized to 4/8 bit: {WHY_NOT_4BIT}")


# ---- adapter checks ----------------------------------------------------------------------------
CONNECTOR_PREFIX = "connector._connector."


def check_adapter(adapter_dir: str | os.PathLike[str], base_shapes: dict[str, tuple[int, ...]],
                  base_dir: Path) -> AdapterInfo:
    """Refuse an adapter that does not fit the base (the check `eval` and `generate` make too),
    from the base files' headers, before anything is loaded."""
    llm = {k[len(LLM_PREFIX):]: v for k, v in base_shapes.items() if k.startswith(LLM_PREFIX)}
    connector = {k[len(CONNECTOR_PREFIX):]: v for k, v in base_shapes.items() if k.startswith(CONNECTOR_PREFIX)}
    return check_lora_adapter(adapter_dir, llm, f"the base {base_dir}", connector or None)


# ---- merging -----------------------------------------------------------------------------------
def merged_state(model: TinyLlavaVideo) -> dict[str, torch.Tensor]:
    """Fold the LoRA deltas into the base weights (in place) and return the original-key state."""
    refuse_quantized_model(model)
    lm = model.language_model
    if hasattr(lm, "merge_and_unload"):
        model.language_model = lm.merge_and_unload(safe_merge=True)
    return {k: v.detach() for k, v in model.state_dict().items()}


def complete_state(state: dict[str, torch.Tensor], base_dir: Path, base_shapes: dict[str, tuple[int, ...]],
                   *, tied: bool) -> dict[str, torch.Tensor]:
    """Add the base tensors the loader skipped (unused vision layers, post-LN, head), unchanged,
    and check that the result has exactly the base's key names."""
    lm_head = LLM_PREFIX + "lm_head.weight"
    extra = [k for k in state if k not in base_shapes and not (tied and k == lm_head)]
    if extra:
        raise CheckpointError(f"merged model has tensors the base {base_dir} lacks: {', '.join(extra[:5])}")
    skipped = read_weights(base_dir, keep=lambda k: k not in state)
    out = {**state, **skipped}
    bad = [k for k, shape in base_shapes.items() if tuple(out[k].shape) != shape]
    if bad:
        raise CheckpointError(f"merged tensors changed shape: {', '.join(bad[:5])}")
    return out


def resolve_merge_dtype(dtype: str, raw: dict[str, Any]) -> str:
    """`auto` keeps the base's stored dtype (bf16 for the released checkpoints)."""
    if dtype != "auto":
        return dtype
    stored = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    return stored.get(str(raw.get("torch_dtype", "float32")), "fp32")


def merge_adapter(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str = "auto",
    force: bool = False,
    device: str = "cpu",
    eval_files: list[str] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Merge `adapter` into the unquantized `base` and write a release folder at `out`."""
    refuse_quantized_dtype(dtype)
    base_dir = resolve_model_dir(str(base))
    out_dir = Path(out)
    if out_dir.exists() and not force:
        raise CheckpointError(f"{out_dir} already exists; choose another --out or pass --force to replace it")
    for other, what in ((base_dir, "the base"), (Path(adapter), "the adapter")):
        if out_dir.resolve() == other.resolve() or other.resolve().is_relative_to(out_dir.resolve()):
            raise CheckpointError(f"--out {out_dir} would overwrite {what} ({other}); choose another folder")
    check_writable(out_dir.parent, "--out folder")  # before loading and merging
    raw = read_config(base_dir).raw
    shapes = base_tensor_shapes(base_dir)
    refuse_quantized_base(base_dir, raw, shapes)
    info = check_adapter(adapter, shapes, base_dir)
    dtype = resolve_merge_dtype(dtype, raw)
    loaded = load_tinyllava(base_dir, quant="none", dtype=dtype, device=device, load_tokenizer=False)
    with quiet_peft():
        load_adapter(loaded.model, info.path)
    state = merged_state(loaded.model)
    tied = bool(loaded.cfg.qwen2().tie_word_embeddings)
    state = complete_state({k: v.cpu() for k, v in state.items()}, base_dir, shapes, tied=tied)
    del loaded
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write_checkpoint(tmp, state, raw, tokenizer_dir=base_dir, dtype=DTYPES[dtype], max_shard_bytes=max_shard_bytes)
        write_model_card(tmp / "README.md", base_dir=base_dir, adapter=info, dtype=dtype, raw=raw,
                         eval_files=eval_files or [], title=out_dir.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except (OSError, RuntimeError) as err:
        need = sum(v.numel() * DTYPES[dtype].itemsize for v in state.values())
        named = disk_error(err, out_dir.parent, need_bytes=need, what=f"writing the merged model {out_dir}",
                           kept="nothing was written there")
        if named is None:
            raise
        raise named from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---- model card --------------------------------------------------------------------------------
CARD_CONFIG_KEYS = (
    ("model", "quant"), ("model", "train_connector"), ("lora", "r"), ("lora", "alpha"),
    ("lora", "target_modules"), ("data", "train"), ("video", "num_frames"), ("rollout", "num_generations"),
    ("rollout", "prompts_per_step"), ("rollout", "max_new_tokens"), ("rollout", "temperature"),
    ("grpo", "loss_type"), ("grpo", "beta"), ("rewards", None), ("coldstart", "enabled"),
    ("coldstart", "steps"), ("train", "steps"), ("train", "lr"), ("train", "lr_scheduler"),
    ("train", "optimizer"), ("train", "seed"),
)
CARD_METRICS = ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "completions/clipped_ratio")


def find_run_dir(adapter_dir: Path) -> Path | None:
    """The `tinyr1 train` run folder an adapter came from (RUN/final, RUN/checkpoints/step-N/adapter)."""
    for parent in list(adapter_dir.resolve().parents)[:3]:
        if (parent / "config.toml").is_file():
            return parent
    return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line of a killed run
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "none" if value is None else str(value)


def _training_section(run_dir: Path | None) -> list[str]:
    if run_dir is None:
        return ["No `tinyr1 train` run folder was found next to the adapter: training details unknown.", ""]
    cfg = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    lines = [f"Run folder: `{run_dir}` (preset `{cfg.get('preset', '?')}`).", "", "| setting | value |", "|---|---|"]
    for section, key in CARD_CONFIG_KEYS:
        table = cfg.get(section, {})
        if key is None and table:
            lines.append(f"| {section} | {_fmt(table.get('weights', table))} |")
        elif key is not None and key in table:
            lines.append(f"| {section}.{key} | {_fmt(table[key])} |")
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    lines.append("")
    if metrics:
        last = metrics[-1]
        keys = [k for k in CARD_METRICS if k in last] + sorted(k for k in last if k.startswith("rewards/"))
        lines += [f"Final values of the training curves (step {last.get('step')}, {len(metrics)} steps logged):",
                  "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(last[k])} |" for k in keys]
    else:
        lines.append("No metrics.jsonl in the run folder.")
    return [*lines, ""]


def _eval_section(run_dir: Path | None, eval_files: list[str]) -> list[str]:
    lines: list[str] = []
    evals = _read_jsonl(run_dir / "eval.jsonl") if run_dir is not None else []
    if evals:
        lines += ["Held-out evaluation logged during training:", "", "| step | metric | value |", "|---|---|---|"]
        last = evals[-1]
        lines += [f"| {last.get('step')} | {k} | {_fmt(v)} |" for k, v in last.items() if k != "step"]
        lines.append("")
    for f in eval_files:
        try:
            summary = json.loads(Path(f).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"--eval {f}: cannot read the `tinyr1 eval` summary ({err})") from None
        lines += [f"`tinyr1 eval` on `{summary.get('data', f)}`:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(summary[k])} |"
                  for k in ("n", "accuracy", "stderr", "format_rate", "mean_think_chars", "skipped") if k in summary]
        lines.append("")
    return lines or ["No evaluation results were found (run `tinyr1 eval` and pass its summary with --eval).", ""]


def write_model_card(path: Path, *, base_dir: Path, adapter: AdapterInfo, dtype: str, raw: dict[str, Any],
                     eval_files: list[str], title: str) -> Path:
    """README.md of a merged release: what went in, how it was trained, how it scores, how to run it."""
    run_dir = find_run_dir(adapter.path)
    llm_name = raw.get("llm_model_name_or_path", "?")
    acfg = adapter.config
    lines = [
        "---", "library_name: tinyr1", "pipeline_tag: video-text-to-text",
        "tags: [tinyllava-video, grpo, lora, tinyr1]", "---", "",
        f"# {title}",
        "",
        "A TinyLLaVA-Video checkpoint with a tinyr1 LoRA adapter merged into its unquantized weights. "
        "It keeps the original on-disk layout (same config.json keys and tensor names as the base).",
        "", "## Merge", "", "| part | value |", "|---|---|",
        f"| base checkpoint | `{base_dir}` (LLM `{llm_name}`, connector `{raw.get('connector_type', '?')}`) |",
        f"| adapter | `{adapter.path}` (r = {acfg.get('r')}, alpha = {acfg.get('lora_alpha')}, "
        f"targets {_fmt(acfg.get('target_modules'))}, {len(adapter.modules)} modules) |",
        f"| connector | {'trained weights from the adapter' if adapter.has_connector else 'unchanged from the base'} |",
        f"| dtype | {dtype} (merged without quantization) |",
        "", "## Training", "", *_training_section(run_dir),
        "## Evaluation", "", *_eval_section(run_dir, eval_files),
        "## Use", "", "```",
        "tinyr1 generate --model THIS_FOLDER --video clip.mp4 --question \"What happens?\" --options \"...\" \"...\"",
        "tinyr1 eval --model THIS_FOLDER --data benchmark.jsonl --out preds.jsonl", "```", "",
        "Prompt: the `qwen2_base` template with the R1 suffix; the model answers "
        "`<think>...</think> <answer>X</answer>`.", "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
