"""The original on-disk layout: key names, tied lm_head, shards, truncated-vision loading, the errors a
broken folder gives, and `tinyr1 init-tiny`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tinyr1.cli import main
from tinyr1.errors import CheckpointError, DeviceError
from tinyr1.model import loading as L
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo
from tinyr1.model.writing import tiny_config, write_checkpoint

VOCAB, EOS = 96, 2
VISION = "vision_tower._vision_tower.vision_model."
CONN = "connector._connector."


def random_model(seed: int = 0, *, untied: bool = False) -> tuple[TinyLlavaVideo, dict]:
    raw = tiny_config(VOCAB, EOS)
    raw["text_config"]["tie_word_embeddings"] = not untied
    torch.manual_seed(seed)
    return TinyLlavaVideo(TinyLlavaConfig.from_dict(raw), truncate_vision=False), raw


def stored(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in L.weight_files(folder):
        out.update(load_file(str(f)))
    return out


def pixels(frames: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(frames, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def load(folder: Path, **kw: object) -> TinyLlavaVideo:
    return L.load_tinyllava(folder, load_tokenizer=False, device="cpu", dtype="fp32", **kw).model  # type: ignore[arg-type]


# ---- (b) layout ---------------------------------------------------------------------------------
def test_saved_keys_are_the_original_names(tmp_path: Path) -> None:
    model, raw = random_model()
    write_checkpoint(tmp_path, model.state_dict(), raw, tokenizer_dir=None, dtype=torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    keys = set(stored(tmp_path))
    assert {k.split(".")[0] for k in keys} == {"language_model", "vision_tower", "connector"}
    assert all(k.startswith((VISION, CONN, "language_model.model.")) for k in keys)
    for k in (
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.model.layers.3.mlp.down_proj.weight",
        "language_model.model.norm.weight",
        VISION + "embeddings.patch_embedding.weight",
        VISION + "encoder.layers.0.self_attn.q_proj.weight",
        VISION + "encoder.layers.2.mlp.fc2.bias",  # the last layer, unused by the features, still saved
        VISION + "post_layernorm.weight",
        VISION + "head.probe",
    ):
        assert k in keys, k
    assert "language_model.lm_head.weight" not in keys  # tied: not saved, as in the released checkpoints
    per_layer = [f"{a}.{b}" for a in ("norm_media", "norm_latents") for b in ("weight", "bias")]
    per_layer += ["to_q.weight", "to_kv.weight", "to_out.weight"]
    want_conn = {CONN + k for k in ("latents", "linear.weight", "linear.bias", "norm.weight", "norm.bias")}
    for n in range(raw["num_resampler_layers"]):
        want_conn |= {f"{CONN}layers.{n}.0.{k}" for k in per_layer}
        want_conn |= {f"{CONN}layers.{n}.1.{k}" for k in ("0.weight", "0.bias", "1.weight", "3.weight")}
    assert {k for k in keys if k.startswith("connector.")} == want_conn
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "tinyllava" and cfg["torch_dtype"] == "float32" and "auto_map" not in cfg
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"bos_token_id": EOS, "eos_token_id": EOS}


def test_save_load_save_round_trip_is_exact(tmp_path: Path) -> None:
    model, raw = random_model(seed=3)
    first, second = tmp_path / "a", tmp_path / "b"
    write_checkpoint(first, model.state_dict(), raw, tokenizer_dir=None, dtype=torch.float32)
    loaded = load(first, truncate_vision=False)
    assert loaded.llm.lm_head.weight is loaded.llm.model.embed_tokens.weight
    original = model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, original[k]), k
    write_checkpoint(second, loaded.state_dict(), loaded.cfg.raw, tokenizer_dir=None, dtype=torch.float32)
    a, b = stored(first), stored(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())


def test_untied_lm_head_is_saved_and_loaded(tmp_path: Path) -> None:
    model, raw = random_model(untied=True)
    write_checkpoint(tmp_path, model.state_dict(), raw, tokenizer_dir=None, dtype=torch.float32)
    head = stored(tmp_path)["language_model.lm_head.weight"]
    loaded = load(tmp_path)
    assert loaded.llm.lm_head.weight is not loaded.llm.model.embed_tokens.weight
    assert torch.equal(loaded.llm.lm_head.weight, head)


def test_sharded_save_writes_a_complete_index(tmp_path: Path) -> None:
    model, raw = random_model(seed=1)
    write_checkpoint(tmp_path, model.state_dict(), raw, tokenizer_dir=None, dtype=torch.float32,
                     max_shard_bytes=400_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (tmp_path / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    want = {k for k in model.state_dict() if k != "language_model.lm_head.weight"}
    assert set(index["weight_map"]) == want
    total = 0
    for key, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / shard), framework="pt") as fh:
            assert key in fh.keys(), f"{key} not in {shard}"  # noqa: SIM118 - safe_open has no __contains__
            total += fh.get_tensor(key).numel() * 4
    assert index["metadata"]["total_size"] == total
    loaded = load(tmp_path, truncate_vision=False)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_truncated_vision_skips_unused_tensors_with_identical_features(tmp_path: Path) -> None:
    model, raw = random_model(seed=2)
    write_checkpoint(tmp_path, model.state_dict(), raw, tokenizer_dir=None, dtype=torch.float32)
    full, short = load(tmp_path, truncate_vision=False), load(tmp_path)
    short_keys, full_keys = set(short.state_dict()), set(full.state_dict())
    dropped = full_keys - short_keys
    assert short_keys < full_keys and dropped
    assert all(k.startswith((VISION + "encoder.layers.2.", VISION + "post_layernorm.", VISION + "head.")) for k in dropped)
    assert any(".post_layernorm." in k for k in dropped) and any(".head." in k for k in dropped)
    assert VISION + "encoder.layers.1.mlp.fc2.weight" in short_keys
    assert len(short.vision_tower.core.encoder.layers) == 2
    pix = pixels(5, 0)
    assert torch.equal(short.vision_features(pix), full.vision_features(pix))
    ids = [torch.tensor([4, 5, -200, 6])]
    with torch.no_grad():
        a = short(ids, [short.encode_video(pix)]).logits
        b = full(ids, [full.encode_video(pix)]).logits
    assert torch.equal(a, b)


# ---- (h) errors ---------------------------------------------------------------------------------
@pytest.fixture
def good(tmp_path: Path) -> Path:
    model, raw = random_model()
    return write_checkpoint(tmp_path / "ckpt", model.state_dict(), raw, tokenizer_dir=None, dtype=torch.float32)


def test_missing_config_names_folder_and_file(good: Path) -> None:
    (good / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json") as err:
        load(good)
    assert str(good) in str(err.value)


def test_invalid_config_json_names_line(good: Path) -> None:
    (good / "config.json").write_text('{\n  "model_type": "tinyllava",\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON at line 3"):
        load(good)


def test_missing_weights_names_folder(good: Path) -> None:
    (good / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights") as err:
        load(good)
    assert str(good) in str(err.value) and "model.safetensors" in str(err.value)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    model, raw = random_model()
    write_checkpoint(tmp_path, model.state_dict(), raw, tokenizer_dir=None, dtype=torch.float32,
                     max_shard_bytes=400_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load(tmp_path)


def test_missing_tensor_names_the_key(tmp_path: Path) -> None:
    model, raw = random_model()
    state = model.state_dict()
    del state[CONN + "layers.1.0.to_kv.weight"]
    write_checkpoint(tmp_path, state, raw, tokenizer_dir=None, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"connector\._connector\.layers\.1\.0\.to_kv\.weight") as err:
        load(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_request_without_cuda_points_to_the_tiny_preset(good: Path) -> None:
    with pytest.raises(DeviceError, match="--preset tiny"):
        L.load_tinyllava(good, load_tokenizer=False, device="cuda")


# ---- tinyr1 init-tiny -----------------------------------------------------------------------------
def test_init_tiny_writes_a_loadable_checkpoint_with_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tiny"
    assert main(["init-tiny", str(out), "--frames", "4", "--image-size", "16", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "connector" in printed and "language model" in printed and "model.safetensors" in printed
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer_config.json"} <= names
    assert "tokenizer.json" not in names  # slow-tokenizer layout, like the released checkpoints
    lm = L.load_tinyllava(out, device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == len(lm.tokenizer)
    assert cfg["text_config"]["eos_token_id"] == lm.tokenizer.eos_token_id
    assert (cfg["group"], cfg["num_queries"], cfg["vision_config"]["image_size"]) == (4, 16, 16)
    vt = lm.model.encode_video(pixels(4, 1, size=16))
    assert vt.shape == (16, 128)
    params = sum(v.numel() for v in stored(out).values())
    assert f"{params:,}" in printed


def test_init_tiny_refuses_a_non_empty_folder_without_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tiny"
    assert main(["init-tiny", str(out)]) == 0
    before = stored(out)
    assert main(["init-tiny", str(out), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "not empty" in err
    after = stored(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # --force replaces the checkpoint files (a stale shard index would shadow model.safetensors), keeps others
    (out / "model.safetensors.index.json").write_text('{"weight_map": {"x": "model-00001-of-00002.safetensors"}}')
    (out / "notes.txt").write_text("mine")
    assert main(["init-tiny", str(out), "--seed", "1", "--force"]) == 0
    assert not (out / "model.safetensors.index.json").exists() and (out / "notes.txt").read_text() == "mine"
    reseeded = stored(out)
    assert not torch.equal(before[CONN + "latents"], reseeded[CONN + "latents"])
    load(out)


def test_init_tiny_same_seed_same_weights(tmp_path: Path) -> None:
    assert main(["init-tiny", str(tmp_path / "a"), "--seed", "7"]) == 0
    assert main(["init-tiny", str(tmp_path / "b"), "--seed", "7"]) == 0
    a, b = stored(tmp_path / "a"), stored(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args", [["--image-size", "20"], ["--image-size", "8"], ["--frames", "0"]])
def test_init_tiny_rejects_bad_sizes(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str]) -> None:
    assert main(["init-tiny", str(tmp_path / "x"), *args]) == 2
    assert args[0] in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_config_weight_shape_mismatch_names_the_tensor(good: Path) -> None:
    cfg = json.loads((good / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 200
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"language_model\.model\.layers\.0\.mlp\.gate_proj\.weight \(256, 128\)"):
        load(good)
