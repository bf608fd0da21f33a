"""GRPO for TinyLLaVA-Video on one device: the step, the loop, then the helpers.

One step: sample G completions for each of B prompts (`rollout_step` -> `Rollout`), score them,
turn scores into group-relative advantages, and take `num_iterations` optimizer steps on the
clipped policy-gradient loss (`update_step`), micro-batched. Generation and updates share the
device: the rollout runs in eval mode with a KV cache, the update in train mode with gradient
checkpointing and a log-prob head that never builds [tokens x vocab] logits.

Where this departs from plain GRPO (Shao et al., 2024), and why:

1. Exact micro-batch normalization. The loss takes the step-wide normalizers (sequences, tokens),
   so any split of the B*G rows into micro-batches gives the gradient of the full batch (TRL divides
   per micro-batch, exact only for equal sizes). See `tinyr1.loss`.
2. The reference policy is the initial policy without a second copy of the LLM: the model with its
   LoRA adapters switched off and, when the connector trains, the video tokens of a frozen copy of
   the initial connector (small). With `grpo.beta = 0` no reference forward runs at all.
3. Advantage noise. `grpo.noise_std` adds N(0, s^2) to each advantage (TinyLLaVA-Video-R1's trick):
   groups whose rewards are all equal still move a little instead of giving no signal.
4. Shared prompt prefix. A micro-batch runs each of its prompts (system + ~512 video tokens +
   question, most of every row) once per decoder layer and its completions against that K/V. Exact:
   the same log-probs and gradients as one full row per completion (tests/test_prefix.py).
5. No sampling-time log-probs. With `num_iterations = 1` the ratio's denominator is the update's own
   detached log-prob (ratio 1, exact); the decode's log-probs differ by rounding (KV cache, other
   kernels) and would bias the clipping. With more iterations the old policy is recomputed once.
6. A non-finite loss or gradient skips the optimizer step (logged), never applies it. Trainable
   weights are fp32 master weights under bf16/fp16 compute; fp16 adds loss scaling.
7. Data-parallel under torchrun (`tinyr1.distributed`): N ranks make the same update as one rank
   running all prompts. Prompt j's completions are drawn from a generator keyed by the step and j's
   index in the global batch (`sample_completions`), rewards are gathered for the advantages and
   metrics, the loss takes the global row and token counts, and the ranks' gradients are summed
   before clipping. A plain one-process run keeps its single batched sampling stream.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tinyr1 import distributed as dist
from tinyr1.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_rank_rng,
    rank_rng_state,
    resume_latest,
    save_adapter,
    save_checkpoint,
)
from tinyr1.context import Context
from tinyr1.data import Sample, reward_columns
from tinyr1.evaluate import decode_completions, prompt_tensor
from tinyr1.feed import SampleFeeder
from tinyr1.log import (
    PEAK_MEMORY,
    PEAK_MEMORY_STEP,
    ROLLOUT_TIME,
    STEP_TIME,
    UPDATE_TIME,
    RunLogger,
    peak_memory_bytes,
    step_peak_memory_bytes,
)
from tinyr1.logprobs import completion_logprobs
from tinyr1.loss import completion_mask, group_advantages, policy_loss, sum_metrics, truncated_rows
from tinyr1.model.loading import adapters_disabled, trainable_parameters
from tinyr1.rewards import compute_rewards
from tinyr1.rollout import Rollout, sample_group

Batch = list[tuple[Sample, torch.Tensor]]  # (sample, pixels [T, 3, S, S]) per prompt


def grpo_step(ctx: Context, batch: Batch) -> tuple[Rollout, dict[str, float]]:
    """One GRPO step on B prompts: rollout -> rewards -> advantages -> update; (rollout, metrics)."""
    step_peak_memory_bytes(ctx.model.device)  # the step's own peak starts here (saves, evals excluded)
    t0 = time.perf_counter()
    ro = rollout_step(ctx, batch)  # G completions per prompt, scored, with advantages
    t1 = time.perf_counter()
    update = update_step(ctx, ro)  # num_iterations optimizer steps on it
    t2 = time.perf_counter()
    metrics = step_metrics(ctx, ro, update)
    metrics.update({STEP_TIME: t2 - t0, ROLLOUT_TIME: t1 - t0, UPDATE_TIME: t2 - t1,
                    PEAK_MEMORY_STEP: step_peak_memory_bytes(ctx.model.device),
                    PEAK_MEMORY: peak_memory_bytes(ctx.model.device)})
    return ro, metrics


def grpo_loop(ctx: Context, run_dir: Path, state: TrainState, feeder: SampleFeeder, total_steps: int,
              logger: RunLogger, evaluate_fn: Callable[[int], Any], stop_after: int | None = None) -> TrainState:
    """GRPO steps from `state.step` to `total_steps`, checkpointing and evaluating on schedule.

    A checkpoint is written before a periodic evaluation, so a kill during it loses no step; a
    SIGINT/SIGTERM finishes the current step (or evaluation), saves and returns. `stop_after` acts
    like a signal after that step (how the tests interrupt a run).
    """
    cfg = ctx.cfg
    with StopFlag() as flag:
        while state.step < total_steps:
            t0 = time.perf_counter()
            batch = feeder.next_batch(cfg.rollout.prompts_per_step)  # decodes the videos
            decode = time.perf_counter() - t0
            ro, metrics = grpo_step(ctx, batch)
            metrics[ROLLOUT_TIME] += decode  # the rollout's time includes reading its videos
            metrics[STEP_TIME] += decode
            metrics.update(dist.gather_max_and_per_rank(  # ranks > 1: the slowest rank, and each one
                {k: metrics[k] for k in (STEP_TIME, ROLLOUT_TIME, UPDATE_TIME, PEAK_MEMORY_STEP, PEAK_MEMORY)},
                per_rank=(STEP_TIME, ROLLOUT_TIME, UPDATE_TIME)))
            if metrics["skipped"]:
                logger.note(f"step {state.step + 1}: non-finite loss or gradient; update skipped")
            logger.log_step(state.step, metrics)
            logger.log_completions(state.step, gathered_completion_rows(ro, [s for s, _ in batch]))
            state = replace(feeder.state(), step=state.step + 1, coldstart_done=state.coldstart_done)
            done = state.step >= total_steps
            flag.stop = dist.any_rank(flag.stop or state.step == stop_after)  # all ranks stop at the same step
            saved = bool(flag.stop or done or (cfg.train.save_every and state.step % cfg.train.save_every == 0))
            if saved:
                save_state(ctx, run_dir, state)
            if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and not done and not flag.stop:
                evaluate_fn(state.step)
                flag.stop = dist.any_rank(flag.stop)
                if flag.stop and not saved:  # the signal came during the evaluation
                    save_state(ctx, run_dir, state)
            if flag.stop:
                logger.note(f"stopped by signal after step {state.step}; resume with --resume {run_dir}")
                break
    return state


# ---- the two phases ----------------------------------------------------------------------------
def rollout_step(ctx: Context, batch: Batch) -> Rollout:
    """Sample G completions per prompt (no grad, KV cache), score them and compute advantages."""
    cfg, model, tok = ctx.cfg, ctx.model, ctx.tokenizer
    g = cfg.rollout.num_generations
    model.eval()
    features = [model.vision_features(frames) for _, frames in batch]  # B x [1, T*P', Dv], once per video
    with torch.no_grad():
        video_tokens = [model.connect(f) for f in features]  # B x [Q, D]
        reference_tokens = ([model.connect(f, ctx.reference_connector) for f in features]
                            if ctx.reference_connector is not None else None)  # B x [Q, D]: the KL's initial connector
    prompt_ids = [prompt_tensor(tok, s.question, "train") for s, _ in batch]  # B x [P_b]
    ids, noise = sample_completions(ctx, prompt_ids, video_tokens)  # [B*G, L], the advantage noise's generator
    texts = decode_completions(tok, ids, completion_mask(ids, tok.eos_token_id))
    columns = reward_columns([s for s, _ in batch], g)  # every key of any row, None where a row lacks it
    per_reward, total = compute_rewards(ctx.reward_funcs, texts, columns)  # [B*G, R], [B*G]
    adv, reward_stats = group_advantages(  # over the global batch: "batch" scaling and the stats see every rank
        dist.all_gather_rows(total.float()), g, scale=cfg.grpo.scale_rewards, noise_std=cfg.grpo.noise_std,
        generator=noise,
    )  # [world*B*G]
    first = dist.rank() * len(batch)  # global index of this rank's first prompt (equal contiguous shares)
    adv = adv[first * g: (first + len(batch)) * g]  # [B*G] this rank's rows
    return Rollout(
        features=features, video_tokens=video_tokens, prompt_ids=prompt_ids,
        row_prompt=torch.arange(len(batch)).repeat_interleave(g), completion_ids=ids,
        completion_mask=completion_mask(ids, tok.eos_token_id, mask_truncated=cfg.grpo.mask_truncated_completions),
        truncated=truncated_rows(ids, tok.eos_token_id), texts=texts, rewards=per_reward, reward_total=total,
        advantages=adv.to(ids.device), reward_stats=reward_stats, reference_video_tokens=reference_tokens,
    )


def update_step(ctx: Context, ro: Rollout) -> dict[str, float]:
    """`num_iterations` optimizer steps on one rollout, micro-batched with gradient accumulation."""
    cfg, model = ctx.cfg, ctx.model
    model.train()
    model.vision_tower.eval()
    n = ro.completion_ids.shape[0] * dist.world_size()  # rows of the global batch (equal shares)
    mask = ro.completion_mask.to(torch.float32)  # [B*G, L]
    total_tokens = max(dist.all_reduce_sum(int(mask.sum().item())), 1)  # active tokens of the global batch
    ref = reference_logprobs(ctx, ro) if cfg.grpo.beta > 0 else None  # [B*G, L]
    old = old_logprobs(ctx, ro) if cfg.grpo.num_iterations > 1 else None  # [B*G, L]
    params = list(trainable_parameters(model).values())
    metrics: dict[str, float] = {}
    for _ in range(cfg.grpo.num_iterations):
        parts = []
        for rows in micro_batches(ro.completion_ids.shape[0], cfg.train.micro_batch_size):
            logp, ent = completion_logprobs(model, ro, rows, temperature=cfg.rollout.temperature,
                                            backend=ctx.backend, with_entropy=True)  # [n_mb, L] each
            loss, m = policy_loss(
                logp, ro.advantages[rows], mask[rows],
                old_logp=old[rows] if old is not None else None,
                ref_logp=ref[rows] if ref is not None else None,
                loss_type=cfg.grpo.loss_type, beta=cfg.grpo.beta, epsilon=cfg.grpo.epsilon,
                epsilon_high=cfg.grpo.epsilon_high, total_sequences=n, total_tokens=total_tokens,
                max_completion_length=cfg.rollout.max_new_tokens, kl_clamp=cfg.grpo.kl_clamp, entropy=ent,
            )
            (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
            parts.append(m)
        metrics = dist.sum_over_ranks(sum_metrics(parts))  # each rank's share of the global value
        dist.all_reduce_gradients(params)  # the full-batch gradient on every rank, before clipping
        metrics["grad_norm"] = _apply_gradients(ctx, params, metrics)
    return metrics


# ---- helpers -----------------------------------------------------------------------------------
def micro_batches(n: int, size: int) -> Iterator[torch.Tensor]:
    """Row indices [<= size] of consecutive micro-batches covering n rows."""
    for start in range(0, n, size):
        yield torch.arange(start, min(start + size, n))


def sample_completions(ctx: Context, prompt_ids: list[torch.Tensor],
                       video_tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Generator]:
    """Completion ids [B*G, L] (eos-padded) and the generator of this step's advantage noise.

    One process (`tinyr1 train`): one batched sampler call drawing from the run's stream
    `ctx.generator`. Under torchrun: prompt j's completions come from a generator keyed by (a seed
    drawn from `ctx.generator`, the same on every rank; j's global index), so they are the same
    whichever rank draws them and however many ranks there are; the noise is keyed by the step.
    One batched call takes a generator per prompt; the rows are eos-padded to the longest completion
    over all ranks, so every rank's update has one process's shapes.
    """
    rc = ctx.cfg.rollout
    eos = ctx.tokenizer.eos_token_id
    kw: dict[str, Any] = dict(group_size=rc.num_generations, max_new_tokens=rc.max_new_tokens, eos_id=eos,
                              temperature=rc.temperature, top_k=rc.top_k, top_p=rc.top_p,
                              sync_every=rc.sync_every, cuda_graphs=rc.cuda_graphs)
    if not dist.active():
        return sample_group(ctx.model, prompt_ids, video_tokens, generator=ctx.generator, **kw)[0], ctx.generator
    step_seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))  # the same draw on every rank
    first = dist.rank() * len(prompt_ids)  # global index of this rank's first prompt
    streams = [dist.keyed_generator(step_seed, first + b) for b in range(len(prompt_ids))]
    local = sample_group(ctx.model, prompt_ids, video_tokens, generator=streams, **kw)[0]  # [B*G, L_rank]
    # Rows stop early only when all rows have ended, so the eos padding never ends a truncated row.
    width = dist.all_reduce_max(local.shape[1])
    ids = torch.full((local.shape[0], width), eos, dtype=torch.long, device=local.device)  # [B*G, L]
    ids[:, : local.shape[1]] = local
    return ids, dist.keyed_generator(step_seed, "noise")


def reference_logprobs(ctx: Context, ro: Rollout) -> torch.Tensor:
    """Log-probs [B*G, L] under the KL reference, the initial policy: LoRA adapters off and, when the
    connector trains, the initial connector's video tokens."""
    with adapters_disabled(ctx.model):
        return _logprobs_no_grad(ctx, ro, reference=True)


def old_logprobs(ctx: Context, ro: Rollout) -> torch.Tensor:
    """Log-probs [B*G, L] under the policy before this step's first optimizer step."""
    return _logprobs_no_grad(ctx, ro, reference=False)


def _logprobs_no_grad(ctx: Context, ro: Rollout, *, reference: bool) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for rows in micro_batches(ro.completion_ids.shape[0], ctx.cfg.train.micro_batch_size):
            logp, _ = completion_logprobs(ctx.model, ro, rows, temperature=ctx.cfg.rollout.temperature,
                                          backend=ctx.backend, reference=reference)
            out.append(logp)
    return torch.cat(out)


def _apply_gradients(ctx: Context, params: list[torch.nn.Parameter], metrics: dict[str, float]) -> float:
    """Clip and step; a non-finite loss or gradient skips the step (logged), never applies it.

    With fp16 loss scaling the gradients are unscaled before clipping, and a skipped step lowers
    the scale (an overflow is how the scaler learns it is too high).
    """
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
    max_norm = ctx.cfg.train.max_grad_norm if ctx.cfg.train.max_grad_norm > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    finite = math.isfinite(norm) and math.isfinite(metrics.get("loss", 0.0))
    metrics["skipped"] = 0.0 if finite else 1.0
    if finite:
        if ctx.scaler is not None:
            ctx.scaler.step(ctx.optimizer)
        else:
            ctx.optimizer.step()
    if ctx.scaler is not None:
        ctx.scaler.update()
        metrics["loss_scale"] = float(ctx.scaler.get_scale())
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return norm


def step_metrics(ctx: Context, ro: Rollout, update: dict[str, float]) -> dict[str, float]:
    """One step's metrics under TRL's names (docs/ORIGINAL.md §2)."""
    full = completion_mask(ro.completion_ids, ctx.tokenizer.eos_token_id).float()  # [B*G, L]
    lengths = dist.all_gather_rows(full.sum(1))  # [world*B*G]: every rank's rows
    rewards = dist.all_gather_rows(ro.rewards.float())  # [world*B*G, R]
    out: dict[str, float] = {
        **ro.reward_stats,  # reward, reward_std, frac_reward_zero_std from group_advantages (global)
        "completions/mean_length": lengths.mean().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": dist.all_gather_rows(ro.truncated.float()).mean().item(),
        "lr": ctx.scheduler.get_last_lr()[0],
    }
    for j, (name, _, _) in enumerate(ctx.reward_funcs):
        out[f"rewards/{name}/mean"] = rewards[:, j].mean().item()
    out.update(update)
    return out


def completion_rows(ro: Rollout, samples: list[Sample]) -> list[dict[str, Any]]:
    """Completions for completions.jsonl, the first of every group first, so groups are visible."""
    prompts = ro.row_prompt.tolist()
    rank = [i - prompts.index(p) for i, p in enumerate(prompts)]  # position of each row in its group
    rows = []
    for i in sorted(range(len(ro.texts)), key=lambda i: (rank[i], prompts[i])):
        s = samples[prompts[i]]
        rows.append({
            "prompt_id": s.id, "answer": s.answer, "completion": ro.texts[i],
            "reward": float(ro.reward_total[i]), "rewards": [float(x) for x in ro.rewards[i]],
            "advantage": float(ro.advantages[i]),
        })
    return rows


def gathered_completion_rows(ro: Rollout, samples: list[Sample]) -> list[dict[str, Any]]:
    """`completion_rows` of the global batch (what rank 0 writes): the ranks' rows interleaved so the
    order is the one process's, position in group first, then the global prompt index."""
    parts = dist.all_gather_objects(completion_rows(ro, samples))  # world x [B*G] rows
    if len(parts) == 1:
        return parts[0]
    b = len(samples)  # each rank's list holds b rows per position in the group
    return [row for k in range(ro.group_size) for part in parts for row in part[k * b: (k + 1) * b]]


class StopFlag:
    """SIGINT/SIGTERM finish the current step, save, and exit cleanly. `StopFlag.received` keeps the
    signal that stopped the last loop (None: it ran to the end), for the CLI's exit code."""

    received: int | None = None

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        StopFlag.received = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.stop = True
        StopFlag.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---- checkpoints -------------------------------------------------------------------------------
def save_state(ctx: Context, run_dir: Path, state: TrainState) -> None:
    """Checkpoint everything `--resume` needs (atomic: temp folder + rename). Called on every rank:
    under torchrun rank 0 writes, with every rank's RNG state (weights and optimizer are the same on
    all ranks); a plain process writes the files it always wrote."""
    rank_rng = dist.all_gather_objects(rank_rng_state()) if dist.active() else None
    if dist.is_main():
        save_checkpoint(run_dir, state, model=ctx.model, optimizer=ctx.optimizer, scheduler=ctx.scheduler,
                        generator=ctx.generator, train_connector=ctx.cfg.model.train_connector, scaler=ctx.scaler,
                        rank_rng=rank_rng, torchrun=dist.active())
    dist.barrier()  # the checkpoint is complete before any rank goes on


def resume_state(ctx: Context, run_dir: Path, *, run_id: str = "",
                 note: Callable[[str], None] = print) -> TrainState | None:
    """Restore the newest intact checkpoint of this run (`run_id`) into `ctx`; None when there is none.

    Under torchrun rank 0 picks the checkpoint (moving a corrupt one aside) and the other ranks
    load the one it picked; each rank then restores its own RNG state, and `note` hears when the
    checkpoint was made by another number of ranks or another launcher.
    """
    if dist.is_main():
        state = resume_latest(run_dir, run_id=run_id, note=note, model=ctx.model, optimizer=ctx.optimizer,
                              scheduler=ctx.scheduler, generator=ctx.generator, scaler=ctx.scaler)
        ckpt = latest_checkpoint(run_dir, run_id=run_id) if state is not None else None
    ckpt = dist.broadcast_object(ckpt if dist.is_main() else None)
    if ckpt is None:
        return None
    if not dist.is_main():
        state = load_checkpoint(ckpt, model=ctx.model, optimizer=ctx.optimizer, scheduler=ctx.scheduler,
                                generator=ctx.generator, scaler=ctx.scaler)
    now = dist.world_size(), dist.active()
    made = load_rank_rng(ckpt, dist.rank(), *now)
    if made != now:
        dist.seed_rank_rng(dist.keyed_seed(ctx.cfg.train.seed, "resume", state.step))  # fresh streams, ranks > 0
        note(f"{ckpt} was written by {_launch(*made)} and resumes on {_launch(*now)}: the adapter, optimizer, "
             "schedule and data position continue; " + (
                 "prompts keep their sampling streams, but completions can differ from an uninterrupted run "
                 "(per-rank random streams restart, and the batch split changes rounding)" if made[1] and now[1]
                 else "sampling differs from an uninterrupted run (one process draws one stream for the whole "
                 "batch, torchrun one per prompt)"))
    return state


def _launch(world: int, torchrun: bool) -> str:
    return f"{world} torchrun rank(s)" if torchrun else "one process (no torchrun)"


def save_final(ctx: Context, run_dir: Path) -> Path:
    """The finished run's adapter (+ connector) in RUN/final: what `eval` and `merge` take."""
    out = run_dir / "final"
    save_adapter(ctx.model, out, train_connector=ctx.cfg.model.train_connector)
    return out
