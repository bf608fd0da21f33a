"""Cold-start SFT: teach the <think>/<answer> format on a few annotated samples before GRPO.

The paper's pipeline: 16 hand-annotated NextQA samples, 1 epoch, lr 1e-5 constant, then GRPO.
The loss is the mean negative log-likelihood of the answer tokens and the end token, computed
through the same chunked log-prob path as GRPO (no [tokens x vocab] logits).
"""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from tinyr1.config import Config
from tinyr1.errors import DataError


def sft_pair(tokenizer: Any, sample: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids [P] with the -200 sentinel, target ids [A] = " answer" + EOS) for one sample.

    The generation prompt ends in "ASSISTANT:"; the target starts right at the answer text, so a
    completion starts with "<think>" and the R1 format reward (a fullmatch) can accept it.
    """
    from tinyr1.data import sft_pair as texts
    from tinyr1.prompts import render_chat
    from tinyr1.tokenizer import tokenize_prompt

    human, answer = texts(sample)
    prompt = torch.tensor(tokenize_prompt(tokenizer, render_chat(human)))
    target = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, torch.tensor(target)


def run_coldstart(cfg: Config, ctx: Any, samples: list[Any], load_frames: Any, console: Console) -> list[float]:
    """SFT steps over `samples`; returns the loss per step. Uses its own AdamW at `coldstart.lr`."""
    from tinyr1.model.loading import trainable_parameters
    from tinyr1.rollout import completion_logprobs
    from tinyr1.session import make_optimizer

    if not samples:
        raise DataError("coldstart.enabled is true but data.coldstart has no samples")
    cs, model, tok = cfg.coldstart, ctx.model, ctx.tokenizer
    per_epoch = -(-len(samples) // cs.batch_size)
    steps = cs.steps or cs.epochs * per_epoch
    optimizer = make_optimizer(cfg, list(trainable_parameters(model).values()), cs.lr, model.device)
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
            vts = [model.encode_video(load_frames(s)) for s in batch]
            width = max(t.numel() for _, t in pairs)
            targets = torch.full((len(pairs), width), tok.eos_token_id, dtype=torch.long)  # [b, A]
            mask = torch.zeros(len(pairs), width)  # [b, A]
            for i, (_, t) in enumerate(pairs):
                targets[i, : t.numel()], mask[i, : t.numel()] = t, 1
            targets, mask = targets.to(model.device), mask.to(model.device)
            logp, _ = completion_logprobs(model, [p for p, _ in pairs], vts, targets, temperature=1.0,
                                          backend=ctx.backend)
            loss = -(logp * mask).sum() / mask.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(trainable_parameters(model).values()), cfg.train.max_grad_norm or 1e9)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(task, advance=1, loss=f"loss {losses[-1]:.3f}")
    console.print(f"cold start: {steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return losses
