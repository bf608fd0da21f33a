"""Reading and writing configs: presets, TOML files with `base` inheritance, --set, run folders.

`load_config` finds the source (preset name, TOML path or run folder), merges its `base` chain key
by key while remembering where each value came from (file:line), applies `--set` overrides and
hands the result to `config_validate.build_config`. `save_config` writes the fully resolved TOML a
run folder keeps, which `load_config` reads back to the same `Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from tinyr1.config import SECTIONS, TABLE_FIELDS, Config, Origins
from tinyr1.config_validate import build_config, parse_overrides
from tinyr1.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PRESETS_DIR = Path(__file__).resolve().parent / "presets"  # package data: works in any install


# ---------------------------------------------------------------- reading TOML with origins


def _show_path(path: Path) -> str:
    """The path as messages show it: relative to the working directory when it lies inside."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _key_lines(text: str) -> dict[tuple[str, str], int]:
    """Line of each `key =` per section; tomllib gives no positions, messages want them."""
    lines: dict[tuple[str, str], int] = {}
    section = ""
    for no, line in enumerate(text.splitlines(), start=1):
        head = re.match(r"\s*\[\s*([^\]]+?)\s*\]", line)
        if head:
            section = head.group(1).strip("\"'")
            lines.setdefault(("", section), no)
            continue
        kv = re.match(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_.:-]+)\s*=""", line)
        if kv:
            lines.setdefault((section, kv.group(1).strip("\"'")), no)
    return lines


def preset_path(name: str) -> Path:
    """Where the preset `name` lives (it may not exist)."""
    return PRESETS_DIR / f"{name}.toml"


def _resolve_source(source: str, relative_to: Path | None = None) -> Path:
    """A preset name, a TOML path, or a run folder holding config.toml."""
    path = Path(source)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.is_dir() and (path / "config.toml").is_file():
        return path / "config.toml"
    if path.is_file():
        return path
    if "/" not in source and not source.endswith(".toml") and preset_path(source).is_file():
        return preset_path(source)
    names = [n for n, _ in list_presets()]
    near = difflib.get_close_matches(source, names, n=1, cutoff=0.5)
    hint = f"did you mean '{near[0]}'? " if near else ""
    raise ConfigError(
        f"no preset or TOML file '{source}'; {hint}presets: {', '.join(names)} "
        f"(a path must point to a .toml file or a run folder with config.toml)"
    )


def _read_text(path: Path) -> str:
    """A TOML file's text; unreadable or non-UTF-8 files are a ConfigError naming the byte and line."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{_show_path(path)}: cannot read: {err.strerror or err}") from err
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"{_show_path(path)}: not UTF-8 text (byte 0x{raw[err.start]:02x} at line {line}); TOML files must be "
            "UTF-8: re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _read_toml(path: Path, text: str | None = None) -> dict[str, Any]:
    try:
        return tomllib.loads(_read_text(path) if text is None else text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{_show_path(path)}: not valid TOML: {err}; fix the syntax there") from err


def _load_raw(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Origins]:
    """Read a TOML and, via `base = ...`, the files it inherits; later files win key by key."""
    if path.resolve() in chain:
        loop = " -> ".join(_show_path(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"{_show_path(path)}: `base` forms a loop ({loop}); remove one `base`")
    text = _read_text(path)
    data = _read_toml(path, text)
    lines = _key_lines(text)
    shown = _show_path(path)
    merged: dict[str, Any] = {}
    origins: Origins = {}
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{shown}: base must be a preset name or a TOML path (a string), got {base!r}")
        merged, origins = _load_raw(_resolve_source(base, path.parent), (*chain, path.resolve()))
        merged.pop("preset", None)
        merged.pop("description", None)
        for name in TABLE_FIELDS:  # a child's [rewards] adds to what it inherits, default included
            merged.setdefault(name, dict(getattr(SECTIONS[name](), TABLE_FIELDS[name])))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
        origins[("", key)] = f"{shown}:{lines.get(('', key), '?')}"
        if isinstance(value, dict):
            for sub in value:
                origins[(key, sub)] = f"{shown}:{lines.get((key, sub), '?')}"
    return merged, origins


def _header_description(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            if text:
                return text
        elif line.strip():
            break
    return ""


# ---------------------------------------------------------------- public API


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every presets/*.toml: tiny first, then by card size, then the rest."""

    def order(name: str) -> tuple[int, int, str]:
        gb = re.fullmatch(r"(\d+)gb", name)
        return (0, 0, name) if name == "tiny" else (1, int(gb.group(1)), name) if gb else (2, 0, name)

    out = []
    for path in sorted(PRESETS_DIR.glob("*.toml"), key=lambda p: order(p.stem)):
        try:
            desc = tomllib.loads(path.read_text(encoding="utf-8")).get("description", "")
        except tomllib.TOMLDecodeError:
            desc = ""
        out.append((path.stem, str(desc) if desc else _header_description(path)))
    return out


def load_config(preset_or_path: str, overrides: list[str] | None = None) -> Config:
    """Preset name, TOML path or run folder -> validated Config; raises one ConfigError listing every problem."""
    path = _resolve_source(preset_or_path)
    data, origins = _load_raw(path)
    is_preset = path.parent.resolve() == PRESETS_DIR.resolve() and path.stem == preset_or_path
    name = preset_or_path if is_preset else path.stem if path.name != "config.toml" else path.parent.name
    problems = parse_overrides(overrides or [], data, origins)
    label = (f"preset {name}" if is_preset else _show_path(path)) + (" + --set" if overrides else "")
    return build_config(
        data, origins, default_name=str(data.get("preset", name)), label=label, problems=problems
    )


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`section.key=value` strings applied to an existing config, re-validated as a whole."""
    data = config_to_dict(cfg)
    origins: Origins = {}
    problems = parse_overrides(overrides, data, origins)
    return build_config(
        data,
        origins,
        default_name=cfg.preset,
        label=cfg.preset + (" + --set" if overrides else ""),
        problems=problems,
    )


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain dict {section: {key: value}} plus `preset` and `description`; rewards is its weights table."""
    out: dict[str, Any] = {"preset": cfg.preset, "description": cfg.description}
    for name in SECTIONS:
        section = getattr(cfg, name)
        if name in TABLE_FIELDS:
            out[name] = dict(getattr(section, TABLE_FIELDS[name]))
        else:
            out[name] = {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
    return out


def _plain(value: Any) -> Any:
    return (
        list(value) if isinstance(value, (list, tuple)) else dict(value) if isinstance(value, dict) else value
    )


def resolve_output_dir(cfg: Config, now: datetime | None = None) -> Config:
    """Fill {preset} and {time} in train.output_dir (the run stores the result)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    out = cfg.train.output_dir.format(preset=re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.preset), time=stamp)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=out))


# ---------------------------------------------------------------- writing TOML

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def config_to_toml(cfg: Config) -> str:
    """Fully resolved TOML with each field's help as a comment; None values are omitted (their default)."""
    data = config_to_dict(cfg)
    lines = [
        "# tinyr1 configuration, fully resolved. Load with: tinyr1 train --preset path/to/this.toml",
        f"preset = {_toml_value(cfg.preset)}",
        f"description = {_toml_value(cfg.description)}",
    ]
    for name, cls in SECTIONS.items():
        lines += ["", f"[{name}]"]
        helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
        for key, value in data[name].items():
            if value is None:
                lines.append(f"# {key} = none  ({helps.get(key, '')})")
            else:
                comment = f"  # {helps[key]}" if helps.get(key) else ""
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}{comment}")
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config atomically (temp file, then rename): a run folder's config.toml."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(config_to_toml(cfg), encoding="utf-8")
    os.replace(tmp, target)
    return target
