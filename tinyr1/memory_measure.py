"""Measure peak live tensor bytes without a GPU: the check behind the memory planner's numbers.

`LiveTensorBytes` is a TorchDispatchMode: every aten op's output tensor whose storage is new (not an
input, not already tracked) adds its storage size; a weakref finalizer on the storage subtracts it
when the storage dies. It sees everything autograd saves and every temporary an op returns, on any
device, but not scratch memory private to one kernel (a GEMM's packing buffers), the CUDA caching
allocator's rounding and fragmentation, or tensors created before the mode was entered (weights:
count those with `tensor_bytes`). That is exactly the "live tensor bytes" the planner models, so
the two can be compared on the CPU (`measure_phases`, tests/test_memory.py, `tinyr1 bench`).
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tinyr1.context import Context
from tinyr1.rollout import Rollout
from tinyr1.trainer import Batch, rollout_step, update_step

T = TypeVar("T")


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages created inside the mode and still alive; `peak` is their high-water mark.

    With `record=True` the live storages at the peak are kept as (bytes, op name, shape) in
    `at_peak`, which shows *what* the peak is made of (slow: use it for diagnosis, not in loops).
    """

    def __init__(self, record: bool = False) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.record = record
        self.at_peak: list[tuple[int, str, tuple[int, ...]]] = []
        self._alive: dict[int, tuple[int, str, tuple[int, ...]]] = {}

    def _free(self, key: int, nbytes: int) -> None:
        if self._alive.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        flat_in = tree_flatten((args, kwargs))[0]
        inputs = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        grew = False
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._alive:  # views and in-place results
                continue
            self._alive[key] = (nbytes, str(func), tuple(t.shape))
            self.current += nbytes
            weakref.finalize(storage, self._free, key, nbytes)
            grew = True
        if grew and self.current > self.peak:
            self.peak = self.current
            if self.record:
                self.at_peak = sorted(self._alive.values(), reverse=True)
        return out

    def summary(self, top: int = 25) -> str:
        """The largest groups of storages alive at the peak (needs record=True)."""
        groups: Counter[tuple[str, tuple[int, ...]]] = Counter()
        counts: Counter[tuple[str, tuple[int, ...]]] = Counter()
        for nbytes, op, shape in self.at_peak:
            groups[(op, shape)] += nbytes
            counts[(op, shape)] += 1
        lines = [f"peak {self.peak:,} B"]
        for (op, shape), nbytes in groups.most_common(top):
            lines.append(f"  {nbytes:>12,} B  {counts[(op, shape)]:>3} x {op} {list(shape)}")
        return "\n".join(lines)


def measure_peak(fn: Callable[[], T], record: bool = False) -> tuple[int, T, LiveTensorBytes]:
    """Run `fn` under a fresh tracker: (peak live bytes above what existed before, fn's result, tracker)."""
    with LiveTensorBytes(record=record) as live:
        result = fn()
    return live.peak, result, live


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Storage bytes of distinct storages (tied weights counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def module_bytes(module: torch.nn.Module) -> int:
    """Parameters + buffers of a module, tied ones once (bitsandbytes 4-bit quant state included)."""
    tensors: list[torch.Tensor] = [*module.parameters(), *module.buffers()]
    for m in module.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            tensors += _quant_state_tensors(state)
    return tensor_bytes(tensors)


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights (NF4 state included) + optimizer state: the tensors alive between steps."""
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return module_bytes(model) + tensor_bytes(state)


def _quant_state_tensors(state: Any) -> list[torch.Tensor]:
    """absmax / code tensors of a bitsandbytes QuantState, nested state (double quantization) included."""
    out = [v for v in (getattr(state, "absmax", None), getattr(state, "code", None)) if isinstance(v, torch.Tensor)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        out += _quant_state_tensors(nested)
    return out


def measure_phases(ctx: Context, batch: Batch) -> tuple[int, int, Rollout]:
    """Peak live tensor bytes of one GRPO step's (rollout, update), run by the trainer's own
    `rollout_step` and `update_step`: (rollout peak, update peak, the rollout).

    Both peaks are above what existed before the step (weights, optimizer state: count those with
    `resident_bytes`); the update's starts from what the rollout keeps for it (features, tokens).
    Run one step first so the optimizer state exists, as from the second step of a run on.
    """
    with LiveTensorBytes() as live:
        ro = rollout_step(ctx, batch)
        rollout_peak, live.peak = live.peak, live.current
        update_step(ctx, ro)
    return rollout_peak, live.peak, ro
