"""The `tinyr1` command line.

Each sibling module of this package adds one command group: it defines `ORDER: int` (position in
`--help`) and `register(subparsers)`, which adds its parser and sets `func(args) -> int`. Heavy
imports (torch, transformers) happen inside the handlers so `tinyr1 --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from tinyr1 import __version__
from tinyr1.cpu import configure_cpu_env
from tinyr1.errors import TinyR1Error

DESCRIPTION = """\
tinyr1 - reinforce a small video language model's reasoning with GRPO on one GPU.

Typical session:
  tinyr1 train --preset tiny                       # CPU demo: synthetic videos, tiny model
  tinyr1 train --preset tiny-video                 # CPU demo of questions one frame cannot answer
  tinyr1 doctor                                    # is this machine ready? versions, GPU kernels, 2 GRPO steps
  tinyr1 presets list                              # what presets exist
  tinyr1 presets show 24gb                         # every resolved value, explained
  tinyr1 train --preset 24gb --set data.train=nextqa.jsonl --set data.video_root=videos/
  tinyr1 train --preset auto --set data.train=nextqa.jsonl --set data.video_root=videos/
                                                   # the largest GPU preset that fits this GPU
"""


def _command_modules() -> list:
    mods = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "register"):
            mods.append(mod)
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyr1", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"tinyr1 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in _command_modules():
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_cpu_env()  # before any command imports torch: OpenMP reads its wait policy once
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TinyR1Error as err:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        return 2
    except KeyboardInterrupt:  # outside a training loop (which saves and exits 130 itself)
        print("interrupted", file=sys.stderr)
        return 130
