"""One training run from a `Config`: context, cold start, GRPO, evaluations, the final adapter.

`train(cfg)` is what `tinyr1 train` calls once the run's inputs exist (the CLI makes the tiny demo's
checkpoint and clips). Everything goes under the run folder: run.json (the run's identity),
config.toml, metrics.jsonl, completions.jsonl, eval.jsonl, checkpoints/, final/ (the adapter).
The folder is locked while a process trains in it (`runfolder`). An evaluation row is never
lost to a resume: rows up to the checkpoint are kept, and an evaluation that was due at that
checkpoint but is missing (killed during it, or stopped by a signal first) runs again.

Under torchrun every rank runs `train`; rank 0 owns the run folder (its checks, identity, lock and
every file), the others compute their share (`tinyr1.distributed`) and hear rank 0's decisions.
The cold start is small (the paper's has 16 samples), so every rank runs it the same way and rank
0's weights are then broadcast.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tinyr1 import distributed as dist
from tinyr1.checkpoint import TrainState, latest_checkpoint, remove_stale_temps
from tinyr1.coldstart import run_coldstart
from tinyr1.config import Config
from tinyr1.config_io import save_config
from tinyr1.config_validate import check_trainable
from tinyr1.context import Context, build_context, frames_loader, load_split, total_steps
from tinyr1.data import Sample
from tinyr1.errors import DiskError
from tinyr1.evaluate import EvalResult, evaluate
from tinyr1.feed import SampleFeeder
from tinyr1.log import QuietLogger, RunLogger, read_eval
from tinyr1.model.loading import trainable_parameters
from tinyr1.reward_modules import locate_all
from tinyr1.runfolder import check_fresh, read_identity, run_lock, start_run
from tinyr1.storage import check_writable, disk_error, tree_bytes
from tinyr1.trainer import grpo_loop, resume_state, save_final, save_state

EVAL_SEED_OFFSET = 7  # evaluation sampling draws from its own seed, never the training sampler's


def train(
    cfg: Config, *, resume: Path | None = None, console: Console | None = None, stop_after: int | None = None,
    force: bool = False, rewards_path: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Run the configured pipeline; returns the run folder. `stop_after` stops (with a checkpoint)
    after that many GRPO steps, as Ctrl-C would. A fresh run needs a new or empty
    `train.output_dir` (or `force` to replace the run in it, see `runfolder`). Custom reward modules
    come only from the `rewards_path` folders; run.json records their files."""
    console = console or Console()
    if not dist.is_main():
        console = Console(quiet=True)  # rank 0 speaks for the run
    dist.check_prompts_divisible(cfg.rollout.prompts_per_step, dist.world_size())
    check_trainable(cfg)
    run_dir = Path(resume) if resume is not None else Path(cfg.train.output_dir)

    def checks() -> Path:  # rank 0's folder is the run's, whatever the others resolved
        if resume is None:
            check_fresh(run_dir, force=force)  # before minutes of loading
        check_writable(run_dir, "the run folder")
        return run_dir

    run_dir = dist.main_first(checks)
    train_set, eval_set = load_split(cfg, cfg.data.train), load_split(cfg, cfg.data.eval)
    if cfg.train.eval_limit is not None:
        eval_set = eval_set[: cfg.train.eval_limit]
    steps = total_steps(cfg, len(train_set))
    ctx = build_context(cfg, total_steps=steps, rewards_path=rewards_path)  # all loads before anything is written
    dist.seed_rank_rng(cfg.train.seed)  # ranks > 0: their own dropout streams
    dist.broadcast_parameters(list(trainable_parameters(ctx.model).values()))  # one initialization
    reward_files = {name: str(file) for name, (file, _) in locate_all(cfg.rewards.weights, rewards_path).items()}
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir) if dist.is_main() else nullcontext():

        def identify() -> str:
            identity = start_run(run_dir, cfg, force=force, reward_files=reward_files) if resume is None \
                else read_identity(run_dir)
            for tmp in remove_stale_temps(run_dir, identity.run_id):
                console.print(f"removed {tmp}: a checkpoint whose save was interrupted")
            return identity.run_id

        run_id = dist.main_first(identify)
        try:
            if dist.is_main():
                save_config(cfg, run_dir / "config.toml")
            _run(ctx, run_dir, run_id, train_set, eval_set, steps, resume is not None, console, stop_after)
        except (OSError, RuntimeError) as err:  # a full or read-only disk, in any library's words
            named = _named_disk_error(err, run_dir, run_id)
            if named is None:
                raise
            raise named from err
    return run_dir


def _named_disk_error(err: BaseException, run_dir: Path, run_id: str) -> DiskError | None:
    """`err` as a DiskError saying what survived, or None when it is not a disk problem."""
    latest = latest_checkpoint(run_dir, run_id=run_id)
    kept = f"checkpoint {latest.name} is intact; resume with --resume {run_dir}" if latest else "no checkpoint yet"
    need = tree_bytes(latest) if latest is not None else None
    return disk_error(err, run_dir, need_bytes=need, what="training", kept=kept)


def _run(ctx: Context, run_dir: Path, run_id: str, train_set: list[Sample], eval_set: list[Sample], steps: int,
         resuming: bool, console: Console, stop_after: int | None) -> None:
    """Cold start, GRPO and evaluations in a locked run folder, from its newest checkpoint when resuming."""
    cfg = ctx.cfg
    load = frames_loader(cfg, cfg.video.image_size or ctx.model.cfg.image_size)
    console.print(describe_run(ctx))
    state = resume_state(ctx, run_dir, run_id=run_id, note=console.print) if resuming else None
    if resuming and state is None:
        console.print(f"{run_dir} has no complete checkpoint yet: starting from the beginning")
    state = state or TrainState(run_id=run_id)
    logger_type = RunLogger if dist.is_main() else QuietLogger
    with logger_type(run_dir, steps, completions_every=cfg.log.completions_every, num_completions=cfg.log.num_completions,
                     console=console, start_step=state.step, enabled_progress=cfg.log.progress,
                     keep_eval_at_start=state.coldstart_done) as logger:
        # rows kept from before a resume; rank 0's reading, so every rank skips the same evaluations
        evaluated = dist.main_first(lambda: {int(r["step"]) for r in read_eval(run_dir)})
        listed_bad: set[str] = set()

        def evaluate_at(step: int) -> None:
            if step in evaluated:  # this state was evaluated before the run was interrupted
                return
            out, skipped = held_out_accuracy(ctx, eval_set, load, step)
            for msg in skipped:
                if msg not in listed_bad:
                    logger.note(f"evaluation skipped an unreadable video: {msg}")
                    listed_bad.add(msg)
            logger.log_eval(step, out)
            evaluated.add(step)

        if not state.coldstart_done:
            if cfg.coldstart.enabled:
                run_coldstart(ctx, load_split(cfg, cfg.data.coldstart), load, console)
                dist.broadcast_parameters(list(trainable_parameters(ctx.model).values()))
            state = replace(state, coldstart_done=True)
            if eval_set:
                evaluate_at(0)
            save_state(ctx, run_dir, state)
        elif eval_set and 0 < state.step < steps and cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
            evaluate_at(state.step)  # due at the checkpoint resumed from, and lost (or never run: a signal)
        feeder = SampleFeeder(train_set, load, seed=cfg.train.seed, max_bad_fraction=cfg.data.max_bad_fraction,
                              state=state, on_skip=logger.note)
        state = grpo_loop(ctx, run_dir, state, feeder, steps, logger, evaluate_at, stop_after)
        if state.step >= steps:
            if dist.is_main():
                save_final(ctx, run_dir)
            if eval_set:
                evaluate_at(state.step)
    dist.barrier()  # every rank returns once the run folder is complete


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
            f"G={ro.num_generations} · log-probs: {ctx.backend} kernel" + _backend_note(ctx))


def _backend_note(ctx: Context) -> str:
    """With model.backend = "unsloth": which fused kernels are bound (imports no unsloth)."""
    if ctx.cfg.model.backend != "unsloth":
        return ""
    from tinyr1.backends.unsloth import bound_layers, describe

    return f" · {describe(bound_layers(ctx.model.llm))}"


def held_out_accuracy(ctx: Context, samples: list[Sample], load: Callable[[Sample], torch.Tensor],
                      step: int) -> tuple[dict[str, float], list[str]]:
    """Held-out accuracy after `step` GRPO steps: greedy, and sampled as the rollout samples
    (`train.eval_samples` completions per clip at the training temperature, top-k and top-p: the
    quantity RL optimizes), and the unreadable videos skipped. Batches are no larger than a
    rollout's prompts, so evaluation fits wherever training does.

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
    out: dict[str, Any] = {"accuracy": greedy.accuracy, "accuracy_stderr": greedy.stderr,
                           "format_rate": greedy.format_rate, "sampled_accuracy": sampled.accuracy,
                           "sampled_accuracy_stderr": sampled.stderr, "n": greedy.n}
    sampled_by = sampled.by_category()
    if sampled_by:  # {category: {n clips, greedy accuracy and its standard error, the same sampled}}
        out["by_category"] = {
            name: {"n": int(g["n"]), "accuracy": g["accuracy"], "accuracy_stderr": g["accuracy_stderr"],
                   "sampled_accuracy": sampled_by[name]["accuracy"],
                   "sampled_accuracy_stderr": sampled_by[name]["accuracy_stderr"]}
            for name, g in greedy.by_category().items()
        }
    if greedy.skipped:
        out["skipped"] = len(greedy.skipped)  # unreadable videos, listed once in the log
    return out, greedy.skipped


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
