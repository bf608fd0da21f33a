"""`tinyr1 merge`: a trained adapter folded into the unquantized base gives the same logits when the
merged folder is loaded through the normal loader; the folder keeps the original key names; 4-bit
bases, mismatched adapters and an existing OUT_DIR are refused with the reason.

The adapter is trained for a few real AdamW steps (LoRA + connector) on an SFT loss from the
model's logits, so the merge has a non-trivial update to carry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tinyr1.checkpoint import save_adapter
from tinyr1.cli import main
from tinyr1.errors import CheckpointError
from tinyr1.merge import merge_adapter, merged_state
from tinyr1.model.loading import add_lora, load_adapter, load_tinyllava, prepare_for_training, weight_files
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo
from tinyr1.model.writing import tiny_config, write_checkpoint, write_tiny_checkpoint
from tinyr1.prompts import build_prompt
from tinyr1.tokenizer import load_tokenizer, tokenize_prompt, tokenize_sft

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTION = "What colour is the square?\nA. red\nB. green\nC. blue\nD. yellow"


def pixels(seed: int) -> torch.Tensor:
    return torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # [T, 3, S, S]


def train_adapter(base: Path, out: Path, *, steps: int = 3, lr: float = 2e-2) -> None:
    """A few AdamW steps of LoRA (r 8) + connector on an SFT loss, saved like `tinyr1 train` does."""
    torch.manual_seed(0)
    loaded = load_tinyllava(base, dtype="fp32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    add_lora(model, r=8, alpha=16.0, dropout=0.0, target_modules=TARGETS)
    prepare_for_training(model, train_connector=True, gradient_checkpointing=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    answers = ["<think>The square is red.</think> <answer>A</answer>",
               "<think>I see a blue square.</think> <answer>C</answer>"]
    for step in range(steps):
        pairs = [tokenize_sft(tok, build_prompt(QUESTION, mode="train"), a) for a in answers]
        ids = [torch.tensor(i) for i, _ in pairs]
        labels = [torch.tensor(lab) for _, lab in pairs]
        videos = [model.encode_video(pixels(step * 2 + j)) for j in range(len(pairs))]  # 2 x [Q, D]
        loss = model(ids, videos, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adapter(model, out, train_connector=True)


def logits_of(model: TinyLlavaVideo, tok: object) -> torch.Tensor:
    """Logits [2, S, V] of two prompts with different clips (batched, so padding is exercised)."""
    rows = [torch.tensor(tokenize_prompt(tok, f"USER: <image>\n{QUESTION} ASSISTANT:")),
            torch.tensor(tokenize_prompt(tok, "USER: <image>\nWhat is it? ASSISTANT: <think>"))]
    with torch.no_grad():
        videos = [model.encode_video(pixels(100 + i)) for i in range(2)]
        return model(rows, videos).logits.double()


def file_keys(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118
                out[k] = fh.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    base = write_tiny_checkpoint(root / "base", seed=3, max_shard_bytes=300_000)  # sharded, with an index
    run = root / "run"
    train_adapter(base, run / "final")
    (run / "config.toml").write_text('preset = "tiny"\n[train]\nsteps = 3\nlr = 0.02\n[rewards]\nr1 = 1.0\n')
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "reward": 0.75, "rewards/r1/mean": 0.75}) + "\n")
    merged = merge_adapter(base, run / "final", root / "merged", dtype="fp32", max_shard_bytes=300_000)
    return {"root": root, "base": base, "adapter": run / "final", "merged": merged}


def test_merged_logits_match_base_plus_adapter(assets: dict[str, Path]) -> None:
    ref = load_tinyllava(assets["base"], dtype="fp32", device="cpu")
    plain = logits_of(ref.model, ref.tokenizer)
    load_adapter(ref.model, assets["adapter"])
    with_adapter = logits_of(ref.model, ref.tokenizer)
    assert (with_adapter - plain).abs().max() > 1e-2, "the trained adapter should change the logits"
    merged = load_tinyllava(assets["merged"], dtype="fp32", device="cpu")
    got = logits_of(merged.model, merged.tokenizer)
    assert (got - with_adapter).abs().max().item() < 1e-4


def test_merged_folder_has_the_original_layout(assets: dict[str, Path]) -> None:
    base, merged = file_keys(assets["base"]), file_keys(assets["merged"])
    assert set(merged) == set(base)
    assert "language_model.lm_head.weight" not in merged  # tied: not saved, like the original
    index = json.loads((assets["merged"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base) and len(set(index["weight_map"].values())) > 1
    for name in ("config.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (assets["merged"] / name).is_file(), name
    cfg_base = json.loads((assets["base"] / "config.json").read_text())
    cfg_merged = json.loads((assets["merged"] / "config.json").read_text())
    assert cfg_merged == cfg_base
    # vision tensors the loader skips (last layer, post-LN, head) are copied unchanged
    skipped = [k for k in base if k.startswith("vision_tower.") and
               (".post_layernorm." in k or ".head." in k or ".encoder.layers.2." in k)]
    assert skipped and all(torch.equal(merged[k], base[k]) for k in skipped)
    assert all(torch.equal(merged[k], base[k]) for k in base if k.startswith("vision_tower."))
    assert torch.equal(merged["language_model.model.embed_tokens.weight"],
                       base["language_model.model.embed_tokens.weight"])  # not a LoRA target
    conn = load_file(str(assets["adapter"] / "connector.safetensors"))
    assert all(torch.equal(merged["connector._connector." + k], v) for k, v in conn.items())
    assert any(not torch.equal(merged["connector._connector." + k], base["connector._connector." + k]) for k in conn)


def test_merged_weight_is_w_plus_scaled_ba(assets: dict[str, Path]) -> None:
    """W' = W + (alpha / r) B A for every targeted projection, in float64."""
    base, merged = file_keys(assets["base"]), file_keys(assets["merged"])
    lora = load_file(str(assets["adapter"] / "adapter_model.safetensors"))
    acfg = json.loads((assets["adapter"] / "adapter_config.json").read_text())
    scale = acfg["lora_alpha"] / acfg["r"]
    checked = 0
    for key, a in lora.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model."): -len(".lora_A.weight")]
        b = lora[key.replace("lora_A", "lora_B")]
        w = "language_model." + module + ".weight"
        want = base[w].double() + scale * (b.double() @ a.double())
        assert (merged[w].double() - want).abs().max() < 1e-6, w
        assert not torch.equal(merged[w], base[w])
        checked += 1
    assert checked == 4 * len(TARGETS)


def test_model_card(assets: dict[str, Path]) -> None:
    card = (assets["merged"] / "README.md").read_text()
    for text in ("## Merge", "## Training", "## Evaluation", str(assets["adapter"]), "| rewards/r1/mean | 0.75 |",
                 "trained weights from the adapter", "fp32"):
        assert text in card, text


def test_four_bit_base_is_refused(assets: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="4-bit.*erases most of the adapter"):
        merge_adapter(assets["base"], assets["adapter"], tmp_path / "a", dtype="nf4")
    quant_base = tmp_path / "quant_base"
    shutil.copytree(assets["base"], quant_base)
    cfg = json.loads((quant_base / "config.json").read_text())
    cfg["quantization_config"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (quant_base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantized checkpoint.*unquantized base"):
        merge_adapter(quant_base, assets["adapter"], tmp_path / "b", dtype="fp32")
    loaded = load_tinyllava(assets["base"], quant="nf4", dtype="fp32", device="cpu")
    load_adapter(loaded.model, assets["adapter"])
    with pytest.raises(CheckpointError, match="quantized to 4/8 bit"):
        merged_state(loaded.model)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_refusal_message_and_exit_code(assets: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["merge", "--base", str(assets["base"]), "--adapter", str(assets["adapter"]),
                 "--out", str(tmp_path / "x"), "--dtype", "nf4"])
    assert code == 2
    assert "rounds the merged weights back onto the 4-bit grid" in capsys.readouterr().err.replace("\n", " ")


def test_mismatched_adapter_is_refused(assets: dict[str, Path], tmp_path: Path) -> None:
    tok = load_tokenizer(assets["base"])
    raw = tiny_config(len(tok), tok.eos_token_id)
    raw["text_config"]["intermediate_size"] = 192  # the adapter's gate/up/down were trained for 256
    torch.manual_seed(0)
    state = TinyLlavaVideo(TinyLlavaConfig.from_dict(raw), truncate_vision=False).state_dict()
    other = write_checkpoint(tmp_path / "other", state, raw, tokenizer_dir=assets["base"], dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"(?s)does not match the base.*mlp\.gate_proj\.lora_B.*\[256, 8\].*\[192, 128\]"):
        merge_adapter(other, assets["adapter"], tmp_path / "m1", dtype="fp32")
    odd = tmp_path / "odd_adapter"
    shutil.copytree(assets["adapter"], odd)
    acfg = json.loads((odd / "adapter_config.json").read_text())
    acfg["target_modules"] = [*TARGETS, "c_attn"]
    (odd / "adapter_config.json").write_text(json.dumps(acfg))
    with pytest.raises(CheckpointError, match=r"targets module\(s\) \['c_attn'\]"):
        merge_adapter(assets["base"], odd, tmp_path / "m2", dtype="fp32")
    with pytest.raises(CheckpointError, match="not a LoRA adapter folder"):
        merge_adapter(assets["base"], tmp_path, tmp_path / "m3", dtype="fp32")


def test_existing_out_dir_needs_force(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "release"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already exists.*--force"):
        merge_adapter(assets["base"], assets["adapter"], out, dtype="fp32")
    assert (out / "keep.txt").is_file()
    with pytest.raises(CheckpointError, match="would overwrite the base"):
        merge_adapter(assets["base"], assets["adapter"], assets["base"], dtype="fp32", force=True)
    code = main(["merge", "--base", str(assets["base"]), "--adapter", str(assets["adapter"]), "--out", str(out),
                 "--dtype", "bf16", "--force"])
    assert code == 0 and not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    merged = file_keys(out)
    assert set(merged) == set(file_keys(assets["base"]))
    assert all(v.dtype == torch.bfloat16 for v in merged.values() if v.is_floating_point())
