"""Never lose a user's work (issue 16), in process on the tiny model: data and run folders survive
typos and reuse, evaluations survive a resume, stale temp folders are cleaned, a corrupt latest
checkpoint falls back to an intact one, and rows with different optional columns train."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tinyr1.config_io import load_config
from tinyr1.context import build_context, frames_loader, load_split
from tinyr1.model.writing import write_tiny_checkpoint
from tinyr1.synth import write_synthetic
from tinyr1.trainer import rollout_step


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint(root / "model", seed=0, frames=4, image_size=32)
    write_synthetic(root / "data", 24, seed=1, frames=4, size=32, eval_n=4, coldstart_n=8)
    return root


def tiny_cfg(assets: Path, out: Path, *extra: str):  # noqa: ANN201 - a Config
    """The smallest real run: 2 prompts x 4 completions, 6 new tokens, 2 cold-start steps."""
    return load_config("tiny", [
        f"model.path={assets / 'model'}", "model.synth=false", "data.synth=false",
        f"data.train={assets / 'data' / 'train.jsonl'}", f"data.coldstart={assets / 'data' / 'coldstart.json'}",
        f"data.video_root={assets / 'data'}", "data.eval=none", "train.eval_every=0",
        "video.num_frames=4", "video.max_frames=4",
        "rollout.num_generations=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=6",
        "train.micro_batch_size=4", "coldstart.steps=2", "coldstart.batch_size=2",
        "log.progress=false", "log.completions_every=0",
        f"train.output_dir={out}", *extra,
    ])


# ---- item 2: optional columns that differ between rows -----------------------------------------
def test_rows_missing_an_optional_column_give_none_to_rewards(assets: Path, tmp_path: Path) -> None:
    """Every other row lacks `task`: each reward still gets one value per completion in every
    column, None where the row has no such key (TRL's contract), and the step trains."""
    rows = [json.loads(line) for line in (assets / "data" / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 2:
            del row["task"]
        else:
            row["difficulty"] = i  # a key only the even rows have
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_cfg(assets, tmp_path / "run", f"data.train={data}")
    seen: list[dict[str, list[Any]]] = []

    def spy(completions: list[str], **columns: Any) -> list[float]:
        seen.append(columns)
        return [float(len(c)) for c in completions]

    ctx = replace(build_context(cfg, total_steps=1), reward_funcs=[("spy", 1.0, spy)])
    samples = load_split(cfg, str(data))[:2]  # row 1 has task (and difficulty), row 2 has neither
    load = frames_loader(cfg, 32)
    ro = rollout_step(ctx, [(s, load(s)) for s in samples])
    cols = seen[0]
    assert cols["task"] == ["color"] * 4 + [None] * 4
    assert cols["difficulty"] == [0] * 4 + [None] * 4
    assert cols["answer"] == [samples[0].answer] * 4 + [samples[1].answer] * 4
    assert all(len(v) == 8 for v in cols.values())
    assert ro.rewards.shape == (8, 1)


# ---- item 1: a typo never destroys data ---------------------------------------------------------
SMALL_SYNTH = ["--set", "data.synth_n=4", "--set", "data.synth_eval_n=2", "--set", "train.steps=1",
               "--set", "coldstart.steps=1", "--set", "log.progress=false"]


def _user_folder(root: Path) -> dict[Path, bytes]:
    """A user's own dataset folder: train.jsonl, eval.jsonl and a clip, with their bytes."""
    mine = root / "mydata"
    (mine / "videos").mkdir(parents=True)
    files = {mine / "train.jsonl": b'{"my": "train rows"}\n', mine / "eval.jsonl": b'{"my": "eval rows"}\n',
             mine / "videos" / "train_00000.mp4": b"my clip"}
    for path, data in files.items():
        path.write_bytes(data)
    return files


@pytest.mark.parametrize("typo", [
    ["--set", "data.train=mydata/trian.jsonl", "--set", "data.video_root=none"],  # synthetic set into mydata/
    ["--set", "data.train=mydata/trian.jsonl", "--set", "data.video_root=mydata"],
    ["--set", "data.train=mydata"],  # a folder
    ["--set", "data.train=mydata/new/train.jsonl", "--set", "data.video_root=mydata"],  # layout mismatch
])
def test_a_mistyped_data_path_writes_nothing(typo: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """With the tiny preset (data.synth = true) a wrong data.train is refused before anything is
    written: the user's files keep their bytes, and no model or synthetic set appears."""
    from tinyr1.cli import main

    files = _user_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--preset", "tiny", *typo, *SMALL_SYNTH])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "data.train = " in err and "Nothing was written" in err, err
    assert {p: p.read_bytes() for p in files} == files
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "mydata", "mydata/eval.jsonl", "mydata/train.jsonl", "mydata/videos", "mydata/videos/train_00000.mp4"]


def test_synthetic_data_goes_only_into_a_new_or_empty_folder(tmp_path: Path) -> None:
    from tinyr1.errors import DataError

    files = _user_folder(tmp_path)
    with pytest.raises(DataError, match=r"mydata is not empty.*choose another folder"):
        write_synthetic(tmp_path / "mydata", 2, 0, frames=4, size=32, eval_n=1, coldstart_n=1)
    assert {p: p.read_bytes() for p in files} == files
    out = write_synthetic(tmp_path / "fresh", 2, 0, frames=4, size=32, eval_n=1, coldstart_n=1)
    assert out["train"].is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "mydata"]


def test_data_synth_command_needs_force_for_a_folder_with_files(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from tinyr1.cli import main

    files = _user_folder(tmp_path)
    argv = ["data", "synth", str(tmp_path / "mydata"), "--n", "2", "--eval-n", "1", "--coldstart-n", "1",
            "--frames", "4"]
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in files} == files
    assert main([*argv, "--force"]) == 0
    assert (tmp_path / "mydata" / "train.jsonl").read_bytes() != files[tmp_path / "mydata" / "train.jsonl"]


def test_the_tiny_presets_own_cache_is_where_synthetic_data_goes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from tinyr1.synth import synthetic_target

    monkeypatch.chdir(tmp_path)
    d = load_config("tiny").data
    paths = {"train": d.train, "eval": d.eval, "coldstart": d.coldstart}
    assert synthetic_target(paths, d.video_root) == Path(".tinyr1_cache/tiny/data")
    Path(".tinyr1_cache/tiny/data").mkdir(parents=True)
    assert synthetic_target(paths, d.video_root) == Path(".tinyr1_cache/tiny/data")  # empty: still fine
    Path(d.train).write_text("{}\n")
    assert synthetic_target(paths, d.video_root) is None  # exists: nothing to write
