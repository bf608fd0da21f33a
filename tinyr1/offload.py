"""Offloaded gradient checkpointing (`model.gradient_checkpointing = "offload"`): a checkpointed
layer's inputs wait for the backward in host RAM instead of on the GPU.

With plain checkpointing the GPU still holds every layer's input (one [tokens, D] tensor per
decoder layer, 36 of them for Qwen2.5-3B) until the backward reaches that layer. Here each input is
copied to pinned host memory as soon as the layer has run (non-blocking), the GPU copy is freed when
the next layer is done with it, and the backward copies it back, re-runs the layer with grad and
backpropagates through it: the reentrant scheme of unsloth's `Unsloth_Offloaded_Gradient_Checkpointer`.

Why our own and not unsloth's: tinyr1's update checkpoints one *pair* of calls per layer (the
prompts, then the completions against the prompts' K/V, `logprobs._prefix_then_suffix`), so the
unit has two hidden-state inputs and two outputs. unsloth's offloaded checkpointer saves only its
first tensor argument and backpropagates a single output, and its "smart" variant (the one
`unsloth_offloaded_gradient_checkpoint` runs) also offloads only argument 0, stores fp32 inputs as
bf16 (a lossy round trip) and works through CUDA streams and process-wide buffers. This module
offloads every floating-point tensor argument, exactly, on any device, and works for both
backends. On a CPU the "host copy" is the tensor itself (nothing moves), so the tests check the
recompute and gradient flow there, and the GPU saving is measured by `tinyr1 bench`.

Like torch's reentrant checkpoint, the recompute runs inside the outer backward and accumulates the
layer's parameter gradients (LoRA) directly; RNG state and autocast are restored for the replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.utils.checkpoint

OFFLOAD_ATTR = "_tinyr1_offload"  # set on a decoder layer whose checkpoints are offloaded


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in pinned host memory (non-blocking from CUDA); a CPU tensor as it is."""
    if t.device.type == "cpu":
        return t.detach()
    host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, device="cpu", pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    return host


@contextlib.contextmanager
def _replay_state(devices: Sequence[torch.device], cpu_rng: torch.Tensor, dev_rng: list[torch.Tensor],
                  autocast: tuple[bool, torch.dtype] | None) -> Iterator[None]:
    """The RNG streams and autocast mode of the forward, for the recompute (dropout draws the same mask)."""
    cuda = [d for d in devices if d.type == "cuda"]
    with torch.random.fork_rng(devices=cuda, enabled=True, device_type="cuda"):
        torch.set_rng_state(cpu_rng)
        for d, state in zip(cuda, dev_rng):
            torch.cuda.set_rng_state(state, d)
        if autocast is not None and autocast[0]:
            with torch.autocast(devices[0].type if devices else "cpu", dtype=autocast[1]):
                yield
        else:
            yield


class _OffloadedCheckpoint(torch.autograd.Function):
    """forward: run `fn` without grad, keep its tensor inputs in host memory; backward: bring them
    back, re-run `fn` with grad, backpropagate the outputs' gradients through it."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Any], spec: tuple[Any, ...], meta: dict[str, bool],
                _anchor: torch.Tensor, *tensors: torch.Tensor) -> tuple[Any, ...]:
        ctx.fn, ctx.spec = fn, spec
        ctx.places = [t.device for t in tensors]
        ctx.devices = sorted(set(ctx.places), key=str)
        ctx.needs = [t.requires_grad for t in tensors]
        ctx.cpu_rng = torch.get_rng_state()
        ctx.dev_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices if d.type == "cuda"]
        dev_type = ctx.devices[0].type if ctx.devices else "cpu"
        ctx.autocast = (torch.is_autocast_enabled(dev_type), torch.get_autocast_dtype(dev_type))
        ctx.host = [_to_host(t) for t in tensors]  # copies, not the graph's tensors: no save_for_backward
        with torch.no_grad():
            out = fn(*_fill(spec, tensors))
        meta["tuple"] = isinstance(out, tuple)
        return out if meta["tuple"] else (out,)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        inputs = [h.to(d, non_blocking=True).detach().requires_grad_(need)
                  for h, d, need in zip(ctx.host, ctx.places, ctx.needs)]
        ctx.host = None
        with torch.enable_grad(), _replay_state(ctx.devices, ctx.cpu_rng, ctx.dev_rng, ctx.autocast):
            out = ctx.fn(*_fill(ctx.spec, inputs))
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, None, *[x.grad if need else None for x, need in zip(inputs, ctx.needs)])


class _Slot:
    """Marks where a tensor argument goes back in."""

    def __repr__(self) -> str:
        return "<tensor>"


_SLOT = _Slot()


def _split(args: Sequence[Any]) -> tuple[tuple[Any, ...], list[torch.Tensor]]:
    """(args with each floating-point tensor replaced by a slot marker, those tensors in order)."""
    spec: list[Any] = []
    tensors: list[torch.Tensor] = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            spec.append(_SLOT)
            tensors.append(a)
        else:
            spec.append(a)
    return tuple(spec), tensors


def _fill(spec: Sequence[Any], tensors: Sequence[torch.Tensor]) -> list[Any]:
    it = iter(tensors)
    return [next(it) if a is _SLOT else a for a in spec]


def offloaded_checkpoint(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
    """`torch.utils.checkpoint.checkpoint(fn, *args)` with the floating-point tensor arguments kept
    in host memory until the backward. Other arguments (modules, index tensors, dicts of masks) are
    held as they are. Keyword arguments meant for torch's checkpoint (`use_reentrant`, ...) are
    ignored: this is always the reentrant scheme. Returns what `fn` returns."""
    spec, tensors = _split(args)
    # The anchor makes autograd call our backward even when no input needs grad (layer 0 behind a
    # frozen embedding): the layer's own parameters (LoRA) still need theirs.
    anchor = torch.empty(0, requires_grad=True)
    meta: dict[str, bool] = {}
    out = _OffloadedCheckpoint.apply(fn, spec, meta, anchor, *tensors)
    return out if meta["tuple"] else out[0]


def layer_checkpoint(layer: torch.nn.Module) -> Callable[..., Any]:
    """The checkpoint function for one decoder layer: offloaded when `enable_offload` marked it,
    else torch's non-reentrant checkpoint."""
    if getattr(layer, OFFLOAD_ATTR, False):
        return offloaded_checkpoint
    return _torch_checkpoint


def _torch_checkpoint(fn: Callable[..., Any], *args: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def enable_offload(layers: Sequence[torch.nn.Module]) -> None:
    """Mark decoder layers for offloaded checkpoints, in tinyr1's shared-prefix update
    (`logprobs.shared_prefix_hidden`) and in HF's own checkpointed calls (the cold start's
    full-sequence forward), which call `layer._gradient_checkpointing_func`."""
    for layer in layers:
        setattr(layer, OFFLOAD_ATTR, True)
        layer._gradient_checkpointing_func = offloaded_checkpoint
