"""One training run from a `Config`: assets, model, optimizer, cold start, GRPO, evaluation.

`train(cfg)` is what `tinyr1 train` calls. It writes everything under the run folder:
config.toml, metrics.jsonl, completions.jsonl, eval.jsonl, checkpoints/, final/ (the adapter).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tinyr1.checkpoint import TrainState
from tinyr1.config import Config, check_trainable, save_config
from tinyr1.errors import ConfigError
from tinyr1.trainer import Ctx, save_state


def prepare_demo_assets(cfg: Config, console: Console) -> None:
    """Create the tiny checkpoint and the synthetic data set when the config asks and they are absent."""
    if cfg.model.synth and not (Path(cfg.model.path) / "config.json").is_file():
        from tinyr1.model.writing import write_tiny_checkpoint

        console.print(f"creating a tiny random TinyLLaVA-Video checkpoint at {cfg.model.path}")
        size = cfg.video.image_size or 32
        write_tiny_checkpoint(cfg.model.path, seed=cfg.data.synth_seed, frames=cfg.video.num_frames, image_size=size)
    if cfg.data.synth and cfg.data.train and not Path(cfg.data.train).is_file():
        from tinyr1.synth import write_synthetic

        out = Path(cfg.data.video_root or Path(cfg.data.train).parent)
        console.print(f"writing {cfg.data.synth_n} synthetic training clips (+{cfg.data.synth_eval_n} held out) to {out}")
        write_synthetic(
            out, cfg.data.synth_n, cfg.data.synth_seed, frames=cfg.video.num_frames,
            size=cfg.video.image_size or 32, eval_n=cfg.data.synth_eval_n,
        )


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes 8-bit AdamW (paged on CUDA) or torch AdamW, by config."""
    name, wd = cfg.train.optimizer, cfg.train.weight_decay
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    import bitsandbytes as bnb

    if name == "paged_adamw8bit" and device.type == "cuda":
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=wd)
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=wd)  # paging needs CUDA; plain 8-bit elsewhere


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total: int) -> Any:
    """Linear warmup, then cosine / linear decay to 0, or constant."""
    warmup = int(math.ceil(cfg.train.warmup_ratio * total))
    kind = cfg.train.lr_scheduler

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (i - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else max(1.0 - progress, 0.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def frames_loader(cfg: Config, image_size: int) -> Any:
    from tinyr1.video import load_frames

    v = cfg.video

    def load(sample: Any) -> torch.Tensor:
        return load_frames(sample.video, v.num_frames, image_size, fps=v.fps, max_frames=v.max_frames)

    return load


def load_split(cfg: Config, path: str | None) -> list[Any]:
    from tinyr1.data import load_dataset

    if path is None:
        return []
    return load_dataset(path, video_root=cfg.data.video_root, fmt=cfg.data.format)


def build_model(cfg: Config) -> tuple[Any, Any]:
    """Load the checkpoint (NF4 when configured), add LoRA, freeze the rest."""
    from tinyr1.kernels import apply_liger
    from tinyr1.model.loading import add_lora, load_tinyllava, prepare_for_training

    m = cfg.model
    loaded = load_tinyllava(m.path, quant=m.quant, dtype=m.dtype, device=m.device, attn_implementation=m.attn_implementation)
    if m.liger == "on" or (m.liger == "auto" and loaded.model.device.type == "cuda"):
        apply_liger(loaded.model.llm)
    add_lora(loaded.model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules)
    prepare_for_training(loaded.model, train_connector=m.train_connector, gradient_checkpointing=m.gradient_checkpointing)
    return loaded.model, loaded.tokenizer


def total_steps(cfg: Config, n_train: int) -> int:
    return cfg.train.steps or max(n_train // cfg.rollout.prompts_per_step, 1)


def train(
    cfg: Config, *, resume: Path | None = None, console: Console | None = None, stop_after: int | None = None
) -> Path:
    """Run the configured pipeline; returns the run folder. `stop_after` stops (with a checkpoint)
    after that many GRPO steps, as Ctrl-C would."""
    from tinyr1.coldstart import run_coldstart
    from tinyr1.feed import SampleFeeder
    from tinyr1.kernels import resolve_backend
    from tinyr1.log import RunLogger
    from tinyr1.model.loading import trainable_parameters
    from tinyr1.rewards import resolve_rewards
    from tinyr1.trainer import grpo_loop, resume_state, save_final

    console = console or Console()
    check_trainable(cfg)
    reward_funcs = resolve_rewards(cfg.rewards.weights)
    run_dir = Path(resume) if resume is not None else Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.toml")
    prepare_demo_assets(cfg, console)
    torch.manual_seed(cfg.train.seed)
    model, tok = build_model(cfg)
    image_size = cfg.video.image_size or model.cfg.image_size
    load = frames_loader(cfg, image_size)
    train_set, eval_set = load_split(cfg, cfg.data.train), load_split(cfg, cfg.data.eval)
    if cfg.train.eval_limit is not None:
        eval_set = eval_set[: cfg.train.eval_limit]
    steps = total_steps(cfg, len(train_set))
    params = list(trainable_parameters(model).values())
    optimizer = make_optimizer(cfg, params, cfg.train.lr, model.device)
    scheduler = make_scheduler(cfg, optimizer, steps * cfg.grpo.num_iterations)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    ctx = Ctx(cfg, model, tok, optimizer, scheduler, generator, reward_funcs, resolve_backend(cfg.model.kernels, model.device))
    console.print(describe_run(ctx))
    state = resume_state(ctx, run_dir) if resume is not None else None
    if resume is not None and state is None:
        console.print(f"{run_dir} has no complete checkpoint yet: starting from the beginning")
    state = state or TrainState()
    with RunLogger(run_dir, steps, completions_every=cfg.log.completions_every, num_completions=cfg.log.num_completions,
                   console=console, start_step=state.step, enabled_progress=cfg.log.progress) as logger:

        def evaluate_at(step: int) -> dict[str, float]:
            return run_eval(cfg, ctx, eval_set, load, logger, step)

        if not state.coldstart_done:
            if cfg.coldstart.enabled:
                run_coldstart(cfg, ctx, load_split(cfg, cfg.data.coldstart), load, console)
            state = replace(state, coldstart_done=True)
            if eval_set:
                evaluate_at(0)
            save_state(ctx, run_dir, state)
        feeder = SampleFeeder(train_set, load, seed=cfg.train.seed, max_bad_fraction=cfg.data.max_bad_fraction,
                              state=state, on_skip=logger.note)
        state = grpo_loop(ctx, run_dir, state, feeder, steps, logger, evaluate_at, stop_after)
        if state.step >= steps:
            save_final(ctx, run_dir)
            if eval_set:
                evaluate_at(state.step)
                print_eval_summary(run_dir, console)
    return run_dir


def describe_run(ctx: Ctx) -> str:
    """One line saying what this run really uses (device, quantization, kernels), before step 1."""
    from tinyr1.model.loading import trainable_parameters

    cfg, model = ctx.cfg, ctx.model
    params = trainable_parameters(model).values()
    trainable, n_params = sum(p.numel() for p in params), len(params)
    ro = cfg.rollout
    return (f"run: {cfg.preset} on {model.device} · LLM {cfg.model.quant} {cfg.model.dtype} · LoRA r{cfg.lora.r} "
            f"({trainable / 1e6:.2f}M trainable in {n_params} tensors) · {ro.prompts_per_step} prompts x G={ro.num_generations}"
            f" · log-probs: {ctx.backend} kernel")


def print_eval_summary(run_dir: Path, console: Console) -> None:
    """Held-out accuracy before and after GRPO, side by side, with standard errors."""
    from rich.table import Table

    from tinyr1.log import read_eval

    rows = read_eval(run_dir)
    if len(rows) < 2:
        return
    first, last = rows[0], rows[-1]
    table = Table(title=f"held-out accuracy ({int(last.get('n', 0))} clips)")
    for col in ("", "greedy", "sampled (T, 4 per clip)", "format"):
        table.add_column(col)
    for name, r in ((f"after cold start (step {first['step']})", first), (f"after GRPO (step {last['step']})", last)):
        table.add_row(name, f"{r['accuracy']:.3f} ± {r['accuracy_stderr']:.3f}", f"{r['sampled_accuracy']:.3f}",
                      f"{r['format_rate']:.3f}")
    table.add_row("GRPO gain", f"{last['accuracy'] - first['accuracy']:+.3f}",
                  f"{last['sampled_accuracy'] - first['sampled_accuracy']:+.3f}", "")
    console.print(table)


def run_eval(cfg: Config, ctx: Ctx, samples: list[Any], load: Any, logger: Any, step: int) -> dict[str, float]:
    """Held-out accuracy: greedy, and sampled at the training temperature (the quantity RL optimizes)."""
    from tinyr1.evaluate import evaluate

    # Batches no larger than a training rollout (prompts_per_step x G rows), so eval fits wherever training does.
    common = dict(load_frames=load, max_new_tokens=cfg.rollout.max_new_tokens, batch_size=cfg.rollout.prompts_per_step,
                  seed=cfg.train.seed + 7, prompt_mode="train")
    greedy = evaluate(ctx.model, ctx.tokenizer, samples, temperature=0.0, **common)
    sampled = evaluate(ctx.model, ctx.tokenizer, samples, temperature=cfg.rollout.temperature,
                       num_samples=min(4, cfg.rollout.num_generations),
                       top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p, **common)
    out = {"accuracy": greedy.accuracy, "accuracy_stderr": greedy.stderr, "format_rate": greedy.format_rate,
           "sampled_accuracy": sampled.accuracy, "n": greedy.n}
    logger.log_eval(step, out)
    return out


def check_resume(cfg: Config, run_dir: Path) -> None:
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"--resume {run_dir}: no config.toml there; is this a tinyr1 run folder?")
