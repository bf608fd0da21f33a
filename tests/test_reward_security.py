"""Custom reward modules are code: where they may come from and when they run (issue 16, security).

A config may not name standard-library or builtin targets, modules resolve only from the config's
folder or --rewards-path (never sys.path or the working directory), the file is printed before it
runs, and resuming a run whose reward module sits in a folder the user did not write needs
--trust-rewards."""

from __future__ import annotations

import os
import sys
import textwrap
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from tinyr1.cli import main
from tinyr1.config_io import load_config, save_config
from tinyr1.errors import RewardError
from tinyr1.model.writing import write_tiny_checkpoint
from tinyr1.rewards import resolve_rewards
from tinyr1.synth import write_synthetic

EVIL = textwrap.dedent("""
    import os, pathlib
    pathlib.Path(os.environ["TINYR1_TEST_MARKER"]).write_text("imported")
    def score(completions, **kw):
        return [0.0] * len(completions)
""")


@pytest.mark.parametrize("name", ["os:system", "subprocess:run", "builtins:exec", "shutil:rmtree", "sys:exit"])
def test_standard_library_and_builtin_targets_are_refused(name: str, tmp_path: Path) -> None:
    """`rewards."os:system" = 1` used to import and call os.system; even a same-named file in the
    reward folder is refused (it would shadow the real module)."""
    (tmp_path / f"{name.split(':')[0]}.py").write_text("def system(*a, **k): return [0.0]\n")
    with pytest.raises(RewardError, match="standard-library or builtin module, refused"):
        resolve_rewards({name: 1.0}, [tmp_path])


def test_modules_come_only_from_the_reward_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module importable from sys.path or the working directory is not a reward module."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tinyr1_test_elsewhere.py").write_text("def score(completions, **k): return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(elsewhere))
    monkeypatch.chdir(elsewhere)
    with pytest.raises(RewardError, match=r"no tinyr1_test_elsewhere.py in the reward folders \(none given\)"):
        resolve_rewards({"tinyr1_test_elsewhere:score": 1.0})
    assert "tinyr1_test_elsewhere" not in sys.modules


@pytest.mark.parametrize(("name", "why"), [("rich", "in use comes from"), ("pip", "is installed")])
def test_an_installed_or_imported_module_name_is_not_shadowed(name: str, why: str, tmp_path: Path) -> None:
    if why == "is installed" and name in sys.modules:
        pytest.skip(f"{name} is imported already in this process")
    (tmp_path / f"{name}.py").write_text("def score(completions, **k): return [1.0] * len(completions)\n")
    with pytest.raises(RewardError, match=rf"'{name}' {why} .*rename"):
        resolve_rewards({f"{name}:score": 1.0}, [tmp_path])


def test_the_resolved_file_is_printed_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`train --config DIR/mine.toml` looks in DIR (and --rewards-path), prints the file, and stops
    at the first bad input after that (here: an output folder that is a file) without importing it."""
    from tinyr1.cli.train import check_custom_rewards
    from tinyr1.reward_modules import search_folders

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "tinyr1_test_printed.py").write_text("def score(completions, **k): return [1.0] * len(completions)\n")
    (conf / "mine.toml").write_text('base = "tiny"\n[rewards]\n"tinyr1_test_printed:score" = 0.5\n')
    cfg = load_config(str(conf / "mine.toml"))
    out = StringIO()
    check_custom_rewards(cfg, search_folders(str(conf / "mine.toml"), []), trust=False,
                         console=Console(file=out, width=300))
    assert out.getvalue().strip() == f"custom reward tinyr1_test_printed:score: {conf / 'tinyr1_test_printed.py'}"
    assert "tinyr1_test_printed" not in sys.modules  # printing is not importing


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sec")
    write_tiny_checkpoint(root / "model", seed=0, frames=4, image_size=32)
    write_synthetic(root / "data", 4, seed=1, frames=4, size=32, eval_n=0, coldstart_n=0)
    return root


def someone_elses_run(assets: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A run folder whose config names `tinyr1_test_evil:score`, recorded (run.json) as coming from
    a folder another user owns (as root: chown; otherwise: a folder others can write)."""
    import json

    evil_dir = tmp_path / "shared"
    evil_dir.mkdir()
    (evil_dir / "tinyr1_test_evil.py").write_text(EVIL)
    if os.getuid() == 0:
        os.chown(evil_dir / "tinyr1_test_evil.py", 4242, 4242)
    else:
        evil_dir.chmod(0o777)
    run = tmp_path / "their-run"
    cfg = load_config("tiny", [
        f"model.path={assets / 'model'}", "model.synth=false", "data.synth=false",
        f"data.train={assets / 'data' / 'train.jsonl'}", f"data.video_root={assets / 'data'}", "data.eval=none",
        "data.coldstart=none",
        "coldstart.enabled=false", "train.eval_every=0", "video.num_frames=4", "video.max_frames=4",
        "rollout.num_generations=2", "rollout.prompts_per_step=1", "rollout.max_new_tokens=2",
        "train.micro_batch_size=2", "train.steps=1", "log.progress=false", "log.completions_every=0",
        "log.num_completions=2",
        f"train.output_dir={run}", "rewards.tinyr1_test_evil:score=1.0",
    ])
    save_config(cfg, run / "config.toml")
    (run / "run.json").write_text(json.dumps({
        "run_id": "0123456789ab", "uid": 4242, "user": "someone",
        "reward_files": {"tinyr1_test_evil:score": str(evil_dir / "tinyr1_test_evil.py")}}))
    return run, evil_dir


def test_resuming_a_run_with_reward_code_from_a_folder_you_did_not_write_needs_trust(
        assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run, evil_dir = someone_elses_run(assets, tmp_path)
    marker = tmp_path / "marker"
    monkeypatch.setenv("TINYR1_TEST_MARKER", str(marker))
    monkeypatch.syspath_prepend(str(evil_dir))  # importable, as a shared PYTHONPATH would make it
    code = main(["train", "--resume", str(run)])
    out = capsys.readouterr()
    assert code == 2, out.out + out.err
    assert f"custom reward tinyr1_test_evil:score: {evil_dir / 'tinyr1_test_evil.py'}" in out.out
    assert "from a place you did not write" in out.err and "--trust-rewards" in out.err
    assert not marker.exists() and "tinyr1_test_evil" not in sys.modules  # never imported
    assert main(["train", "--resume", str(run), "--trust-rewards"]) == 0
    assert marker.read_text() == "imported" and (run / "final").is_dir()
