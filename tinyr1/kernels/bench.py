"""`tinyr1 bench kernels`: time and peak memory of the per-token log-prob implementations.

Each method runs forward + backward of sum(g * logp) for random hidden states (requiring grad) and a
frozen lm_head, the shape of a GRPO update micro-batch. Peak memory is the high-water mark of
memory allocated *during* the call, above what existed before it (inputs excluded):

- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats();
- CPU: `tinyr1.memory_measure.LiveTensorBytes`, a TorchDispatchMode that adds the storage size of
  every new tensor an aten op returns and subtracts it when the storage is freed (weakref
  finalizer). It sees every tensor autograd creates, but not scratch memory internal to one kernel
  (e.g. a GEMM's packing buffers).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tinyr1.kernels.logprob import naive_token_logprobs, token_logprobs
from tinyr1.memory_measure import LiveTensorBytes

METHODS = ("naive", "torch", "triton", "liger")


@dataclass(frozen=True)
class BenchResult:
    method: str
    seconds: float  # median over repeats of forward + backward (methods interleaved)
    peak_bytes: int  # allocated during the call, above the inputs
    max_abs_diff: float | None  # max |logp - logp_naive|, None when naive did not run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _liger_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    out = LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden / temperature, targets)
    loss = getattr(out, "loss", out[0] if isinstance(out, tuple) else out)
    return -loss.float()  # [N]


def _step_fn(method: str, temperature: float, with_entropy: bool, chunk_size: int | None) -> Callable[..., torch.Tensor]:
    """One forward + backward; returns the detached log-probs."""

    def step(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if method == "naive":
            logp, ent = naive_token_logprobs(hidden, weight, targets, temperature, with_entropy)
        elif method == "liger":
            logp, ent = _liger_logprobs(hidden, weight, targets, temperature), None
        else:
            logp, ent = token_logprobs(hidden, weight, targets, temperature, with_entropy=with_entropy,
                                       backend=method, chunk_size=chunk_size)  # type: ignore[arg-type]
        (logp * g).sum().backward()  # entropy, when asked for, is only logged (as in GRPO)
        del ent
        hidden.grad = None
        return logp.detach()

    return step


def measure_memory(step: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> tuple[int, torch.Tensor]:
    """(peak bytes allocated during one step above its inputs, logp); on CPU this is also the warm-up."""
    device = inputs[0].device
    if device.type != "cuda":
        with LiveTensorBytes() as live:
            logp = step(*inputs)
        return live.peak, logp
    step(*inputs)  # compile Triton kernels outside the measured run
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    logp = step(*inputs)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base, logp


def time_step(step: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> float:
    device = inputs[0].device
    _sync(device)
    t0 = time.perf_counter()
    step(*inputs)
    _sync(device)
    return time.perf_counter() - t0


def make_inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, ...]:
    """Hidden states [N, H] (requires grad), a frozen lm_head [V, H] at Qwen-like scale, targets,
    upstream grads; seeded, so every run (and every method) times the same numbers."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()  # [N, H]
    w = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device=device, dtype=dtype)  # [V, H]
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)  # [N]
    g = (torch.randn(tokens, generator=gen) / tokens).to(device)  # [N] upstream d loss / d logp
    return h, w, targets, g


def bench_kernels(methods: list[str], tokens: int, hidden: int, vocab: int, dtype: torch.dtype,
                  device: torch.device, temperature: float = 1.0, repeats: int = 2,
                  with_entropy: bool = False, chunk_size: int | None = None,
                  on_result: Callable[[BenchResult], None] | None = None) -> list[BenchResult]:
    """Run each method on the same inputs; logp of each is compared with naive's when naive ran."""
    inputs = make_inputs(tokens, hidden, vocab, dtype, device)
    steps = {m: _step_fn(m, temperature, with_entropy, chunk_size) for m in methods}
    memory: dict[str, tuple[int, torch.Tensor]] = {}
    for method in methods:
        memory[method] = measure_memory(steps[method], inputs)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):  # interleaved, so a busy machine slows every method alike
        for method in methods:
            times[method].append(time_step(steps[method], inputs))
    reference = memory["naive"][1] if "naive" in memory else None
    results = []
    for method in methods:
        peak, logp = memory[method]
        diff = None if reference is None else float((logp - reference).abs().max())
        results.append(BenchResult(method, statistics.median(times[method]), peak, diff))
        if on_result is not None:
            on_result(results[-1])
    return results
