"""Reading a completion's `<think>` and `<answer>` tags, in one place.

There are two answer parsers on purpose, because the original TinyLLaVA-Video-R1 has two and they
serve different masters (docs/ORIGINAL.md §2):

- `reward_answer` is the **training reward's** reading, kept to the character because the released
  model was trained against it: the text of the first `<answer>..</answer>` *on one line* (the
  original's tag search has no DOTALL flag, so a newline inside the tag hides it), or, with no
  such tag, the whole stripped completion. Whoever compares it with the truth decides what
  matches (the R1 accuracy also accepts a matching first character).
- `answer_letter` is **evaluation's** reading: the first character of the first `<answer>` text
  (across lines), and only when it is an uppercase option letter; otherwise None, which counts as
  wrong. The original eval scripts instead fall back to heuristics and finally a random letter,
  which inflates accuracy on broken outputs by up to 1 / #options; tinyr1 never guesses.

`answer_text` (the tag text across lines, or None) is what both data loading and `answer_letter`
read; `think_text` is the reasoning the format and length rewards measure.
"""

from __future__ import annotations

import re

# No DOTALL on purpose: the original reward's tag search misses an answer that spans lines.
_REWARD_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def reward_answer(text: str) -> str:
    """The answer the R1 training reward compares: the first one-line `<answer>` text, stripped,
    else the whole stripped text ("<answer> C </answer>" -> "C"; "C. pick up" -> "C. pick up")."""
    m = _REWARD_ANSWER_RE.search(text)
    return m.group(1).strip() if m else text.strip()


def answer_text(text: str) -> str | None:
    """The stripped text of the first `<answer>..</answer>`, which may span lines; None without one."""
    m = _ANSWER_RE.search(text)
    return m.group(1).strip() if m else None


def answer_letter(text: str, num_options: int | None = None) -> str | None:
    """The evaluated prediction: the first character of `answer_text` when it is an uppercase
    letter within the `num_options` options (any A-Z when None); None when missing or invalid."""
    body = answer_text(text)
    if not body or not ("A" <= body[0] <= "Z"):
        return None
    if num_options is not None and ord(body[0]) - ord("A") >= num_options:
        return None
    return body[0]


def think_text(text: str) -> str | None:
    """The stripped text of the first `<think>..</think>` (across lines); None without one."""
    m = _THINK_RE.search(text)
    return m.group(1).strip() if m else None
