"""The GPU's numerics on the CPU: fp32 master weights under bf16 compute, fp16 with loss scaling,
the KL reference as the initial policy, and attention masks without fully masked rows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyr1.checkpoint import save_adapter
from tinyr1.config_io import load_config
from tinyr1.context import Context, build_context, frames_loader, load_split
from tinyr1.errors import DeviceError
from tinyr1.feed import SampleFeeder
from tinyr1.logprobs import completion_logprobs, prefix_mask
from tinyr1.model import loading
from tinyr1.model.loading import adapters_disabled, trainable_parameters
from tinyr1.model.writing import write_tiny_checkpoint
from tinyr1.rewards import resolve_rewards
from tinyr1.synth import write_synthetic
from tinyr1.trainer import grpo_step, reference_logprobs, rollout_step, update_step

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint(root / "model", seed=0, frames=4, image_size=32)
    write_synthetic(root / "data", 12, seed=1, frames=4, size=32, eval_n=0, coldstart_n=0)
    return root


def _cfg(assets: Path, *extra: str):
    return load_config("tiny", [
        f"model.path={assets / 'model'}", "model.synth=false", "data.synth=false", "coldstart.enabled=false",
        f"data.train={assets / 'data' / 'train.jsonl'}", f"data.video_root={assets / 'data'}", "data.eval=none", "train.eval_every=0",
        "video.num_frames=4", "video.max_frames=4", "rollout.num_generations=4", "rollout.prompts_per_step=2",
        "rollout.max_new_tokens=6", "train.micro_batch_size=4", "train.optimizer=adamw", *extra,
    ])


def _context(cfg) -> tuple[Context, SampleFeeder]:
    ctx = replace(build_context(cfg, total_steps=10), reward_funcs=resolve_rewards({"length": 1.0}))  # varied rewards
    feeder = SampleFeeder(load_split(cfg, cfg.data.train), frames_loader(cfg, 32), seed=0, max_bad_fraction=0.0)
    return ctx, feeder


def test_bf16_compute_keeps_fp32_master_weights_and_applies_adamw_exactly(assets: Path, tmp_path: Path) -> None:
    """bf16 compute as on CUDA: every trainable tensor (LoRA and connector) is fp32 and moves by
    exactly what AdamW prescribes for its (clipped) gradient; at lr 1e-5 bf16 weights would round
    most of these updates away. The saved connector is fp32 too."""
    cfg = _cfg(assets, "model.dtype=bf16", "train.lr=1e-5", "train.weight_decay=0.01")
    ctx, feeder = _context(cfg)
    model = ctx.model
    assert model.compute_dtype == torch.bfloat16 and model.connector_trains
    params = trainable_parameters(model)
    assert {p.dtype for p in params.values()} == {torch.float32}
    assert any(k.startswith("connector.") for k in params) and any("lora_B" in k for k in params)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor, dict]] = {}

    def before_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        group = optimizer.param_groups[0]
        for name, p in params.items():
            if p.grad is not None:
                seen[name] = (p.detach().double().clone(), p.grad.double().clone(), dict(group))

    ctx.optimizer.register_step_pre_hook(before_step)
    ro = rollout_step(ctx, feeder.next_batch(2))
    metrics = update_step(ctx, ro)
    assert metrics["skipped"] == 0 and seen
    moved = 0
    for name, (w, g, group) in seen.items():
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        want = w * (1 - lr * wd) - lr * g / (g.abs() + eps)  # AdamW's first step: m^ = g, v^ = g^2
        got = params[name].detach().double()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * lr + 2e-7 * float(w.abs().max()), msg=name)
        moved += int((got != w).sum())
    assert any(k.startswith("connector.") for k in seen) and moved > 0.99 * sum(w.numel() for w, _, _ in seen.values())
    save_adapter(model, tmp_path / "adapter", train_connector=True)
    saved = load_file(str(tmp_path / "adapter" / "connector.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_kl_reference_is_the_initial_policy_when_the_connector_trains(assets: Path) -> None:
    """After updates that move the connector a lot, the reference log-probs equal those of the
    untouched initial model (adapters off, its own connector) - not the adapters-off LLM fed by the
    trained connector."""
    cfg = _cfg(assets, "grpo.beta=0.1", "train.lr=0.01")
    ctx, feeder = _context(cfg)
    assert ctx.reference_connector is not None
    for _ in range(3):
        grpo_step(ctx, feeder.next_batch(2))
    ro = rollout_step(ctx, feeder.next_batch(2))
    ref = reference_logprobs(ctx, ro)  # [B*G, L]
    initial, _ = _context(cfg)  # same seed: the weights training started from
    rows = torch.arange(ro.completion_ids.shape[0])
    with torch.no_grad(), adapters_disabled(initial.model):
        own = replace(ro, video_tokens=[initial.model.connect(f) for f in ro.features], reference_video_tokens=None)
        want, _ = completion_logprobs(initial.model, own, rows, temperature=cfg.rollout.temperature, backend="torch")
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-5)
    with torch.no_grad(), adapters_disabled(ctx.model):  # what the reference was before: the trained connector
        drifted, _ = completion_logprobs(ctx.model, ro, rows, temperature=cfg.rollout.temperature, backend="torch")
    assert (drifted - want).abs().max() > 1e-3, "the connector should have moved in this test"


def test_no_reference_connector_without_kl_or_connector_training(assets: Path) -> None:
    assert build_context(_cfg(assets, "grpo.beta=0"), total_steps=1).reference_connector is None
    frozen = build_context(_cfg(assets, "grpo.beta=0.1", "model.train_connector=false"), total_steps=1)
    assert frozen.reference_connector is None and not frozen.model.connector_trains


def test_auto_dtype_picks_bf16_where_supported_else_fp16_and_refuses_bf16_by_name(monkeypatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: True)
    assert loading.resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: False)
    assert loading.resolve_dtype("auto", cuda) == torch.float16
    assert loading.resolve_dtype("fp32", cuda) == torch.float32
    with pytest.raises(DeviceError, match=r"Tesla T4 has no bf16 support: set model.dtype = \"fp16\""):
        loading.resolve_dtype("bf16", cuda)
    assert loading.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_fp16_compute_scales_the_loss_and_skips_overflowing_steps(assets: Path) -> None:
    """fp16 (GPUs without bf16): a GradScaler scales the loss, gradients are unscaled before
    clipping, fp32 master weights move; an overflow skips the step and halves the scale. (The
    config refuses fp16 on a CPU for speed; the test builds the same policy here directly.)"""
    cfg = _cfg(assets, "train.lr=1e-3")
    cfg = replace(cfg, model=replace(cfg.model, dtype="fp16"))
    ctx, feeder = _context(cfg)
    assert ctx.model.compute_dtype == torch.float16 and ctx.scaler is not None
    params = trainable_parameters(ctx.model)
    assert {p.dtype for p in params.values()} == {torch.float32}
    start = {k: p.detach().clone() for k, p in params.items()}
    _, metrics = grpo_step(ctx, feeder.next_batch(2))
    assert metrics["skipped"] == 0 and metrics["loss_scale"] == 65536.0
    assert all(torch.isfinite(p).all() for p in params.values())
    assert sum(int((p.detach() != start[k]).sum()) for k, p in params.items()) > 0
    name, victim = next((k, p) for k, p in params.items() if "lora_A" in k)
    hook = victim.register_hook(lambda g: g * float("inf"))  # an fp16 overflow in one gradient
    before = {k: p.detach().clone() for k, p in params.items()}
    _, metrics = grpo_step(ctx, feeder.next_batch(2))
    hook.remove()
    assert metrics["skipped"] == 1 and metrics["loss_scale"] == 32768.0
    assert all(torch.equal(p.detach(), before[k]) for k, p in params.items()), "a skipped step changes nothing"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefix_mask_never_fully_masks_a_row_and_keeps_real_rows_causal(attn: str) -> None:
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True],
                          [False, False, False, False, True]])  # left padding  [B, S]
    allowed = prefix_mask(valid)  # [B, S, S]
    assert allowed.any(-1).all(), "every query row attends to something"
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    for b in range(3):
        real = valid[b]
        assert torch.equal(allowed[b][real], (causal & real[None, :])[real])  # real rows: plain causal
        assert torch.equal(allowed[b][~real], torch.eye(5, dtype=torch.bool)[~real])  # padding: itself only
    # and through an attention implementation: finite everywhere, real rows as with padding ignored
    q = k = v = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(0))  # [B, heads, S, hd]
    if attn == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
    else:
        scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~allowed[:, None], float("-inf"))
        out = scores.softmax(-1) @ v
    assert torch.isfinite(out).all()
    for b in range(3):
        real = valid[b].nonzero().flatten()
        sub = torch.nn.functional.scaled_dot_product_attention(
            q[b : b + 1, :, real], k[b : b + 1, :, real], v[b : b + 1, :, real], is_causal=True)
        torch.testing.assert_close(out[b : b + 1, :, real], sub)
