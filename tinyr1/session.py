"""One training run from a `Config`: context, cold start, GRPO, evaluations, the final adapter.

`train(cfg)` is what `tinyr1 train` calls once the run's inputs exist (the CLI makes the tiny demo's
checkpoint and clips). Everything goes under the run folder: config.toml, metrics.jsonl,
completions.jsonl, eval.jsonl, checkpoints/, final/ (the adapter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from tinyr1.checkpoint import TrainState
from tinyr1.coldstart import run_coldstart
from tinyr1.config import Config
from tinyr1.config_io import save_config
from tinyr1.config_validate import check_trainable
from tinyr1.context import Context, build_context, frames_loader, load_split, total_steps
from tinyr1.data import Sample
from tinyr1.evaluate import evaluate
from tinyr1.feed import SampleFeeder
from tinyr1.log import RunLogger
from tinyr1.model.loading import trainable_parameters
from tinyr1.trainer import grpo_loop, resume_state, save_final, save_state

EVAL_SEED_OFFSET = 7  # evaluation sampling draws from its own seed, never the training sampler's


def train(
    cfg: Config, *, resume: Path | None = None, console: Console | None = None, stop_after: int | None = None
) -> Path:
    """Run the configured pipeline; returns the run folder. `stop_after` stops (with a checkpoint)
    after that many GRPO steps, as Ctrl-C would."""
    console = console or Console()
    check_trainable(cfg)
    train_set, eval_set = load_split(cfg, cfg.data.train), load_split(cfg, cfg.data.eval)
    if cfg.train.eval_limit is not None:
        eval_set = eval_set[: cfg.train.eval_limit]
    steps = total_steps(cfg, len(train_set))
    ctx = build_context(cfg, total_steps=steps)  # data, rewards and weights load before anything is written
    run_dir = Path(resume) if resume is not None else Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.toml")
    load = frames_loader(cfg, cfg.video.image_size or ctx.model.cfg.image_size)
    console.print(describe_run(ctx))
    state = resume_state(ctx, run_dir) if resume is not None else None
    if resume is not None and state is None:
        console.print(f"{run_dir} has no complete checkpoint yet: starting from the beginning")
    state = state or TrainState()
    with RunLogger(run_dir, steps, completions_every=cfg.log.completions_every, num_completions=cfg.log.num_completions,
                   console=console, start_step=state.step, enabled_progress=cfg.log.progress) as logger:

        def evaluate_at(step: int) -> dict[str, float]:
            out = held_out_accuracy(ctx, eval_set, load, step)
            logger.log_eval(step, out)
            return out

        if not state.coldstart_done:
            if cfg.coldstart.enabled:
                run_coldstart(ctx, load_split(cfg, cfg.data.coldstart), load, console)
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
    return run_dir


def describe_run(ctx: Context) -> str:
    """One line saying what this run really uses (device, quantization, kernels), before step 1."""
    cfg, model = ctx.cfg, ctx.model
    params = trainable_parameters(model).values()
    trainable, n_params = sum(p.numel() for p in params), len(params)
    ro = cfg.rollout
    compute = str(model.compute_dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float", "fp")
    chosen = f"{compute} (auto)" if cfg.model.dtype == "auto" else compute
    scaling = " with loss scaling" if ctx.scaler is not None else ""
    return (f"run: {cfg.preset} on {model.device} · LLM {cfg.model.quant}, compute {chosen}{scaling} · LoRA r{cfg.lora.r} "
            f"({trainable / 1e6:.2f}M fp32 trainable in {n_params} tensors) · {ro.prompts_per_step} prompts x "
            f"G={ro.num_generations} · log-probs: {ctx.backend} kernel" + _backend_note(ctx))


def _backend_note(ctx: Context) -> str:
    """With model.backend = "unsloth": which fused kernels are bound (imports no unsloth)."""
    if ctx.cfg.model.backend != "unsloth":
        return ""
    from tinyr1.backends.unsloth import bound_layers, describe

    return f" · {describe(bound_layers(ctx.model.llm))}"


def held_out_accuracy(ctx: Context, samples: list[Sample], load: Callable[[Sample], torch.Tensor],
                      step: int) -> dict[str, float]:
    """Held-out accuracy after `step` GRPO steps: greedy, and sampled as the rollout samples
    (`train.eval_samples` completions per clip at the training temperature, top-k and top-p: the
    quantity RL optimizes). Batches are no larger than a rollout's prompts, so evaluation fits
    wherever training does."""
    cfg, ro = ctx.cfg, ctx.cfg.rollout
    common = dict(load_frames=load, max_new_tokens=ro.max_new_tokens, batch_size=ro.prompts_per_step,
                  seed=cfg.train.seed + EVAL_SEED_OFFSET, prompt_mode="train")
    greedy = evaluate(ctx.model, ctx.tokenizer, samples, temperature=0.0, **common)
    sampled = evaluate(ctx.model, ctx.tokenizer, samples, temperature=ro.temperature,
                       num_samples=min(cfg.train.eval_samples, ro.num_generations),
                       top_k=ro.top_k, top_p=ro.top_p, **common)
    return {"accuracy": greedy.accuracy, "accuracy_stderr": greedy.stderr, "format_rate": greedy.format_rate,
            "sampled_accuracy": sampled.accuracy, "n": greedy.n}
