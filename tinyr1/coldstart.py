"""Cold-start SFT: teach the <think>/<answer> format on a few annotated samples before GRPO.

The paper's pipeline: 16 hand-annotated NextQA samples, 1 epoch, lr 1e-5 constant, then GRPO.
The loss is the mean negative log-likelihood of the answer tokens and the end token. Every sample
has its own prompt, so there is no prefix to share: each row is prompt + answer, teacher-forced in
one forward, scored by the same log-prob head as GRPO (no [tokens x vocab] logits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from tinyr1.context import Context
from tinyr1.data import Sample
from tinyr1.data import sft_pair as sft_texts
from tinyr1.errors import DataError
from tinyr1.logprobs import head_logprobs
from tinyr1.model.loading import trainable_parameters
from tinyr1.model.tinyllava import TinyLlavaVideo
from tinyr1.optim import make_optimizer
from tinyr1.prompts import render_chat
from tinyr1.tokenizer import tokenize_prompt


def sft_pair(tokenizer: Any, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids [P] with the -200 sentinel, target ids [A] = " answer" + EOS) for one sample.

    The generation prompt ends in "ASSISTANT:"; the target starts right at the answer text, so a
    completion starts with "<think>" and the R1 format reward (a fullmatch) can accept it.
    """
    human, answer = sft_texts(sample)
    prompt = torch.tensor(tokenize_prompt(tokenizer, render_chat(human)))
    target = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, torch.tensor(target)


def sft_hidden(
    model: TinyLlavaVideo, prompt_ids: Sequence[torch.Tensor], video_tokens: Sequence[torch.Tensor],
    target_ids: torch.Tensor,
) -> torch.Tensor:
    """Final hidden states that predict each target token [n, A, D], one full row per sample.

    Row i is `prompt_ids[i]` (video spliced in) followed by `target_ids[i]`; the state at position p
    predicts token p + 1, so target token j is predicted at `P'_i - 1 + j` (P'_i: prompt with video).
    """
    n, length = target_ids.shape
    rows = [torch.cat([p.to(target_ids.device), t]) for p, t in zip(prompt_ids, target_ids)]
    embeds, mask, _ = model.splice(rows, video_tokens)  # [n, S, D]
    model.check_length(embeds.shape[1])
    hidden = model.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # [n, S, D]
    starts = torch.tensor([p.numel() - 1 + v.shape[0] - 1 for p, v in zip(prompt_ids, video_tokens)],
                          device=hidden.device)  # [n]
    index = starts[:, None] + torch.arange(length, device=hidden.device)[None, :]  # [n, A]
    return hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [n, A, D]


def run_coldstart(ctx: Context, samples: list[Sample], load_frames: Callable[[Sample], torch.Tensor],
                  console: Console) -> list[float]:
    """SFT steps over `samples`; returns the loss per step. Its own optimizer at `coldstart.lr`
    (a fresh state, so GRPO's AdamW moments do not start from the SFT gradients)."""
    cfg = ctx.cfg
    if not samples:
        raise DataError("coldstart.enabled is true but data.coldstart has no samples")
    cs, model, tok = cfg.coldstart, ctx.model, ctx.tokenizer
    per_epoch = -(-len(samples) // cs.batch_size)
    steps = cs.steps or cs.epochs * per_epoch
    params = list(trainable_parameters(model).values())
    optimizer = make_optimizer(cfg.train.optimizer, params, lr=cs.lr, weight_decay=cfg.train.weight_decay,
                               device=model.device)
    gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    model.vision_tower.eval()
    with Progress(TextColumn("[bold]cold start"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                  console=console, disable=not cfg.log.progress) as bar:
        task = bar.add_task("sft", total=steps, loss="")
        for _ in range(steps):
            if len(order) < cs.batch_size:
                order += torch.randperm(len(samples), generator=gen).tolist()
            batch = [samples[i] for i in order[: cs.batch_size]]
            del order[: cs.batch_size]
            pairs = [sft_pair(tok, s) for s in batch]
            video = [model.encode_video(load_frames(s)) for s in batch]  # b x [Q, D]
            width = max(t.numel() for _, t in pairs)
            targets = torch.full((len(pairs), width), tok.eos_token_id, dtype=torch.long)  # [b, A]
            mask = torch.zeros(len(pairs), width)  # [b, A]
            for i, (_, t) in enumerate(pairs):
                targets[i, : t.numel()], mask[i, : t.numel()] = t, 1
            targets, mask = targets.to(model.device), mask.to(model.device)
            hidden = sft_hidden(model, [p for p, _ in pairs], video, targets)  # [b, A, D]
            logp, _ = head_logprobs(model, hidden, targets, temperature=1.0, backend=ctx.backend)  # [b, A]
            loss = -(logp * mask).sum() / mask.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or 1e9)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(task, advance=1, loss=f"loss {losses[-1]:.3f}")
    console.print(f"cold start: {steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return losses
