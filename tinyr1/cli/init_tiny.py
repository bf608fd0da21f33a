"""`tinyr1 init-tiny OUT_DIR`: a tiny random TinyLLaVA-Video checkpoint in the original layout."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ORDER = 45

DESCRIPTION = """\
Write a tiny, randomly initialised TinyLLaVA-Video checkpoint into OUT_DIR, in exactly the
on-disk layout of the released models (config.json with text_config/vision_config,
safetensors with the original key names, generation_config.json, slow Qwen2 tokenizer files).
It loads through the same code as a real checkpoint, so it is the model for CPU demos, tests
and trying a pipeline before downloading 3B weights.

The model: SigLIP 64 wide x 3 layers (patch 8), a group resampler with 4 tokens per frame,
Qwen2 128 wide x 4 layers, a ~500-token BPE tokenizer trained offline.

Examples:
  tinyr1 init-tiny ckpt/tiny
  tinyr1 init-tiny ckpt/tiny16 --frames 16 --image-size 64 --seed 1
  tinyr1 train --preset tiny --set model.path=ckpt/tiny
"""

# Files a checkpoint folder consists of; --force removes only these (never anything else).
_CHECKPOINT_GLOBS = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json",
)
PATCH = 8  # the tiny SigLIP's patch size
PARTS = (("vision tower", "vision_tower."), ("connector", "connector."), ("language model", "language_model."))


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "init-tiny", help="write a tiny random checkpoint (original layout) for demos and tests",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to create (must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed; same seed, same weights (default 0)")
    parser.add_argument("--frames", type=int, default=8,
                        help="frames per video = resampler groups; 4 video tokens per frame (default 8)")
    parser.add_argument("--image-size", type=int, default=32, metavar="PX",
                        help=f"vision input size in pixels, a multiple of {PATCH}, at least {2 * PATCH} (default 32)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty OUT_DIR, replacing its checkpoint files (others are kept)")
    parser.set_defaults(func=handler)


def _check_args(args: argparse.Namespace) -> None:
    from tinyr1.errors import CheckpointError, ConfigError

    if args.frames < 1:
        raise ConfigError(f"--frames {args.frames}: need at least 1 frame")
    if args.image_size < 2 * PATCH or args.image_size % PATCH:
        raise ConfigError(
            f"--image-size {args.image_size}: must be a multiple of the patch size {PATCH} and at least "
            f"{2 * PATCH} (e.g. 32 or 64)"
        )
    out: Path = args.out_dir
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder; choose another OUT_DIR")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise CheckpointError(
            f"{out} is not empty; choose a new folder, or pass --force to replace the checkpoint files in it"
        )


def _remove_old_checkpoint(out: Path) -> list[str]:
    """Stale files would mix with the new ones (an old shard index would win over model.safetensors)."""
    removed = []
    for pattern in _CHECKPOINT_GLOBS:
        for f in out.glob(pattern):
            if f.is_file():
                f.unlink()
                removed.append(f.name)
    return sorted(removed)


def parameter_counts(out: Path) -> dict[str, tuple[int, int]]:
    """part -> (tensors, parameters) as stored on disk (the tied lm_head is not stored)."""
    from safetensors import safe_open

    from tinyr1.model.loading import weight_files

    counts = {name: (0, 0) for name, _ in PARTS}
    for f in weight_files(out):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                numel = 1
                for n in fh.get_slice(key).get_shape():
                    numel *= n
                part = next(name for name, prefix in PARTS if key.startswith(prefix))
                tensors, params = counts[part]
                counts[part] = (tensors + 1, params + numel)
    return counts


def handler(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tinyr1.model.writing import write_tiny_checkpoint

    _check_args(args)
    out: Path = args.out_dir
    console = Console()
    removed = _remove_old_checkpoint(out) if out.is_dir() else []
    with console.status(f"writing a tiny checkpoint to {out} ..."):
        write_tiny_checkpoint(out, seed=args.seed, frames=args.frames, image_size=args.image_size)
    if removed:
        console.print(f"--force: replaced {len(removed)} old checkpoint files in {out}")

    table = Table(title=f"tiny TinyLLaVA-Video in {out}", title_justify="left")
    table.add_column("part")
    table.add_column("tensors", justify="right")
    table.add_column("parameters", justify="right")
    counts = parameter_counts(out)
    for part, (tensors, params) in counts.items():
        table.add_row(part, str(tensors), f"{params:,}")
    total = sum(p for _, p in counts.values())
    table.add_row("total", str(sum(t for t, _ in counts.values())), f"{total:,}", style="bold")
    console.print(table)
    files = sorted(p for p in out.iterdir() if p.is_file())
    console.print("files: " + ", ".join(f"{p.name} ({p.stat().st_size / 1024:.0f} KiB)" for p in files),
                  highlight=False)
    console.print(f"{args.frames} frames of {args.image_size}x{args.image_size} px -> "
                  f"{4 * args.frames} video tokens; seed {args.seed}. "
                  f"Use it: tinyr1 train --preset tiny --set model.path={out}", highlight=False)
    return 0
