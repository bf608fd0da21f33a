"""`tinyr1 eval`: multiple-choice accuracy of a checkpoint (+ adapter) on a dataset file."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from tinyr1.cli._args import add_loading_args, add_model_args, add_sampling_args

ORDER = 30

DESCRIPTION = """\
Multiple-choice evaluation on any dataset format tinyr1 reads (the paper's GRPO JSONL, LLaVA-style
JSON, or generic JSONL with video/question/options/answer). The prompt is the R1 evaluation prompt
(question, options, then the think/answer instruction on a new line). Generation is greedy and
deterministic unless --temperature is given. The prediction is the first letter of the <answer>
text; a missing or invalid answer counts as wrong (the original scripts substitute a random letter).

Writes one JSON line per completion to --out (id, answer, prediction, completion, correct,
formatted, think_chars, num_tokens, category) and a summary next to it (preds.jsonl -> preds.summary.json),
and prints accuracy, format rate, mean think length, and accuracy by category when rows have one
(`category`, `task`, `task_type`, ...). Rows with a missing or unreadable video are listed and skipped.
"""

EPILOG = """\
examples:
  tinyr1 eval --model ckpt/ --adapter runs/x/final --data mvbench.jsonl --video-root mvbench/videos
  tinyr1 eval --model release/ --data videomme.jsonl --limit 200 --batch-size 4 --out vmme.jsonl
  tinyr1 eval --model .tinyr1_cache/tiny/model --adapter runs/tiny-*/final \\
      --data .tinyr1_cache/tiny/data/eval.jsonl --max-new-tokens 48
  tinyr1 eval ... --temperature 1.0 --num-samples 4     # sampled accuracy (what GRPO optimizes)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="multiple-choice accuracy on a dataset file", description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="FILE", help="dataset file (.jsonl or .json)")
    p.add_argument("--video-root", metavar="DIR", help="folder relative video paths are resolved against")
    p.add_argument("--format", default="auto", choices=["auto", "r1", "llava", "generic"], help="row format")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N rows")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="questions generated together (default 8)")
    p.add_argument("--frames", type=int, metavar="T", help="frames per video (default: the model's group, 16)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="longest completion (default 1024, as R1)")
    p.add_argument("--num-samples", type=int, default=1, help="completions per question when sampling")
    p.add_argument("--out", metavar="FILE", help="per-completion JSONL (default: DATA_STEM.preds.jsonl here)")
    add_sampling_args(p)
    add_loading_args(p)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    from tinyr1.errors import ConfigError

    for name in ("limit", "batch_size", "frames", "max_new_tokens", "num_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.num_samples > 1 and args.temperature <= 0:
        raise ConfigError("--num-samples > 1 needs --temperature > 0 (greedy completions would all be equal)")


def output_path(args: argparse.Namespace) -> Path:
    """Where the predictions go, checked before any work: a writable folder, and never over a file
    that is not an earlier `tinyr1 eval` output (its summary beside it) or over the data itself."""
    from tinyr1.errors import ConfigError
    from tinyr1.storage import check_writable

    out = Path(args.out) if args.out else Path(f"{Path(args.data).stem}.preds.jsonl")
    if out.exists() and out.resolve() == Path(args.data).resolve():
        raise ConfigError(f"--out {out} is the --data file; choose another file for the predictions")
    if out.exists() and (not out.is_file() or not summary_path(out).is_file()):
        raise ConfigError(f"--out {out} exists and is not an earlier `tinyr1 eval` output (no "
                          f"{summary_path(out).name} beside it); choose another file, or delete it first")
    check_writable(out.parent, "--out folder")
    return out


def summary_path(out: Path) -> Path:
    return out.with_name(out.stem + ".summary.json")


def read_samples(args: argparse.Namespace, console: Any) -> list[Any]:
    """Readable rows of --data (malformed rows are listed and skipped), cut to --limit."""
    from rich.markup import escape

    from tinyr1.data import scan_dataset
    from tinyr1.errors import DataError

    samples, problems = scan_dataset(args.data, video_root=args.video_root, fmt=args.format)
    for prob in problems[:20]:
        console.print(f"[yellow]skipped row[/] {escape(str(prob))}")
    if len(problems) > 20:
        console.print(f"[yellow]... and {len(problems) - 20} more malformed rows skipped[/]")
    if not samples:
        raise DataError(f"{args.data}: no readable rows to evaluate (`tinyr1 data check {args.data}` lists problems)")
    return samples[: args.limit] if args.limit else samples


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from tinyr1.evaluate import evaluate, load_for_inference
    from tinyr1.video import load_frames

    _check_args(args)
    out = output_path(args)  # before minutes of evaluation
    console = Console()
    samples = read_samples(args, console)
    loaded = load_for_inference(args.model, args.adapter, quant=args.quant, dtype=args.dtype, device=args.device)
    frames = args.frames or loaded.cfg.group
    size = loaded.cfg.image_size

    def load(sample: Any) -> Any:
        return load_frames(sample.video, frames, size)  # [T, 3, S, S]

    columns = (TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("eval", total=len(samples))
        result = evaluate(
            loaded.model, loaded.tokenizer, samples, load_frames=load, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, temperature=args.temperature, num_samples=args.num_samples,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, prompt_mode=args.prompt,
            on_batch=lambda n: bar.update(task, advance=n),
        )
    for msg in result.skipped:
        console.print(f"[yellow]skipped (video)[/] {escape(msg)}")
    write_outputs(out, result, args, frames)
    print_summary(console, result, out)
    return 0


def write_outputs(out: Path, result: Any, args: argparse.Namespace, frames: int) -> Path:
    """OUT (one line per completion) and OUT.summary.json (what `tinyr1 merge --eval` reads), each
    written to a temporary file and renamed: a full disk leaves the earlier files, named."""
    from tinyr1.storage import disk_error

    summary = {"data": str(args.data), "model": str(args.model), "adapter": args.adapter, "frames": frames,
               "prompt": args.prompt, "temperature": args.temperature, "num_samples": args.num_samples,
               **result.summary(), "skipped_rows": result.skipped}
    texts = {out: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows),
             summary_path(out): json.dumps(summary, indent=2) + "\n"}
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in texts.items():
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            named = disk_error(err, path, need_bytes=len(text.encode()), what="writing the evaluation results")
            if named is None:
                raise
            raise named from err
    return summary_path(out)


def print_summary(console: Any, result: Any, out: Path) -> None:
    from rich.table import Table

    table = Table(title="evaluation", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("questions", str(result.n))
    table.add_row("skipped (unreadable video)", str(len(result.skipped)))
    table.add_row("accuracy", f"{result.accuracy:.4f} ± {result.stderr:.4f}")
    table.add_row("format rate", f"{result.format_rate:.4f}")
    table.add_row("mean think length (chars)", f"{result.mean_think_chars:.1f}")
    table.add_row("mean completion (tokens)", f"{result.mean_tokens:.1f}")
    console.print(table)
    cats = result.by_category()
    if cats:
        by = Table(title="by category")
        for col in ("category", "n", "accuracy", "format rate"):
            by.add_column(col, justify="left" if col == "category" else "right")
        for name, c in cats.items():
            by.add_row(name, str(int(c["n"])), f"{c['accuracy']:.4f}", f"{c['format_rate']:.4f}")
        console.print(by)
    console.print(f"per-sample results: {out}  summary: {summary_path(out)}")
