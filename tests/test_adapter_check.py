"""One adapter check for `eval`, `generate` and `merge` (issue 16, items 7 and 9): an adapter of
another model, a truncated adapter file and a pickle-only adapter are refused by name, through the
real CLI, before anything is applied."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tinyr1.checkpoint import save_adapter
from tinyr1.cli import main
from tinyr1.model.loading import add_lora, load_tinyllava, prepare_for_training
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo
from tinyr1.model.writing import tiny_config, write_checkpoint, write_tiny_checkpoint
from tinyr1.synth import write_synthetic
from tinyr1.tokenizer import load_tokenizer


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter (+ connector) of `model_dir` with non-zero B, as training leaves it."""
    torch.manual_seed(0)
    model = load_tinyllava(model_dir, dtype="fp32", device="cpu").model
    add_lora(model, r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    prepare_for_training(model, train_connector=True, gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    save_adapter(model, out, train_connector=True)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = write_tiny_checkpoint(root / "base", seed=0, frames=4, image_size=32)
    tok = load_tokenizer(base)
    raw = tiny_config(len(tok), tok.eos_token_id, frames=4)
    raw["text_config"]["num_hidden_layers"] = 8  # same widths, twice the layers
    torch.manual_seed(1)
    state = TinyLlavaVideo(TinyLlavaConfig.from_dict(raw), truncate_vision=False).state_dict()
    deep = write_checkpoint(root / "deep", state, raw, tokenizer_dir=base, dtype=torch.float32)
    data = write_synthetic(root / "data", 2, 0, frames=4, size=32, eval_n=2, coldstart_n=0)
    return {"base": base, "deep": deep, "data": data["eval"], "own": make_adapter(base, root / "own"),
            "deep_adapter": make_adapter(deep, root / "deep_adapter")}


def eval_argv(assets: dict[str, Path], adapter: Path, out: Path) -> list[str]:
    return ["eval", "--model", str(assets["base"]), "--adapter", str(adapter), "--data", str(assets["data"]),
            "--frames", "4", "--max-new-tokens", "2", "--out", str(out)]


def test_eval_refuses_an_adapter_of_a_deeper_model_like_merge_does(assets: dict[str, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An 8-layer adapter on the 4-layer model: PEFT would apply layers 0-3 and drop 4-7 silently."""
    assert main(eval_argv(assets, assets["own"], tmp_path / "ok.jsonl")) == 0  # its own model: fine
    capsys.readouterr()
    code = main(eval_argv(assets, assets["deep_adapter"], tmp_path / "p.jsonl"))
    err = capsys.readouterr().err
    assert code == 2 and "does not match this model" in err and "has no model.layers.4.self_attn.q_proj" in err
    assert not (tmp_path / "p.jsonl").exists()
    code = main(["merge", "--base", str(assets["base"]), "--adapter", str(assets["deep_adapter"]),
                 "--out", str(tmp_path / "m")])
    assert code == 2 and "has no model.layers.4.self_attn.q_proj" in capsys.readouterr().err


def test_generate_refuses_it_too(assets: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    clip = next((assets["data"].parent / "videos").glob("eval_*.mp4"))
    code = main(["generate", "--model", str(assets["base"]), "--adapter", str(assets["deep_adapter"]),
                 "--video", str(clip), "--question", "What colour?", "--max-new-tokens", "2"])
    assert code == 2 and "has no model.layers.4.self_attn.q_proj" in capsys.readouterr().err


def test_a_truncated_adapter_file_is_named(assets: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = shutil.copytree(assets["own"], tmp_path / "cut")
    f = bad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert main(eval_argv(assets, bad, tmp_path / "p.jsonl")) == 2
    err = capsys.readouterr().err
    assert f"{f} is unreadable" in err and "truncated or corrupt" in err, err
    code = main(["merge", "--base", str(assets["base"]), "--adapter", str(bad), "--out", str(tmp_path / "m")])
    assert code == 2 and "is unreadable" in capsys.readouterr().err


def test_a_pickle_only_adapter_is_refused_by_name(assets: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(assets["own"] / "adapter_config.json", pickled)
    torch.save(load_file(str(assets["own"] / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    assert main(eval_argv(assets, pickled, tmp_path / "p.jsonl")) == 2
    err = capsys.readouterr().err
    assert "adapter_model.bin (a pickle, which can run code when loaded)" in err and "safetensors" in err
