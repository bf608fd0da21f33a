"""`tinyr1 doctor`: is this machine set up to train, and do the GPU paths compute what the CPU tests checked?

The CPU tests check every kernel against a reference, but the compiled Triton kernels, bitsandbytes'
CUDA matmuls, liger's kernels and the paged optimizer only exist on a GPU. The first minutes on a
new GPU should show whether they agree with their references there, before hours of training do.

Each check is a small function `check_*(probe) -> Check` that compares one fast path with its
reference (or runs two real GRPO steps) and says PASS, FAIL or SKIP with the reason; a check that
raises becomes a FAIL carrying the message (`run_checks`). Checks that need CUDA SKIP on a CPU and
say so; the Triton interpreter is never used here (the tests use it). `tinyr1.environment`
lists versions and the GPU. The CLI (`tinyr1/cli/doctor.py`) prints both and exits non-zero on a FAIL.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tinyr1.config_io import load_config
from tinyr1.context import Context
from tinyr1.feed import SampleFeeder
from tinyr1.kernels import apply_liger, liger_available, token_logprobs
from tinyr1.kernels.logprob import triton_available
from tinyr1.memory import GiB, auto_preset, estimate
from tinyr1.memory_arch import Arch, RunShape
from tinyr1.memory_measure import measure_phases, resident_bytes
from tinyr1.model.loading import quantize_llm_nf4, trainable_parameters
from tinyr1.model.writing import write_tiny_checkpoint
from tinyr1.preset_bench import bench_context
from tinyr1.trainer import grpo_step, rollout_step, update_step

Status = Literal["PASS", "FAIL", "SKIP"]
NEEDS_CUDA = "needs a CUDA GPU"


@dataclass(frozen=True)
class Check:
    """One self-test's outcome: PASS / FAIL / SKIP, what was compared (or why it did not run), seconds."""

    name: str
    status: Status
    detail: str
    seconds: float = 0.0


class Skipped(Exception):  # noqa: N818 - raised by a check that cannot run here; the message says why
    """A check cannot run on this machine (no CUDA, optional package missing)."""


# ---------------------------------------------------------------- what the checks share


@dataclass
class TinyRun:
    """A tiny random TinyLLaVA-Video trained as the GPU presets train (NF4, LoRA, trained connector,
    gradient checkpointing, KL reference, 8-bit AdamW, kernels and liger on auto), on `device`."""

    ctx: Context
    feeder: SampleFeeder
    steps: int = 0  # GRPO steps run so far (the optimizer state exists from the first one)

    PROMPTS = 2  # 2 prompts x G=4 = 8 rows in 2 micro-batches: the planner's update moment
    OVERRIDES = (
        "model.synth=false", "data.synth=false", "model.quant=nf4", "model.dtype=auto", "model.kernels=auto",
        "model.liger=auto", "model.gradient_checkpointing=true", "video.num_frames=4", "video.max_frames=4",
        "rollout.num_generations=4", f"rollout.prompts_per_step={PROMPTS}", "rollout.max_new_tokens=8",
        "train.micro_batch_size=4", "train.optimizer=paged_adamw8bit", "grpo.beta=0.01", "lora.r=8", "lora.alpha=16",
    )

    @classmethod
    def build(cls, folder: Path, device: torch.device) -> TinyRun:
        """Write the checkpoint and clips under `folder`, load the `tiny` preset moved to `device`."""
        model_dir = write_tiny_checkpoint(folder / "model", seed=0, frames=4, image_size=32)
        cfg = load_config("tiny", [f"model.path={model_dir}", f"model.device={device.type}", *cls.OVERRIDES])
        ctx, feeder = bench_context(cfg, folder / "data", seed=0, allow_eos=False)  # completions run to the end
        return cls(ctx, feeder)

    def step(self) -> dict[str, float]:
        _, metrics = grpo_step(self.ctx, self.feeder.next_batch(self.PROMPTS))
        self.steps += 1
        return metrics


@dataclass
class Probe:
    """The device the checks run on, and the tiny run the GRPO and memory checks share (built once)."""

    device: torch.device
    folder: Path
    _run: TinyRun | None = field(default=None, repr=False)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def tiny_run(self) -> TinyRun:
        if self._run is None:
            self._run = TinyRun.build(self.folder, self.device)
        return self._run


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error ||x - ref|| / ||ref||, in float64 on the CPU."""
    ref = ref.detach().double().cpu()
    return float((x.detach().double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30))


def _verdict(problems: list[str], detail: str) -> tuple[Status, str]:
    return ("FAIL", "; ".join(problems) + f" ({detail})") if problems else ("PASS", detail)


def _compute_dtype(device: torch.device) -> torch.dtype:
    """The training compute dtype on `device` (model.dtype = auto)."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _needs_cuda(probe: Probe, why: str = "") -> None:
    if not probe.cuda:
        raise Skipped(NEEDS_CUDA + (f" ({why})" if why else ""))


# ---------------------------------------------------------------- the checks


def check_nf4(probe: Probe) -> Check:
    """bitsandbytes NF4: the layer tinyr1's loader makes (`quantize_llm_nf4`), inference with 1 row (the
    4-bit gemv kernel on CUDA) and 8 rows (dequantize + matmul), and a training forward with the input
    gradient LoRA needs, against x @ dequantize(W)^T in fp32; and the dequantized weights close to the
    originals (a broken quantizer agrees with its own dequantization)."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise RuntimeError(f"bitsandbytes is not installed ({err}); the 4-bit LLM needs it: pip install bitsandbytes") from None
    dtype = _compute_dtype(probe.device)
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 384, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(384, 256, generator=gen) * 0.05)
    w = lin.weight.detach().clone()  # [out, in]
    holder = nn.Module()
    holder.model = nn.Module()
    holder.model.layers = nn.ModuleList([nn.Sequential(lin)])
    quantize_llm_nf4(holder, compute_dtype=dtype, device=probe.device)
    q = holder.model.layers[0][0]
    w_deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()  # [out, in]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    problems, errs = [], {}
    quant_err = _rel(w_deq, w.to(w_deq.device))
    if quant_err > 0.15:  # 4-bit NF4 of Gaussian weights rounds by ~9%
        problems.append(f"dequantized weights {quant_err:.1%} off the originals (expected ~9%)")
    for rows in (1, 8):  # inference (no grad): 1 row takes bitsandbytes' 4-bit gemv kernel on CUDA
        x = torch.randn(rows, 256, generator=gen).to(probe.device, dtype)  # [rows, in]
        with torch.no_grad():
            y = q(x)  # [rows, out]
        errs[f"{rows} row{'s' * (rows > 1)}"] = _rel(y, x.float() @ w_deq.t())
    x = torch.randn(8, 256, generator=gen).to(probe.device, dtype).requires_grad_()  # training: grad to x
    y = q(x)
    g = torch.randn(y.shape, generator=gen).to(probe.device, y.dtype)
    (dx,) = torch.autograd.grad((y.float() * g.float()).sum(), x)
    errs["training forward"] = _rel(y, x.detach().float() @ w_deq.t())
    errs["d input"] = _rel(dx, g.float() @ w_deq)
    problems += [f"{k} off by {v:.1e} (tolerance {tol:.0e})" for k, v in errs.items() if not v <= tol]
    detail = (f"{str(dtype).removeprefix('torch.')} on {probe.device.type}: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f"; NF4 rounding {quant_err:.1%}")
    status, detail = _verdict(problems, detail)
    return Check("nf4", status, detail)


def logprob_errors(candidate: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
                   reference: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
                   device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, float]:
    """Relative errors of a per-token log-prob implementation against a reference, both called as
    `fn(hidden, weight, targets, temperature, with_entropy=True)`: log-probs, entropies, and the
    gradients of a random loss on both outputs w.r.t. hidden and lm_head weight. The vocabulary
    (5003) is no multiple of any tile, so the masked edge tiles run too."""
    gen = torch.Generator().manual_seed(seed)
    n, hdim, vocab = 300, 256, 5003
    h = torch.randn(n, hdim, generator=gen).to(device, dtype)  # [N, H]
    w = (torch.randn(vocab, hdim, generator=gen) * 0.3).to(device, dtype)  # [V, H]
    t = torch.randint(0, vocab, (n,), generator=gen).to(device)  # [N]
    g_lp, g_ent = (torch.randn(n, generator=gen).to(device) for _ in range(2))  # [N] each
    out = []
    for fn in (candidate, reference):
        hi, wi = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = fn(hi, wi, t, 0.8, with_entropy=True)
        assert ent is not None
        dh, dw = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), [hi, wi])
        out.append((lp, ent, dh, dw))
    names = ("logp", "entropy", "d hidden", "d weight")
    return {name: _rel(a, b) for name, a, b in zip(names, out[0], out[1])}


LOGPROB_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def check_logprob_triton(probe: Probe) -> Check:
    """The compiled Triton log-prob kernels (forward and backward) against the chunked torch path."""
    _needs_cuda(probe, "the compiled kernels; the tests run them in the Triton interpreter")
    if not triton_available():
        raise Skipped("triton is not installed (pip install 'tinyr1[kernels]'); training uses the torch path")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set on a GPU machine: training would interpret the kernels "
                           "(very slowly); unset it")
    dtypes = [torch.float32, _compute_dtype(probe.device)]
    problems, parts = [], []
    for dtype in dtypes:
        errs = logprob_errors(lambda *a, **k: token_logprobs(*a, **k, backend="triton"),
                              lambda *a, **k: token_logprobs(*a, **k, backend="torch"), probe.device, dtype)
        tol = LOGPROB_TOL[dtype]
        name = str(dtype).removeprefix("torch.")
        problems += [f"{name} {k} off by {v:.1e} (tolerance {tol:.0e})" for k, v in errs.items() if not v <= tol]
        parts.append(f"{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    status, detail = _verdict(problems, "; ".join(parts) + " (vs the torch path)")
    return Check("logprob-triton", status, detail)


def tiny_qwen2(device: torch.device | str, seed: int = 0) -> nn.Module:
    """A 2-layer Qwen2 with wide random weights (the liger check here, the liger tests on the CPU)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2, generator=gen)  # RMSNorm weights too, so a wrong norm shows
    return model.to(device)


def check_liger(probe: Probe) -> Check:
    """liger-kernel's RMSNorm and SwiGLU patched into a tiny Qwen2 (`apply_liger`, as training does):
    logits and every parameter's gradient against the unpatched model."""
    import copy

    _needs_cuda(probe, "liger's kernels are CUDA only")
    if not liger_available():
        raise Skipped("liger-kernel is not installed (optional: pip install 'tinyr1[kernels]'); training runs unfused")
    model = tiny_qwen2(probe.device)
    fused = copy.deepcopy(model)
    if not apply_liger(fused):
        raise RuntimeError("apply_liger changed nothing on a CUDA Qwen2 model")
    ids = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1)).to(probe.device)
    ref, out = model(ids).logits, fused(ids).logits
    logits_err = _rel(out, ref)
    ref.float().square().sum().backward()
    out.float().square().sum().backward()
    grad_err = max(_rel(q.grad, p.grad) for p, q in zip(model.parameters(), fused.parameters()))
    problems = []
    if not logits_err <= 1e-4:
        problems.append(f"logits off by {logits_err:.1e} (tolerance 1e-4)")
    if not grad_err <= 1e-3:
        problems.append(f"gradients off by {grad_err:.1e} (tolerance 1e-3)")
    status, detail = _verdict(problems, f"fp32: logits {logits_err:.1e}, worst parameter gradient {grad_err:.1e}")
    return Check("liger", status, detail)


def check_adamw8bit(probe: Probe) -> Check:
    """Three steps of bitsandbytes' 8-bit AdamW (paged on CUDA, as training uses it) against torch
    AdamW from the same start and gradients; the states must really be 8-bit."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise RuntimeError(f"bitsandbytes is not installed ({err}): pip install bitsandbytes") from None
    cls = bnb.optim.PagedAdamW8bit if probe.cuda else bnb.optim.AdamW8bit  # paging needs CUDA (optim.py)
    gen = torch.Generator().manual_seed(0)
    p0 = (torch.randn(64, 128, generator=gen) * 0.1).to(probe.device)  # >= 4096 elements: 8-bit states
    p8, pref = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    opt8 = cls([p8], lr=1e-3, weight_decay=0.01)
    ref = torch.optim.AdamW([pref], lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        g = torch.randn(64, 128, generator=gen).to(probe.device)
        p8.grad, pref.grad = g.clone(), g.clone()
        opt8.step()
        ref.step()
    err = _rel(p8.detach() - p0, pref.detach() - p0)
    kinds = sorted({str(v.dtype).removeprefix("torch.") for k, v in opt8.state[p8].items()
                    if torch.is_tensor(v) and k.startswith("state")})
    problems = []
    if not err <= 0.05:
        problems.append(f"update off torch AdamW's by {err:.1%} (tolerance 5%)")
    if kinds != ["uint8"]:
        problems.append(f"states are {kinds or 'missing'}, not uint8")
    status, detail = _verdict(problems, f"{cls.__name__} on {probe.device.type}: 3 steps, update {err:.1%} "
                                        f"from torch AdamW's, states {'/'.join(kinds) or 'none'}")
    return Check("adamw8bit", status, detail)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def check_grpo(probe: Probe) -> Check:
    """Two real GRPO steps (`trainer.grpo_step`) of a tiny random model on this device, set up as the
    GPU presets are: finite loss and gradient, no skipped update, every trainable tensor moved and
    every frozen one (NF4 codes, vision tower, embeddings) untouched."""
    run = probe.tiny_run()
    before = _snapshot(run.ctx.model)
    trainable = set(trainable_parameters(run.ctx.model))
    metrics = [run.step() for _ in range(2)]
    problems = []
    for i, m in enumerate(metrics, 1):
        bad = [k for k in ("loss", "grad_norm", "reward", "kl", "entropy") if k in m and not math.isfinite(m[k])]
        if bad:
            problems.append(f"step {i}: non-finite {', '.join(bad)}")
        if m.get("skipped"):
            problems.append(f"step {i}: update skipped (non-finite loss or gradient)")
    after = dict(run.ctx.model.named_parameters())
    stuck = [k for k in trainable if torch.equal(after[k].detach(), before[k])]
    moved = [k for k in before if k not in trainable and not torch.equal(after[k].detach(), before[k])]
    if stuck:
        problems.append(f"{len(stuck)} of {len(trainable)} trainable tensors did not change (e.g. {stuck[0]})")
    if moved:
        problems.append(f"{len(moved)} frozen tensors changed (e.g. {moved[0]})")
    c = run.ctx.cfg
    detail = (f"2 steps on {probe.device.type}: {c.model.quant}/{str(run.ctx.model.compute_dtype).removeprefix('torch.')}, "
              f"log-probs {run.ctx.backend}, {type(run.ctx.optimizer).__name__}, {TinyRun.PROMPTS} prompts x G="
              f"{c.rollout.num_generations} x {c.rollout.max_new_tokens} tokens; loss "
              + " -> ".join(f"{m['loss']:.4f}" for m in metrics) + f", {len(trainable)} trainable tensors moved")
    status, detail = _verdict(problems, detail)
    return Check("grpo", status, detail)


@contextlib.contextmanager
def _cuda_peaks(device: torch.device) -> Iterator[Callable[[], int]]:
    """Peak CUDA bytes allocated above the level at entry; call the yielded function to read (and restart) it."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)

    def read() -> int:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        torch.cuda.reset_peak_memory_stats(device)
        return int(peak)

    yield read


def check_memory(probe: Probe) -> Check:
    """One more GRPO step of the tiny run, measured, beside `tinyr1 plan`'s estimate for the same
    shapes. CUDA: torch.cuda.max_memory_allocated above the level before the step; CPU: live tensor
    bytes (`memory_measure.measure_phases`, the method of tests/test_memory.py). Compared: what each
    phase adds on top of weights and optimizer state; the update's gradients are taken off the
    measurement (the planner books them as state). Allocator fragmentation and the CUDA context
    (the planner's modelled overheads) are not part of this comparison."""
    run = probe.tiny_run()
    if run.steps == 0:
        run.step()  # the optimizer state exists from the second step on
    ctx = run.ctx
    batch = run.feeder.next_batch(TinyRun.PROMPTS)
    if probe.cuda:
        with _cuda_peaks(probe.device) as read:
            ro = rollout_step(ctx, batch)
            rollout = read()
            update_step(ctx, ro)
            update = read()
        how, tol = "torch.cuda.max_memory_allocated", 2.0  # tiny tensors: block rounding and workspaces weigh more
    else:
        batch = [(s, f.double()) for s, f in batch]  # handed over in float64: the tower's cast makes the
        rollout, update, ro = measure_phases(ctx, batch)  # per-video copy a GPU's host-to-device copy makes
        how, tol = "live tensor bytes (CPU)", 1.25
    run.steps += 1
    grads = sum(p.numel() * p.element_size() for p in trainable_parameters(ctx.model).values())
    prompt_tokens = round(sum(p.numel() - 1 for p in ro.prompt_ids) / len(ro.prompt_ids))
    shape = RunShape.from_config(ctx.cfg, prompt_tokens)
    est = estimate(Arch.from_tinyllava(ctx.model.cfg), shape)
    pairs = {"rollout": (rollout, est.phase_total("rollout", ("kept", "activation"))),
             "update": (update - grads, est.phase_total("update", ("kept", "activation")))}
    problems, parts = [], []
    for phase, (measured, planned) in pairs.items():
        ratio = measured / max(planned, 1)
        parts.append(f"{phase} {_mib(measured)} measured vs {_mib(planned)} planned ({ratio:.2f}x)")
        if not 1 / tol <= ratio <= tol:
            problems.append(f"{phase}: measured/planned = {ratio:.2f}, outside [{1 / tol:.2f}, {tol:.2f}]")
    resident = resident_bytes(ctx.model, ctx.optimizer)
    parts.append(f"step peak with weights and optimizer state {_mib(resident + max(rollout, update))} vs planned "
                 f"{_mib(est.allocated_peak)}")
    status, detail = _verdict(problems, "; ".join(parts) + f" [{how}; the planner's fragmentation and CUDA "
                                                           "context are not measured here]")
    return Check("memory", status, detail)


def _mib(n: float) -> str:
    return f"{n / 1024**2:.2f} MiB"


def check_preset(probe: Probe) -> Check:
    """Which GPU preset the planner fits on this card (what `--preset auto` picks)."""
    _needs_cuda(probe, "no card to size; `tinyr1 plan --preset auto --gpu-gb N` plans for a card of N GiB")
    props = torch.cuda.get_device_properties(probe.device)
    name, reasons = auto_preset(int(props.total_memory))
    card = f"{props.name}, {props.total_memory / GiB:.1f} GiB"
    if name is None:
        return Check("preset", "FAIL", f"no GPU preset fits {card}: {'; '.join(reasons)}")
    chosen = reasons[-1].removesuffix(" -> chosen")
    return Check("preset", "PASS", f"--preset auto picks {name} on {card}: {chosen}")


def check_unsloth(probe: Probe) -> Check:
    """model.backend = "unsloth" on this GPU: unsloth's NF4 dequantization against bitsandbytes', then
    one NF4 decoder layer of a tiny model with the fused kernels bound, forward and LoRA gradients,
    against the same layer on the PEFT path. Last among the checks: importing unsloth patches
    torch/transformers for the rest of the process."""
    _needs_cuda(probe, "on a CPU unsloth's Triton kernels run only interpreted; the tests cover that")
    from tinyr1.backends.unsloth import (
        INSTALL_HINT,
        bind_unsloth,
        bound_layers,
        unsloth_version,
    )
    from tinyr1.backends.unsloth import check_unsloth as probe_unsloth_install

    if unsloth_version() is None:
        raise Skipped(f"unsloth is not installed (optional, for model.backend = 'unsloth'): {INSTALL_HINT}")
    version = probe_unsloth_install(probe.device, "nf4")  # raises with the reason when its NF4 path fails here
    import copy

    from tinyr1.logprobs import _additive_mask, prefix_mask
    from tinyr1.model.loading import add_lora, prepare_for_training
    from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo
    from tinyr1.model.writing import tiny_config

    dtype = _compute_dtype(probe.device)
    torch.manual_seed(0)
    peft = TinyLlavaVideo(TinyLlavaConfig.from_dict(tiny_config(40, 3, frames=4))).to(dtype)
    peft.requires_grad_(False)
    quantize_llm_nf4(peft.llm, compute_dtype=dtype, device=probe.device)
    peft.to(probe.device)
    add_lora(peft, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    fused = copy.deepcopy(peft)
    bind_unsloth(fused.llm)
    bound = bound_layers(fused.llm)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 9, peft.llm.config.hidden_size, generator=gen)
    pos = torch.arange(9)[None].expand(2, 9).to(probe.device)
    mask = _additive_mask(prefix_mask(torch.ones(2, 9, dtype=torch.bool, device=probe.device)), dtype)
    results = []
    for model in (peft, fused):
        prepare_for_training(model, train_connector=False, gradient_checkpointing=False)
        x = x0.to(probe.device, dtype).requires_grad_(True)
        layer = model.llm.model.layers[0]
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=model.llm.model.rotary_emb(x, pos))
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        results.append((out.detach(), {k: p.grad for k, p in trainable_parameters(model).items() if p.grad is not None}))
    out_err = _rel(results[1][0], results[0][0])
    grad_err = max(_rel(results[1][1][k], results[0][1][k]) for k in results[0][1])
    tol_out, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 5e-2)
    problems = []
    if not out_err <= tol_out:
        problems.append(f"layer output off by {out_err:.1e} (tolerance {tol_out:.0e})")
    if not grad_err <= tol_grad:
        problems.append(f"LoRA gradients off by {grad_err:.1e} (tolerance {tol_grad:.0e})")
    detail = (f"unsloth {version}: kernels active on {bound['layers']} of {peft.llm.config.num_hidden_layers} layers "
              f"(q/k/v {bound['qkv']}, o {bound['o']}, MLP {bound['mlp']}); NF4 {str(dtype).removeprefix('torch.')} "
              f"layer vs PEFT: output {out_err:.1e}, worst LoRA gradient {grad_err:.1e}")
    status, detail = _verdict(problems, detail)
    return Check("unsloth", status, detail)


CHECKS: tuple[tuple[str, Callable[[Probe], Check], str], ...] = (
    ("nf4", check_nf4, "bitsandbytes NF4 matmul (1 and 8 rows) and its input gradient vs dequantized weights"),
    ("logprob-triton", check_logprob_triton, "compiled Triton log-prob kernels, forward and backward, vs torch"),
    ("liger", check_liger, "liger RMSNorm + SwiGLU in a tiny Qwen2: logits and gradients vs unpatched"),
    ("adamw8bit", check_adamw8bit, "3 steps of (paged) 8-bit AdamW vs torch AdamW"),
    ("grpo", check_grpo, "2 GRPO steps of a tiny random model on this device (NF4, LoRA, connector, KL)"),
    ("memory", check_memory, "a measured GRPO step beside the planner's estimate for its shapes"),
    ("preset", check_preset, "the largest GPU preset the planner fits on this card"),
    ("unsloth", check_unsloth, "model.backend = unsloth: fused NF4 LoRA layer vs PEFT (last: the import patches)"),
)
CHECK_NAMES = tuple(name for name, _, _ in CHECKS)


def run_checks(only: Sequence[str] | None = None, *, device: torch.device | None = None,
               on_start: Callable[[str], None] | None = None) -> list[Check]:
    """Run the checks (all, or those named in `only`) in order; one that raises becomes a FAIL with
    its message, one that raises `Skipped` a SKIP, and the rest still run."""
    unknown = sorted(set(only or ()) - set(CHECK_NAMES))
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; choose from {', '.join(CHECK_NAMES)}")
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    with tempfile.TemporaryDirectory(prefix="tinyr1-doctor-") as tmp:
        probe = Probe(dev, Path(tmp))
        for name, fn, _ in CHECKS:
            if only and name not in only:
                continue
            if on_start:
                on_start(name)
            t0 = time.perf_counter()
            try:
                result = fn(probe)
            except Skipped as why:
                result = Check(name, "SKIP", str(why))
            except Exception as err:  # noqa: BLE001 - a broken check is a FAIL, the others still run
                result = Check(name, "FAIL", f"{type(err).__name__}: {err}")
            results.append(replace(result, name=name, seconds=time.perf_counter() - t0))
    return results


def summary(results: Sequence[Check]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    text = f"{len(results)} checks: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    cuda_skips = [r.name for r in results if r.status == "SKIP" and r.detail.startswith(NEEDS_CUDA)]
    if cuda_skips:
        text += f"; on a CUDA GPU these run too: {', '.join(cuda_skips)}"
    return text


def to_json(results: Sequence[Check], env: Sequence[tuple[str, str]]) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "ok": not any(r.status == "FAIL" for r in results),
        "environment": dict(env),
        "checks": [{"name": r.name, "status": r.status, "detail": r.detail, "seconds": round(r.seconds, 3)}
                   for r in results],
    }
