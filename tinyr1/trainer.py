"""The GRPO loop, readable top to bottom: rollout -> reward -> advantage -> update -> log -> save.

Generation and updates share one device: the rollout runs in eval mode with the KV cache (prompt
prefilled once per prompt, shared by its G completions), the update in train mode with gradient
checkpointing and the chunked/fused log-prob (no [tokens x vocab] logits). The update shares the
prompt too: each micro-batch runs each of its prompts once (with grad: LoRA and the connector see
it) and that prompt's completions against its K/V. The reference policy
is the same model with the LoRA adapters switched off; with beta = 0 it never runs.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tinyr1.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_adapter, save_checkpoint
from tinyr1.config import Config
from tinyr1.evaluate import decode_completions, prompt_tensor
from tinyr1.feed import SampleFeeder
from tinyr1.loss import completion_mask, group_advantages, policy_loss, sum_metrics, truncated_rows
from tinyr1.model.loading import adapters_disabled, trainable_parameters
from tinyr1.model.tinyllava import TinyLlavaVideo
from tinyr1.rollout import Rollout, completion_logprobs, sample_group


@dataclass
class Ctx:
    """What one GRPO step needs; built once by `tinyr1.session.build_session`."""

    cfg: Config
    model: TinyLlavaVideo
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator  # sampling + advantage noise
    reward_funcs: list[tuple[str, float, Any]]
    backend: str  # log-prob kernel backend


class StopFlag:
    """SIGINT/SIGTERM finish the current step, save, and exit cleanly."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.stop = True

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def rollout_step(ctx: Ctx, batch: list[tuple[Any, torch.Tensor]]) -> tuple[Rollout, list[torch.Tensor]]:
    """Sample G completions per prompt, score them, and compute advantages."""
    from tinyr1.rewards import compute_rewards

    cfg, model, tok = ctx.cfg, ctx.model, ctx.tokenizer
    model.eval()
    feats = [model.vision_features(frames) for _, frames in batch]  # B x [1, T*P', Dv], computed once
    conn_dtype = model.connector._connector.linear.weight.dtype
    with torch.no_grad():
        video_tokens = [model.connector(f.to(conn_dtype))[0] for f in feats]  # B x [Q, D]
    prompt_ids = [prompt_tensor(tok, s.question, "train") for s, _ in batch]
    ro = cfg.rollout
    ids, logp = sample_group(
        model, prompt_ids, video_tokens, group_size=ro.num_generations, max_new_tokens=ro.max_new_tokens,
        eos_id=tok.eos_token_id, temperature=ro.temperature, top_k=ro.top_k, top_p=ro.top_p,
        generator=ctx.generator,
    )  # [B*G, L] each
    mask = completion_mask(ids, tok.eos_token_id, mask_truncated=cfg.grpo.mask_truncated_completions)
    texts = decode_completions(tok, ids, completion_mask(ids, tok.eos_token_id))
    g = ro.num_generations
    columns: dict[str, list[Any]] = {}
    for s, _ in batch:
        for key, value in s.columns().items():
            columns.setdefault(key, []).extend([value] * g)
    per_reward, total = compute_rewards(ctx.reward_funcs, texts, columns)  # [B*G, R], [B*G]
    adv, reward_stats = group_advantages(
        total.float(), g, scale=cfg.grpo.scale_rewards, noise_std=cfg.grpo.noise_std, generator=ctx.generator
    )
    rollout = Rollout(
        prompt_ids=prompt_ids, video_tokens=video_tokens, group_size=g, completion_ids=ids,
        completion_mask=mask, sample_logprobs=logp, truncated=truncated_rows(ids, tok.eos_token_id),
        texts=texts, rewards=per_reward, reward_total=total, advantages=adv.to(ids.device),
        reward_stats=reward_stats,
    )
    return rollout, feats


def _rows_logprobs(
    ctx: Ctx, ro: Rollout, feats: list[torch.Tensor], rows: torch.Tensor, *, grad: bool, entropy: bool,
    share_prefix: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [n, L] of completions `rows`; the connector re-runs with grad when it trains.

    Rows of one prompt get the same prompt and video tensor objects, so `completion_logprobs` runs
    each prompt of the micro-batch once and its rows against it (`share_prefix=False`: one full row
    per completion, the reference path).
    """
    model = ctx.model
    pidx = ro.prompt_index[rows.cpu()].tolist()
    if grad and ctx.cfg.model.train_connector:
        dtype = model.connector._connector.linear.weight.dtype
        vt_by_prompt = {p: model.connector(feats[p].to(dtype))[0] for p in sorted(set(pidx))}
        vts = [vt_by_prompt[p] for p in pidx]
    else:
        vts = [ro.video_tokens[p] for p in pidx]
    with torch.set_grad_enabled(grad):
        return completion_logprobs(
            model, [ro.prompt_ids[p] for p in pidx], vts, ro.completion_ids[rows],
            temperature=ctx.cfg.rollout.temperature, backend=ctx.backend, with_entropy=entropy,
            share_prefix=share_prefix,
        )


def _no_grad_logprobs(
    ctx: Ctx, ro: Rollout, feats: list[torch.Tensor], reference: bool, share_prefix: bool | None = None
) -> torch.Tensor:
    """Old-policy or reference (adapters off) log-probs for all rows, micro-batched, no grad."""
    n = ro.completion_ids.shape[0]
    out = []
    for start in range(0, n, ctx.cfg.train.micro_batch_size):
        rows = torch.arange(start, min(start + ctx.cfg.train.micro_batch_size, n))
        with adapters_disabled(ctx.model) if reference else contextlib.nullcontext():
            out.append(_rows_logprobs(ctx, ro, feats, rows, grad=False, entropy=False, share_prefix=share_prefix)[0])
    return torch.cat(out)  # [B*G, L]


def update_step(
    ctx: Ctx, ro: Rollout, feats: list[torch.Tensor], share_prefix: bool | None = None
) -> dict[str, float]:
    """num_iterations optimizer steps on one rollout, micro-batched with gradient accumulation.

    Each micro-batch runs its prompts once and their completions against them (`share_prefix`
    False: the unshared reference path, for tests).
    """
    cfg, model = ctx.cfg, ctx.model
    model.train()
    model.vision_tower.eval()
    n, length = ro.completion_ids.shape
    mask = ro.completion_mask.to(torch.float32)  # [B*G, L]
    total_tokens = max(int(mask.sum().item()), 1)
    ref = _no_grad_logprobs(ctx, ro, feats, True, share_prefix) if cfg.grpo.beta > 0 else None
    old = _no_grad_logprobs(ctx, ro, feats, False, share_prefix) if cfg.grpo.num_iterations > 1 else None
    params = list(trainable_parameters(model).values())
    metrics: dict[str, float] = {}
    for _ in range(cfg.grpo.num_iterations):
        parts = []
        for start in range(0, n, cfg.train.micro_batch_size):
            rows = torch.arange(start, min(start + cfg.train.micro_batch_size, n))
            logp, ent = _rows_logprobs(ctx, ro, feats, rows, grad=True, entropy=True,
                                       share_prefix=share_prefix)  # [n_mb, L] each
            loss, m = policy_loss(
                logp, ro.advantages[rows], mask[rows],
                old_logp=old[rows] if old is not None else None,
                ref_logp=ref[rows] if ref is not None else None,
                loss_type=cfg.grpo.loss_type, beta=cfg.grpo.beta, epsilon=cfg.grpo.epsilon,
                epsilon_high=cfg.grpo.epsilon_high, total_sequences=n, total_tokens=total_tokens,
                max_completion_length=cfg.rollout.max_new_tokens, kl_clamp=cfg.grpo.kl_clamp, entropy=ent,
            )
            loss.backward()
            parts.append(m)
        metrics = sum_metrics(parts)
        metrics["grad_norm"] = _apply_gradients(ctx, params, metrics)
    return metrics


def _apply_gradients(ctx: Ctx, params: list[torch.nn.Parameter], metrics: dict[str, float]) -> float:
    """Clip and step; a non-finite loss or gradient skips the step (logged), never applies it."""
    max_norm = ctx.cfg.train.max_grad_norm if ctx.cfg.train.max_grad_norm > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    finite = math.isfinite(norm) and math.isfinite(metrics.get("loss", 0.0))
    metrics["skipped"] = 0.0 if finite else 1.0
    if finite:
        ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return norm


def step_metrics(ctx: Ctx, ro: Rollout, update: dict[str, float]) -> dict[str, float]:
    """TRL's metric names for one step (REFERENCE.md §3)."""
    assert ro.rewards is not None
    full = completion_mask(ro.completion_ids, ctx.tokenizer.eos_token_id).float()  # [B*G, L]
    out: dict[str, float] = {
        **ro.reward_stats,  # reward, reward_std, frac_reward_zero_std from group_advantages
        "completions/mean_length": full.sum(1).mean().item(),
        "completions/max_length": full.sum(1).max().item(),
        "completions/clipped_ratio": ro.truncated.float().mean().item(),
        "lr": ctx.scheduler.get_last_lr()[0],
    }
    for j, (name, _, _) in enumerate(ctx.reward_funcs):
        out[f"rewards/{name}/mean"] = ro.rewards[:, j].float().mean().item()
    out.update(update)
    return out


def completion_rows(ro: Rollout, samples: list[Any], step: int) -> list[dict[str, Any]]:
    """A few completions for completions.jsonl (one per prompt first, so groups are visible)."""
    assert ro.rewards is not None and ro.advantages is not None and ro.reward_total is not None
    order = sorted(range(len(ro.texts)), key=lambda i: (i % ro.group_size, i // ro.group_size))
    rows = []
    for i in order:
        s = samples[i // ro.group_size]
        rows.append({
            "prompt_id": s.id, "answer": s.answer, "completion": ro.texts[i],
            "reward": float(ro.reward_total[i]), "rewards": [float(x) for x in ro.rewards[i]],
            "advantage": float(ro.advantages[i]),
        })
    return rows


def grpo_loop(ctx: Ctx, run_dir: Path, state: TrainState, feeder: SampleFeeder, total_steps: int,
              logger: Any, evaluate_fn: Any, stop_after: int | None = None) -> TrainState:
    """Run GRPO steps from `state.step` to `total_steps`, saving and evaluating on schedule.

    `stop_after` behaves like a SIGINT after that step (save, then return): used to test resume.
    """
    from tinyr1.log import PEAK_MEMORY, ROLLOUT_TIME, STEP_TIME, UPDATE_TIME, peak_memory_bytes

    cfg = ctx.cfg
    with StopFlag() as flag:
        while state.step < total_steps:
            t0 = time.perf_counter()
            batch = feeder.next_batch(cfg.rollout.prompts_per_step)
            ro, feats = rollout_step(ctx, batch)
            t1 = time.perf_counter()
            upd = update_step(ctx, ro, feats)
            t2 = time.perf_counter()
            m = step_metrics(ctx, ro, upd)
            m.update({STEP_TIME: t2 - t0, ROLLOUT_TIME: t1 - t0, UPDATE_TIME: t2 - t1,
                      PEAK_MEMORY: peak_memory_bytes(ctx.model.device)})
            if m["skipped"]:
                logger.note(f"step {state.step + 1}: non-finite loss or gradient; update skipped")
            logger.log_step(state.step, m)
            logger.log_completions(state.step, completion_rows(ro, [s for s, _ in batch], state.step))
            state = replace(feeder.state(), step=state.step + 1, coldstart_done=state.coldstart_done)
            done = state.step >= total_steps
            flag.stop = flag.stop or state.step == stop_after
            saved = bool(flag.stop or done or (cfg.train.save_every and state.step % cfg.train.save_every == 0))
            if saved:  # before a periodic evaluation, so a signal or kill during it loses no step
                save_state(ctx, run_dir, state)
            if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and not done and not flag.stop:
                evaluate_fn(state.step)
                if flag.stop and not saved:  # the signal came during the evaluation
                    save_state(ctx, run_dir, state)
            if flag.stop:
                logger.note(f"stopped by signal after step {state.step}; resume with --resume {run_dir}")
                break
    return state


def save_state(ctx: Ctx, run_dir: Path, state: TrainState) -> None:
    """Checkpoint everything `--resume` needs (atomic: temp folder + rename)."""
    save_checkpoint(run_dir, state, model=ctx.model, optimizer=ctx.optimizer, scheduler=ctx.scheduler,
                    generator=ctx.generator, train_connector=ctx.cfg.model.train_connector)


def resume_state(ctx: Ctx, run_dir: Path) -> TrainState | None:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    return load_checkpoint(ckpt, model=ctx.model, optimizer=ctx.optimizer, scheduler=ctx.scheduler,
                           generator=ctx.generator)


def save_final(ctx: Ctx, run_dir: Path) -> Path:
    out = run_dir / "final"
    save_adapter(ctx.model, out, train_connector=ctx.cfg.model.train_connector)
    return out
