"""Shared by the inference tests: a LoRA adapter trained for seconds on answer-only targets."""

from __future__ import annotations

from pathlib import Path

import torch

from tinyr1.checkpoint import save_adapter
from tinyr1.data import load_dataset, sft_pair
from tinyr1.model.loading import LORA_DEFAULT_TARGETS, add_lora, load_tinyllava, prepare_for_training
from tinyr1.tokenizer import tokenize_sft
from tinyr1.video import load_frames


def train_answer_adapter(
    model_dir: Path, train_file: Path, out: Path, *, steps: int = 30,
    targets: tuple[str, ...] | list[str] = LORA_DEFAULT_TARGETS,
) -> None:
    """LoRA on answer-only SFT targets (" <answer>X</answer>"): seconds on a CPU, real tags after."""
    torch.manual_seed(0)
    loaded = load_tinyllava(model_dir, dtype="fp32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    add_lora(model, r=8, alpha=16.0, dropout=0.0, target_modules=list(targets))
    prepare_for_training(model, train_connector=False, gradient_checkpointing=False)
    samples = load_dataset(train_file)
    with torch.no_grad():
        videos = {s.id: model.encode_video(load_frames(s.video, 8, 32)) for s in samples}  # [Q, D] each
    pairs = {s.id: tokenize_sft(tok, *sft_pair(s)) for s in samples}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for i in range(steps):
        batch = [samples[(i * 4 + j) % len(samples)] for j in range(4)]
        loss = model([torch.tensor(pairs[s.id][0]) for s in batch], [videos[s.id] for s in batch],
                     labels=[torch.tensor(pairs[s.id][1]) for s in batch]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adapter(model, out, train_connector=False)
