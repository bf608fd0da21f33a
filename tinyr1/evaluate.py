"""Multiple-choice evaluation: greedy (deterministic) or sampled accuracy on a dataset.

Generation reuses the rollout's prefix-shared sampler: with temperature 0 it is greedy, with
`num_samples` > 1 at the training temperature it measures the quantity GRPO optimizes (the mean
accuracy over samples). A missing or invalid `<answer>` counts as wrong — never a random letter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tinyr1.errors import VideoError
from tinyr1.model.tinyllava import TinyLlavaVideo


@dataclass
class EvalResult:
    accuracy: float  # mean over samples (and over the num_samples completions of each)
    format_rate: float  # completions with the full <think>..</think> <answer>..</answer> format
    n: int  # samples evaluated
    skipped: list[str] = field(default_factory=list)  # unreadable videos
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per completion

    @property
    def stderr(self) -> float:
        """Standard error of the accuracy over samples (binomial approximation)."""
        if self.n == 0:
            return 0.0
        p = self.accuracy
        return (p * (1 - p) / self.n) ** 0.5


def prompt_tensor(tokenizer: Any, question: str, mode: str) -> torch.Tensor:
    """Token ids [P] of the full chat prompt for a question, `<image>` as the -200 sentinel."""
    from tinyr1.prompts import build_prompt, render_chat
    from tinyr1.tokenizer import tokenize_prompt

    return torch.tensor(tokenize_prompt(tokenizer, render_chat(build_prompt(question, mode=mode))))  # type: ignore[arg-type]


def decode_completions(tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Text of each completion up to (excluding) its first EOS."""
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True) for row, m in zip(ids, mask)]


@torch.no_grad()
def evaluate(
    model: TinyLlavaVideo,
    tokenizer: Any,
    samples: Sequence[Any],
    *,
    load_frames: Callable[[Any], torch.Tensor],
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    num_samples: int = 1,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    prompt_mode: str = "eval",
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Accuracy and format rate of `samples`; `load_frames(sample) -> [T, 3, S, S]`."""
    from tinyr1.loss import completion_mask
    from tinyr1.rewards import REWARDS
    from tinyr1.rollout import sample_group

    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for start in range(0, len(samples), batch_size):
        batch, vts = [], []
        for s in samples[start : start + batch_size]:
            try:
                vts.append(model.encode_video(load_frames(s)))
                batch.append(s)
            except VideoError as err:
                skipped.append(f"{s.video}: {err}")
        if on_batch is not None:
            on_batch(len(samples[start : start + batch_size]))
        if not batch:
            continue
        pids = [prompt_tensor(tokenizer, s.question, prompt_mode) for s in batch]
        ids, _ = sample_group(
            model, pids, vts, group_size=num_samples, max_new_tokens=max_new_tokens, eos_id=eos,
            temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
        )
        texts = decode_completions(tokenizer, ids, completion_mask(ids, eos))
        solutions = [f"<answer>{s.answer}</answer>" for s in batch for _ in range(num_samples)]
        acc = REWARDS["accuracy"](texts, solution=solutions)
        fmt = REWARDS["format_strict"](texts, solution=solutions)
        for i, text in enumerate(texts):
            s = batch[i // num_samples]
            rows.append({
                "id": s.id, "answer": s.answer, "completion": text,
                "correct": bool(acc[i] > 0), "formatted": bool(fmt[i] > 0),
            })
    model.train(was_training)
    n = len(rows) // max(num_samples, 1)
    accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else 0.0
    format_rate = sum(r["formatted"] for r in rows) / len(rows) if rows else 0.0
    return EvalResult(accuracy, format_rate, n, skipped, rows)
