"""Reward functions: pure, TRL-compatible, chosen by name in the `[rewards]` TOML table.

Contract (TRL's, so users can bring their own): `fn(completions: list[str], **columns) ->
list[float]`, where `columns` holds every dataset column as a list aligned with `completions`
(here at least `solution` = "<answer>X</answer>" and `answer` = "X"). The R1 rewards follow
docs/ORIGINAL.md §2 to the character: the released model was trained against exactly these. How a
completion's tags are read (and why the reward reads `<answer>` differently from evaluation) is
`tinyr1.answers`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tinyr1.answers import answer_letter, reward_answer, think_text
from tinyr1.errors import RewardError
from tinyr1.prompts import THINK_TAGS
from tinyr1.reward_modules import import_reward

RewardFn = Callable[..., list[float]]

_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_OPTION_LINE_RE = re.compile(r"^\(?([A-Z])[.)]\s+(.+?)\s*$", re.MULTILINE)
THINK_CHARS_FOR_FULL_FORMAT = 1200
LENGTH_CAP_CHARS = 1200


def completion_text(completion: Any) -> str:
    """A completion as text: a plain string, or TRL's conversational `[{"role", "content"}]`."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[0], dict):
        return str(completion[0].get("content", ""))
    raise RewardError(f"a completion must be a str or a list of messages, got {type(completion).__name__}")


def _texts(completions: Sequence[Any]) -> list[str]:
    return [completion_text(c) for c in completions]


def _ground_truths(solution: Sequence[str] | None, answer: Sequence[str] | None) -> list[str]:
    """The correct answer text per completion, from `solution` (tag text) or `answer` (letter)."""
    if solution is not None:
        return [reward_answer(sol) for sol in solution]
    if answer is not None:
        return [str(a).strip() for a in answer]
    raise RewardError("reward needs a 'solution' or 'answer' column with the correct option letter")


def accuracy_score(text: str, truth: str) -> float:
    """1.0 when the reward's answer (`reward_answer`: the one-line `<answer>` text, else the whole
    stripped text) equals the truth or starts with it ("C. pick up" answers "C"); case-sensitive.
    The original's math-verify pre-check only matters for numeric answers ("2.0" == "2") and is
    not reproduced."""
    student = reward_answer(text)
    if not student:
        return 0.0
    return 1.0 if student == truth or student[0] == truth else 0.0


def format_score(text: str) -> float:
    """F = 0.5 + 0.5 * min(len(think) / 1200, 1) for `<think>..</think> <answer>..</answer>`
    with exactly one of each tag; 0 otherwise."""
    if not _FORMAT_RE.fullmatch(text) or any(text.count(t) != 1 for t in THINK_TAGS):
        return 0.0
    think = think_text(text) or ""  # always present once the fullmatch passed
    return 0.5 + 0.5 * min(len(think) / THINK_CHARS_FOR_FULL_FORMAT, 1.0)


def accuracy(
    completions: Sequence[Any], solution: Sequence[str] | None = None, answer: Sequence[str] | None = None, **_: Any
) -> list[float]:
    """1/0: the answer letter matches (docs/ORIGINAL.md §2 accuracy)."""
    texts = _texts(completions)
    truths = _ground_truths(solution, answer)
    return [accuracy_score(t, g) for t, g in zip(texts, truths)]


def format(completions: Sequence[Any], **_: Any) -> list[float]:
    """F in {0} U [0.5, 1]: think/answer structure, longer thinking scores up to 1200 chars."""
    return [format_score(t) for t in _texts(completions)]


def format_strict(completions: Sequence[Any], **_: Any) -> list[float]:
    """1/0: the same structure test as `format`, without the length bonus."""
    return [1.0 if format_score(t) > 0 else 0.0 for t in _texts(completions)]


def r1(
    completions: Sequence[Any], solution: Sequence[str] | None = None, answer: Sequence[str] | None = None, **_: Any
) -> list[float]:
    """The paper's combined reward: R = acc + (2 acc - 1) F, and R == 0 becomes -2.

    correct+formatted 1+F in [1.5, 2]; correct only 1; wrong+formatted -F in [-1, -0.5];
    wrong and unformatted -2 (the zero case).
    """
    texts = _texts(completions)
    truths = _ground_truths(solution, answer)
    out = []
    for text, truth in zip(texts, truths):
        acc, fmt = accuracy_score(text, truth), format_score(text)
        r = acc + (2.0 * acc - 1.0) * fmt
        out.append(-2.0 if r == 0 else r)
    return out


def length(completions: Sequence[Any], **_: Any) -> list[float]:
    """min(len(think text) / 1200, 1): rewards longer reasoning, capped (whole text without tags)."""
    out = []
    for text in _texts(completions):
        body = think_text(text)
        out.append(min(len(body if body is not None else text.strip()) / LENGTH_CAP_CHARS, 1.0))
    return out


def _options(n: int, options: Sequence[Any] | None, problem: Sequence[str] | None,
             question: Sequence[str] | None) -> list[dict[str, str]]:
    if options is not None:
        return [{chr(ord("A") + i): str(o) for i, o in enumerate(opts or [])} for opts in options]
    source = problem if problem is not None else question
    if source is None:
        return [{} for _ in range(n)]
    return [{m.group(1): m.group(2) for m in _OPTION_LINE_RE.finditer(q)} for q in source]


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text.lower()) is not None


def agreement(
    completions: Sequence[Any],
    options: Sequence[Any] | None = None,
    problem: Sequence[str] | None = None,
    question: Sequence[str] | None = None,
    **_: Any,
) -> list[float]:
    """1/0: the think text names the option its own answer letter picks, and no other option.

    Ties the letter to the reasoning so the think text cannot drift away from the answer
    (rewarding only the letter let them diverge in the tiny demo, docs/DESIGN.md). The letter is
    read like evaluation reads it (`answer_letter`).
    """
    texts = _texts(completions)
    opts = _options(len(texts), options, problem, question)
    out = []
    for text, by_letter in zip(texts, opts):
        think, letter = think_text(text), answer_letter(text)
        if think is None or letter not in by_letter:
            out.append(0.0)
            continue
        named = {k for k, v in by_letter.items() if _mentions(think, v)}
        out.append(1.0 if named == {letter} else 0.0)
    return out


REWARDS: dict[str, RewardFn] = {
    "r1": r1,
    "accuracy": accuracy,
    "format": format,
    "format_strict": format_strict,
    "length": length,
    "agreement": agreement,
}


def resolve_rewards(weights: dict[str, float],
                    search: Sequence[str | os.PathLike[str]] = ()) -> list[tuple[str, float, RewardFn]]:
    """`{name: weight}` -> `[(name, weight, fn)]`; a "module:function" name is imported only here,
    and only from its file in the `search` folders (`tinyr1.reward_modules`)."""
    if not weights:
        raise RewardError(f"[rewards] is empty: name at least one reward, e.g. r1 = 1.0 (built-ins: {', '.join(REWARDS)})")
    out = []
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
        if name in REWARDS:
            fn = REWARDS[name]
        elif ":" in name:
            fn = import_reward(name, search)
        else:
            raise RewardError(
                f"unknown reward {name!r}; built-in rewards: {', '.join(sorted(REWARDS))}, "
                f"or a custom 'module:function'"
            )
        out.append((name, float(weight), fn))
    return out


def _checked(name: str, values: Any, n: int) -> list[float]:
    if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward {name!r} must return a list of {n} floats, got {type(values).__name__}")
    if len(values) != n:
        raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError) as err:
            raise RewardError(f"reward {name!r} returned a non-number at index {i}: {v!r}") from err
        if not math.isfinite(f):
            raise RewardError(f"reward {name!r} returned {f} at index {i} (completion: see completions.jsonl)")
        out.append(f)
    return out


def compute_rewards(
    funcs: list[tuple[str, float, RewardFn]], completions: list[str], columns: dict[str, list[Any]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every reward; returns (per-reward [N, R], weighted sum [N]) as float32 tensors.

    A reward that raises, returns the wrong length, a non-number, NaN or inf is a RewardError
    naming it: a silently broken reward would train the model on noise.
    """
    n = len(completions)
    for key, col in columns.items():
        if len(col) != n:
            raise RewardError(f"column {key!r} has {len(col)} values for {n} completions")
    per = torch.zeros(n, len(funcs), dtype=torch.float32)  # [N, R]
    for j, (name, _, fn) in enumerate(funcs):
        try:
            values = fn(completions=completions, **columns)
        except RewardError as err:
            raise RewardError(f"reward {name!r}: {err}") from err
        except Exception as err:
            raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
        per[:, j] = torch.tensor(_checked(name, values, n), dtype=torch.float32)
    weights = torch.tensor([w for _, w, _ in funcs], dtype=torch.float32)  # [R]
    total = per @ weights  # [N]
    return per, total
