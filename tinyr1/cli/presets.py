"""`tinyr1 presets`: list the shipped presets and show every resolved value with its meaning."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

ORDER = 80

LIST_HELP = """\
List the presets (tinyr1/presets/*.toml, shipped with the package) with their key numbers.

Columns: G = completions per prompt, frames per video, max new tokens per completion,
micro-batch = completions per backward pass, LoRA rank.

Example:
  tinyr1 presets list
"""

SHOW_HELP = """\
Show every resolved value of a preset (or a TOML file / run folder), grouped by section, with a
one-line description of each field. Values that differ from the built-in default are bold.

Examples:
  tinyr1 presets show 24gb
  tinyr1 presets show 12gb --set rollout.num_generations=6 --set train.micro_batch_size=3
  tinyr1 presets show my_run.toml          # a TOML may start with: base = "24gb"
  tinyr1 presets show 24gb --toml > my.toml   # a fully resolved file to edit
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "presets",
        help="list presets / show a preset's resolved configuration",
        description="Presets are TOML files in tinyr1/presets/ that map one to one onto the config sections.\n\n"
        "Examples:\n  tinyr1 presets list\n  tinyr1 presets show 24gb",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="presets_command", metavar="ACTION", required=True)
    lst = sub.add_parser(
        "list", help="table of presets and their key numbers", description=LIST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    lst.set_defaults(func=_list)
    show = sub.add_parser(
        "show", help="every resolved value, explained", description=SHOW_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    show.add_argument("name", metavar="NAME", help="preset name, TOML path or run folder")
    show.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one value (repeatable), as in `tinyr1 train`",
    )  # fmt: skip
    show.add_argument("--toml", action="store_true", help="print the resolved TOML instead of a table")
    show.set_defaults(func=_show)


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tinyr1.config_io import list_presets, load_config
    from tinyr1.errors import ConfigError

    table = Table(title="tinyr1 presets", title_justify="left")
    for col in ("name", "G", "frames", "new tokens", "micro-batch", "LoRA r", "description"):
        table.add_column(col, justify="right" if col not in ("name", "description") else "left")
    broken = []
    for name, description in list_presets():
        try:
            cfg = load_config(name)
        except ConfigError as err:
            broken.append(str(err))
            table.add_row(name, "-", "-", "-", "-", "-", "[red]invalid (see below)[/]")
            continue
        frames = f"{cfg.video.fps:g} fps" if cfg.video.fps is not None else str(cfg.video.num_frames)
        table.add_row(
            name, str(cfg.rollout.num_generations), frames, str(cfg.rollout.max_new_tokens),
            str(cfg.train.micro_batch_size), str(cfg.lora.r), description,
        )  # fmt: skip
    console = Console()
    console.print(table)
    for err in broken:
        Console(stderr=True).print(err, markup=False, highlight=False)
    return 1 if broken else 0


def _show(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tinyr1.config_io import config_to_toml, load_config

    cfg = load_config(args.name, args.overrides)
    if args.toml:
        print(config_to_toml(cfg), end="")
        return 0
    Console().print(show_table(cfg))
    return 0


def show_table(cfg: Any) -> Any:
    """A rich table of every field: section, key, value (bold where it differs from the default), help."""
    from rich.markup import escape
    from rich.table import Table

    from tinyr1.config import SECTIONS, TABLE_FIELDS

    title = f"preset {cfg.preset}" + (f": {cfg.description}" if cfg.description else "")
    table = Table(title=escape(title), title_justify="left", show_lines=False)
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("meaning")
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        default = cls()
        table.add_section()
        table.add_row(f"[bold cyan]{name}[/]", "", "")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if name in TABLE_FIELDS and f.name == TABLE_FIELDS[name]:
                for key, weight in value.items():
                    table.add_row(
                        f"  {escape(key)}", f"{weight:g}", escape(f"reward weight ({f.metadata['help']})")
                    )
                continue
            shown = escape(_fmt(value))
            if value != getattr(default, f.name):
                shown = f"[bold]{shown}[/]"
            table.add_row(f"  {f.name}", shown, escape(f.metadata.get("help", "")))
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)
