"""Prompt strings of TinyLLaVA-Video-R1, character-exact.

The original renders prompts with the Vicuna-style `qwen2_base` template (not ChatML) and
tokenizes them in pieces split at `<image>` (see `tinyr1.tokenizer.tokenize_prompt`). Any
deviation in a space or newline changes the token ids the released checkpoints were trained on,
so every string here is a literal copied from docs/ORIGINAL.md §1-2 and tested as such.
"""

from __future__ import annotations

from typing import Literal

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# Training: appended right after the question (it starts with its own space).
R1_SUFFIX = (
    " Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."
)
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # the sentinel id the video embeddings replace; not a vocabulary token
IGNORE_INDEX = -100
EOS = "<|endoftext|>"
# The template's separator between the user turn and the answer (used to mask SFT labels).
SFT_SEPARATOR = " ASSISTANT: "
THINK_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def build_prompt(question: str, *, mode: Literal["train", "eval"]) -> str:
    """The user text for a question that already lists its options ("A. ..." lines).

    train: `<image>\\n{question}{R1_SUFFIX}` (GRPO and cold start, suffix with its leading space);
    eval: `<image>\\n{question}\\n{suffix}` (the R1 eval scripts put the suffix on its own line).
    """
    if mode == "train":
        return f"{IMAGE_TOKEN}\n{question}{R1_SUFFIX}"
    if mode == "eval":
        return f"{IMAGE_TOKEN}\n{question}\n{R1_SUFFIX.lstrip()}"
    raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")


def _user_content(user_text: str) -> str:
    """The original template moves `<image>` to the front of the first turn: remove it, strip,
    then prefix `<image>\\n` (so `"<image>" + q` and `"<image>\\n" + q` render the same)."""
    if IMAGE_TOKEN in user_text:
        stripped = user_text.replace(IMAGE_TOKEN, "").strip()
        return f"{IMAGE_TOKEN}\n{stripped}".strip()
    return user_text


def render_chat(user_text: str) -> str:
    """The generation prompt: `{SYSTEM} USER: {user_text} ASSISTANT:` (no trailing space)."""
    return f"{SYSTEM} USER: {_user_content(user_text)} ASSISTANT:"


def render_sft(user_text: str, answer: str) -> str:
    """One SFT example: `{SYSTEM} USER: {user_text} ASSISTANT: {answer}<|endoftext|>`.

    The loss covers the answer and the end token; `tinyr1.tokenizer.tokenize_sft` masks the rest
    exactly as the original `make_labels` does.
    """
    return f"{SYSTEM} USER: {_user_content(user_text)}{SFT_SEPARATOR}{answer}{EOS}"


def format_options(options: list[str]) -> str:
    """`A. first\\nB. second ...`: the option block of the paper's NextQA problems."""
    return "\n".join(f"{chr(ord('A') + i)}. {opt}" for i, opt in enumerate(options))


def question_with_options(question: str, options: list[str] | None) -> str:
    """A question followed by its option block on the next lines (as in the R1 `problem` field)."""
    if not options:
        return question
    return f"{question}\n{format_options(options)}"
