"""Never lose a user's work (issue 16), in process on the tiny model: data and run folders survive
typos and reuse, evaluations survive a resume, stale temp folders are cleaned, a corrupt latest
checkpoint falls back to an intact one, and rows with different optional columns train."""

from __future__ import annotations

import json
import re
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


# ---- items 3, 4, 5, 8: run folders, evaluations, temp folders, corrupt checkpoints ---------------
RUN = ("train.steps=4", "train.save_every=2", "train.eval_every=2")  # evaluations at 0, 2 and 4


def run_cfg(assets: Path, out: Path, *extra: str):  # noqa: ANN201 - a Config
    return tiny_cfg(assets, out, f"data.eval={assets / 'data' / 'eval.jsonl'}", *RUN, *extra)


@pytest.fixture(scope="module")
def straight(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    from tinyr1.session import train

    return train(run_cfg(assets, tmp_path_factory.mktemp("straight") / "run"))


def metrics_of(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("step_time", "time/", "memory/"))} for r in rows]


def weights_of(adapter_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out.update({f"connector.{k}": v for k, v in load_file(str(adapter_dir / "connector.safetensors")).items()})
    return out


def assert_same_run(run: Path, straight: Path) -> None:
    """Nothing lost: the same metrics, evaluations and bit-identical final weights."""
    import torch

    from tinyr1.log import read_eval

    assert metrics_of(run) == metrics_of(straight)
    assert read_eval(run) == read_eval(straight)
    a, b = weights_of(run / "final"), weights_of(straight / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def files_of(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_fresh_run_never_reuses_another_runs_folder(assets: Path, tmp_path: Path, straight: Path) -> None:
    """Run A (6 steps, save every 3), then a fresh run B (4 steps, save every 2, another seed) into
    the same folder: B is refused with --resume and --force named, A's files keep their bytes. With
    --force B replaces A; a checkpoint of A copied back in is never resumed from nor pruned."""
    import shutil

    from tinyr1.errors import CheckpointError
    from tinyr1.session import train

    run = tmp_path / "run"
    train(run_cfg(assets, run, "train.steps=6", "train.save_every=3", "train.seed=1"))
    a_files = files_of(run)
    with pytest.raises(CheckpointError, match=r"already holds a run \(checkpoints up to step 6, a final adapter\); "
                       r"continue it with `tinyr1 train --resume .*`, start over in it with --force"):
        train(run_cfg(assets, run))
    assert files_of(run) == a_files
    a_step6 = tmp_path / "a-step-6"
    shutil.copytree(run / "checkpoints" / "step-000006", a_step6)
    train(run_cfg(assets, run), force=True, stop_after=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000", "step-000002"]
    assert not (run / "final").exists()
    shutil.copytree(a_step6, run / "checkpoints" / "step-000006")  # another run's checkpoint, newer
    train(load_config(str(run / "config.toml")), resume=run)
    assert_same_run(run, straight)
    assert files_of(run / "checkpoints" / "step-000006") == {
        run / "checkpoints" / "step-000006" / p.relative_to(a_step6): b for p, b in files_of(a_step6).items()}


def test_the_cli_refuses_a_fresh_run_in_a_used_folder_before_making_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Running the README's `--set train.output_dir=runs/tiny-demo` command a second time."""
    from tinyr1.cli import main

    monkeypatch.chdir(tmp_path)
    run = Path("runs/tiny-demo")
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text('preset = "tiny"\n')
    code = main(["train", "--preset", "tiny", "--set", f"train.output_dir={run}", *SMALL_SYNTH])
    err = capsys.readouterr().err
    assert code == 2 and "--resume runs/tiny-demo" in err and "--force" in err, err
    assert not Path(".tinyr1_cache").exists()


@pytest.mark.parametrize("how", ["killed during the next step", "stopped by a signal"])
def test_evaluations_survive_a_resume(assets: Path, tmp_path: Path, straight: Path, how: str) -> None:
    """Resuming from checkpoint 2 keeps the evaluation at step 2 (killed during step 3: checkpoint 2
    and its evaluation are on disk), or runs it (a signal stopped the run before it)."""
    import shutil

    from tinyr1.log import read_eval
    from tinyr1.session import train

    run = tmp_path / "run"
    if how == "killed during the next step":
        train(run_cfg(assets, run), stop_after=3)
        shutil.rmtree(run / "checkpoints" / "step-000003")  # what a kill before that save leaves
        assert [r["step"] for r in read_eval(run)] == [0, 2]
    else:
        train(run_cfg(assets, run), stop_after=2)
        assert [r["step"] for r in read_eval(run)] == [0]
    train(load_config(str(run / "config.toml")), resume=run)
    assert [r["step"] for r in read_eval(run)] == [0, 2, 4]
    assert_same_run(run, straight)


def test_interrupted_saves_leave_no_temp_folders(assets: Path, tmp_path: Path, straight: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A save interrupted half-way (its second file) leaves a temp folder; resuming removes this
    run's and only this run's (by name), and still reproduces the uninterrupted run."""
    import torch

    from tinyr1 import checkpoint
    from tinyr1.session import train

    run = tmp_path / "run"
    calls = {"n": 0}
    real_save = torch.save

    def interrupted(obj: Any, f: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 1:  # 3 files per save (optimizer, scheduler, rng): the 3rd save, 1st file
            raise KeyboardInterrupt  # Ctrl-C twice, or any kill: no cleanup runs
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(run_cfg(assets, run))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    temps = list((run / "checkpoints").glob(".tmp-*"))
    assert len(temps) == 1 and temps[0].name.startswith(".tmp-step-000004-"), temps
    temps[0].rename(temps[0].with_name(re.sub(r"-\d+$", "-999999", temps[0].name)))  # the process that wrote it is gone
    foreign = run / "checkpoints" / ".tmp-step-000004-0123456789ab-4242"  # another run's, by name
    foreign.mkdir()
    train(load_config(str(run / "config.toml")), resume=run)
    assert sorted(p.name for p in (run / "checkpoints").glob(".tmp-*")) == [foreign.name]
    assert_same_run(run, straight)


@pytest.mark.parametrize("damage", ["truncated adapter", "zeroed optimizer state", "no rng state"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(
        assets: Path, tmp_path: Path, straight: Path, damage: str) -> None:
    from io import StringIO

    from rich.console import Console

    from tinyr1.session import train

    run = tmp_path / "run"
    train(run_cfg(assets, run, "train.save_every=1"), stop_after=3)  # checkpoints 2 and 3 (keep 2)
    latest = run / "checkpoints" / "step-000003"
    if damage == "truncated adapter":
        f = latest / "adapter" / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "zeroed optimizer state":
        f = latest / "optimizer.pt"
        f.write_bytes(b"\0" * f.stat().st_size)
    else:
        (latest / "rng.pt").unlink()
    out = StringIO()
    train(load_config(str(run / "config.toml")), resume=run, console=Console(file=out, width=300))
    log = out.getvalue()
    assert "step-000003 is unreadable" in log and "resuming from" in log and "step-000002 (step 2)" in log, log
    assert (run / "checkpoints" / "corrupt-step-000003").is_dir()  # kept for a look, out of the way
    assert_same_run(run, straight)


def test_a_run_folder_is_used_by_one_process_at_a_time(straight: Path) -> None:
    """While a process trains in a run folder (it holds RUN/.lock), another resume is refused
    before it writes anything."""
    import os

    from tinyr1.errors import CheckpointError
    from tinyr1.runfolder import run_lock
    from tinyr1.session import train

    before = files_of(straight)
    with run_lock(straight), pytest.raises(CheckpointError, match=rf"in use by another tinyr1 process \(pid {os.getpid()}\)"):
        train(load_config(str(straight / "config.toml")), resume=straight)
    assert files_of(straight) == before


def test_unreadable_eval_videos_are_listed_once(assets: Path, tmp_path: Path) -> None:
    """Item 10: a bad clip in the training-time eval set is named in the log (once per run) and
    counted in eval.jsonl, not silently dropped."""
    from io import StringIO

    from rich.console import Console

    from tinyr1.log import read_eval
    from tinyr1.session import train

    rows = [json.loads(line) for line in (assets / "data" / "eval.jsonl").read_text().splitlines()]
    rows[1]["video"] = "videos/lost_clip.mp4"
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = StringIO()
    run = train(tiny_cfg(assets, tmp_path / "run", f"data.eval={data}", "train.steps=1", "coldstart.enabled=false"),
                console=Console(file=out, width=300))
    log = out.getvalue()
    assert log.count("lost_clip.mp4") == 1 and "evaluation skipped an unreadable video" in log, log
    assert [(r["step"], r["n"], r["skipped"]) for r in read_eval(run)] == [(0, 3, 1), (1, 3, 1)]


# ---- item 6: a full disk or read-only output ---------------------------------------------------
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(assets: Path, tmp_path: Path, straight: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The third save's optimizer state meets a full disk half-way, failing as torch does then
    ("inline_container.cc ... unexpected pos", seen on a full tmpfs; tests/test_faults.py fills a
    real one): a named DiskError with the path and the room needed, the previous checkpoint intact,
    no temp folder; resuming then loses nothing."""
    import io

    import torch

    from tinyr1 import checkpoint
    from tinyr1.errors import DiskError
    from tinyr1.session import train

    run, calls, real_save = tmp_path / "run", {"n": 0}, torch.save

    def third_save_hits_a_full_disk(obj: Any, f: Any) -> None:
        calls["n"] += 1
        if calls["n"] != 7:
            return real_save(obj, f)
        buf = io.BytesIO()
        real_save(obj, buf)
        Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # what fitted
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint.torch, "save", third_save_hits_a_full_disk)
    with pytest.raises(DiskError, match=r"disk full at .*/run/checkpoints \(needs ~\d.*B.*\) while saving checkpoint "
                       r"step-000004; the previous checkpoint step-000002 is intact"):
        train(run_cfg(assets, run))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000", "step-000002"]
    train(load_config(str(run / "config.toml")), resume=run)
    assert_same_run(run, straight)


def test_eval_out_never_overwrites_a_file_it_did_not_write(assets: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Checked before the evaluation: the data file itself, or any file without an eval summary."""
    from tinyr1.cli import main

    data = assets / "data" / "eval.jsonl"
    notes = tmp_path / "notes.jsonl"
    notes.write_text("mine\n")
    for out, why in ((data, "is the --data file"), (notes, "is not an earlier `tinyr1 eval` output")):
        before = out.read_bytes()
        code = main(["eval", "--model", str(assets / "model"), "--data", str(data), "--out", str(out)])
        assert code == 2 and why in capsys.readouterr().err
        assert out.read_bytes() == before
