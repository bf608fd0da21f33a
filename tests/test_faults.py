"""Real faults against a real `tinyr1 train` process (issue 16): SIGKILL at 14 moments of one tiny
run (cold start, evaluations, inside and around checkpoint saves, pruning, a half-written metrics
line, the final adapter), a SIGTERM, a full disk (a small tmpfs) and read-only outputs.

Each kill is a real signal the process sends itself at a chosen call (tests/fault_runner.py), then
the run is resumed with `tinyr1 train --resume`. After all of them: the same metrics and
evaluations as an uninterrupted run, bit-identical final weights, no temp folder left.
The tiny settings keep each process to a few seconds; every process uses one torch thread (a
resume is bit-identical only on the same thread count).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from tinyr1.model.writing import write_tiny_checkpoint
from tinyr1.synth import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "fault_runner.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "TRITON_INTERPRET": "1"}


def write_config(assets: Path, path: Path, out: Path, **extra: Any) -> Path:
    """A TOML of the smallest real run: 6 GRPO steps of 2 prompts x 4, checkpoints every 2 steps,
    evaluations on 4 clips at 0, 2, 4 and 6."""
    train = {"steps": 6, "save_every": 2, "eval_every": 2, "micro_batch_size": 4, "output_dir": str(out),
             **extra}
    body = textwrap.dedent(f"""\
        base = "tiny"
        [model]
        path = "{assets / 'model'}"
        synth = false
        [data]
        synth = false
        train = "{assets / 'data' / 'train.jsonl'}"
        eval = "{assets / 'data' / 'eval.jsonl'}"
        coldstart = "{assets / 'data' / 'coldstart.json'}"
        video_root = "{assets / 'data'}"
        [video]
        num_frames = 4
        max_frames = 4
        [rollout]
        num_generations = 4
        prompts_per_step = 2
        max_new_tokens = 6
        [coldstart]
        steps = 2
        batch_size = 2
        [log]
        progress = false
        completions_every = 1
        num_completions = 2
        [train]
        """) + "".join(f"{k} = {json.dumps(v)}\n" for k, v in train.items())
    path.write_text(body)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    write_tiny_checkpoint(root / "model", seed=0, frames=4, image_size=32)
    write_synthetic(root / "data", 24, seed=1, frames=4, size=32, eval_n=4, coldstart_n=8)
    return root


def tinyr1(*args: str, fault: tuple[str, int, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """`tinyr1 ARGS --threads 1` in a fresh process, killed at `fault` = (point, count, when)."""
    head = [str(RUNNER), fault[0], str(fault[1]), fault[2], "--"] if fault else ["-m", "tinyr1"]
    return subprocess.run([sys.executable, *head, *args, "--threads", "1"], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def straight(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, in a process of its own like the interrupted ones."""
    root = tmp_path_factory.mktemp("straight")
    cfg = write_config(assets, root / "run.toml", root / "run")
    proc = tinyr1("train", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def metrics_of(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("step_time", "time/", "memory/"))} for r in rows]


def evals_of(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]


def weights_of(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out.update({f"connector.{k}": v for k, v in load_file(str(adapter_dir / "connector.safetensors")).items()})
    return out


def assert_nothing_lost(run: Path, straight: Path) -> None:
    assert metrics_of(run) == metrics_of(straight)
    assert evals_of(run) == evals_of(straight) and [r["step"] for r in evals_of(run)] == [0, 2, 4, 6]
    a, b = weights_of(run / "final"), weights_of(straight / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    leftovers = [p.name for p in run.rglob(".*tmp*")] + [p.name for p in run.rglob("corrupt-*")]
    assert leftovers == [], leftovers


def checkpoints(run: Path) -> list[str]:
    """The step-N folders on disk (complete or not; temp folders are hidden names)."""
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


# (what happens, fault point, count in that process, when, checkpoints on disk afterwards)
KILLS = [
    ("during the cold start", "tinyr1.coldstart:sft_hidden", 2, "before", []),
    ("during the evaluation after the cold start", "tinyr1.session:evaluate", 1, "before", []),
    ("inside the first save: adapter written, optimizer not", "torch:save", 1, "before", []),
    ("inside the first save: complete in its temp folder, not renamed", "tinyr1.checkpoint:_fsync_dir", 1,
     "before", []),
    ("after the rename, before pruning", "tinyr1.checkpoint:_fsync_dir", 2, "after", ["step-000000"]),
    ("during the rollout of step 1", "tinyr1.trainer:sample_group", 1, "before", ["step-000000"]),
    ("SIGTERM during step 1: finishes it, saves, exit 143", "tinyr1.trainer:update_step", 1, "term",
     ["step-000000", "step-000001"]),
    ("during the update of step 2", "tinyr1.trainer:update_step", 1, "before", ["step-000000", "step-000001"]),
    ("half-way through writing the optimizer state of step 2", "torch:save", 1, "half",
     ["step-000000", "step-000001"]),
    ("half-way through the metrics line of step 2", "tinyr1.log:RunLogger.log_step", 1, "half",
     ["step-000000", "step-000001"]),
    ("during the evaluation at step 2", "tinyr1.session:evaluate", 1, "before", ["step-000001", "step-000002"]),
    ("during pruning (step 1 deleted half-way)", "shutil:rmtree", 1, "before",
     ["step-000001", "step-000002", "step-000004"]),  # step-000001 without COMPLETE: removed on resume
    ("inside the final adapter's save", "tinyr1.checkpoint:save_file", 2, "before",
     ["step-000004", "step-000006"]),
    ("during the final evaluation", "tinyr1.session:evaluate", 1, "before", ["step-000004", "step-000006"]),
]


def test_killed_at_14_moments_a_run_loses_nothing(assets: Path, straight: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = write_config(assets, tmp_path / "run.toml", run)
    for i, (what, point, count, when, after) in enumerate(KILLS):
        args = ("train", "--config", str(cfg)) if i == 0 else ("train", "--resume", str(run))
        proc = tinyr1(*args, fault=(point, count, when))
        want = 128 + signal.SIGTERM if when == "term" else -signal.SIGKILL
        assert proc.returncode == want, f"{what}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert checkpoints(run) == after, (what, checkpoints(run))
        if when == "term":
            assert "stopped by signal 15" in proc.stdout and "--resume" in proc.stdout
        if what.startswith("during pruning"):
            assert not (run / "checkpoints" / "step-000001" / "COMPLETE").exists()  # never mistaken for complete
        if what.startswith("inside the final adapter"):
            assert list(run.glob(".final.tmp-*")) and not (run / "final").exists()
        if what.startswith("during the final evaluation"):
            assert "removed" in proc.stdout and not list(run.glob(".final.tmp-*"))  # the previous kill's, by name
    proc = tinyr1("train", "--resume", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_nothing_lost(run, straight)


def unshare_works() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"],
                           capture_output=True, timeout=60)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not unshare_works(),
                                 reason="needs `unshare --user --mount` to mount a small tmpfs without root")


def in_namespace(script: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run a bash script in a private mount namespace (its mounts vanish with it)."""
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script],
                          capture_output=True, text=True, env=ENV, timeout=timeout)


@needs_tmpfs
def test_a_full_disk_stops_cleanly_and_the_run_resumes(assets: Path, straight: Path, tmp_path: Path) -> None:
    """The run folder on a tmpfs with room for about two checkpoints and the logs: a later save
    fails with "disk full at ... (needs ~N MB, M MB free)", exit 2, no traceback, the previous
    checkpoint intact and no temp folder; after the disk grows (a remount: space freed) --resume
    finishes and nothing is lost."""
    ckpt = sum(f.stat().st_size for f in (straight / "checkpoints" / "step-000006").rglob("*") if f.is_file())
    size = int(2.6 * ckpt) + 512 * 1024  # logs, config, two checkpoints, not a third
    mnt, out = tmp_path / "disk", tmp_path / "out"
    mnt.mkdir()
    cfg = write_config(assets, tmp_path / "run.toml", mnt / "run")
    py = f"{sys.executable} -m tinyr1"
    script = f"""
        set -u
        mount -t tmpfs -o size={size} tmpfs {mnt}
        {py} train --config {cfg} --threads 1 > {tmp_path}/first.out 2> {tmp_path}/first.err
        echo $? > {tmp_path}/first.rc
        ls -a {mnt}/run/checkpoints > {tmp_path}/after_full.txt
        mount -o remount,size=256m tmpfs {mnt}
        {py} train --resume {mnt}/run --threads 1 > {tmp_path}/second.out 2> {tmp_path}/second.err
        echo $? > {tmp_path}/second.rc
        cp -a {mnt}/run {out}
    """
    proc = in_namespace(script)
    assert proc.returncode == 0, proc.stderr
    err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "2", err
    assert "disk full at" in err and "(needs ~" in err and "is intact" in err and "Traceback" not in err, err
    left = (tmp_path / "after_full.txt").read_text().split()
    assert [n for n in left if n.startswith(".tmp")] == [] and "step-000002" in left, left
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()
    assert_nothing_lost(out, straight)


@needs_tmpfs
def test_read_only_outputs_are_refused_before_any_work(assets: Path, tmp_path: Path) -> None:
    """train into, and eval --out onto, a read-only file system: exit 2 at once with the path,
    not an OSError 30 traceback after minutes of work."""
    ro = tmp_path / "ro"
    ro.mkdir()
    cfg = write_config(assets, tmp_path / "run.toml", ro / "run")
    py = f"{sys.executable} -m tinyr1"
    script = f"""
        mount -t tmpfs -o size=1m tmpfs {ro} && mount -o remount,ro {ro}
        {py} train --config {cfg} --threads 1 > {tmp_path}/train.out 2> {tmp_path}/train.err; echo $? > {tmp_path}/train.rc
        {py} eval --model {assets / 'model'} --data {assets / 'data' / 'eval.jsonl'} --frames 4 --max-new-tokens 2 \
            --out {ro}/preds.jsonl > {tmp_path}/eval.out 2> {tmp_path}/eval.err; echo $? > {tmp_path}/eval.rc
    """
    proc = in_namespace(script)
    assert proc.returncode == 0, proc.stderr
    for name, what in (("train", "train.output_dir"), ("eval", "--out folder")):
        err = (tmp_path / f"{name}.err").read_text()
        assert (tmp_path / f"{name}.rc").read_text().strip() == "2", err
        assert f"{what} " in err and "is not writable" in err and "Read-only file system" in err, err
        assert "Traceback" not in err
    assert "accuracy" not in (tmp_path / "eval.out").read_text()  # refused before evaluating
