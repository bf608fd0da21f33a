"""The memory planner against what really lives: peak live tensor bytes measured on the CPU.

Activations are compared with `LiveTensorBytes` (a TorchDispatchMode) around a real rollout and a
real update micro-batch of tiny models; weights, NF4 storage, LoRA and optimizer states against the
bytes of the real modules and bitsandbytes states. Allocator/CUDA-context overheads are modelled
lines the CPU cannot check and are left out here.
"""

from __future__ import annotations

import pytest
import torch

from tinyr1.cli import main
from tinyr1.config_io import load_config
from tinyr1.errors import ConfigError
from tinyr1.memory import (
    PRESET_BUDGET,
    GiB,
    advise,
    arch_for_config,
    auto_preset,
    check_fits,
    estimate,
    gpu_presets,
    need_bytes,
    nominal_gpu_gb,
    verdict,
    weight_lines,
)
from tinyr1.memory_arch import Arch, RunShape
from tinyr1.memory_measure import LiveTensorBytes, measure_phases, module_bytes, tensor_bytes
from tinyr1.model.loading import add_lora, prepare_for_training, quantize_llm_nf4, trainable_parameters
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo
from tinyr1.model.writing import tiny_config
from tinyr1.preset_bench import bench_context, write_random_checkpoint
from tinyr1.tokenizer import build_tiny_tokenizer, load_tokenizer
from tinyr1.trainer import grpo_step

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _tiny_cfg(frames: int, hidden: int = 128, ffn: int = 512, layers: int = 3, vocab: int = 2048) -> TinyLlavaConfig:
    raw = tiny_config(vocab, 3, frames=frames)
    raw["text_config"].update(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers)
    raw["hidden_size"] = hidden
    return TinyLlavaConfig.from_dict(raw)


def test_tracker_counts_live_storages_once() -> None:
    x = torch.zeros(1000)  # made before the mode: not counted
    with LiveTensorBytes() as live:
        a = torch.empty(256)  # 1 KiB
        b = a.view(16, 16)  # a view: no new storage
        c = x * 2  # 4000 B
        c.add_(1)  # in place: nothing new
        del a, b
        d = torch.empty(64, dtype=torch.float64)  # 512 B, allocated after a's storage died
    assert live.peak == 1024 + 4000
    assert live.current == 4000 + 512
    del c, d
    assert live.current == 0


@pytest.mark.parametrize(
    "frames,group,new_tokens,prompts,micro,dtype,dropout",
    [
        (4, 4, 16, 2, 4, "fp32", 0.05),  # decode (KV cache) and layer backward dominate
        (8, 2, 8, 2, 2, "fp32", 0.05),  # many frames, short completions: prefill and connector
        (2, 8, 16, 1, 4, "bf16", 0.0),  # 16-bit path: fp32 copies for the LoRA inputs and norms
        (2, 8, 64, 2, 8, "fp32", 0.0),  # decode peaks: each prompt's K/V once + preallocated completion K/V
        (2, 8, 96, 2, 8, "bf16", 0.0),  # the same in 16 bits (fp32 attention scores)
    ],
)
def test_planner_within_20_percent_of_measured_peaks(tmp_path, frames, group, new_tokens, prompts, micro, dtype,
                                                     dropout) -> None:
    """A GRPO step of the trainer itself (`measure_phases`: rollout_step, update_step) against the
    planner's kept tensors + activations of each phase. The update's measured peak holds the
    gradients it allocates (their real bytes are taken off: the planner's gradient line assumes
    fp32 master weights for a bf16 connector, and weights/states are checked in the next test).
    Every shape has two micro-batches or more: the planner's update moment is a micro-batch
    backward while the gradients already exist; with one micro-batch the real peak is lower."""
    model_dir = tmp_path / "model"
    build_tiny_tokenizer(model_dir)
    raw = tiny_config(2048, load_tokenizer(model_dir).eos_token_id, frames=frames)
    raw["text_config"].update(hidden_size=128, intermediate_size=512, num_hidden_layers=3)
    write_random_checkpoint(model_dir, raw, seed=0, dtype=torch.float32)
    cfg = load_config("tiny", [
        f"model.path={model_dir}", "model.synth=false", f"model.dtype={dtype}", "model.gradient_checkpointing=true",
        "lora.r=8", "lora.alpha=16", f"lora.dropout={dropout}", f"video.num_frames={frames}",
        f"video.max_frames={frames}", f"rollout.num_generations={group}", f"rollout.prompts_per_step={prompts}",
        f"rollout.max_new_tokens={new_tokens}", "rollout.top_k=0", f"train.micro_batch_size={micro}",
    ])
    ctx, feeder = bench_context(cfg, tmp_path / "data", seed=0, allow_eos=False)  # every row runs to the end
    grpo_step(ctx, feeder.next_batch(prompts))  # the optimizer state exists from the second step on
    # frames as host memory handed over in float64: the tower's cast makes the per-video copy a GPU makes
    batch = [(sample, frames.double()) for sample, frames in feeder.next_batch(prompts)]
    rollout, update, ro = measure_phases(ctx, batch)
    grads = sum(p.numel() * p.element_size() for p in trainable_parameters(ctx.model).values())
    prompt_tokens = round(sum(p.numel() - 1 for p in ro.prompt_ids) / len(ro.prompt_ids))
    shape = RunShape.from_config(ctx.cfg, prompt_tokens)
    est = estimate(Arch.from_tinyllava(ctx.model.cfg), shape)
    planned_rollout = est.phase_total("rollout", ("kept", "activation"))
    planned_update = est.phase_total("update", ("kept", "activation"))
    assert planned_rollout == pytest.approx(rollout, rel=0.2), est.moments
    assert planned_update == pytest.approx(update - grads, rel=0.2), est.moments


def test_weights_nf4_lora_and_8bit_optimizer_bytes_match_the_real_modules() -> None:
    import bitsandbytes as bnb

    cfg = _tiny_cfg(4, hidden=256, ffn=1024, layers=2)
    torch.manual_seed(0)
    model = TinyLlavaVideo(cfg).to(torch.bfloat16)
    model.requires_grad_(False)
    quantize_llm_nf4(model.llm, compute_dtype=torch.bfloat16, device=torch.device("cpu"))
    llm = model.llm.model
    measured_layers = module_bytes(llm.layers)  # 4-bit codes + quant states, biases, norms
    add_lora(model, r=8, alpha=16, dropout=0.05, target_modules=TARGETS)
    prepare_for_training(model, train_connector=True, gradient_checkpointing=False)
    shape = RunShape(dtype="bf16", quant="nf4", lora_r=8, device="cpu", optimizer="adamw8bit", train_connector=True)
    lines = {ln.name: ln.rollout for ln in weight_lines(Arch.from_tinyllava(cfg), shape)}
    assert lines["LLM decoder linears"] == pytest.approx(measured_layers, rel=0.01)
    assert lines["embeddings / lm_head"] == module_bytes(llm.embed_tokens) + module_bytes(llm.norm)
    assert lines["vision tower (frozen)"] == module_bytes(model.vision_tower)
    assert lines["connector"] == module_bytes(model.connector)
    assert lines["LoRA weights"] == tensor_bytes(p for n, p in model.named_parameters() if "lora_" in n)
    params = list(trainable_parameters(model).values())
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert lines["optimizer states"] == pytest.approx(tensor_bytes(states), rel=0.001)


def test_larger_runs_need_more_and_advice_actually_fits() -> None:
    arch = Arch.qwen25_3b()
    base = RunShape()
    for field, bigger in [("group_size", 16), ("frames", 32), ("max_new_tokens", 1024), ("micro_batch", 16),
                          ("lora_r", 128)]:
        assert need_bytes(estimate(arch, RunShape(**{field: bigger}))) > need_bytes(estimate(arch, base)), field
    huge = RunShape(group_size=64)
    card = 8 * GiB
    assert verdict(need_bytes(estimate(arch, huge)), card) == "does not fit"
    fixes = advise(arch, huge, card)
    assert fixes
    for fix in fixes:
        assert verdict(fix.need, card) == "fits"
        assert fix.flags().startswith("--set ")


def test_impossible_override_is_refused_with_advice() -> None:
    cfg = load_config("8gb", ["rollout.num_generations=64"])
    with pytest.raises(ConfigError, match=r"does not fit.*--set rollout\.num_generations=\d"):
        check_fits(cfg, 8 * GiB)
    check_fits(load_config("8gb"), 8 * GiB)  # the preset itself passes


def test_plan_cli_prints_table_and_verdict(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells at the default 80 columns
    assert main(["plan", "--preset", "12gb"]) == 0
    out = capsys.readouterr().out
    assert "prompt K/V" in out and "checkpointed layer" in out and "CUDA context" in out
    assert "fits: needs" in out
    assert main(["plan", "--preset", "8gb", "--set", "rollout.num_generations=64"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "--set rollout.num_generations=" in out


def test_train_refuses_before_loading_weights(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # judge against the preset's 8 GB card
    code = main(["train", "--preset", "8gb", "--set", "rollout.num_generations=64",
                 "--set", "model.path=does/not/exist"])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "--no-check" in err
    assert not any(tmp_path.iterdir()), "nothing may be written before the check"


# ---------------------------------------------------------------- GPU presets and --preset auto


def _need(name: str, overrides: list[str] | None = None) -> int:
    cfg = load_config(name, overrides)
    return need_bytes(estimate(arch_for_config(cfg), RunShape.from_config(cfg)))


def test_gpu_presets_are_the_four_cards_largest_first() -> None:
    assert gpu_presets() == ["24gb", "16gb", "12gb", "8gb"]


@pytest.mark.parametrize("name", gpu_presets())
def test_gpu_preset_needs_at_most_75_percent_of_its_card(name: str) -> None:
    """The presets are sized with 25% headroom until the planner is measured on a GPU."""
    card = int(nominal_gpu_gb(name) * GiB)  # type: ignore[operator]
    need = _need(name)
    assert need <= PRESET_BUDGET * card, f"{name}: needs {need / GiB:.2f} GiB, {need / card:.0%} of its card"
    check_fits(load_config(name), card)  # and `tinyr1 train`'s own check agrees


@pytest.mark.parametrize("name", gpu_presets())
def test_gpu_presets_keep_the_papers_group_frames_tokens_connector_kl_and_noise(name: str) -> None:
    """Only the 8 GB card gives up part of the recipe: a frozen connector, because training it does
    not fit (its header has the planner's numbers)."""
    c = load_config(name)
    assert (c.rollout.num_generations, c.video.num_frames, c.rollout.max_new_tokens) == (8, 16, 512)
    assert (c.grpo.beta, c.grpo.noise_std, c.grpo.kl_clamp) == (0.01, 0.02, 100.0)
    assert (c.rollout.temperature, c.rollout.top_k, c.grpo.num_iterations) == (1.0, 50, 1)
    assert (c.rollout.prompts_per_step, c.model.train_connector) == (8, name != "8gb")
    if name == "8gb":  # and the planner agrees that training the connector does not fit
        assert _need(name, ["model.train_connector=true"]) > PRESET_BUDGET * 8 * GiB


@pytest.mark.parametrize("card_gib,want", [
    (8, "8gb"), (12, "12gb"), (16, "16gb"), (24, "24gb"), (80, "24gb"),
    (15.0, "16gb"),  # a T4 reports 15 GiB
    (22.5, "24gb"),  # an A10 / L4 reports ~22.5 GiB
    (7.9, "8gb"),  # a little under the 8gb preset's 75%: the largest that still 'fits'
])
def test_auto_preset_picks_the_largest_gpu_preset_the_planner_fits(card_gib: float, want: str) -> None:
    card = int(card_gib * GiB)
    name, reasons = auto_preset(card)
    assert name == want, reasons
    tried = gpu_presets()[: gpu_presets().index(want) + 1]  # every larger preset was tried first
    assert [r.split()[0] for r in reasons] == tried
    assert reasons[-1].endswith("-> chosen") and f"{_need(want) / GiB:.2f} GiB" in reasons[-1]
    for line, larger in zip(reasons[:-1], tried[:-1]):
        assert "does not fit" in line or "tight" in line or "but above" in line, line
        assert _need(larger) > PRESET_BUDGET * card
    assert ("but above" in reasons[-1]) == (_need(want) > PRESET_BUDGET * card)


def test_auto_preset_none_when_too_small_and_overrides_count() -> None:
    name, reasons = auto_preset(4 * GiB)
    assert name is None and len(reasons) == len(gpu_presets())
    assert all(r.endswith("does not fit") for r in reasons)
    # the user's --set values are planned too: 64 completions per prompt fit no preset on 16 GiB...
    assert auto_preset(16 * GiB, ["rollout.num_generations=64"])[0] is None
    # ...and a cheaper run lets a 20 GiB card take a larger preset
    assert auto_preset(20 * GiB)[0] == "16gb"
    assert auto_preset(20 * GiB, ["rollout.max_new_tokens=128"])[0] == "24gb"


class _FakeProps:
    name = "NVIDIA GeForce RTX 4090"
    total_memory = 24 * GiB


def test_preset_auto_in_plan_and_train(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--preset", "auto", "--gpu-gb", "12"]) == 0  # a given card: no GPU needed
    out = capsys.readouterr().out
    assert f"auto: 12.0 GiB (given): 12gb needs {_need('12gb') / GiB:.2f} GiB" in out and "24gb needs" in out
    assert f"fits: needs {_need('12gb') / GiB:.2f} GiB of a 12 GiB card" in out
    assert main(["plan", "--preset", "auto", "--gpu-gb", "4"]) == 2
    assert "no GPU preset fits 4.0 GiB" in capsys.readouterr().err

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["plan", "--preset", "auto"], ["train", "--preset", "auto"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "no CUDA GPU" in err and "--preset tiny" in err, err
    assert not any(tmp_path.iterdir()), "nothing may be written"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _i: _FakeProps())
    assert main(["plan", "--preset", "auto"]) == 0
    out = capsys.readouterr().out
    need = _need("24gb")
    assert f"auto: NVIDIA GeForce RTX 4090, 24.0 GiB: 24gb needs {need / GiB:.2f} GiB ({need / (24 * GiB):.0%}): fits" in out
    assert f"fits: needs {need / GiB:.2f} GiB of a 24 GiB card" in out
