"""Validation of a raw TOML dict against the schema: types, values and cross-field rules, one error.

`config_io.load_config` reads the files and hands the merged dict here; `build_config` turns it
into a `Config` or raises one `ConfigError` listing every problem (file:line or the --set text,
the key, the nearest valid key, and the fix). Nothing here reads files, imports torch or touches
weights: a bad config fails in milliseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any, Literal, Union

from tinyr1.config import SECTIONS, TABLE_FIELDS, TOP_LEVEL_KEYS, Config, Origins
from tinyr1.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

_NONE_WORDS = ("none", "null")


# ---------------------------------------------------------------- types


def _members(tp: Any) -> tuple[Any, ...]:
    """The alternatives of a union (`int | None` -> (int, NoneType)), else (tp,)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def type_name(tp: Any) -> str:
    names = []
    for m in _members(tp):
        origin = typing.get_origin(m)
        if m is type(None):
            names.append("none")
        elif origin is Literal:
            names.append("one of " + ", ".join(repr(a) for a in typing.get_args(m)))
        elif origin is list:
            names.append(f"list of {type_name(typing.get_args(m)[0])}")
        elif origin is dict:
            key, val = typing.get_args(m)
            names.append(f"table of {type_name(key)} -> {type_name(val)}")
        else:
            names.append(m.__name__)
    return " or ".join(names)


def _describe(value: Any) -> str:
    kind = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "table"}.get(
        type(value), type(value).__name__
    )
    shown = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return f"{kind} {shown}"


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(True, value in the field's type) or (False, None). Ints widen to float; bools are no ints."""
    for m in _members(tp):
        origin = typing.get_origin(m)
        if m is type(None):
            if value is None or (
                isinstance(value, str) and value.lower() in _NONE_WORDS and str not in _members(tp)
            ):
                return True, None
        elif origin is Literal:
            if isinstance(value, str):  # membership is a value check, reported separately
                return True, value
        elif origin is list:
            if isinstance(value, list):
                items = [coerce(v, typing.get_args(m)[0]) for v in value]
                if all(ok for ok, _ in items):
                    return True, [v for _, v in items]
        elif origin is dict:
            if isinstance(value, dict):
                items = {k: coerce(v, typing.get_args(m)[1]) for k, v in value.items()}
                if all(ok for ok, _ in items.values()):
                    return True, {k: v for k, (_, v) in items.items()}
        elif m is bool:
            if isinstance(value, bool):
                return True, value
        elif m is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True, value
        elif m is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True, float(value)
        elif m is str and isinstance(value, str):
            return True, value
    return False, None


def parse_text(text: str, tp: Any) -> Any:
    """A --set value typed by its field: `8` -> 8, `1e-6` -> 1e-6, `true`, `none`, `a,b` or `["a","b"]`.

    Text that fits no member is returned as is, so validation reports "expected X, got str '...'".
    """
    text = text.strip()
    members = _members(tp)
    if type(None) in members and text.lower() in (*_NONE_WORDS, ""):
        return None
    for m in members:
        origin = typing.get_origin(m)
        if m is bool and text.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return text.lower() in ("true", "yes", "on", "1")
        if m is int and re.fullmatch(r"[+-]?\d[\d_]*", text):
            return int(text)
        if m is float:
            try:
                return float(text)
            except ValueError:
                pass
        if origin is list:
            if text.startswith("["):
                try:
                    return tomllib.loads(f"v = {text}")["v"]
                except tomllib.TOMLDecodeError:
                    return text
            return [part.strip() for part in text.split(",") if part.strip()]
        if (m is str or origin is Literal) and len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            return text[1:-1]
        if m is str or origin is Literal:
            return text
    return text


# ---------------------------------------------------------------- overrides


def parse_overrides(overrides: list[str], data: dict[str, Any], origins: Origins) -> list[str]:
    """Apply `section.key=value` strings onto the raw dict (in place); returns syntax problems."""
    problems = []
    for item in overrides:
        key, eq, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not name:
            problems.append(f"--set {item}: expected section.key=value, e.g. --set rollout.num_generations=4")
            continue
        if section not in SECTIONS:
            problems.append(_unknown_section(section, f"--set {item}"))
            continue
        if not text.strip():  # an empty value is a slip (an unset shell variable), never "none"
            problems.append(f"--set {item}: no value after '='; write a value, or none to unset an optional key")
            continue
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        if section in TABLE_FIELDS:
            tp = typing.get_args(hints[TABLE_FIELDS[section]])[1]
        else:
            tp = hints.get(name, str)
        if section in TABLE_FIELDS and section not in data:  # --set rewards.x=w adds to the defaults
            data[section] = dict(getattr(cls(), TABLE_FIELDS[section]))
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            data[section] = target = {}
        target[name] = parse_text(text, tp)
        origins[(section, name)] = f"--set {item}"
    return problems


# ---------------------------------------------------------------- sections


def _near(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
    return f"did you mean '{near[0]}'? " if near else ""


def _unknown_section(name: str, where: str) -> str:
    return f"{where}: unknown section '{name}'; {_near(name, list(SECTIONS))}valid sections: {', '.join(SECTIONS)}"


def _check_bounds(qual: str, value: Any, meta: typing.Mapping[str, Any]) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{qual} = {value}: must be a finite number"
    if meta.get("nonempty") and len(value) == 0:
        return f"{qual} must not be empty"
    tests = (("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
             ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b))  # fmt: skip
    failed = [f"{sign} {meta[k]}" for k, sign, ok in tests if k in meta and not ok(value, meta[k])]
    if not failed:
        return None
    bounds = " and ".join(f"{sign} {meta[k]}" for k, sign, _ in tests if k in meta)
    why = f" ({meta['why']})" if meta.get("why") else ""
    return f"{qual} = {value!r}: must be {bounds}{why}"


def _build_section(name: str, raw: Any, origins: Origins, problems: list[str], bad: set[str]) -> Any:
    """One section dataclass from its raw table; bad entries are reported and left at their default."""
    cls = SECTIONS[name]
    if not isinstance(raw, dict):
        problems.append(
            f"{origins.get(('', name), name)}: '{name}' must be a table (a section), got {_describe(raw)}"
        )
        return cls()
    if name in TABLE_FIELDS:
        return _build_table_section(name, raw, origins, problems, bad)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = origins.get((name, key), f"{name}.{key}")
        if key not in fields:
            problems.append(
                f"{where}: unknown key '{name}.{key}'; {_near(key, list(fields))}"
                f"valid keys in {name}: {', '.join(fields)}"
            )
            continue
        ok, typed = coerce(value, hints[key])
        issue = (
            _check_value(f"{name}.{key}", typed, hints[key], fields[key].metadata)
            if ok
            else f"{name}.{key}: expected {type_name(hints[key])}, got {_describe(value)}"
        )
        if issue:
            problems.append(f"{where}: {issue}")
            bad.add(f"{name}.{key}")
        else:
            kwargs[key] = typed
    return cls(**kwargs)


def _build_table_section(
    name: str, raw: dict[str, Any], origins: Origins, problems: list[str], bad: set[str]
) -> Any:
    """A section that is one mapping (rewards: name -> weight); each entry is checked on its own."""
    cls = SECTIONS[name]
    fname = TABLE_FIELDS[name]
    value_tp = typing.get_args(typing.get_type_hints(cls)[fname])[1]
    table: dict[str, Any] = {}
    for key, value in raw.items():
        where = origins.get((name, key), f"{name}.{key}")
        ok, typed = coerce(value, value_tp)
        if not ok:
            issue: str | None = f"{name}.{key}: expected {type_name(value_tp)}, got {_describe(value)}"
        elif not re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?", key):
            issue = f'{name}.{key}: not a reward name; use a built-in name or "module:function"'
        elif not math.isfinite(typed):
            issue = f"{name}.{key} = {typed}: weight must be a finite number"
        else:
            issue = None
        if issue:
            problems.append(f"{where}: {issue}")
            bad.add(f"{name}.{fname}")
        else:
            table[key] = typed
    if f"{name}.{fname}" not in bad and not any(w != 0 for w in table.values()):
        problems.append(
            f"{name}: no reward with a nonzero weight, nothing would be optimized; "
            f"fix: give one a weight, e.g. r1 = 1.0 in the {name} table or --set {name}.r1=1.0"
        )
        bad.add(f"{name}.{fname}")
    return cls(**{fname: table})


def _check_value(qual: str, value: Any, tp: Any, meta: typing.Mapping[str, Any]) -> str | None:
    literal = next((m for m in _members(tp) if typing.get_origin(m) is Literal), None)
    if literal is not None and isinstance(value, str):  # a bool beside a Literal (`bool | Literal["offload"]`) is a bool
        allowed = [str(a) for a in typing.get_args(literal)]
        if value not in allowed:
            near = _near(value, allowed)
            return f"{qual} = {value!r}: must be one of {', '.join(repr(a) for a in allowed)}" + (
                f"; {near.strip()}" if near else ""
            )
    return _check_bounds(qual, value, meta)


# ---------------------------------------------------------------- cross-field rules

_RULES: list[tuple[tuple[str, ...], Callable[[Config], str | None]]] = []


def _rule(*keys: str) -> Callable[[Callable[[Config], str | None]], Callable[[Config], str | None]]:
    """Register a rule over `keys`; it is skipped when one of them already has a problem."""

    def register(fn: Callable[[Config], str | None]) -> Callable[[Config], str | None]:
        _RULES.append((keys, fn))
        return fn

    return register


@_rule("train.micro_batch_size", "rollout.prompts_per_step", "rollout.num_generations")
def _micro_batch_divides(c: Config) -> str | None:
    total = c.rollout.prompts_per_step * c.rollout.num_generations
    mb = c.train.micro_batch_size
    if total % mb == 0:
        return None
    fits = [d for d in range(1, total + 1) if total % d == 0]
    return (
        f"train.micro_batch_size = {mb} must divide rollout.prompts_per_step * rollout.num_generations "
        f"= {c.rollout.prompts_per_step} * {c.rollout.num_generations} = {total}; "
        f"fix: set train.micro_batch_size to one of {', '.join(map(str, fits))}"
    )


@_rule("grpo.epsilon", "grpo.epsilon_high")
def _epsilon_high(c: Config) -> str | None:
    if c.grpo.epsilon_high is None or c.grpo.epsilon_high >= c.grpo.epsilon:
        return None
    return (
        f"grpo.epsilon_high = {c.grpo.epsilon_high} is below grpo.epsilon = {c.grpo.epsilon}; "
        f"fix: set grpo.epsilon_high >= {c.grpo.epsilon} or to none"
    )


@_rule("video.fps", "video.num_frames", "video.max_frames")
def _frames(c: Config) -> str | None:
    if c.video.fps is not None or c.video.num_frames <= c.video.max_frames:
        return None
    return (
        f"video.num_frames = {c.video.num_frames} exceeds video.max_frames = {c.video.max_frames}; "
        f"fix: set video.max_frames = {c.video.num_frames} or video.num_frames <= {c.video.max_frames}"
    )


@_rule("coldstart.enabled", "data.coldstart", "data.synth")
def _coldstart_data(c: Config) -> str | None:
    if not c.coldstart.enabled or c.data.coldstart is not None:
        return None
    return (
        "coldstart.enabled = true but data.coldstart is not set; "
        'fix: set data.coldstart = "coldstart.json" or coldstart.enabled = false'
    )


@_rule("data.synth", "data.train")
def _synth_target(c: Config) -> str | None:
    if not c.data.synth or c.data.train is not None:
        return None
    return (
        'data.synth = true needs data.train as the file to write; fix: set data.train = "synth/train.jsonl"'
    )


@_rule("data.synth_tasks", "data.synth")
def _synth_tasks(c: Config) -> str | None:
    from tinyr1.synth import TASK_GROUPS, TASKS

    unknown = [t for t in c.data.synth_tasks if t not in TASKS and t not in TASK_GROUPS]
    if not c.data.synth or not unknown:
        return None
    return (f"data.synth_tasks has unknown task(s) {', '.join(map(repr, unknown))}; "
            f"fix: choose from {', '.join([*TASKS, *TASK_GROUPS])}")


@_rule("train.eval_every", "data.eval")
def _eval_data(c: Config) -> str | None:
    if c.train.eval_every == 0 or c.data.eval is not None:
        return None
    return (
        f"train.eval_every = {c.train.eval_every} but data.eval is not set; "
        'fix: set data.eval = "eval.jsonl" or train.eval_every = 0'
    )


@_rule("model.dtype", "model.device")
def _fp16_cpu(c: Config) -> str | None:
    if c.model.dtype != "fp16" or c.model.device != "cpu":
        return None
    return "model.dtype = 'fp16' with model.device = 'cpu': fp16 matmuls are slow or missing on CPUs; fix: set model.dtype = 'fp32' or 'auto'"


@_rule("model.liger", "model.device")
def _liger_cpu(c: Config) -> str | None:
    if c.model.liger != "on" or c.model.device != "cpu":
        return None
    return "model.liger = 'on' with model.device = 'cpu': Liger kernels need CUDA; fix: set model.liger = 'auto' or 'off'"


@_rule("model.backend", "lora.dropout")
def _unsloth_dropout(c: Config) -> str | None:
    if c.model.backend != "unsloth" or c.lora.dropout == 0:
        return None
    return (f"model.backend = 'unsloth' with lora.dropout = {c.lora.dropout}: the backend binds unsloth's fused "
            "LoRA kernels, which tinyr1 runs only without LoRA dropout (as unsloth's own fast path); "
            "fix: set lora.dropout = 0 or model.backend = 'peft'")


@_rule("model.backend", "model.liger")
def _unsloth_liger(c: Config) -> str | None:
    if c.model.backend != "unsloth" or c.model.liger != "on":
        return None
    return ("model.liger = 'on' with model.backend = 'unsloth': unsloth fuses the MLP (SwiGLU) itself and liger's "
            "MLP swap would replace it; fix: set model.liger = 'auto' (off under unsloth) or model.backend = 'peft'")


@_rule("log.num_completions", "rollout.prompts_per_step", "rollout.num_generations")
def _log_completions(c: Config) -> str | None:
    total = c.rollout.prompts_per_step * c.rollout.num_generations
    if c.log.num_completions <= total:
        return None
    return (
        f"log.num_completions = {c.log.num_completions} exceeds the {total} completions of a step; "
        f"fix: set log.num_completions <= {total}"
    )


@_rule("train.output_dir")
def _output_dir(c: Config) -> str | None:
    names = {m.group(1) for m in re.finditer(r"\{([^{}]*)\}", c.train.output_dir)}
    unknown = sorted(names - {"preset", "time"})
    if not unknown:
        return None
    return f"train.output_dir = {c.train.output_dir!r}: unknown placeholder {{{unknown[0]}}}; fix: use only {{preset}} and {{time}}"


def check_rules(cfg: Config, bad: AbstractSet[str] = frozenset()) -> list[str]:
    """Every broken cross-field rule, skipping rules over keys that already failed their own check."""
    return [msg for keys, fn in _RULES if not bad.intersection(keys) and (msg := fn(cfg))]


# ---------------------------------------------------------------- entry point


def build_config(
    data: dict[str, Any], origins: Origins, *, default_name: str, label: str, problems: list[str]
) -> Config:
    """Raw merged TOML dict -> Config, or one ConfigError with all `problems` plus those found here."""
    problems = list(problems)
    bad: set[str] = set()
    sections: dict[str, Any] = {}
    ordered = [k for k in SECTIONS if k in data] + [k for k in data if k not in SECTIONS]
    for key in ordered:
        value = data[key]
        if key in SECTIONS:
            sections[key] = _build_section(key, value, origins, problems, bad)
        elif key in TOP_LEVEL_KEYS:
            if not isinstance(value, str):
                problems.append(
                    f"{origins.get(('', key), key)}: {key} must be a string, got {_describe(value)}"
                )
        else:
            where = origins.get(("", key), key)
            kind = "section" if isinstance(value, dict) else "top-level key"
            problems.append(
                f"{where}: unknown {kind} '{key}'; {_near(key, [*SECTIONS, *TOP_LEVEL_KEYS])}"
                f"valid sections: {', '.join(SECTIONS)}; top-level keys: {', '.join(TOP_LEVEL_KEYS)}"
            )
    description = data.get("description", "")
    cfg = Config(
        **sections,
        preset=default_name,
        description=description if isinstance(description, str) else "",
    )
    problems += [f"rule: {msg}" for msg in check_rules(cfg, bad)]
    if problems:
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        body = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid configuration ({label}), {count}:\n{body}")
    return cfg


# ---------------------------------------------------------------- beyond a valid config


def check_trainable(cfg: Config) -> None:
    """What `load_config` cannot demand (presets leave data open): training needs data.train."""
    if cfg.data.train is None:
        raise ConfigError(
            "data.train is not set: GRPO needs a training set; fix: --set data.train=path/to/train.jsonl "
            "(and --set data.video_root=videos/ if its video paths are relative to another folder)"
        )
