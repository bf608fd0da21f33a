"""Data-parallel GRPO under `torchrun`: who this process is, the collectives the trainer needs, how a
step's prompts are shared out, and sampling streams that do not depend on that split.

`torchrun --nproc_per_node N -m tinyr1 train ...` starts N copies of the ordinary trainer; each
joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT env
vars) through `init_from_env()`. Every helper here is the identity in a plain process (no group),
so a one-GPU `tinyr1 train` runs exactly what it ran before.

The contract: N ranks make the same update as one rank running all `rollout.prompts_per_step`
prompts (tests/test_distributed.py: 2 gloo ranks vs 1, weights and metrics within 1e-6).

- Prompts. The data order is global (`feed.SampleFeeder` draws the same global batch on every rank)
  and rank r takes the contiguous slice [r*B/N, (r+1)*B/N) of it (`shard_range`). A group (one
  prompt's G completions) never spans ranks.
- Sampling. Under torchrun (any number of ranks, one included) each prompt's completions, and each
  step's advantage noise, come from a generator keyed by (a per-step seed, the prompt's *global*
  index) (`keyed_generator`, `tinyr1.trainer.sample_completions`), so prompt j sees the same
  uniforms whichever rank draws it and however many ranks there are. The per-step seed is drawn
  from `Context.generator`, identical on every rank and saved with each checkpoint. A plain
  one-process run keeps one batched sampler call on that stream (its samples differ from a
  torchrun run's of the same seed; they agree in distribution).
- Normalizers and statistics. Rewards are gathered so advantages (group, or whole-batch std for
  `scale_rewards = "batch"`) and reward metrics are computed over the global batch; the loss gets the
  global row and token counts, so each rank's loss is its share of the full-batch loss and the SUM
  of the ranks' gradients is the full-batch gradient (`all_reduce_gradients`). Clipping then sees
  the global gradient, identical on every rank, and so does the non-finite test: every rank skips
  (or applies) the same step.

Why an explicit all-reduce of the trainable gradients rather than DistributedDataParallel: the
update never calls `model.forward` (it scores each micro-batch through `completion_logprobs`,
which runs the prompt once and its completions against that K/V, plus a reference pass with the
adapters switched off), so DDP's forward hooks would not see it; accumulation over micro-batches
would need `no_sync` around all but the last; and gradient checkpointing with DDP needs
`static_graph` tricks. The trainable set (LoRA + connector, tens to a few hundred MB) is reduced
once per optimizer step, in buckets, after the last micro-batch: one collective per bucket, the
same bytes DDP would send, without overlap with the backward, which costs little next to a
rollout. Frozen weights are never communicated.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tinyr1.errors import ConfigError, DeviceError, TinyR1Error

T = TypeVar("T")
TIMEOUT_ENV = "TINYR1_DIST_TIMEOUT"  # seconds a collective may wait for a slow rank (default 30 min)
DEFAULT_TIMEOUT_S = 1800
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun for every worker, also with --nproc_per_node 1
BUCKET_ELEMENTS = 1 << 24  # 16M elements (64 MB of fp32) per gradient all-reduce


# ---- who am I ----------------------------------------------------------------------------------
def active() -> bool:
    """Whether this process is one rank of an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 writes logs, metrics, completions, evaluations and checkpoints; the others compute."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes; False (nothing done) in a plain process. One
    process under torchrun joins a group of one: it samples as the ranks of a larger run do.

    gloo carries CPU tensors (the tests, CPU runs), NCCL the CUDA ones; each rank uses the GPU
    LOCAL_RANK. A collective waits at most TINYR1_DIST_TIMEOUT seconds (default 1800) for a slow
    rank, so a rank stuck for good ends the run instead of hanging it.
    """
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and TORCHRUN_ENV not in os.environ:
        return False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    backend, device = "gloo", None
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise DeviceError(
                f"torchrun started local rank {local} but this machine has {torch.cuda.device_count()} CUDA "
                "GPU(s): one rank per GPU, so --nproc_per_node must be at most the GPU count "
                "(for a CPU run on a GPU machine, set CUDA_VISIBLE_DEVICES=)")
        torch.cuda.set_device(local)
        backend, device = "cpu:gloo,cuda:nccl", torch.device("cuda", local)
    dist.init_process_group(backend, timeout=timeout, device_id=device)
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    """Leave the process group (at exit; a no-op when there is none)."""
    if active():
        dist.destroy_process_group()


def check_prompts_divisible(prompts_per_step: int, world: int) -> None:
    """`rollout.prompts_per_step` is the global batch: every rank takes the same number of prompts."""
    if prompts_per_step % world != 0:
        lower = max(prompts_per_step // world, 1) * world
        raise ConfigError(
            f"rollout.prompts_per_step = {prompts_per_step} is not divisible by the {world} ranks of this run "
            f"(torchrun --nproc_per_node x nodes): it is the global number of prompts per step and each rank "
            f"takes an equal share. Set --set rollout.prompts_per_step={lower} or "
            f"{lower + world}, or run on a number of GPUs that divides {prompts_per_step}.")


def shard_range(n: int, rank_: int, world: int) -> tuple[int, int]:
    """[start, end) of rank `rank_`'s contiguous share of n items (the first n % world get one more)."""
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


# ---- keyed sampling streams --------------------------------------------------------------------
def keyed_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a fixed function of `parts` (same on every machine and Python run)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded by `keyed_seed(*parts)`: the draws depend on the key, not on who draws."""
    return torch.Generator().manual_seed(keyed_seed(*parts))


def seed_rank_rng(seed: int) -> None:
    """Give rank r > 0 its own torch RNG stream (LoRA dropout, anything drawn from the global RNG);
    rank 0 keeps `train.seed`'s, so a one-process run is unchanged. Call after the model is built:
    its initialization must be the same on every rank."""
    if rank() > 0:
        torch.manual_seed(keyed_seed(seed, "torch", rank()))


# ---- collectives (each is the identity in one process) -----------------------------------------
def barrier() -> None:
    if active():
        dist.barrier()


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0, in rank order ([n, ...] -> [world*n, ...]); the
    shapes must be equal on all ranks."""
    if not active():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's picklable `obj`, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_first(fn: Callable[[], T]) -> T:
    """`fn()` run by rank 0 alone (the run folder's checks and files), its result handed to every
    rank. When it raises, every rank raises: a TinyR1Error as itself (the same message everywhere),
    anything else as a RuntimeError naming it on the other ranks, so none waits for a dead rank 0."""
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as err:  # re-raised below, on every rank
            error = err
    shared = error if error is None or isinstance(error, TinyR1Error) else \
        RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")
    box = [result, shared]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise box[1]
    return box[0]


def all_reduce_max(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sum(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a stop signal, a skipped step)."""
    return all_reduce_max(int(flag)) > 0


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Add up per-rank partial metrics (same keys on every rank); NaN/inf propagate, which is how a
    non-finite loss on one rank makes every rank skip the step."""
    if not active():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)  # [K]
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def gather_max_and_per_rank(values: dict[str, float], per_rank: Sequence[str]) -> dict[str, float]:
    """Each value -> its maximum over ranks (a step waits for its slowest rank; memory is per GPU),
    plus `key/rank{r}` for the keys in `per_rank`. Unchanged in one process."""
    if not active():
        return values
    keys = sorted(values)
    rows = all_gather_rows(torch.tensor([[values[k] for k in keys]], dtype=torch.float64))  # [world, K]
    out = {k: float(rows[:, i].max()) for i, k in enumerate(keys)}
    for i, k in enumerate(keys):
        if k in per_rank:
            out.update({f"{k}/rank{r}": float(rows[r, i]) for r in range(rows.shape[0])})
    return out


def broadcast_parameters(params: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's values of `params` to every rank (after initialization and the cold start, so
    all ranks start each GRPO step from bit-identical weights)."""
    if not active():
        return
    with torch.no_grad():
        for bucket in _buckets(list(params)):
            flat = torch.cat([p.detach().reshape(-1) for p in bucket])  # [numel of the bucket]
            dist.broadcast(flat, src=0)
            _unflatten_into(flat, bucket)


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over ranks, in place. The loss on each rank is already divided
    by the global normalizer, so the sum is the full-batch gradient.

    A parameter with a gradient on some ranks and none on others counts as zero on those; one with
    none anywhere keeps `grad = None` (the optimizer skips it, as in one process).
    """
    if not active():
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.long)  # [P]
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    used = [p for p, has in zip(params, present.tolist()) if has]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    with torch.no_grad():
        for bucket in _buckets([p.grad for p in used]):
            flat = torch.cat([g.reshape(-1) for g in bucket])  # [numel of the bucket]
            dist.all_reduce(flat)
            _unflatten_into(flat, bucket)


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of same-device, same-dtype tensors of at most BUCKET_ELEMENTS (a larger
    tensor goes alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() > BUCKET_ELEMENTS or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()
