"""Bad input gets a named error, never a traceback from inside a library (issue 16, items 9 and 10):
each case runs the real CLI (or the real loader) and checks the exit code and the message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyr1.cli import main
from tinyr1.config_io import load_config
from tinyr1.errors import ConfigError
from tinyr1.synth import write_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_synthetic(tmp_path_factory.mktemp("synth"), 4, 0, frames=4, size=32, eval_n=2, coldstart_n=2)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and everything printed; an exception other than the CLI's own is a failure."""
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


# ---- item 9 -------------------------------------------------------------------------------------
def test_data_check_of_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["data", "check", str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path}: is a folder, not a dataset file" in out


def test_eval_data_of_a_folder(synth: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["eval", "--model", str(tmp_path), "--data", str(tmp_path)], capsys)
    assert code == 2 and "is a folder, not a dataset file" in out


def test_non_utf8_toml_names_the_file_and_the_byte(tmp_path: Path) -> None:
    bad = tmp_path / "mine.toml"
    bad.write_bytes(b'base = "tiny"\n# caf\xe9 latin-1 comment\n')
    with pytest.raises(ConfigError, match=r"mine.toml: not UTF-8 text \(byte 0xe9 at line 2\)"):
        load_config(str(bad))


def test_non_utf8_toml_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "mine.toml"
    bad.write_bytes(b"[train]\nsteps = 3 # \xff\n")
    code, out = run(["plan", "--config", str(bad)], capsys)
    assert code == 2 and "not UTF-8 text" in out


@pytest.mark.parametrize("key", ["train.seed", "data.synth_seed"])
def test_seed_beyond_the_range_the_generators_take(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key} = 18446744073709551616: must be >= 0 and <= 4294967295"):
        load_config("tiny", [f"{key}={2**64}"])
    assert load_config("tiny", [f"{key}={2**32 - 1}"])  # the largest accepted


def test_data_check_frames_zero(synth: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["data", "check", str(synth["train"]), "--frames", "0"], capsys)
    assert code == 2 and "--frames must be at least 1, got 0" in out


# ---- item 10 ------------------------------------------------------------------------------------
def test_empty_set_value_is_refused_not_none() -> None:
    """`--set train.steps=` used to mean none (one epoch: 250 steps on the tiny preset)."""
    with pytest.raises(ConfigError, match=r"--set train.steps=: no value after '='; write a value, or none"):
        load_config("tiny", ["train.steps="])
    assert load_config("tiny", ["train.steps=none"]).train.steps is None


def test_data_check_of_an_empty_dataset_is_not_usable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, out = run(["data", "check", str(empty)], capsys)
    assert code == 1 and "no rows" in out and "usable" not in out.replace("unusable", "")


def test_skip_message_names_the_video_once(synth: dict[str, Path], tmp_path: Path) -> None:
    from tinyr1.data import load_dataset
    from tinyr1.feed import SampleFeeder
    from tinyr1.video import load_frames

    rows = [json.loads(line) for line in synth["train"].read_text().splitlines()]
    rows[0]["video_filename"] = str(tmp_path / "gone.mp4")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_dataset(data, video_root=synth["train"].parent)
    notes: list[str] = []
    feeder = SampleFeeder(samples, lambda s: load_frames(s.video, 4, 32), seed=0, max_bad_fraction=0.5,
                          on_skip=notes.append)
    feeder.next_batch(len(samples) - 1)
    assert len(notes) == 1 and notes[0].count("gone.mp4") == 1, notes


def test_unknown_lora_target_is_named_with_the_layers_there_are(tmp_path: Path) -> None:
    from tinyr1.model.loading import add_lora, load_tinyllava
    from tinyr1.model.writing import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path / "model", seed=0, frames=4, image_size=32)
    model = load_tinyllava(tmp_path / "model", dtype="fp32", device="cpu").model
    with pytest.raises(ConfigError, match=r"lora.target_modules = \['q_proj', 'foo_proj'\]: the LLM has no linear "
                       r"layer named foo_proj .*its linear layers are down_proj, gate_proj, .*v_proj"):
        add_lora(model, r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "foo_proj"])
    with pytest.raises(ConfigError, match=r"'q_prj': did you mean 'q_proj'\?"):
        add_lora(model, r=4, alpha=8.0, dropout=0.0, target_modules=["q_prj"])
    add_lora(model, r=4, alpha=8.0, dropout=0.0, target_modules=["self_attn.q_proj"])  # PEFT's suffix match
