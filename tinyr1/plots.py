"""Curves of a run as a PNG: reward, accuracy (training and held-out), completion length, KL, and
held-out accuracy per question category when the evaluations have categories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinyr1.log import ACCURACY_KEYS, read_eval, read_metrics


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows if key in r and isinstance(r[key], int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _smooth(values: list[float]) -> list[float]:
    """Trailing moving average over ~5% of the run: RL curves are noisy step to step."""
    window = max(1, len(values) // 20)
    out, acc, buf = [], 0.0, []
    for v in values:
        buf.append(v)
        acc += v
        if len(buf) > window:
            acc -= buf.pop(0)
        out.append(acc / len(buf))
    return out


def _draw(ax: Any, rows: list[dict[str, Any]], keys: list[str], title: str) -> bool:
    drawn = False
    for key in keys:
        steps, values = _series(rows, key)
        if not steps:
            continue
        xs = [s + 1 for s in steps]
        if len(values) > 20:
            line = ax.plot(xs, values, alpha=0.3, linewidth=0.8)[0]
            ax.plot(xs, _smooth(values), color=line.get_color(), linewidth=1.8, label=key)
        else:
            ax.plot(xs, values, marker="o", markersize=3, label=key)
        drawn = True
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    return drawn


def _not_logged(ax: Any, title: str, what: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, f"not logged\n({what})", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_categories(ax: Any, evals: list[dict[str, Any]], categories: list[str]) -> None:
    """Held-out accuracy per category after each evaluation: greedy solid, sampled dotted, one
    colour per category."""
    for name in categories:
        rows = [(r["step"], r["by_category"][name]) for r in evals if name in (r.get("by_category") or {})]
        steps = [step for step, _ in rows]
        line = ax.plot(steps, [c["accuracy"] for _, c in rows], "s-", markersize=4, label=f"{name} (greedy)")[0]
        ax.plot(steps, [c["sampled_accuracy"] for _, c in rows], "o:", color=line.get_color(), markersize=3,
                label=f"{name} (sampled)")
    ax.set_title("held-out accuracy by category (step 0 = after the cold start)")
    ax.set_xlabel("GRPO steps")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, len(categories)))


def plot_run(run_dir: Path | str, out_png: Path | str | None = None) -> Path:
    """Draw reward, accuracy, completion length and KL curves of a run to a PNG; returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    evals = read_eval(run_dir)
    out = Path(out_png) if out_png is not None else run_dir / "curves.png"
    categories = list(dict.fromkeys(c for r in evals for c in (r.get("by_category") or {})))
    fig = Figure(figsize=(11, 11 if categories else 7.5), dpi=110)
    FigureCanvasAgg(fig)
    if categories:  # a third, wide panel: held-out accuracy per question category
        grid = fig.add_gridspec(3, 2)
        axes = [[fig.add_subplot(grid[i, j]) for j in range(2)] for i in range(2)]
        _draw_categories(fig.add_subplot(grid[2, :]), evals, categories)
    else:
        axes = fig.subplots(2, 2)
    keys = sorted({k for r in rows for k in r})

    reward_keys = ["reward"] + [k for k in keys if k.startswith("rewards/") and k.endswith("/mean")]
    if _draw(axes[0][0], rows, reward_keys, "reward"):
        axes[0][0].legend(fontsize=7)
    else:
        _not_logged(axes[0][0], "reward", "reward")

    acc_key = next((k for k in ACCURACY_KEYS if k in keys), None)
    ax = axes[0][1]
    drawn = _draw(ax, rows, [acc_key], "accuracy") if acc_key else False
    # eval rows count GRPO steps done (0 = after the cold start), like the metric x axis (step + 1)
    for key, style, label in (("accuracy", "s--", "eval accuracy (greedy)"),
                              ("sampled_accuracy", "o:", "eval accuracy (sampled)")):
        eval_steps, eval_acc = _series(evals, key)
        if eval_steps:
            ax.plot(eval_steps, eval_acc, style, color="black", label=label)
            ax.set_title("accuracy")
            drawn = True
    if drawn:
        ax.legend(fontsize=7)
    else:
        _not_logged(ax, "accuracy", " or ".join(ACCURACY_KEYS))

    if not _draw(axes[1][0], rows, ["completions/mean_length"], "completion length (tokens)"):
        _not_logged(axes[1][0], "completion length", "completions/mean_length")
    if not _draw(axes[1][1], rows, ["kl"], "KL to reference"):
        _not_logged(axes[1][1], "KL to reference", "kl; beta = 0 runs have no reference")

    fig.suptitle(f"{run_dir.resolve().name}: {len(rows)} steps")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
