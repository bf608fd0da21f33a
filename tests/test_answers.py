"""The two answer parsers side by side (training reward vs evaluation, docs/ORIGINAL.md §2), and
the think text, on the edge cases where readings could differ."""

from __future__ import annotations

import pytest

from tinyr1.answers import answer_letter, answer_text, reward_answer, think_text

# (completion, reward_answer, answer_text, answer_letter with 4 options)
CASES = [
    ("<think>red</think> <answer>B</answer>", "B", "B", "B"),
    # no tag: the reward compares the whole stripped text, evaluation has no prediction
    ("B", "B", None, None),
    ("  The answer is B.  ", "The answer is B.", None, None),
    ("", "", None, None),
    ("<answer>B", "<answer>B", None, None),  # unclosed
    # two tags: both read the first
    ("<answer>A</answer> then <answer>B</answer>", "A", "A", "A"),
    # whitespace around the letter is stripped
    ("<answer>  C \t</answer>", "C", "C", "C"),
    # a newline inside the tag: the reward's search (no DOTALL, like the original) misses the tag
    # and falls back to the whole text; evaluation reads across lines
    ("<answer>\nD\n</answer>", "<answer>\nD\n</answer>", "D", "D"),
    ("<think>a\nb</think>\n<answer>C</answer>", "C", "C", "C"),  # newlines outside the tag are fine
    # lowercase: kept as is by the reward (which compares case-sensitively); not a letter to evaluation
    ("<answer>b</answer>", "b", "b", None),
    # text around the letter: the reward keeps it (its first character may still match), evaluation
    # takes the first character only when it is a letter
    ("<answer>C. pick up the cup</answer>", "C. pick up the cup", "C. pick up the cup", "C"),
    ("<answer>(B)</answer>", "(B)", "(B)", None),
    ("<answer>Option B</answer>", "Option B", "Option B", None),  # "O": not one of 4 options
    ("<answer></answer>", "", "", None),
    ("<answer>E</answer>", "E", "E", None),  # beyond the 4 options
]


@pytest.mark.parametrize(("text", "want_reward", "want_text", "want_letter"), CASES)
def test_reward_and_evaluation_readings(text: str, want_reward: str, want_text: str | None,
                                        want_letter: str | None) -> None:
    assert reward_answer(text) == want_reward
    assert answer_text(text) == want_text
    assert answer_letter(text, 4) == want_letter


def test_answer_letter_option_count() -> None:
    assert answer_letter("<answer>E</answer>", 5) == "E"
    assert answer_letter("<answer>E</answer>", 4) is None
    assert answer_letter("<answer>E</answer>") == "E"  # no option count: any A-Z
    assert answer_letter("<answer>Option B</answer>") == "O"  # the first character, never a search


def test_think_text() -> None:
    assert think_text("<think>  two words </think><answer>A</answer>") == "two words"
    assert think_text("<think>line 1\nline 2</think>") == "line 1\nline 2"
    assert think_text("<think>first</think> <think>second</think>") == "first"
    assert think_text("<answer>A</answer>") is None
    assert think_text("<think>unclosed") is None
