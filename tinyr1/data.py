"""Dataset formats -> `Sample`, with every malformed row reported at once.

Three row formats are read (docs/ORIGINAL.md §2): the paper's GRPO JSONL (`problem`, `solution`,
`video_filename`), the LLaVA-style cold-start JSON (`video`, `conversations`), and a generic
JSONL (`video`, `question`, `options`, `answer`). Every row becomes a `Sample` with the raw
columns kept in `extra`, because reward functions receive every column (TRL's contract).
A malformed row is reported with `file:line` and what is wrong; all problems of a file are
collected so `tinyr1 data check` can list them in one pass.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tinyr1.answers import answer_text
from tinyr1.errors import DataError
from tinyr1.prompts import IMAGE_TOKEN, R1_SUFFIX, build_prompt, question_with_options

Format = Literal["auto", "r1", "llava", "generic"]
_OPTION_RE = re.compile(r"^([A-Z])\.\s+(.*?)\s*$")
_REQUIRED = {
    "r1": ("problem", "solution", "video_filename"),
    "llava": ("video", "conversations"),
    "generic": ("video", "question", "answer"),
}


@dataclass(frozen=True)
class Sample:
    """One multiple-choice video question. `question` already lists the options ("A. ..")."""

    id: str
    video: Path
    question: str
    answer: str
    options: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> dict[str, Any]:
        """The columns reward functions receive: the raw row plus `question`, `answer`,
        `options` and the paper's `solution` ("<answer>X</answer>")."""
        cols = dict(self.extra)
        cols.update(question=self.question, answer=self.answer, options=self.options, video=str(self.video))
        cols.setdefault("solution", f"<answer>{self.answer}</answer>")
        return cols


def reward_columns(samples: Sequence[Sample], repeat: int) -> dict[str, list[Any]]:
    """The columns reward functions receive for `samples`, each row repeated `repeat` times (its G
    completions). Every key that any row has becomes a column, None where a row lacks it: TRL's
    contract is one aligned value per completion in every column, and optional keys differ by row."""
    rows = [s.columns() for s in samples]
    keys = dict.fromkeys(k for row in rows for k in row)
    return {k: [row.get(k) for row in rows for _ in range(repeat)] for k in keys}


@dataclass(frozen=True)
class RowProblem:
    """A row that could not be read, with where it is and why."""

    file: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class _RowError(Exception):
    pass


def options_from_problem(problem: str) -> list[str] | None:
    """The option texts of a problem's "A. ..", "B. .." lines (consecutive from A), else None."""
    opts: list[str] = []
    for line in problem.splitlines():
        m = _OPTION_RE.match(line.strip())
        if m and ord(m.group(1)) - ord("A") == len(opts):
            opts.append(m.group(2))
    return opts or None


def resolve_video(raw: str, video_root: str | os.PathLike[str] | None, data_file: Path) -> Path:
    """A row's video path: absolute stays; relative (a leading "./" dropped, as the original's
    `video_filename[1:]`) joins `video_root`, or the data file's folder when there is none."""
    p = Path(raw)
    if p.is_absolute():
        return p
    rel = raw[2:] if raw.startswith("./") else raw
    root = Path(video_root) if video_root is not None else data_file.parent
    return root / rel


def _letter(value: Any, options: list[str] | None, what: str) -> str:
    """The answer as one option letter; an exact option text is mapped to its letter."""
    if not isinstance(value, str) or not value.strip():
        raise _RowError(f"{what} is empty or not a string ({value!r}); it must be an option letter like 'A'")
    text = value.strip()
    if options and text in options and not (len(text) == 1 and "A" <= text <= "Z"):
        return chr(ord("A") + options.index(text))
    letter = text[0]
    if not ("A" <= letter <= "Z") or (len(text) > 1 and text[1].isalnum()):
        raise _RowError(f"{what} {text!r} is not an option letter A-Z")
    if options and ord(letter) - ord("A") >= len(options):
        raise _RowError(f"{what} is {letter!r} but the question has only {len(options)} options")
    return letter


def _need_str(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _RowError(f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _parse_r1(row: dict[str, Any]) -> tuple[str, str, list[str] | None, str]:
    problem = _need_str(row, "problem")
    solution = _need_str(row, "solution")
    answer = answer_text(solution)
    if answer is None:
        raise _RowError(f"'solution' must be '<answer>X</answer>', got {solution!r}")
    options = options_from_problem(problem)
    return problem, _letter(answer, options, "'solution' answer"), options, _need_str(row, "video_filename")


def _strip_suffix(text: str) -> str:
    for suffix in (R1_SUFFIX, "\n" + R1_SUFFIX.lstrip(), R1_SUFFIX.lstrip()):
        if text.endswith(suffix):
            return text[: -len(suffix)].rstrip()
    return text


def _parse_llava(row: dict[str, Any]) -> tuple[str, str, list[str] | None, str]:
    convs = row.get("conversations")
    if not isinstance(convs, list) or len(convs) < 2 or not all(isinstance(c, dict) for c in convs):
        raise _RowError("'conversations' must be a list of at least two {from, value} turns")
    human, gpt = convs[0], convs[1]
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        raise _RowError(f"turns must be human then gpt, got {human.get('from')!r}, {gpt.get('from')!r}")
    h_text, g_text = human.get("value"), gpt.get("value")
    if not isinstance(h_text, str) or IMAGE_TOKEN not in h_text:
        raise _RowError(f"the human turn must contain {IMAGE_TOKEN} where the video goes")
    if not isinstance(g_text, str):
        raise _RowError("the gpt turn's 'value' must be a string")
    answer = answer_text(g_text)
    if answer is None:
        raise _RowError("the gpt turn has no <answer>X</answer> (cold-start answers end with one)")
    question = _strip_suffix(h_text.replace(IMAGE_TOKEN, "").strip())
    options = options_from_problem(question)
    return question, _letter(answer, options, "the gpt <answer>"), options, _need_str(row, "video")


def _parse_generic(row: dict[str, Any]) -> tuple[str, str, list[str] | None, str]:
    question = _need_str(row, "question")
    options = row.get("options")
    if options is not None and (
        not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options)
    ):
        raise _RowError(f"'options' must be a non-empty list of strings or null, got {options!r}")
    letter = _letter(row.get("answer"), options, "'answer'")
    return question_with_options(question, options), letter, options, _need_str(row, "video")


_PARSERS = {"r1": _parse_r1, "llava": _parse_llava, "generic": _parse_generic}


def _detect(row: dict[str, Any]) -> str | None:
    if "problem" in row or "solution" in row or "video_filename" in row:
        return "r1"
    if "conversations" in row:
        return "llava"
    if "question" in row:
        return "generic"
    return None


def _iter_json_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON array with the line each starts on (so errors can say file:line)."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    pos = ws.match(text, 0).end()
    if text[pos : pos + 1] != "[":
        raise DataError(f"{path}:1: a .json dataset must be a JSON array of rows ([{{...}}, ...])")
    pos = ws.match(text, pos + 1).end()
    while pos < len(text) and text[pos] != "]":
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg}, column {err.colno}); fix the file") from err
        yield line, obj
        pos = ws.match(text, pos).end()


def _iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, row) pairs; a JSONL line that is not JSON yields (line, JSONDecodeError)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataError(f"{path}: dataset file not found") from err
    except IsADirectoryError as err:
        raise DataError(f"{path}: is a folder, not a dataset file; pass the .jsonl or .json file inside it") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read the dataset file ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason}); datasets are JSON/JSONL files") from err
    if text.lstrip().startswith("["):
        yield from _iter_json_rows(path, text)
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as err:
            yield i, err


def scan_dataset(
    path: str | os.PathLike[str], *, video_root: str | os.PathLike[str] | None = None, fmt: Format = "auto"
) -> tuple[list[Sample], list[RowProblem]]:
    """Read every row: (samples, problems). Videos are not opened here."""
    file = Path(path)
    samples: list[Sample] = []
    problems: list[RowProblem] = []
    detected: str | None = None if fmt == "auto" else fmt
    if detected is not None and detected not in _PARSERS:
        raise DataError(f"unknown data format {fmt!r}; use one of auto, r1, llava, generic")
    for line, row in _iter_rows(file):
        if isinstance(row, json.JSONDecodeError):
            problems.append(RowProblem(file, line, f"invalid JSON ({row.msg} at column {row.colno})"))
            continue
        if not isinstance(row, dict):
            problems.append(RowProblem(file, line, f"a row must be a JSON object, got {type(row).__name__}"))
            continue
        kind = detected or _detect(row)
        if kind is None:
            problems.append(RowProblem(file, line, f"unrecognised row (keys {sorted(row)}); expected "
                                       "problem/solution/video_filename, video/conversations, or video/question/answer"))
            continue
        detected = kind
        missing = [k for k in _REQUIRED[kind] if k not in row]
        if missing:
            problems.append(RowProblem(file, line, f"missing key(s) {missing} ({kind} rows need {list(_REQUIRED[kind])})"))
            continue
        try:
            question, answer, options, raw_video = _PARSERS[kind](row)
        except _RowError as err:
            problems.append(RowProblem(file, line, str(err)))
            continue
        sid = str(row.get("id", f"{file.name}:{line}"))
        video = resolve_video(raw_video, video_root, file)
        samples.append(Sample(sid, video, question, answer, options, dict(row)))
    return samples, problems


def load_dataset(
    path: str | os.PathLike[str], *, video_root: str | os.PathLike[str] | None = None, fmt: Format = "auto"
) -> list[Sample]:
    """All samples of a dataset file; any malformed row is a DataError listing every problem."""
    samples, problems = scan_dataset(path, video_root=video_root, fmt=fmt)
    if problems:
        shown = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(
            f"{path}: {len(problems)} malformed row(s):\n  {shown}{more}\n"
            f"fix or remove them (`tinyr1 data check {path}` lists all problems)"
        )
    if not samples:
        raise DataError(f"{path}: the dataset has no rows")
    return samples


def sft_pair(sample: Sample) -> tuple[str, str]:
    """(user text, assistant answer) for cold-start SFT: the LLaVA turns as written, else the
    training prompt with an answer-only target."""
    convs = sample.extra.get("conversations")
    if isinstance(convs, list) and len(convs) >= 2:
        return str(convs[0]["value"]), str(convs[1]["value"])
    return build_prompt(sample.question, mode="train"), f"<answer>{sample.answer}</answer>"
