"""One training run from a `Config`: context, cold start, GRPO, evaluations, the final adapter.

`train(cfg)` is what `tinyr1 train` calls once the run's inputs exist (the CLI makes the tiny demo's
checkpoint and clips). Everything goes under the run folder: config.toml, metrics.jsonl,
completions.jsonl, eval.jsonl, checkpoints/, final/ (the adapter).

Under torchrun every rank runs `train`; rank 0 writes the run folder, the others compute their share
(`tinyr1.distributed`). The cold start is small (the paper's has 16 samples), so every rank runs it
the same way and rank 0's weights are then broadcast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from tinyr1 import distributed as dist
from tinyr1.checkpoint import TrainState
from tinyr1.coldstart import run_coldstart
from tinyr1.config import Config
from tinyr1.config_io import save_config
from tinyr1.config_validate import check_trainable
from tinyr1.context import Context, build_context, frames_loader, load_split, total_steps
from tinyr1.data import Sample
from tinyr1.evaluate import EvalResult, evaluate
from tinyr1.feed import SampleFeeder
from tinyr1.log import QuietLogger, RunLogger
from tinyr1.model.loading import trainable_parameters
from tinyr1.trainer import grpo_loop, resume_state, save_final, save_state

EVAL_SEED_OFFSET = 7  # evaluation sampling draws from its own seed, never the training sampler's


def train(
    cfg: Config, *, resume: Path | None = None, console: Console | None = None, stop_after: int | None = None
) -> Path:
    """Run the configured pipeline; returns the run folder. `stop_after` stops (with a checkpoint)
    after that many GRPO steps, as Ctrl-C would."""
    console = console or Console()
    if not dist.is_main():
        console = Console(quiet=True)  # rank 0 speaks for the run
    dist.check_prompts_divisible(cfg.rollout.prompts_per_step, dist.world_size())
    check_trainable(cfg)
    train_set, eval_set = load_split(cfg, cfg.data.train), load_split(cfg, cfg.data.eval)
    if cfg.train.eval_limit is not None:
        eval_set = eval_set[: cfg.train.eval_limit]
    steps = total_steps(cfg, len(train_set))
    ctx = build_context(cfg, total_steps=steps)  # data, rewards and weights load before anything is written
    dist.seed_rank_rng(cfg.train.seed)  # ranks > 0: their own dropout streams
    dist.broadcast_parameters(list(trainable_parameters(ctx.model).values()))  # one initialization
    run_dir = Path(resume) if resume is not None else Path(cfg.train.output_dir)
    run_dir = Path(dist.broadcast_object(str(run_dir)))  # rank 0's folder is the run's
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.toml")
    load = frames_loader(cfg, cfg.video.image_size or ctx.model.cfg.image_size)
    console.print(describe_run(ctx))
    state = resume_state(ctx, run_dir, note=console.print) if resume is not None else None
    if resume is not None and state is None:
        console.print(f"{run_dir} has no complete checkpoint yet: starting from the beginning")
    state = state or TrainState()
    logger_type = RunLogger if dist.is_main() else QuietLogger
    with logger_type(run_dir, steps, completions_every=cfg.log.completions_every, num_completions=cfg.log.num_completions,
                     console=console, start_step=state.step, enabled_progress=cfg.log.progress) as logger:

        def evaluate_at(step: int) -> dict[str, float]:
            out = held_out_accuracy(ctx, eval_set, load, step)
            logger.log_eval(step, out)
            return out

        if not state.coldstart_done:
            if cfg.coldstart.enabled:
                run_coldstart(ctx, load_split(cfg, cfg.data.coldstart), load, console)
                dist.broadcast_parameters(list(trainable_parameters(ctx.model).values()))
            state = replace(state, coldstart_done=True)
            if eval_set:
                evaluate_at(0)
            save_state(ctx, run_dir, state)
        feeder = SampleFeeder(train_set, load, seed=cfg.train.seed, max_bad_fraction=cfg.data.max_bad_fraction,
                              state=state, on_skip=logger.note)
        state = grpo_loop(ctx, run_dir, state, feeder, steps, logger, evaluate_at, stop_after)
        if state.step >= steps:
            if dist.is_main():
                save_final(ctx, run_dir)
            if eval_set:
                evaluate_at(state.step)
    dist.barrier()  # every rank returns once the run folder is complete
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
    world = dist.world_size()
    ranks = f" ({world} ranks x {ro.prompts_per_step // world})" if world > 1 else ""
    return (f"run: {cfg.preset} on {model.device} · LLM {cfg.model.quant}, compute {chosen}{scaling} · LoRA r{cfg.lora.r} "
            f"({trainable / 1e6:.2f}M fp32 trainable in {n_params} tensors) · {ro.prompts_per_step} prompts{ranks} x "
            f"G={ro.num_generations} · log-probs: {ctx.backend} kernel")


def held_out_accuracy(ctx: Context, samples: list[Sample], load: Callable[[Sample], torch.Tensor],
                      step: int) -> dict[str, float]:
    """Held-out accuracy after `step` GRPO steps: greedy, and sampled as the rollout samples
    (`train.eval_samples` completions per clip at the training temperature, top-k and top-p: the
    quantity RL optimizes). Batches are no larger than a rollout's prompts, so evaluation fits
    wherever training does.

    Under torchrun each rank evaluates its contiguous share of `samples` and the results are
    gathered on every rank (rank 0 logs them). Greedy answers are those of one process; the sampled
    ones come from one stream per rank, so they match one process in distribution, not draw for draw.
    """
    cfg, ro = ctx.cfg, ctx.cfg.rollout
    world, me = dist.world_size(), dist.rank()
    start, end = dist.shard_range(len(samples), me, world)
    seed = cfg.train.seed + EVAL_SEED_OFFSET
    common = dict(load_frames=load, max_new_tokens=ro.max_new_tokens, batch_size=ro.prompts_per_step // world,
                  seed=seed if me == 0 else dist.keyed_seed(seed, "eval", me), prompt_mode="train",
                  sync_every=ro.sync_every, cuda_graphs=ro.cuda_graphs)
    num_samples = min(cfg.train.eval_samples, ro.num_generations)
    greedy = gather_eval(evaluate(ctx.model, ctx.tokenizer, samples[start:end], temperature=0.0, **common), 1)
    sampled = gather_eval(evaluate(ctx.model, ctx.tokenizer, samples[start:end], temperature=ro.temperature,
                                   num_samples=num_samples, top_k=ro.top_k, top_p=ro.top_p, **common), num_samples)
    return {"accuracy": greedy.accuracy, "accuracy_stderr": greedy.stderr, "format_rate": greedy.format_rate,
            "sampled_accuracy": sampled.accuracy, "n": greedy.n}


def gather_eval(result: EvalResult, num_samples: int) -> EvalResult:
    """The evaluation of all ranks' shares as one result, rows in sample order (itself in one process)."""
    parts = dist.all_gather_objects(result)
    if len(parts) == 1:
        return result
    rows = [r for part in parts for r in part.rows]
    skipped = [s for part in parts for s in part.skipped]
    accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else 0.0
    format_rate = sum(r["formatted"] for r in rows) / len(rows) if rows else 0.0
    return EvalResult(accuracy, format_rate, len(rows) // max(num_samples, 1), skipped, rows)
