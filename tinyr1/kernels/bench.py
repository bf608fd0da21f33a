"""`tinyr1 bench kernels`: time and peak memory of the per-token log-prob implementations.

Each method runs forward + backward of sum(g * logp) for random hidden states (requiring grad) and a
frozen lm_head, the shape of a GRPO update micro-batch. Peak memory is the high-water mark of
memory allocated *during* the call, above what existed before it (inputs excluded):

- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats();
- CPU: `tinyr1.memory_measure.LiveTensorBytes`, a TorchDispatchMode that adds the storage size of
  every new tensor an aten op returns and subtracts it when the storage is freed (weakref
  finalizer). It sees every tensor autograd creates, but not scratch memory internal to one kernel
  (e.g. a GEMM's packing buffers).

A method that runs out of CUDA memory is reported as such (`BenchResult.error == "OOM"`) and the
others still run: on an 8 GB card the naive method does not fit at N = 4096. `default_tokens` sizes
N to the free memory so that by default every method fits.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tinyr1.kernels.logprob import naive_token_logprobs, token_logprobs
from tinyr1.memory_measure import LiveTensorBytes

METHODS = ("naive", "torch", "triton", "liger")
OOM = "OOM"
MAX_TOKENS = 4096  # the default N when memory allows: 8 completions x 512 tokens
NAIVE_BYTES_PER_LOGIT = 12  # three fp32 [N, V] tensors at once: logits, log-softmax kept for backward, its grad
FUSED_BYTES_PER_TOKEN_HIDDEN = 16  # fused paths: a few fp32 [N, H] buffers (hidden in fp32, accumulators, dh)
FUSED_FIXED_BYTES = 64 << 20  # their vocabulary tiles (the torch path keeps [N, tile] near 16 MiB)


@dataclass(frozen=True)
class BenchResult:
    method: str
    seconds: float | None  # median over repeats of forward + backward (methods interleaved); None on error
    peak_bytes: int | None  # allocated during the call, above the inputs; None on error
    max_abs_diff: float | None  # max |logp - logp_naive|, None when naive did not run (or this one failed)
    error: str | None = None  # OOM: the method ran out of CUDA memory (the others still ran)


def estimated_peak_bytes(method: str, tokens: int, hidden: int, vocab: int, dtype: torch.dtype) -> int:
    """Rough peak of one forward + backward of `method` including its inputs (for sizing N only)."""
    elem = torch.finfo(dtype).bits // 8
    inputs = vocab * hidden * elem + 2 * tokens * hidden * elem  # lm_head, hidden states and their grad
    if method == "naive":
        return inputs + NAIVE_BYTES_PER_LOGIT * tokens * vocab
    return inputs + FUSED_BYTES_PER_TOKEN_HIDDEN * tokens * hidden + FUSED_FIXED_BYTES


def default_tokens(methods: list[str], hidden: int, vocab: int, dtype: torch.dtype, free_bytes: int,
                   fraction: float = 0.8, cap: int = MAX_TOKENS) -> int:
    """Largest N <= cap for which every method's estimated peak stays within `fraction` of the free
    memory; a multiple of 256 when at least 256, and never below 16 (then a method may report OOM)."""
    budget = fraction * free_bytes
    n = cap
    for method in methods:
        fixed = estimated_peak_bytes(method, 0, hidden, vocab, dtype)
        per_token = estimated_peak_bytes(method, 1, hidden, vocab, dtype) - fixed
        n = min(n, int((budget - fixed) // per_token))
    if n >= 256:
        n = n // 256 * 256
    return max(16, n)


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


def _release(inputs: tuple[torch.Tensor, ...]) -> None:
    """After a method ran out of memory: drop its partial gradient and give the cached blocks back,
    so the next method starts from the inputs alone (the traceback is already gone)."""
    inputs[0].grad = None
    gc.collect()
    if inputs[0].device.type == "cuda":
        torch.cuda.empty_cache()


def bench_kernels(methods: list[str], tokens: int, hidden: int, vocab: int, dtype: torch.dtype,
                  device: torch.device, temperature: float = 1.0, repeats: int = 2,
                  with_entropy: bool = False, chunk_size: int | None = None,
                  on_result: Callable[[BenchResult], None] | None = None) -> list[BenchResult]:
    """Run each method on the same inputs; logp of each is compared with naive's when naive ran.

    A method that raises torch.cuda.OutOfMemoryError (in its memory run or a timed run) is reported
    with error "OOM" and skipped from then on; the other methods still run.
    """
    inputs = make_inputs(tokens, hidden, vocab, dtype, device)
    steps = {m: _step_fn(m, temperature, with_entropy, chunk_size) for m in methods}
    memory: dict[str, tuple[int, torch.Tensor]] = {}
    failed: set[str] = set()
    for method in methods:
        try:
            memory[method] = measure_memory(steps[method], inputs)
        except torch.cuda.OutOfMemoryError:
            failed.add(method)
        _release(inputs)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):  # interleaved, so a busy machine slows every method alike
        for method in methods:
            if method in failed:
                continue
            try:
                times[method].append(time_step(steps[method], inputs))
            except torch.cuda.OutOfMemoryError:
                failed.add(method)
            if method in failed:
                _release(inputs)
    reference = memory["naive"][1] if "naive" in memory and "naive" not in failed else None
    results = []
    for method in methods:
        if method in failed:
            results.append(BenchResult(method, None, None, None, OOM))
        else:
            peak, logp = memory[method]
            diff = None if reference is None else float((logp - reference).abs().max())
            results.append(BenchResult(method, statistics.median(times[method]), peak, diff))
        if on_result is not None:
            on_result(results[-1])
    return results
