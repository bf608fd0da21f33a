"""`tinyr1 data`: write the synthetic dataset, check a dataset before a long run."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

ORDER = 40

_DESCRIPTION = """\
Datasets: create the synthetic demo set, or check a real one before training.

  synth   writes real H.264 clips of simple scenes with a verifiable answer (colour, count,
          position of a square, which one frame shows; or its first / last colour, direction of
          motion, number of colour changes, which need several frames), a GRPO JSONL in the paper's format (train.jsonl),
          a cold-start JSON (coldstart.json) and a held-out eval set (eval.jsonl).
  check   validates every row and opens every video; prints counts, durations, frame counts
          and the answer-letter balance, lists every bad row/video; exit code 1 if any is bad.

Examples:
  tinyr1 data synth data/synth --n 2000 --seed 0
  tinyr1 data synth data/mix --n 1000 --tasks color,count,position --eval-n 200
  tinyr1 data synth data/time --n 2000 --tasks temporal    # first,last,direction,changes
  tinyr1 data check data/synth/train.jsonl
  tinyr1 data check nextqa_0-30s.jsonl --video-root videos/
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "data", help="create synthetic data, check a dataset", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = sub.add_parser(
        "synth", help="write the synthetic video QA set", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write synthetic clips + train.jsonl, coldstart.json, eval.jsonl into OUT_DIR.\n\n"
        "Example:\n  tinyr1 data synth data/synth --n 2000 --seed 0 --tasks color",
    )
    synth.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (new or empty unless --force)")
    synth.add_argument("--force", action="store_true", help="write into OUT_DIR even if it holds files (they may be "
                       "overwritten)")
    synth.add_argument("--n", type=int, default=2000, help="training clips (default 2000)")
    synth.add_argument("--seed", type=int, default=0, help="seed; the same seed writes the same data (default 0)")
    synth.add_argument("--tasks", default="color",
                       help="comma-separated tasks: color, count, position (one frame answers them); first, last, "
                       "direction, changes (they need several frames); temporal = those four (default color)")
    synth.add_argument("--frames", type=int, default=8, help="frames per clip (default 8)")
    synth.add_argument("--size", type=int, default=32, help="frame width = height in pixels, even (default 32)")
    synth.add_argument("--eval-n", type=int, default=500, help="held-out eval clips (default 500)")
    synth.add_argument("--coldstart-n", type=int, default=64, help="cold-start SFT clips (default 64)")
    synth.set_defaults(func=_synth)

    check = sub.add_parser(
        "check", help="validate rows and open every video", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate every row of FILE and decode every video it names.\n\n"
        "Examples:\n  tinyr1 data check data/synth/train.jsonl\n"
        "  tinyr1 data check nextqa.jsonl --video-root videos/ --frames 16",
    )
    check.add_argument("file", metavar="FILE", help="dataset file (.jsonl or .json)")
    check.add_argument("--video-root", default=None,
                       help="folder relative video paths are resolved against (default: FILE's folder)")
    check.add_argument("--format", dest="fmt", default="auto", choices=["auto", "r1", "llava", "generic"],
                       help="row format (default: detected from the first row)")
    check.add_argument("--frames", type=int, default=16, help="frames to decode per video (default 16)")
    check.set_defaults(func=_check)

    probe = sub.add_parser(
        "probe", help="does one frame answer the questions? (linear probe on the vision features)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fit a linear probe per task on the model's frozen vision features, from ONE frame chosen at\n"
        "random and from ALL frames in order, on TRAIN; score both on EVAL. A video question leaves\n"
        "the one-frame probe near chance; the all-frames probe is the control that the evidence is\n"
        "in the features at all.\n\n"
        "Example:\n  tinyr1 data probe data/time/train.jsonl data/time/eval.jsonl --model .tinyr1_cache/tiny-video/model",
    )
    probe.add_argument("train", metavar="TRAIN", help="dataset the probes are fit on (.jsonl / .json)")
    probe.add_argument("eval", metavar="EVAL", help="held-out dataset they are scored on")
    probe.add_argument("--model", required=True, help="checkpoint folder whose vision tower gives the features")
    probe.add_argument("--video-root", default=None, help="folder relative video paths resolve against "
                       "(default: each file's folder)")
    probe.add_argument("--frames", type=int, default=8, help="frames per clip (default 8)")
    probe.add_argument("--limit", type=int, default=0, help="use at most this many training rows (0 = all)")
    probe.set_defaults(func=_probe)


def _synth(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tinyr1.synth import write_synthetic

    console = Console()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    start = time.perf_counter()
    with console.status(f"writing {args.n + args.eval_n + args.coldstart_n} clips to {args.out_dir} ..."):
        paths = write_synthetic(args.out_dir, args.n, args.seed, tasks=tasks, frames=args.frames, size=args.size,
                                eval_n=args.eval_n, coldstart_n=args.coldstart_n, overwrite=args.force)
    elapsed = time.perf_counter() - start
    console.print(f"wrote {args.n} train, {args.coldstart_n} cold-start and {args.eval_n} eval clips "
                  f"({', '.join(tasks)}; {args.frames} frames of {args.size}x{args.size}) in {elapsed:.1f} s")
    for name, path in paths.items():
        console.print(f"  {name:<10} {path}")
    return 0


def _stats(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    vals = sorted(values)
    return f"min {vals[0]:{fmt}} / median {vals[len(vals) // 2]:{fmt}} / max {vals[-1]:{fmt}}"


def _open_videos(samples: list[Any], frames: int) -> dict[str, tuple[str, Any]]:
    """Decode every distinct video once: path -> ("ok", VideoInfo) | ("missing"|"corrupt", reason)."""
    from rich.progress import Progress

    from tinyr1.errors import VideoError
    from tinyr1.video import decode_frames

    results: dict[str, tuple[str, Any]] = {}
    paths = list(dict.fromkeys(str(s.video) for s in samples))
    with Progress(transient=True) as progress:
        bar = progress.add_task("opening videos", total=len(paths))
        for p in paths:
            if not Path(p).exists():
                results[p] = ("missing", "file not found")
            else:
                try:
                    _, _, info = decode_frames(p, frames)
                    results[p] = ("ok", info)
                except VideoError as err:
                    results[p] = ("corrupt", str(err).split(": ", 1)[-1])
            progress.advance(bar)
    return results


def _check(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tinyr1.data import scan_dataset
    from tinyr1.errors import ConfigError

    if args.frames < 1:
        raise ConfigError(f"--frames must be at least 1, got {args.frames}")
    console = Console()
    samples, problems = scan_dataset(args.file, video_root=args.video_root, fmt=args.fmt)
    if not samples and not problems:
        console.print(f"[red]{args.file}: the dataset has no rows[/]: nothing to train or evaluate on")
        return 1
    videos = _open_videos(samples, args.frames)
    kinds = Counter(videos[str(s.video)][0] for s in samples)
    ok_infos = [videos[str(s.video)][1] for s in samples if videos[str(s.video)][0] == "ok"]
    letters = Counter(s.answer for s in samples)
    balance = "  ".join(f"{k} {v} ({v / max(len(samples), 1):.0%})" for k, v in sorted(letters.items()))

    table = Table(title=f"data check: {args.file}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("rows", str(len(samples) + len(problems)))
    table.add_row("OK", f"[green]{kinds['ok']}[/]")
    for kind, n in (("missing", kinds["missing"]), ("corrupt", kinds["corrupt"]), ("malformed", len(problems))):
        table.add_row(kind, f"[red]{n}[/]" if n else "0")
    table.add_row("distinct videos", str(len(videos)))
    table.add_row("duration (s)", _stats([i.duration for i in ok_infos], ".1f"))
    table.add_row("frames", _stats([float(i.num_frames) for i in ok_infos], ".0f"))
    table.add_row("answer letters", balance or "-")
    console.print(table)

    bad = Table(title="unusable rows", show_lines=False)
    bad.add_column("kind", style="red")
    bad.add_column("where")
    bad.add_column("why")
    for p in problems:
        bad.add_row("malformed", f"{p.file}:{p.line}", p.message)
    for s in samples:
        kind, detail = videos[str(s.video)]
        if kind != "ok":
            bad.add_row(kind, f"{s.id}: {s.video}", detail)
    if bad.row_count:
        console.print(bad)
        console.print(f"[red]{bad.row_count} unusable row(s)[/]: fix or remove them; a training run skips "
                      f"bad videos and stops when more than data.max_bad_fraction of them are bad")
        return 1
    console.print("[green]all rows and videos are usable[/]")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tinyr1.data import load_dataset
    from tinyr1.frame_probe import probe_tasks
    from tinyr1.model.loading import load_tinyllava
    from tinyr1.video import load_frames

    console = Console()
    train = load_dataset(args.train, video_root=args.video_root)
    held_out = load_dataset(args.eval, video_root=args.video_root)
    if args.limit:
        train = train[: args.limit]
    model = load_tinyllava(args.model, device="cpu", dtype="fp32", load_tokenizer=False).model
    size = model.cfg.image_size
    with console.status(f"probing {len(train)} training and {len(held_out)} held-out clips ..."):
        results = probe_tasks(model, train, held_out, lambda s: load_frames(s.video, args.frames, size))
    table = Table(title=f"linear probe on the vision features: held-out accuracy ± se ({args.frames} frames)")
    for col in ("task", "category", "chance", "1 frame", "all frames", "train/eval"):
        table.add_column(col, justify="left" if col in ("task", "category") else "right")
    for r in results:
        table.add_row(r.task, r.category, f"{r.chance:.2f}", f"{r.one_frame:.3f} ± {r.one_frame_stderr:.3f}",
                      f"{r.all_frames:.3f} ± {r.all_frames_stderr:.3f}", f"{r.n_train}/{r.n_eval}")
    console.print(table)
    return 0
