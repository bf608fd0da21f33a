"""Multiple-choice evaluation (greedy or sampled accuracy on a dataset) and streamed answers.

Generation reuses the rollout's prefix-shared sampler: with temperature 0 it is greedy, with
`num_samples` > 1 at the training temperature it measures the quantity GRPO optimizes (the mean
accuracy over samples). The prediction is `tinyr1.answers.answer_letter`: the first character of
the `<answer>` text when it is an option letter; a missing or invalid `<answer>` counts as wrong —
never a random letter (the original eval scripts draw one, which inflates accuracy by up to
1 / #options on broken outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tinyr1.answers import answer_letter, think_text
from tinyr1.errors import VideoError
from tinyr1.hf_compat import quiet_peft
from tinyr1.loss import completion_mask
from tinyr1.model.loading import LoadedModel, load_adapter, load_tinyllava
from tinyr1.model.tinyllava import TinyLlavaVideo
from tinyr1.prompts import build_prompt, question_with_options, render_chat
from tinyr1.rewards import format_strict
from tinyr1.rollout import sample_group
from tinyr1.tokenizer import tokenize_prompt

CATEGORY_KEYS = ("category", "task", "task_type", "question_type", "type", "domain")


def category_of(sample: Any) -> str | None:
    """A question category from the row (`category`, `task`, `task_type`, ...), when it has one."""
    extra = getattr(sample, "extra", None) or {}
    for key in CATEGORY_KEYS:
        value = extra.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
            return str(value)
    return None


@dataclass
class EvalResult:
    accuracy: float  # mean over samples (and over the num_samples completions of each)
    format_rate: float  # completions with the full <think>..</think> <answer>..</answer> format
    n: int  # samples evaluated
    skipped: list[str] = field(default_factory=list)  # unreadable videos
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per completion

    @property
    def mean_think_chars(self) -> float:
        return sum(r["think_chars"] for r in self.rows) / len(self.rows) if self.rows else 0.0

    @property
    def mean_tokens(self) -> float:
        return sum(r["num_tokens"] for r in self.rows) / len(self.rows) if self.rows else 0.0

    def by_category(self) -> dict[str, dict[str, float]]:
        """{category: {n clips, accuracy, accuracy_stderr, format_rate}}; {} when no row has a category."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in self.rows:
            if r.get("category") is not None:
                groups.setdefault(str(r["category"]), []).append(r)
        return {
            name: {"n": len(g) // self.per_clip, "accuracy": sum(r["correct"] for r in g) / len(g),
                   "accuracy_stderr": clip_stderr(g, self.per_clip), "format_rate": sum(r["formatted"] for r in g) / len(g)}
            for name, g in sorted(groups.items())
        }

    def summary(self) -> dict[str, Any]:
        """The numbers `tinyr1 eval` prints and stores next to its per-sample JSONL."""
        return {"n": self.n, "completions": len(self.rows), "accuracy": self.accuracy, "stderr": self.stderr,
                "format_rate": self.format_rate, "mean_think_chars": self.mean_think_chars,
                "mean_tokens": self.mean_tokens, "skipped": len(self.skipped), "by_category": self.by_category()}

    @property
    def stderr(self) -> float:
        """Standard error of the accuracy over clips (the clips are the independent draws)."""
        return clip_stderr(self.rows, self.per_clip)

    @property
    def per_clip(self) -> int:
        """Completions per clip (1 when greedy)."""
        return max(len(self.rows) // self.n, 1) if self.n else 1


def binomial_stderr(p: float, n: float) -> float:
    """Standard error of an accuracy p measured on n independent clips (0 when n is 0)."""
    return (p * (1 - p) / n) ** 0.5 if n else 0.0


def clip_stderr(rows: Sequence[dict[str, Any]], per_clip: int = 1) -> float:
    """Standard error of the mean correctness over clips, whose `per_clip` completions are
    consecutive rows: each clip's fraction correct, population variance over clips (with one
    completion per clip this is the binomial sqrt(p (1 - p) / n))."""
    means = [sum(float(r["correct"]) for r in rows[i : i + per_clip]) / per_clip
             for i in range(0, len(rows) - per_clip + 1, per_clip)]
    if not means:
        return 0.0
    mu = sum(means) / len(means)
    return (sum((m - mu) ** 2 for m in means) / len(means) / len(means)) ** 0.5


def prompt_tensor(tokenizer: Any, question: str, mode: str) -> torch.Tensor:
    """Token ids [P] of the full chat prompt for a question, `<image>` as the -200 sentinel."""
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
    load_frames: Callable[[Any], torch.Tensor | None],
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    num_samples: int = 1,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    prompt_mode: str = "eval",
    on_batch: Callable[[int], None] | None = None,
    sync_every: int = 16,
    cuda_graphs: bool = False,
) -> EvalResult:
    """Accuracy and format rate of `samples`; `load_frames(sample) -> [T, 3, S, S]`."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for start in range(0, len(samples), batch_size):
        batch, vts = [], []
        chunk = samples[start : start + batch_size]
        for s in chunk:
            try:
                frames = load_frames(s)  # [T, 3, S, S], or None from a loader that skips bad videos itself
            except VideoError as err:
                skipped.append(f"{s.id}: {err}")
                continue
            if frames is None:
                skipped.append(f"{s.id}: {s.video}: unreadable video")
                continue
            vts.append(model.encode_video(frames))
            batch.append(s)
        if not batch:
            if on_batch is not None:
                on_batch(len(chunk))
            continue
        pids = [prompt_tensor(tokenizer, s.question, prompt_mode) for s in batch]
        ids, _ = sample_group(
            model, pids, vts, group_size=num_samples, max_new_tokens=max_new_tokens, eos_id=eos,
            temperature=temperature, top_k=top_k, top_p=top_p, generator=gen, sync_every=sync_every,
            cuda_graphs=cuda_graphs,
        )
        cmask = completion_mask(ids, eos)  # [B*G, L]
        texts = decode_completions(tokenizer, ids, cmask)
        fmt = format_strict(texts)
        for i, text in enumerate(texts):
            s = batch[i // num_samples]
            pred = answer_letter(text, len(s.options) if s.options else None)
            rows.append({
                "id": s.id, "sample": i % num_samples, "answer": s.answer, "prediction": pred,
                "completion": text, "correct": pred is not None and pred == s.answer,
                "formatted": bool(fmt[i] > 0), "think_chars": len(think_text(text) or ""),
                "num_tokens": int(cmask[i].sum()), "category": category_of(s),
            })
        if on_batch is not None:
            on_batch(len(chunk))
    model.train(was_training)
    n = len(rows) // max(num_samples, 1)
    accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else 0.0
    format_rate = sum(r["formatted"] for r in rows) / len(rows) if rows else 0.0
    return EvalResult(accuracy, format_rate, n, skipped, rows)


class TokenStreamer:
    """Hands each newly generated piece of text to `on_text` as soon as its token is sampled.

    The sampler calls `put` with each step's token (one row), then `answer_question` calls `end`.
    A piece whose last character is an incomplete UTF-8 sequence (U+FFFD) waits for the next token.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.printed = 0
        self.puts = 0  # tokens seen, EOS included (tests check that text arrives step by step)

    def put(self, value: torch.Tensor) -> None:
        if value.numel() != 1:
            raise ValueError(f"TokenStreamer streams one sequence at a time (batch size 1), got {value.numel()} tokens")
        self.puts += 1
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.printed:
            self.on_text(text[self.printed :])
            self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.printed:
            self.on_text(text[self.printed :])
            self.printed = len(text)


@torch.no_grad()
def answer_question(
    model: TinyLlavaVideo,
    tokenizer: Any,
    pixels: torch.Tensor,
    question: str,
    *,
    options: list[str] | None = None,
    prompt_mode: str = "eval",
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    streamer: TokenStreamer | None = None,
) -> tuple[str, str | None]:
    """One question about one clip, streamable: (completion, letter | None).

    pixels [T, 3, S, S]; greedy unless temperature > 0. The options are listed under the question
    ("A. ..." lines) exactly as in the datasets. The rollout's sampler decodes (one decode path);
    it checks for EOS after every token here, so a streamed reply stops right at its end.
    """
    model.eval()
    pids = prompt_tensor(tokenizer, question_with_options(question, options), prompt_mode)  # [P]
    video = model.encode_video(pixels)  # [Q, D]
    eos = tokenizer.eos_token_id
    ids, _ = sample_group(
        model, [pids], [video], group_size=1, max_new_tokens=max_new_tokens, eos_id=eos,
        temperature=temperature, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(seed),
        sync_every=1, on_step=streamer.put if streamer is not None else None,
    )  # [1, L]
    if streamer is not None:
        streamer.end()
    text = decode_completions(tokenizer, ids, completion_mask(ids, eos))[0]
    return text, answer_letter(text, len(options) if options else None)


def load_for_inference(
    model_dir: str, adapter: str | None = None, *, quant: str = "none", dtype: str = "auto", device: str = "auto"
) -> LoadedModel:
    """A checkpoint (+ LoRA adapter and connector, applied on top, never merged) ready to generate."""
    loaded = load_tinyllava(model_dir, quant=quant, dtype=dtype, device=device)  # type: ignore[arg-type]
    if adapter is not None:
        with quiet_peft():
            load_adapter(loaded.model, adapter)
        loaded.model.to(loaded.model.device)
    loaded.model.eval()
    return loaded
