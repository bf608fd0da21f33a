"""A user-defined reward for tinyr1, plugged in by name as `module:function`.

Needs: tinyr1 installed; nothing else. Takes: a second to run this file (it scores a few example
completions); used in training it adds nothing measurable to a step.

A reward follows TRL's contract: `fn(completions: list[str], **columns) -> list[float]`, one
float per completion. `columns` holds every dataset column as a list aligned with `completions`
(at least `solution` = "<answer>X</answer>", `answer` = "X", `question`, `options`, `video`, plus
whatever else the JSONL rows carry), so accept `**kwargs` and take what you need.

Use it in training (tinyr1 imports a custom module only from the folder of the --config TOML
that names it, or from a folder given with --rewards-path; never from PYTHONPATH or the working
directory, and never a standard-library module):

    tinyr1 train --preset tiny --rewards-path examples --set rewards.custom_reward:concise_think=0.5

`--set rewards.NAME=WEIGHT` adds the reward to the preset's `r1 = 1.0`; the run prints the file it
imports (`custom reward custom_reward:concise_think: /.../examples/custom_reward.py`) and logs it as
`rewards/custom_reward:concise_think/mean` in metrics.jsonl. A module in a file or folder that another
user owns or can write runs only with --trust-rewards. A reward that raises, returns the wrong
length, NaN or inf stops the run with a message naming it (a silently broken reward would train on
noise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinyr1.answers import think_text  # the <think> reading the built-in rewards use
from tinyr1.rewards import compute_rewards, resolve_rewards

SHORTEST, LONGEST = 20, 400  # characters of reasoning that earn the full reward


def concise_think(completions: list[str], **columns: Any) -> list[float]:
    """1.0 for reasoning between 20 and 400 characters, fading linearly to 0 at 0 and at 800
    characters; 0 without a <think> block. Counters the drift towards ever longer thinking that
    the paper's format reward (which pays up to 1200 characters) can cause on a small model."""
    scores = []
    for text in completions:
        think = think_text(text)
        if think is None:
            scores.append(0.0)
            continue
        n = len(think)
        if n < SHORTEST:
            scores.append(n / SHORTEST)
        elif n <= LONGEST:
            scores.append(1.0)
        else:
            scores.append(max(0.0, 1.0 - (n - LONGEST) / LONGEST))
    return scores


def names_the_answer(completions: list[str], answer: list[str], options: list[Any] | None = None,
                     **columns: Any) -> list[float]:
    """1.0 when the reasoning mentions the correct option's text (e.g. "red" for answer A = red).

    Shows how to read dataset columns: `answer` (the letter) and `options` (the option texts, or
    None for rows that list them only inside the question)."""
    out = []
    for i, text in enumerate(completions):
        opts = options[i] if options is not None else None
        think = think_text(text)
        if think is None or not opts:
            out.append(0.0)
            continue
        correct = str(opts[ord(answer[i]) - ord("A")]).lower()
        out.append(1.0 if correct in think.lower() else 0.0)
    return out


if __name__ == "__main__":
    completions = [
        "<think>The square is red in every frame. Red is option A.</think> <answer>A</answer>",
        "<think>hm</think> <answer>B</answer>",
        "<answer>A</answer>",
    ]
    columns = {"solution": ["<answer>A</answer>"] * 3, "answer": ["A"] * 3,
               "options": [["red", "green", "blue", "yellow"]] * 3}
    funcs = resolve_rewards({"r1": 1.0, "custom_reward:concise_think": 0.5, "custom_reward:names_the_answer": 0.25},
                            [Path(__file__).resolve().parent])  # custom modules come from named folders only
    per, total = compute_rewards(funcs, completions, columns)
    names = [name for name, _, _ in funcs]
    for text, row, t in zip(completions, per.tolist(), total.tolist()):
        parts = ", ".join(f"{n} {v:+.2f}" for n, v in zip(names, row))
        print(f"{t:+.3f}  ({parts})  {text}")
