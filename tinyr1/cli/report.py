"""`tinyr1 report RUN_DIR`: a summary table of a run's metrics and a PNG of its curves."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

ORDER = 60

DESCRIPTION = """\
Summarize a training run from its metrics.jsonl (and eval.jsonl, if any):
a table with the first, last and best value of the key metrics, and a PNG with
reward, accuracy, completion length and KL curves (default RUN_DIR/curves.png).

Examples:
  tinyr1 report runs/tiny
  tinyr1 report runs/24gb-nextqa --out figures/nextqa.png
"""

# metric -> "max" / "min" (which direction is better) or None (no "best")
KEY_METRICS: dict[str, str | None] = {
    "reward": "max",
    "reward_std": None,
    "accuracy": "max",
    "frac_reward_zero_std": "min",
    "completions/mean_length": None,
    "completions/clipped_ratio": "min",
    "kl": None,
    "entropy": None,
    "clip_ratio/region_mean": None,
    "step_time": None,
}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="summary table and curves (PNG) of a run directory",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="run folder written by `tinyr1 train`")
    parser.add_argument("--out", metavar="PNG", type=Path, default=None, help="where to write the plot")
    parser.set_defaults(func=handler)


def _metric_order(keys: set[str]) -> list[tuple[str, str | None]]:
    order: list[tuple[str, str | None]] = []
    for key, direction in KEY_METRICS.items():
        if key in keys:
            order.append((key, direction))
        if key == "reward":  # per-function rewards right after the total
            order += [(k, "max") for k in sorted(keys) if k.startswith("rewards/") and k.endswith("/mean")]
    return order


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}" if abs(value) < 0.01 and value != 0 else f"{value:.3f}"


def handler(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tinyr1.errors import CheckpointError
    from tinyr1.log import format_duration, read_eval, read_metrics
    from tinyr1.plots import plot_run

    console = Console()
    rows = read_metrics(args.run_dir)
    if not rows:
        raise CheckpointError(
            f"{args.run_dir}/metrics.jsonl has no steps yet: wait for the first step to finish."
        )
    keys = {k for r in rows for k in r}
    table = Table(
        title=f"{args.run_dir}: {len(rows)} steps (step {rows[0]['step'] + 1} to {rows[-1]['step'] + 1})"
    )
    for col in ("metric", "first", "last", "best", "best at step"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, direction in _metric_order(keys):
        pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), int | float)]
        pts = [p for p in pts if not math.isnan(p[1])]
        if not pts:
            continue
        best = ("", "")
        if direction is not None:
            pick = max if direction == "max" else min
            step, value = pick(pts, key=lambda p: p[1])
            best = (_fmt(value), str(step + 1))
        table.add_row(key, _fmt(pts[0][1]), _fmt(pts[-1][1]), *best)
    console.print(table)

    total = sum(float(r["step_time"]) for r in rows if isinstance(r.get("step_time"), int | float))
    if total > 0:
        console.print(f"training time (sum of step_time): {format_duration(total)}")
    for ev in read_eval(args.run_dir)[-3:]:
        parts = ", ".join(
            f"{k} {_fmt(float(v))}" for k, v in ev.items() if k != "step" and isinstance(v, int | float)
        )
        console.print(f"eval after {ev['step']} GRPO steps: {parts}")
    category_table(read_eval(args.run_dir), console)
    out = plot_run(args.run_dir, args.out)
    console.print(f"curves: {out}")
    return 0


def category_table(evals: list[dict[str, Any]], console: Any) -> None:
    """Held-out accuracy per category at the first and last evaluation (greedy ± se, sampled)."""
    from rich.table import Table

    with_cats = [e for e in evals if e.get("by_category")]
    if not with_cats:
        return
    first, last = with_cats[0], with_cats[-1]
    table = Table(title=f"held-out accuracy by category (after {first['step']} -> after {last['step']} GRPO steps)")
    for col in ("category", "clips", "greedy before", "greedy after", "sampled before", "sampled after", "sampled gain"):
        table.add_column(col, justify="left" if col == "category" else "right")
    for name, a in first["by_category"].items():
        b = last["by_category"].get(name)
        if b is None:
            continue
        table.add_row(name, str(int(b["n"])), f"{a['accuracy']:.3f} ± {a['accuracy_stderr']:.3f}",
                      f"{b['accuracy']:.3f} ± {b['accuracy_stderr']:.3f}", _with_se(a, "sampled_accuracy"),
                      _with_se(b, "sampled_accuracy"), f"{b['sampled_accuracy'] - a['sampled_accuracy']:+.3f}")
    console.print(table)


def _with_se(row: dict[str, Any], key: str) -> str:
    se = row.get(f"{key}_stderr")
    return f"{row[key]:.3f}" + (f" ± {se:.3f}" if isinstance(se, int | float) else "")
