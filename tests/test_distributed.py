"""Data-parallel GRPO on the CPU: two gloo ranks under the real `torchrun` against one.

Ranks run tests/dist_worker.py (or `-m tinyr1 train`) under torchrun in subprocesses, one thread
each. The reference is one rank, this test process in a gloo group of one (`one_rank`, what
`torchrun --nproc-per-node 1` gives): a torchrun launch draws each prompt's completions from its
own stream, which is what makes the split irrelevant (a plain `tinyr1 train` draws one stream for
the whole batch). The tiny fp32 model is deterministic on the CPU, so "the same update" is checked
at 1e-6 on the weights and on every logged metric (the metrics matter: Adam's update hardly
changes when all gradients are scaled by a constant, so a normalizer that is off by the world size
shows in `loss` and `grad_norm`, not in the weights).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from dist_worker import FAILED_AT, LOSS_TYPES, config, equivalence, write_assets
from rich.console import Console

from tinyr1 import distributed as dist
from tinyr1.checkpoint import RANK_RNG_FILE, TrainState, latest_checkpoint, save_adapter
from tinyr1.config_io import load_config, save_config
from tinyr1.context import build_context
from tinyr1.errors import ConfigError
from tinyr1.runfolder import read_identity
from tinyr1.session import train
from tinyr1.trainer import resume_state

pytestmark = [pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("step_time", "time/", "memory/")  # differ run to run


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_assets(tmp_path_factory.mktemp("dist"))


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _torchrun(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _start_torchrun(*args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> str:
    """Wait for a started torchrun; its stdout (a failure shows its stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    return out


@contextmanager
def one_rank() -> Iterator[None]:
    """This test process as the one rank of a gloo group: what `torchrun --nproc-per-node 1` gives
    `tinyr1 train` (the per-prompt sampling streams), without starting another process."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def _weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out.update({f"connector.{k}": v for k, v in load_file(str(adapter_dir / "connector.safetensors")).items()})
    return out


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, f"weights differ by {worst:.3g}"


def _assert_same_metrics(a: list[dict], b: list[dict], rel: float = 1e-6) -> None:
    assert len(a) == len(b) and a
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            x, y = ra[k], rb[k]
            same = x == y or (x is not None and y is not None and math.isclose(x, y, rel_tol=rel, abs_tol=1e-9))
            assert same, f"step {ra['step']} {k}: {x} vs {y}"


def test_two_ranks_make_the_update_of_one_rank(assets: Path, tmp_path: Path) -> None:
    two_ranks = _start_torchrun("tests/dist_worker.py", "equivalence", str(assets), str(tmp_path / "two"))
    with one_rank():  # meanwhile, the reference here
        equivalence(assets, tmp_path / "one")
    assert "8 prompts (2 ranks x 4) x G=4" in " ".join(_finish(two_ranks).split())
    for loss in LOSS_TYPES:
        one, two = tmp_path / "one" / loss, tmp_path / "two" / loss
        a, b = _weights(one / "final"), _weights(two / "final")
        moved = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)  # LoRA B starts at 0
        assert moved > 1e-3, f"{loss}: the adapter hardly moved ({moved:.3g}); the comparison would mean nothing"
        _assert_same_weights(a, b, 1e-6)
        _assert_same_metrics(_metrics(one), _metrics(two))
        rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
        assert all(f"{k}/rank{r}" in rows[0] for k in ("step_time", "time/rollout") for r in (0, 1))
        # the same completions, gathered from both ranks into one process's order
        texts = [[(r["prompt_id"], r["completion"]) for r in map(json.loads, (run / "completions.jsonl").open())]
                 for run in (one, two)]
        assert texts[0] == texts[1] and len(texts[0]) == 2 * 32
        # the unreadable clip was skipped at the same place: the same data position after 2 steps
        states = [json.loads((latest_checkpoint(run) / "train_state.json").read_text()) for run in (one, two)]
        for st in states:
            del st["run_id"]  # two runs
        assert states[0] == states[1] and len(states[0]["bad_videos"]) == 1 and "bad.mp4" in states[0]["bad_videos"][0]


def test_resume_under_two_ranks_reproduces_the_straight_run(assets: Path, tmp_path: Path) -> None:
    _finish(_start_torchrun("tests/dist_worker.py", "resume", str(assets), str(tmp_path)))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert len(_metrics(straight)) == 4
    _assert_same_metrics(_metrics(straight), _metrics(stopped), rel=0)
    a = _weights(straight / "final")
    for k, v in _weights(stopped / "final").items():
        assert torch.equal(a[k], v), k
    evals = [json.loads(line) for line in (straight / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4] and evals[-1]["n"] == 6  # sharded 3 + 3, gathered
    assert json.loads((stopped / "eval.jsonl").read_text().splitlines()[-1]) == evals[-1]
    saved = torch.load(stopped / "checkpoints" / "step-000002" / RANK_RNG_FILE, weights_only=True)
    assert saved["world_size"] == 2 and not torch.equal(saved["states"][0]["torch"], saved["states"][1]["torch"])

    # the 2-rank checkpoint of step 2, resumed by one torchrun rank: it says so, and continues the
    # same prompts with the same streams (equal here; on GPUs rounding may make it drift)
    for name in ("one_rank", "plain"):
        shutil.copytree(stopped, tmp_path / name, ignore=shutil.ignore_patterns("step-000004", "final"))
    console = Console(record=True, width=300)
    with one_rank():
        train(load_config(str(tmp_path / "one_rank" / "config.toml")), resume=tmp_path / "one_rank", console=console)
    said = console.export_text()
    assert "written by 2 torchrun rank(s) and resumes on 1 torchrun rank(s)" in said and "can differ" in said
    _assert_same_metrics(_metrics(straight), _metrics(tmp_path / "one_rank"))
    _assert_same_weights(a, _weights(tmp_path / "one_rank" / "final"), 1e-6)
    # ... and by a plain process, which samples with one stream per step: what it restores and says
    ctx = build_context(load_config(str(tmp_path / "plain" / "config.toml")), total_steps=4)
    said: list[str] = []
    state = resume_state(ctx, tmp_path / "plain", run_id=read_identity(stopped).run_id, note=said.append)
    assert any("resumes on one process (no torchrun)" in m and "sampling differs" in m for m in said), said
    assert state == TrainState(**json.loads((stopped / "checkpoints" / "step-000002" / "train_state.json").read_text()))
    save_adapter(ctx.model, tmp_path / "restored", train_connector=True)
    restored, saved = _weights(tmp_path / "restored"), _weights(stopped / "checkpoints" / "step-000002" / "adapter")
    assert restored.keys() == saved.keys() and all(torch.equal(restored[k], saved[k]) for k in saved)


def _cli_config(assets: Path, tmp_path: Path, *extra: str) -> Path:
    path = tmp_path / "run.toml"
    save_config(config(assets, tmp_path / "run", *extra), path)
    return path


def test_a_failing_rank_stops_the_other_with_its_error(assets: Path, tmp_path: Path) -> None:
    cfg = _cli_config(assets, tmp_path, "train.steps=6", "rewards.dist_worker:failing_reward=1.0")
    stamp = tmp_path / "failed_at"
    proc = _torchrun("-m", "tinyr1", "train", "--config", str(cfg), "--threads", "1", "--rewards-path",
                     str(ROOT / "tests"), timeout=300, **{FAILED_AT: str(stamp)})
    ended = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 1 failed on purpose at step 2" in out  # rank 1's reason, through the CLI's error line
    assert "Connection closed by peer" in out  # rank 0, blocked in the next collective, stopped too
    assert ended - float(stamp.read_text()) < 60, "the surviving rank did not stop promptly"
    assert len(_metrics(tmp_path / "run")) == 1  # step 1 was logged, step 2 never completed


def test_sigterm_to_torchrun_saves_once_and_exits(assets: Path, tmp_path: Path) -> None:
    cfg = _cli_config(assets, tmp_path, "train.steps=200")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tinyr1", "train", "--config", str(cfg), "--threads", "1"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            assert launcher.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.5)
        launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    steps = len(_metrics(tmp_path / "run"))
    assert out.count("stopped by signal after step") == 1, out[-3000:]  # rank 0 alone speaks and saves
    assert 1 <= steps < 200
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000000", f"step-{steps:06d}"], ckpts  # after the (empty) cold start, and at the stop
    assert json.loads((tmp_path / "run" / "checkpoints" / ckpts[-1] / "train_state.json").read_text())["step"] == steps


def test_prompts_per_step_must_divide_by_the_ranks() -> None:
    dist.check_prompts_divisible(8, 4)
    with pytest.raises(ConfigError, match=r"rollout\.prompts_per_step = 6 is not divisible by the 4 ranks") as err:
        dist.check_prompts_divisible(6, 4)
    assert "rollout.prompts_per_step=4 or 8" in str(err.value)


def test_plan_reports_per_gpu_memory(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tinyr1.cli import main

    monkeypatch.setenv("COLUMNS", "250")

    def need(*args: str) -> float:
        assert main(["plan", "--preset", "24gb", *args]) == 0
        out = capsys.readouterr().out
        found = re.search(r"(fits|tight|does not fit): needs ([0-9.]+) GiB", out)
        assert found, out
        if args:
            assert "B=2 prompts per GPU (8 over 4 GPUs)" in out and "card on each GPU" in out
        return float(found.group(2))

    assert need("--gpus", "4") < need()  # a quarter of the rollout's rows per GPU
    assert main(["plan", "--preset", "24gb", "--gpus", "3"]) == 2
    assert "rollout.prompts_per_step = 8 is not divisible by the 3 ranks" in capsys.readouterr().err


def test_shards_and_keyed_streams() -> None:
    assert [dist.shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [dist.shard_range(2, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert dist.keyed_seed(5, 3) == dist.keyed_seed(5, 3) != dist.keyed_seed(5, 4)
    a = torch.rand(4, generator=dist.keyed_generator(1, 2))
    assert torch.equal(a, torch.rand(4, generator=dist.keyed_generator(1, 2)))
    assert not torch.equal(a, torch.rand(4, generator=dist.keyed_generator(1, "noise")))
