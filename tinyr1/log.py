"""Run logging: a rich live progress line, metrics.jsonl, completions.jsonl and eval.jsonl
(plots.py draws them).

Everything a run reports lands as JSON lines in the run directory, readable without wandb
(TRL #2948): one line per step in `metrics.jsonl` with TRL's metric names (`reward`, `reward_std`,
`frac_reward_zero_std`, `rewards/{name}/mean`, `completions/mean_length`,
`completions/clipped_ratio`, `kl`, `entropy`, `clip_ratio/region_mean`, `step_time`, ...).

Steps are 0-based indices: `log_step(i, ...)` reports the i-th optimizer step, and a run resumed
with `start_step=k` (k steps already done) drops every line with `step >= k` so that nothing is
duplicated. eval.jsonl counts steps done instead (`log_eval(k, ...)` evaluates the model after k
steps, the state checkpoint k holds), so a resume from checkpoint k keeps its rows up to k
(`keep_eval_at_start`). Non-finite values are written as JSON `null` (standard JSON; jq and pandas read it)
and read back as NaN.

The live line reads these keys when present (others are only written): `reward`, `accuracy` or
`rewards/accuracy/mean`, `completions/mean_length`, `kl`, `step_time` with its split
`time/rollout` + `time/update`, `memory/step_peak_bytes` (this step's peak, from
`step_peak_memory_bytes`) and `memory/peak_bytes` (the run's, from `peak_memory_bytes`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from tinyr1.errors import CheckpointError

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"
EVAL_FILE = "eval.jsonl"
STEP_TIME = "step_time"
ROLLOUT_TIME = "time/rollout"
UPDATE_TIME = "time/update"
PEAK_MEMORY = "memory/peak_bytes"  # the run's peak so far (peak_memory_bytes)
PEAK_MEMORY_STEP = "memory/step_peak_bytes"  # this step's own peak (step_peak_memory_bytes)
ACCURACY_KEYS = ("rewards/accuracy/mean", "accuracy")

# Linux: writing "5" here resets the peak RSS (VmHWM in /proc/self/status) to the current RSS.
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
# Per device: the largest peak step_peak_memory_bytes read before resetting it. The reset lowers
# the process high-water mark (CUDA max_memory_allocated; ru_maxrss follows VmHWM), so the run's
# peak is kept here.
_PEAKS_RESET_AWAY: dict[str, int] = {}
_warned_no_step_peak = False


# ----------------------------------------------------------------------------- small helpers


def _device_key(device: Any) -> tuple[Any, str]:
    """(torch.device with the CUDA index filled in, its name as a dict key)."""
    import torch  # heavy; `tinyr1 report` reads logs through this module and never needs it

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev, str(dev)


def _high_water_mark(dev: Any) -> int:
    """The process high-water mark since start or the last reset: CUDA max_memory_allocated, else
    peak RSS."""
    import torch

    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    import resource  # Unix-only (Windows has no `resource`), so only where it is used

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def peak_memory_bytes(device: Any) -> int:
    """The run's (process') peak memory on `device`: CUDA max_memory_allocated, else peak RSS,
    including peaks that `step_peak_memory_bytes` has reset since."""
    dev, key = _device_key(device)
    return max(_high_water_mark(dev), _PEAKS_RESET_AWAY.get(key, 0))


def _vm_hwm() -> int | None:
    """Linux peak RSS since the last clear_refs reset (VmHWM), bytes; None where there is none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def step_peak_memory_bytes(device: Any) -> int:
    """Peak memory on `device` since the previous call (the first call: since the process started),
    then reset, so that each call at the end of a step measures that step alone.

    CUDA: torch.cuda.max_memory_allocated, reset with reset_peak_memory_stats. CPU: the peak RSS
    (VmHWM), reset through /proc/self/clear_refs (Linux). Where that cannot be reset, this returns
    the process peak and warns once. The run's peak (`peak_memory_bytes`) keeps what was reset.
    """
    global _warned_no_step_peak
    import torch

    dev, key = _device_key(device)
    if dev.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(dev))
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        peak = _vm_hwm()
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            peak = None
        if peak is None:
            if not _warned_no_step_peak:
                _warned_no_step_peak = True
                warnings.warn(f"{PEAK_MEMORY_STEP} is the process peak RSS here: {_CLEAR_REFS} cannot reset "
                              "it (Linux only), so it never decreases", RuntimeWarning, stacklevel=2)
            return peak_memory_bytes(dev)
    _PEAKS_RESET_AWAY[key] = max(_PEAKS_RESET_AWAY.get(key, 0), peak)
    return peak


def format_bytes(n: float) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _to_json_value(value: Any) -> Any:
    """Tensors, numpy scalars and floats -> plain JSON numbers; NaN/inf -> null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json_value(v) for v in value]
    return _to_json_value(float(value))


def _from_json_value(value: Any) -> Any:
    return float("nan") if value is None else value


def _read_jsonl(path: Path, *, strict: bool) -> list[dict[str, Any]]:
    """Parse a JSON-lines file. A broken *last* line (a run killed mid-write) is dropped; a broken
    line elsewhere is an error when `strict`, else dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as err:
            if lineno == len(lines) or not strict:
                continue
            raise CheckpointError(
                f"{path}:{lineno}: unreadable line ({err}). The file is written by `tinyr1 train`; "
                "delete the broken line (or the run directory) and try again."
            ) from err
        rows.append({k: _from_json_value(v) for k, v in row.items()})
    return rows


def _truncate_jsonl(path: Path, start_step: int) -> None:
    """Keep only complete lines with step < start_step; atomic (temp file + rename)."""
    if not path.exists():
        return
    kept = [r for r in _read_jsonl(path, strict=False) if r["step"] < start_step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in kept:
            f.write(json.dumps(_to_json_value(row)) + "\n")
    os.replace(tmp, path)


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """The rows of RUN_DIR/metrics.jsonl, in file order; NaN where a value was not finite."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory. Pass the folder that `tinyr1 train` wrote.")
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir}: no {METRICS_FILE} here, so this is not a tinyr1 run directory (or no step has "
            "finished yet). Pass the run folder given to `tinyr1 train` (it holds metrics.jsonl)."
        )
    return _read_jsonl(path, strict=True)


def read_eval(run_dir: Path | str) -> list[dict[str, Any]]:
    """Rows of RUN_DIR/eval.jsonl (step, accuracy, ...) or [] when there is none."""
    path = Path(run_dir) / EVAL_FILE
    return _read_jsonl(path, strict=True) if path.is_file() else []


def accuracy_of(row: dict[str, Any]) -> float | None:
    for key in ACCURACY_KEYS:
        if key in row:
            return float(row[key])
    return None


# ----------------------------------------------------------------------------- the logger


class RunLogger:
    """Writes a run's JSON-lines files and shows a live progress line.

    Use as a context manager around the training loop; every write is flushed at once so a run
    killed at any moment keeps all finished steps.
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        *,
        completions_every: int,
        num_completions: int,
        console: Console | None = None,
        start_step: int = 0,
        enabled_progress: bool = True,
        keep_eval_at_start: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.completions_every = completions_every
        self.num_completions = num_completions
        self.console = console if console is not None else Console()
        self.start_step = start_step
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, COMPLETIONS_FILE):
            _truncate_jsonl(self.run_dir / name, start_step)
        _truncate_jsonl(self.run_dir / EVAL_FILE, start_step + 1 if keep_eval_at_start else start_step)
        self._metrics_f = (self.run_dir / METRICS_FILE).open("a", encoding="utf-8")
        self._durations: list[float] = []
        self._last_time = time.monotonic()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if enabled_progress:
            self._progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(bar_width=24),
                TextColumn("{task.fields[eta]}"),
                TextColumn("{task.fields[stats]}"),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task(
                "grpo", total=total_steps, completed=start_step, eta="", stats=""
            )
            self._progress.start()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if not self._metrics_f.closed:
            self._metrics_f.close()

    # -- writing ------------------------------------------------------------------

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one line `{"step": step, **metrics}` to metrics.jsonl and update the display."""
        now = time.monotonic()
        duration = metrics.get(STEP_TIME)
        self._durations.append(float(duration) if duration is not None else now - self._last_time)
        self._last_time = now
        row = {"step": int(step), **{k: _to_json_value(v) for k, v in metrics.items()}}
        self._metrics_f.write(json.dumps(row) + "\n")
        self._metrics_f.flush()
        stats = self.summary(metrics)
        recent = self._durations[-20:]
        remaining = max(self.total_steps - (step + 1), 0)
        eta = f"ETA {format_duration(sum(recent) / len(recent) * remaining)}"
        self.console.print(
            f"step {step + 1}/{self.total_steps} · {eta} · {stats}", highlight=False, markup=False
        )
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step + 1, eta=eta, stats=stats)
            self._progress.refresh()

    def note(self, message: str) -> None:
        """Print a line above the live progress (e.g. a skipped step); print through this, not print()."""
        self.console.print(message, highlight=False, markup=False)

    def wants_completions(self, step: int) -> bool:
        """Whether `log_completions` will write at this step (so the trainer can skip decoding)."""
        return self.completions_every > 0 and self.num_completions > 0 and step % self.completions_every == 0

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> int:
        """Write the first `num_completions` rows (prompt id, completion, rewards, advantage, ...) to
        completions.jsonl when `wants_completions(step)`; returns how many were written."""
        if not self.wants_completions(step):
            return 0
        chosen = rows[: self.num_completions]
        with (self.run_dir / COMPLETIONS_FILE).open("a", encoding="utf-8") as f:
            for row in chosen:
                f.write(json.dumps({"step": int(step), **_to_json_value(row)}, ensure_ascii=False) + "\n")
        return len(chosen)

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Append an evaluation result (e.g. `accuracy`) to eval.jsonl; `tinyr1 report` plots it."""
        with (self.run_dir / EVAL_FILE).open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), **_to_json_value(metrics)}) + "\n")
        parts = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if not isinstance(v, dict))
        by = metrics.get("by_category") or {}
        if by:  # greedy / sampled per category, one compact clause
            parts += "; greedy/sampled by category: " + ", ".join(
                f"{name} {_fmt(c['accuracy'])}/{_fmt(c['sampled_accuracy'])}" for name, c in by.items())
        self.console.print(f"eval after {step} GRPO steps: {parts}", highlight=False, markup=False)

    @staticmethod
    def summary(metrics: dict[str, Any]) -> str:
        """The one-line human summary of a step's metrics."""
        parts: list[str] = []
        if "reward" in metrics:
            parts.append(f"reward {_fmt(metrics['reward'])}")
        acc = accuracy_of({k: _num(v) for k, v in metrics.items() if k in ACCURACY_KEYS})
        if acc is not None:
            parts.append(f"acc {acc:.3f}")
        if "completions/mean_length" in metrics:
            parts.append(f"len {_num(metrics['completions/mean_length']):.0f}")
        if "kl" in metrics:
            parts.append(f"kl {_fmt(metrics['kl'])}")
        if STEP_TIME in metrics:
            t = f"{_num(metrics[STEP_TIME]):.1f} s/step"
            if ROLLOUT_TIME in metrics and UPDATE_TIME in metrics:
                t += f" (rollout {_num(metrics[ROLLOUT_TIME]):.1f} + update {_num(metrics[UPDATE_TIME]):.1f})"
            parts.append(t)
        peaks = [f"{format_bytes(_num(metrics[k]))}{label}" for k, label in
                 ((PEAK_MEMORY_STEP, " step"), (PEAK_MEMORY, " run" if PEAK_MEMORY_STEP in metrics else ""))
                 if k in metrics]
        if peaks:
            parts.append("peak " + " / ".join(peaks))
        return " · ".join(parts)


class QuietLogger(RunLogger):
    """What ranks other than 0 of a data-parallel run hold: the logger's calls, nothing written or
    shown (rank 0 writes every file, from metrics gathered over the ranks)."""

    def __init__(self, *_: Any, **__: Any) -> None:  # no files, no display
        pass

    def close(self) -> None:
        pass

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def wants_completions(self, step: int) -> bool:
        return False

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> int:
        return 0

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        pass


def _num(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def _fmt(value: Any) -> str:
    v = _num(value)
    return f"{v:.4g}" if abs(v) < 0.01 and v != 0 else f"{v:.3f}"
