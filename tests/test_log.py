"""log.py and `tinyr1 report`: JSON lines, resume truncation, plots, errors."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tinyr1 import log
from tinyr1.cli import main
from tinyr1.errors import CheckpointError, TinyR1Error
from tinyr1.log import (
    PEAK_MEMORY,
    PEAK_MEMORY_STEP,
    RunLogger,
    format_bytes,
    peak_memory_bytes,
    read_eval,
    read_metrics,
    step_peak_memory_bytes,
)
from tinyr1.plots import plot_run

MiB = 2**20


def quiet_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


def step_metrics(i: int) -> dict[str, object]:
    return {
        "reward": torch.tensor(0.1 * i),
        "reward_std": 0.5,
        "rewards/r1/mean": 0.1 * i,
        "rewards/accuracy/mean": min(1.0, 0.05 * i),
        "completions/mean_length": 100.0 - i,
        "kl": 0.001 * i,
        "step_time": 2.5,
        "time/rollout": 1.5,
        "time/update": 1.0,
        "memory/peak_bytes": 3 * 1024**3,
    }


def write_run(run_dir: Path, steps: int, **kw: object) -> None:
    console, _ = quiet_console()
    with RunLogger(run_dir, steps, completions_every=2, num_completions=2, console=console, **kw) as log:  # type: ignore[arg-type]
        for i in range(kw.get("start_step", 0), steps):  # type: ignore[arg-type]
            log.log_step(i, step_metrics(i))


def test_log_step_writes_one_json_line_per_step(tmp_path: Path) -> None:
    console, buf = quiet_console()
    with RunLogger(tmp_path, 3, completions_every=0, num_completions=0, console=console) as log:
        log.log_step(0, step_metrics(0))
        log.log_step(1, {**step_metrics(1), "kl": float("nan"), "entropy": torch.tensor(float("inf"))})
        # flushed at once: readable while the run is still going
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    raw = [json.loads(line) for line in lines]  # standard JSON: no NaN literals
    assert [r["step"] for r in raw] == [0, 1]
    assert raw[1]["kl"] is None and raw[1]["entropy"] is None
    assert raw[1]["reward"] == pytest.approx(0.1)
    rows = read_metrics(tmp_path)
    assert math.isnan(rows[1]["kl"]) and rows[0]["kl"] == 0.0
    assert rows[1]["rewards/accuracy/mean"] == pytest.approx(0.05)
    out = buf.getvalue()
    assert "step 2/3" in out and "reward 0.100" in out and "acc 0.050" in out
    assert "rollout 1.5 + update 1.0" in out and "peak 3.00 GiB" in out and "ETA" in out


def test_live_progress_on_a_terminal(tmp_path: Path) -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=200)
    with RunLogger(tmp_path, 4, completions_every=0, num_completions=0, console=console, start_step=1) as log:
        log.log_step(1, step_metrics(1))
        log.note("skipped step 3: NaN in rewards")
        log.log_step(2, step_metrics(2))
    out = buf.getvalue()
    assert "step 3/4" in out and "skipped step 3" in out and "━" in out  # the bar was drawn
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_resume_truncates_later_steps(tmp_path: Path) -> None:
    write_run(tmp_path, 6)  # steps 0..5 written
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "rew')  # killed mid-write
    console, _ = quiet_console()
    with RunLogger(tmp_path, 8, completions_every=1, num_completions=1, console=console, start_step=4) as log:
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
        for i in range(4, 8):
            log.log_step(i, step_metrics(i))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(8))
    assert rows[5]["completions/mean_length"] == 95.0


def test_completions_every_n_steps_and_resume(tmp_path: Path) -> None:
    console, _ = quiet_console()
    sample = {"prompt_id": "q1", "completion": "<think>é</think>", "rewards": {"r1": 1.5}, "advantage": 0.7}
    with RunLogger(tmp_path, 6, completions_every=2, num_completions=2, console=console) as log:
        written = [log.log_completions(i, [sample] * 3) for i in range(6)]
    assert written == [2, 0, 2, 0, 2, 0]
    rows = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows] == [0, 0, 2, 2, 4, 4]
    assert rows[0]["completion"] == "<think>é</think>" and rows[0]["rewards"] == {"r1": 1.5}
    with RunLogger(tmp_path, 6, completions_every=2, num_completions=2, console=console, start_step=2):
        pass
    steps = [json.loads(x)["step"] for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert steps == [0, 0]


def test_broken_middle_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward": 1}\nnot json\n{"step": 2, "reward": 1}\n')
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl:2"):
        read_metrics(tmp_path)


def test_missing_run_dir_or_metrics_is_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TinyR1Error, match="no metrics.jsonl"):
        read_metrics(tmp_path)
    with pytest.raises(TinyR1Error, match="no such run directory"):
        read_metrics(tmp_path / "nope")


def test_plot_writes_png_with_and_without_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, 40)
    console, _ = quiet_console()
    with RunLogger(run, 40, completions_every=0, num_completions=0, console=console, start_step=40) as log:
        log.log_eval(19, {"accuracy": 0.4})
        log.log_eval(39, {"accuracy": 0.55})
    assert [r["step"] for r in read_eval(run)] == [19, 39]
    png = plot_run(run)
    assert png == run / "curves.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

    sparse = tmp_path / "sparse"  # only reward: the other panels say "not logged"
    sparse.mkdir()
    (sparse / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "reward": i / 3}) + "\n" for i in range(3))
    )
    out = plot_run(sparse, tmp_path / "figs" / "sparse.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_report_cli_prints_table_and_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path, 12)
    out = tmp_path / "report.png"
    assert main(["report", str(tmp_path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rewards/accuracy/mean" in text and "completions/mean_length" in text
    assert "1.100" in text  # last reward (step 11) and its best
    assert out.stat().st_size > 10_000


def test_report_cli_without_metrics_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "no metrics.jsonl" in err and "Traceback" not in err


def test_memory_and_bytes_helpers() -> None:
    peak = peak_memory_bytes("cpu")
    assert 10 * 1024**2 < peak < 1024**4  # this python process with torch loaded
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 1024**3) == "3.00 GiB"


def _can_reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak_rss(), reason="the CPU step peak needs /proc/self/clear_refs (Linux)")
def test_step_peak_is_this_steps_own_on_cpu() -> None:
    """A 256 MiB step, then a step that allocates nothing: the second step's peak is its own (not the
    process maximum), while the run's peak still remembers the first step."""
    step_peak_memory_bytes("cpu")  # the window starts here
    big = torch.ones(64 * MiB)  # [64 Mi] fp32, 256 MiB written, so resident
    del big  # large blocks are unmapped at once: the RSS drops back
    first = step_peak_memory_bytes("cpu")
    second = step_peak_memory_bytes("cpu")
    assert first - second > 200 * MiB, (first, second)
    assert peak_memory_bytes("cpu") >= first


def test_step_peak_without_a_reset_is_the_process_peak_with_a_note(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "_CLEAR_REFS", tmp_path / "no-proc" / "clear_refs")  # not Linux: nothing to reset
    monkeypatch.setattr(log, "_warned_no_step_peak", False)
    with pytest.warns(RuntimeWarning, match="process peak RSS"):
        peak = step_peak_memory_bytes("cpu")
    assert peak == peak_memory_bytes("cpu")
    step_peak_memory_bytes("cpu")  # warned once per process, not per step


@pytest.mark.gpu
def test_step_peak_is_this_steps_own_on_cuda() -> None:
    step_peak_memory_bytes("cuda")
    big = torch.ones(64 * MiB, device="cuda")  # [64 Mi] fp32, 256 MiB
    del big
    first = step_peak_memory_bytes("cuda")
    second = step_peak_memory_bytes("cuda")
    assert first >= 256 * MiB > second
    assert peak_memory_bytes("cuda") >= first  # reset_peak_memory_stats did not lose the run's peak


def test_summary_shows_the_step_peak_beside_the_runs() -> None:
    assert PEAK_MEMORY_STEP == "memory/step_peak_bytes" and PEAK_MEMORY == "memory/peak_bytes"
    both = RunLogger.summary({PEAK_MEMORY_STEP: 1024**3, PEAK_MEMORY: 3 * 1024**3})
    assert both == "peak 1.00 GiB step / 3.00 GiB run"
    assert RunLogger.summary({PEAK_MEMORY: 3 * 1024**3}) == "peak 3.00 GiB"
    assert RunLogger.summary({PEAK_MEMORY_STEP: 1024**3}) == "peak 1.00 GiB step"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


def test_per_category_evaluations_reach_the_log_the_report_and_the_curves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside table cells
    run = tmp_path / "run"
    write_run(run, 20)
    console, buf = quiet_console()
    with RunLogger(run, 20, completions_every=0, num_completions=0, console=console, start_step=20) as log:
        for step, (a, b) in ((0, (0.31, 0.62)), (10, (0.52, 0.7)), (20, (0.83, 0.91))):
            log.log_eval(step, {
                "accuracy": (a + b) / 2, "accuracy_stderr": 0.02, "sampled_accuracy": a, "sampled_accuracy_stderr": 0.01,
                "n": 200, "by_category": {
                    "order": {"n": 100, "accuracy": a + 0.05, "accuracy_stderr": 0.03, "sampled_accuracy": a,
                              "sampled_accuracy_stderr": 0.02},
                    "colour": {"n": 100, "accuracy": b, "accuracy_stderr": 0.03, "sampled_accuracy": b - 0.01,
                               "sampled_accuracy_stderr": 0.02}}})
    assert "greedy/sampled by category: order 0.360/0.310, colour 0.620/0.610" in buf.getvalue()
    assert read_eval(run)[-1]["by_category"]["colour"]["sampled_accuracy"] == pytest.approx(0.9)
    out = tmp_path / "report.png"
    assert main(["report", str(run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out accuracy by category" in text
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in text.splitlines()
            if line.count("│") == 8}
    assert rows["order"] == ["100", "0.360 ± 0.030", "0.880 ± 0.030", "0.310 ± 0.020", "0.830 ± 0.020", "+0.520"]
    assert rows["colour"][0:2] == ["100", "0.620 ± 0.030"] and rows["colour"][-1] == "+0.290"
    sparse = tmp_path / "sparse"  # no categories: four panels, a shorter figure
    write_run(sparse, 20)
    with RunLogger(sparse, 20, completions_every=0, num_completions=0, console=console, start_step=20) as log:
        log.log_eval(0, {"accuracy": 0.3})
    width, height = _png_size(out)
    assert _png_size(plot_run(sparse, tmp_path / "four.png")) == (width, 825) and height == 1210
