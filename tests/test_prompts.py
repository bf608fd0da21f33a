"""Prompt strings against the literal text of docs/ORIGINAL.md §1-2 (character-exact)."""

import pytest

from tinyr1.prompts import (
    R1_SUFFIX,
    SYSTEM,
    build_prompt,
    question_with_options,
    render_chat,
    render_sft,
)

QUESTION = "What is the man doing?\nA. running\nB. cooking\nC. pick up\nD. sleeping\nE. singing"


def test_train_prompt_literal() -> None:
    user = build_prompt(QUESTION, mode="train")
    assert user == (
        "<image>\nWhat is the man doing?\nA. running\nB. cooking\nC. pick up\nD. sleeping\nE. singing"
        " Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."
    )
    assert render_chat(user) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is the man doing?"
        "\nA. running\nB. cooking\nC. pick up\nD. sleeping\nE. singing Output the thinking process in "
        "<think> </think> and final answer (option) in <answer> </answer> tags. ASSISTANT:"
    )


def test_eval_prompt_literal() -> None:
    user = build_prompt("Q?\nA. x\nB. y", mode="eval")
    assert user == (
        "<image>\nQ?\nA. x\nB. y\n"
        "Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."
    )
    assert render_chat(user).endswith("tags. ASSISTANT:")
    assert render_chat(user).startswith(SYSTEM + " USER: <image>\nQ?\nA. x")


def test_image_token_is_moved_to_front_like_the_original() -> None:
    # The original's trainer prepends "<image>" without a newline; its template strips and
    # re-inserts it as "<image>\n", so both spellings render identically.
    q = "Q?\nA. x" + R1_SUFFIX
    assert render_chat("<image>" + q) == render_chat("<image>\n" + q) == render_chat(f"  {q} <image>")
    assert render_chat("no video here") == f"{SYSTEM} USER: no video here ASSISTANT:"


def test_sft_rendering_literal() -> None:
    text = render_sft("<image>\nQ?", "<think>because</think> <answer>B</answer>")
    assert text == (
        f"{SYSTEM} USER: <image>\nQ? ASSISTANT: <think>because</think> <answer>B</answer><|endoftext|>"
    )


def test_question_with_options() -> None:
    assert question_with_options("Q?", ["red", "green"]) == "Q?\nA. red\nB. green"
    assert question_with_options("Q?", None) == "Q?"


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        build_prompt("Q", mode="test")  # type: ignore[arg-type]
