"""`model.backend = "unsloth"`: unsloth's fused LoRA kernels bound onto the tiny model's Qwen2 layers
compute what the PEFT path computes, in the calls the update really makes.

Runs only where unsloth is installed (CI makes a venv for it: `.ci/run`); elsewhere every test
here skips with that reason. unsloth is imported by `tinyr1.backends.unsloth` inside the tests (not
at collection), since importing it patches torch/transformers for the rest of the process. On a CPU
the fused functions run on unquantized fp32 weights with their Triton kernels interpreted
(`TRITON_INTERPRET=1`, conftest); NF4 needs CUDA (`test_cpu_nf4_is_refused_with_the_reason`).
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("unsloth") is None,
                       reason="unsloth is not installed (CI runs these in its own venv: .ci/run)"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]

from tinyr1.logprobs import _additive_mask, _prefix_then_suffix, prefix_mask  # noqa: E402
from tinyr1.model.loading import add_lora, prepare_for_training, trainable_parameters  # noqa: E402
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo  # noqa: E402
from tinyr1.model.writing import tiny_config  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 1e-5  # fp32, unquantized: the fused functions only reorder sums


def _pair(seed: int = 0, gc: bool | str = False) -> tuple[TinyLlavaVideo, TinyLlavaVideo]:
    """The same tiny model twice (PEFT LoRA with non-zero B, so every LoRA weight gets a gradient):
    the second with unsloth's kernels bound."""
    from tinyr1.backends.unsloth import bind_unsloth

    torch.manual_seed(seed)
    peft = TinyLlavaVideo(TinyLlavaConfig.from_dict(tiny_config(40, 3, frames=4)))
    peft.requires_grad_(False)
    add_lora(peft, r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    fused = copy.deepcopy(peft)
    counts = bind_unsloth(fused.llm)
    layers = fused.llm.config.num_hidden_layers
    assert (counts["layers"], counts["qkv"], counts["o"], counts["mlp"]) == (layers,) * 4
    for m in (peft, fused):
        prepare_for_training(m, train_connector=False, gradient_checkpointing=gc)
    return peft, fused


def _grads(model: TinyLlavaVideo) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in trainable_parameters(model).items() if p.grad is not None}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=k)


def test_the_binding_patches_forwards_not_modules() -> None:
    """Projections stay the same PEFT modules (the sampler calls them directly; the adapter saves the
    same keys); only the attention and MLP instances' forward changed."""
    peft, fused = _pair()
    a, b = peft.llm.model.layers[0], fused.llm.model.layers[0]
    assert type(b.self_attn.q_proj) is type(a.self_attn.q_proj) and hasattr(b.self_attn.q_proj, "lora_A")
    assert "forward" in vars(b.self_attn) and "forward" in vars(b.mlp) and "forward" not in vars(a.mlp)
    assert peft.state_dict().keys() == fused.state_dict().keys()
    x = torch.randn(2, 5, a.self_attn.q_proj.in_features)
    with torch.no_grad():  # a direct projection call is PEFT's, bias included
        torch.testing.assert_close(b.self_attn.q_proj(x), a.self_attn.q_proj(x), rtol=0, atol=0)


def _layer_inputs(model: TinyLlavaVideo, seed: int) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    d = model.llm.config.hidden_size
    x = torch.randn(2, 9, d, generator=g)
    pos = torch.arange(9)[None].expand(2, 9)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # left padding on row 1
    kw = {"attention_mask": _additive_mask(prefix_mask(valid), x.dtype), "position_ids": pos,
          "position_embeddings": model.llm.model.rotary_emb(x, pos)}
    return x, kw


@pytest.mark.parametrize("grad", ["plain", "shared-prefix"])
def test_one_decoder_layer_forward_and_backward_equal_peft(grad: str) -> None:
    """One decoder layer, fp32: outputs, the input gradient and every LoRA gradient within 1e-5.
    `plain`: a full-sequence call as HF makes it; `shared-prefix`: the update's own call
    (`logprobs._prefix_then_suffix`: prompts with a DynamicCache, then completions against the
    prompts' K/V repeated to their rows)."""
    peft, fused = _pair(seed=1)
    outs, grads = [], []
    for model in (peft, fused):
        model.train()
        layer = model.llm.model.layers[0]
        x, kw = _layer_inputs(model, seed=2)
        x.requires_grad_(True)
        if grad == "plain":
            out = layer(x, **kw)
            out = out[0] if isinstance(out, tuple) else out
            outputs = [out]
        else:
            g = torch.Generator().manual_seed(3)
            hs = torch.randn(3, 4, x.shape[-1], generator=g).requires_grad_(True)
            rows = torch.tensor([0, 1, 1])
            s, ls = x.shape[1], hs.shape[1]
            allowed = torch.cat([kw["attention_mask"][rows, 0, -1:, :].expand(3, ls, s) == 0,
                                 torch.ones(ls, ls, dtype=torch.bool).tril().expand(3, ls, ls)], -1)
            pos_s = 9 + torch.arange(ls)[None].expand(3, ls)
            suffix = {"attention_mask": _additive_mask(allowed, hs.dtype), "position_ids": pos_s,
                      "position_embeddings": model.llm.model.rotary_emb(hs, pos_s)}
            outputs = list(_prefix_then_suffix(layer, x, hs, rows, model.llm.config, kw, suffix))
        # output weights of std 1/16 keep the gradients of order 1-10: atol 1e-5 is then ~1e-6 relative
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(4 + i)) / 16 for i, o in enumerate(outputs)]
        sum((o * w).sum() for o, w in zip(outputs, weights)).backward()
        outs.append([o.detach() for o in outputs])
        extra = {"completions": hs.grad.clone()} if grad == "shared-prefix" else {}
        grads.append({"input": x.grad.clone(), **extra, **_grads(model)})
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=0, atol=ATOL)
    assert len(grads[0]) == 1 + 2 * len(TARGETS) + (grad == "shared-prefix")  # input(s) + layer 0's LoRA A and B
    assert all(0.1 < float(g.abs().max()) < 100 for g in grads[0].values())
    _close(grads[0], grads[1], ATOL)


@pytest.mark.parametrize("gc", [True, "offload"])
def test_whole_update_forward_matches_with_checkpointing(gc: bool | str) -> None:
    """Every layer through `shared_prefix_hidden` with checkpointing (torch's, and our offloaded
    one, whose reentrant recompute replays the fused functions): hidden states and LoRA gradients."""
    from tinyr1.logprobs import shared_prefix_hidden

    peft, fused = _pair(seed=5, gc=gc)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(4, 40, (n,), generator=g) for n in (5, 8)]
    for p in prompts:
        p[1] = -200
    comp = torch.randint(4, 40, (4, 6), generator=g)
    results = []
    for model in (peft, fused):
        model.train()
        torch.manual_seed(7)
        video = [model.connect(model.vision_features(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i))))
                 for i in range(2)]
        h = shared_prefix_hidden(model, prompts, video, comp, torch.tensor([0, 0, 1, 1]))
        (h * torch.linspace(-1, 1, h.numel()).view_as(h) / 64).sum().backward()  # gradients of order 0.1-1
        results.append((h.detach(), _grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=ATOL)
    _close(results[0][1], results[1][1], ATOL)


def test_reference_pass_with_adapters_off_uses_the_base_weights() -> None:
    """The KL reference (adapters disabled, no grad) through the fused forwards = PEFT's adapters-off."""
    from tinyr1.model.loading import adapters_disabled

    peft, fused = _pair(seed=8)
    x, kw = _layer_inputs(peft, seed=9)
    outs = []
    for model in (peft, fused):
        with torch.no_grad(), adapters_disabled(model):
            out = model.llm.model.layers[1](x, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=ATOL)
    with torch.no_grad():
        on = fused.llm.model.layers[1](x, **kw)
    assert (on[0] if isinstance(on, tuple) else on).sub(outs[0]).abs().max() > 1e-3  # LoRA does act


# ---------------------------------------------------------------- two GRPO steps, save, merge


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinyr1.model.writing import write_tiny_checkpoint
    from tinyr1.synth import write_synthetic

    root = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint(root / "model", seed=0, frames=4, image_size=32)
    write_synthetic(root / "data", 16, seed=1, frames=4, size=32, eval_n=0, coldstart_n=0)
    return root


def _run_two_steps(assets: Path, backend: str, lr: float = 1e-3) -> tuple[Any, list[dict[str, Any]]]:
    """Two GRPO steps; each step's metrics, sampled ids, rewards and the gradients the optimizer applied."""
    from tinyr1.config_io import load_config
    from tinyr1.context import build_context, frames_loader, load_split
    from tinyr1.feed import SampleFeeder
    from tinyr1.rewards import resolve_rewards
    from tinyr1.trainer import rollout_step, update_step

    cfg = load_config("tiny", [
        f"model.path={assets / 'model'}", "model.synth=false", "data.synth=false", f"model.backend={backend}",
        f"data.train={assets / 'data' / 'train.jsonl'}", f"data.video_root={assets / 'data'}", "data.eval=none",
        "train.eval_every=0",
        "video.num_frames=4", "video.max_frames=4", "rollout.num_generations=4", "rollout.prompts_per_step=2",
        "rollout.max_new_tokens=6", "train.micro_batch_size=4", "grpo.beta=0.05", f"train.lr={lr}",
        "model.gradient_checkpointing=true", "log.progress=false",
    ])
    ctx = replace(build_context(cfg, total_steps=4), reward_funcs=resolve_rewards({"length": 1.0}))
    feeder = SampleFeeder(load_split(cfg, cfg.data.train), frames_loader(cfg, 32), seed=0, max_bad_fraction=0.05)
    applied: list[dict[str, torch.Tensor]] = []
    ctx.optimizer.register_step_pre_hook(
        lambda *_: applied.append({k: p.grad.clone() for k, p in trainable_parameters(ctx.model).items()}))
    metrics = []
    for _ in range(2):
        ro = rollout_step(ctx, feeder.next_batch(2))
        metrics.append({**update_step(ctx, ro), "completion_ids": ro.completion_ids, "reward": ro.reward_total})
        metrics[-1]["grads"] = applied[-1]
    return ctx, metrics


def test_two_grpo_steps_equal_peft_and_the_adapter_merges(assets: Path, tmp_path: Path) -> None:
    """Two GRPO steps (rollout, adapters-off reference, checkpointed update, AdamW) of the tiny model
    with each backend from the same seed: the same sampled tokens and rewards; loss, KL and gradient
    norm within 1e-4 (relative); the gradients the optimizer applied at both steps within 1e-4 of
    their scale; every trained tensor after the two steps within 1e-4. (AdamW's first steps move
    each weight by about lr times the *sign* of its gradient, so weights whose gradient is at
    rounding level may step either way: lr 1e-4 keeps that below the tolerance, while a wrong
    gradient would still move weights by up to 4e-4 apart.) The unsloth run's adapter is the usual
    PEFT folder: `tinyr1 merge` folds it into the original layout, whose logits equal the trained
    model's."""
    from tinyr1.backends.unsloth import bound_layers
    from tinyr1.checkpoint import save_adapter
    from tinyr1.cli import main
    from tinyr1.model.loading import load_tinyllava, weight_files

    peft_ctx, peft_m = _run_two_steps(assets, "peft", lr=1e-4)
    ctx, m = _run_two_steps(assets, "unsloth", lr=1e-4)
    assert bound_layers(ctx.model.llm)["layers"] == ctx.model.llm.config.num_hidden_layers
    assert bound_layers(peft_ctx.model.llm)["layers"] == 0
    for a, b in zip(peft_m, m):
        assert torch.equal(a.pop("completion_ids"), b.pop("completion_ids"))  # the same tokens were sampled
        torch.testing.assert_close(b.pop("reward"), a.pop("reward"), rtol=0, atol=0)
        ga, gb = a.pop("grads"), b.pop("grads")
        scale = max(float(g.abs().max()) for g in ga.values())
        assert scale > 1e-3
        _close(ga, gb, 1e-4 * scale)
        numbers = [k for k, v in a.items() if isinstance(v, float) and not k.startswith(("time", "memory", "step_time"))]
        assert {"loss", "kl", "grad_norm"} <= set(numbers)
        for key in numbers:
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
    want, got = trainable_parameters(peft_ctx.model), trainable_parameters(ctx.model)
    _close(want, got, 1e-4)
    assert any("lora_B" in k and bool(p.abs().max() > 0) for k, p in got.items())  # the steps really trained

    adapter = tmp_path / "adapter"
    save_adapter(ctx.model, adapter, train_connector=ctx.model.connector_trains)
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(assets / "model"), "--adapter", str(adapter), "--out", str(out),
                 "--dtype", "fp32"]) == 0
    from safetensors import safe_open

    def keys(folder: Path) -> set[str]:
        names: set[str] = set()
        for f in weight_files(folder):
            with safe_open(str(f), framework="pt") as fh:
                names.update(fh.keys())  # noqa: SIM118
        return names

    assert keys(out) == keys(assets / "model")
    merged = load_tinyllava(out, dtype="fp32", device="cpu").model
    ids = [torch.tensor([5, 6, -200, 7, 8, 9])]
    video = [torch.randn(merged.cfg.num_queries, merged.llm.config.hidden_size, generator=torch.Generator().manual_seed(0))]
    ctx.model.eval()
    with torch.no_grad():
        trained = ctx.model(ids, video).logits
        released = merged(ids, video).logits
        base = load_tinyllava(assets / "model", dtype="fp32", device="cpu").model(ids, video).logits
    torch.testing.assert_close(released, trained, rtol=0, atol=1e-4)
    assert float((released - base).abs().max()) > 5e-3  # 50x the tolerance: the adapter changed the release (1.6e-2)


# ---------------------------------------------------------------- refusals


def test_cpu_nf4_is_refused_with_the_reason() -> None:
    """unsloth's NF4 dequantization calls bitsandbytes' native CUDA functions, which its CPU build
    lacks: a CPU run with model.quant = nf4 stops before loading, saying so."""
    from tinyr1.backends.unsloth import check_unsloth, nf4_unsupported_reason
    from tinyr1.errors import DeviceError

    reason = nf4_unsupported_reason(torch.device("cpu"))
    if reason is None:
        pytest.skip("this unsloth/bitsandbytes pair dequantizes NF4 on the CPU; nothing to refuse")
    assert "cdequantize_blockwise" in reason
    with pytest.raises(DeviceError, match="model.quant = 'none'"):
        check_unsloth(torch.device("cpu"), "nf4")
    check_unsloth(torch.device("cpu"), "none")  # unquantized weights are fine


def test_dropout_or_a_lora_bias_is_refused_at_bind_time() -> None:
    from tinyr1.backends.unsloth import bind_unsloth
    from tinyr1.errors import ConfigError

    torch.manual_seed(0)
    model = TinyLlavaVideo(TinyLlavaConfig.from_dict(tiny_config(40, 3, frames=4)))
    add_lora(model, r=4, alpha=8, dropout=0.1, target_modules=TARGETS)
    with pytest.raises(ConfigError, match=r"layer 0 qkv: LoRA dropout > 0 \(set lora.dropout = 0\)"):
        bind_unsloth(model.llm)

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = TinyLlavaVideo(TinyLlavaConfig.from_dict(tiny_config(40, 3, frames=4)))
    model.language_model = get_peft_model(model.language_model, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, lora_bias=True))
    with pytest.raises(ConfigError, match="a LoRA bias"):
        bind_unsloth(model.llm)


@pytest.mark.gpu
def test_nf4_layer_on_cuda_matches_peft() -> None:
    """On CUDA (bf16 compute, NF4 base): the fused layer against PEFT over the same 4-bit weights."""
    from tinyr1.backends.unsloth import bind_unsloth, check_unsloth
    from tinyr1.model.loading import quantize_llm_nf4

    dev = torch.device("cuda")
    check_unsloth(dev, "nf4")
    torch.manual_seed(0)
    peft = TinyLlavaVideo(TinyLlavaConfig.from_dict(tiny_config(40, 3, frames=4))).to(torch.bfloat16)
    peft.requires_grad_(False)
    quantize_llm_nf4(peft.llm, compute_dtype=torch.bfloat16, device=dev)
    peft.to(dev)
    add_lora(peft, r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    fused = copy.deepcopy(peft)
    bind_unsloth(fused.llm)
    outs = []
    for model in (peft, fused):
        prepare_for_training(model, train_connector=False, gradient_checkpointing=False)
        x, kw = _layer_inputs(model, seed=2)
        x, kw = x.to(dev, torch.bfloat16), {k: (tuple(t.to(dev, torch.bfloat16) for t in v) if isinstance(v, tuple)
                                             else v.to(dev)) for k, v in kw.items()}
        kw["attention_mask"] = kw["attention_mask"].to(torch.bfloat16)
        out = model.llm.model.layers[0](x.requires_grad_(True), **kw)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().sum().backward()
        outs.append((out.detach().float(), _grads(model)))
    rel = float((outs[1][0] - outs[0][0]).norm() / outs[0][0].norm())
    assert rel < 2e-2, rel
    for k in outs[0][1]:
        g0, g1 = outs[0][1][k].float(), outs[1][1][k].float()
        assert float((g1 - g0).norm() / g0.norm().clamp_min(1e-12)) < 5e-2, k


def test_bench_compares_the_backends_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`tinyr1 bench --preset tiny --backends peft,unsloth`: both run on the same checkpoint and shapes
    (peft first) and print one table; no timing claim on a CPU, only that the numbers are there."""
    import json

    from tinyr1.cli import main

    monkeypatch.setenv("COLUMNS", "220")
    out_json = tmp_path / "cmp.json"
    assert main(["bench", "--preset", "tiny", "--steps", "1", "--backends", "unsloth,peft", "--json", str(out_json),
                 "--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=2",
                 "--set", "rollout.max_new_tokens=4", "--set", "train.micro_batch_size=2",
                 "--set", "video.num_frames=4", "--set", "video.max_frames=4"]) == 0
    out = capsys.readouterr().out
    assert "backends side by side" in out and "update / peft" in out
    res = json.loads(out_json.read_text())
    assert [r["shape"]["backend"] for r in res] == ["peft", "unsloth"]
    assert res[0]["arch"] == res[1]["arch"] and res[0]["new_tokens"] == res[1]["new_tokens"] == [2 * 2 * 4]
    for r in res:
        assert r["seconds"]["update"] > 0 and r["measured"]["update"] > 0
