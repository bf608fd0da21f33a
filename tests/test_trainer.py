"""The GRPO engine end to end on the tiny model: 4-bit step, exact resume, crash during save."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tinyr1.checkpoint import TrainState, latest_checkpoint
from tinyr1.config_io import load_config
from tinyr1.context import build_context, frames_loader, load_split
from tinyr1.feed import SampleFeeder
from tinyr1.log import RunLogger
from tinyr1.logprobs import completion_logprobs
from tinyr1.model.writing import write_tiny_checkpoint
from tinyr1.rewards import resolve_rewards
from tinyr1.session import train
from tinyr1.synth import write_synthetic
from tinyr1.trainer import grpo_loop, rollout_step, update_step


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint(root / "model", seed=0, frames=4, image_size=32)
    write_synthetic(root / "data", 24, seed=1, frames=4, size=32, eval_n=8, coldstart_n=8)
    return root


def _cfg(assets: Path, out: Path, *extra: str):
    return load_config("tiny", [
        f"model.path={assets / 'model'}", "model.synth=false", "data.synth=false",
        f"data.train={assets / 'data' / 'train.jsonl'}", f"data.coldstart={assets / 'data' / 'coldstart.json'}",
        f"data.video_root={assets / 'data'}", "data.eval=none", "train.eval_every=0",
        "video.num_frames=4", "video.max_frames=4",
        "rollout.num_generations=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=6",
        "train.micro_batch_size=4", "coldstart.steps=2", "coldstart.batch_size=2",
        "log.progress=false", "log.completions_every=1", "log.num_completions=2",
        f"train.output_dir={out}", *extra,
    ])


def _feeder(cfg) -> SampleFeeder:
    return SampleFeeder(load_split(cfg, cfg.data.train), frames_loader(cfg, 32), seed=0, max_bad_fraction=0.05)


def test_grpo_step_on_4bit_changes_only_lora(assets: Path) -> None:
    import bitsandbytes as bnb

    cfg = _cfg(assets, assets / "unused", "model.quant=nf4", "model.train_connector=false", "train.lr=0.05",
               "train.optimizer=adamw8bit", "grpo.beta=0.1")
    ctx = replace(build_context(cfg, total_steps=4), reward_funcs=resolve_rewards({"length": 1.0}))  # never a zero-variance group
    model = ctx.model
    base = model.llm.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, bnb.nn.Linear4bit)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    feeder = _feeder(cfg)
    for _ in range(2):  # LoRA B starts at 0, so A only moves from the second step on
        ro = rollout_step(ctx, feeder.next_batch(2))
        m = update_step(ctx, ro)
        assert m["skipped"] == 0 and m["grad_norm"] > 0 and "kl" in m
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    lora = {n for n in before if "lora_" in n}
    assert lora and changed == lora, f"unexpected changes: {sorted(changed ^ lora)[:5]}"


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timing = ("step_time", "time/", "memory/")
    return [{k: v for k, v in r.items() if not k.startswith(timing)} for r in rows]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return _load_dir(run / "final")


def _load_dir(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """LoRA + connector weights of a saved adapter folder, connector keys prefixed."""
    from safetensors.torch import load_file

    out = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out.update({f"connector.{k}": v for k, v in load_file(str(adapter_dir / "connector.safetensors")).items()})
    return out


def test_resume_reproduces_an_uninterrupted_run(assets: Path, tmp_path: Path) -> None:
    straight = train(_cfg(assets, tmp_path / "a", "train.steps=6", "train.save_every=0"))
    cfg_b = _cfg(assets, tmp_path / "b", "train.steps=6", "train.save_every=0")
    train(cfg_b, stop_after=3)
    assert latest_checkpoint(tmp_path / "b").name == "step-000003"
    assert not (tmp_path / "b" / "final").exists()
    resumed = train(load_config(str(tmp_path / "b" / "config.toml")), resume=tmp_path / "b")
    assert _metrics(straight) == _metrics(resumed)
    assert len(_metrics(resumed)) == 6
    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a crash in the middle of writing step 6 leaves only a temp folder: resume ignores it
    ckpts = tmp_path / "b" / "checkpoints"
    partial = ckpts / ".tmp-step-000009-4242"
    shutil.copytree(ckpts / "step-000006", partial)
    (partial / "COMPLETE").unlink()
    (partial / "optimizer.pt").write_bytes(b"\x00" * 10)  # half-written
    assert latest_checkpoint(tmp_path / "b").name == "step-000006"


def _graph_nodes(t: torch.Tensor) -> set[str]:
    """Names of every autograd node that produced `t` (which Functions really ran)."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def test_update_dispatches_to_the_configured_kernel(assets: Path, tmp_path: Path) -> None:
    """`model.kernels` reaches the GRPO update: "triton" runs tinyr1's Triton kernels (under the
    interpreter here), "torch" the chunked torch path, and both make the same update."""
    pytest.importorskip("triton", reason="the triton backend needs the triton package (the kernels extra)")
    from io import StringIO

    from rich.console import Console

    ckpts, metrics = {}, {}
    for kernels in ("torch", "triton"):
        cfg = _cfg(assets, tmp_path / kernels, f"model.kernels={kernels}", "train.steps=2", "train.save_every=1",
                   "coldstart.enabled=false")
        out = StringIO()
        run = train(cfg, console=Console(file=out, width=200), stop_after=1)
        assert f"log-probs: {kernels} kernel" in out.getvalue()
        ckpts[kernels] = _load_dir(latest_checkpoint(run) / "adapter")
        # the function the update differentiates through, on this run's model and a fresh rollout
        ctx = build_context(cfg, total_steps=2)
        batch = [(s, frames_loader(cfg, 32)(s)) for s in load_split(cfg, cfg.data.train)[:2]]
        ro = rollout_step(ctx, batch)
        logp, _ = completion_logprobs(ctx.model, ro, torch.arange(4), temperature=1.0, backend=ctx.backend)
        nodes = _graph_nodes(logp)
        want, other = ("_TritonLogprobBackward", "_TorchLogprobBackward")[:: 1 if kernels == "triton" else -1]
        assert want in nodes and other not in nodes, sorted(nodes)
        metrics[kernels] = _metrics(run)[0]
    # Same gradients: the step's loss and gradient norm agree to float32 rounding. Weights after one
    # AdamW step move by about lr * sign(grad), so an element whose gradient is ~0 may differ by up to
    # lr (3e-4) between backends; everything else agrees far more tightly.
    assert metrics["torch"]["grad_norm"] == pytest.approx(metrics["triton"]["grad_norm"], rel=1e-4)
    assert metrics["torch"]["loss"] == pytest.approx(metrics["triton"]["loss"], rel=1e-4, abs=1e-7)
    a, b = ckpts["torch"], ckpts["triton"]
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("save_every", [2, 0])
def test_signal_during_an_evaluation_keeps_the_step(assets: Path, tmp_path: Path, save_every: int) -> None:
    """SIGTERM while a periodic evaluation runs: the loop stops after it with the step checkpointed
    (a scheduled save happens before the evaluation, so even a kill during it loses nothing)."""
    import os
    import signal

    cfg = _cfg(assets, tmp_path / "run", f"data.eval={assets / 'data' / 'eval.jsonl'}", "train.eval_every=2",
               f"train.save_every={save_every}", "train.steps=6")
    ctx = build_context(cfg, total_steps=6)
    feeder = _feeder(cfg)
    evaluated: list[int] = []

    def evaluate_and_get_killed(step: int) -> None:
        if save_every:
            assert latest_checkpoint(tmp_path / "run").name == f"step-{step:06d}"  # saved before evaluating
        evaluated.append(step)
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the loop's StopFlag

    handler = signal.getsignal(signal.SIGTERM)
    with RunLogger(tmp_path / "run", 6, completions_every=0, num_completions=0, enabled_progress=False) as logger:
        state = grpo_loop(ctx, tmp_path / "run", TrainState(coldstart_done=True), feeder, 6, logger,
                          evaluate_and_get_killed)
    assert evaluated == [2] and state.step == 2
    assert latest_checkpoint(tmp_path / "run").name == "step-000002"
    assert signal.getsignal(signal.SIGTERM) == handler  # the loop's handler is gone again


def test_liger_on_without_liger_kernel_is_refused_before_loading(assets: Path, tmp_path: Path, monkeypatch) -> None:
    from tinyr1 import context
    from tinyr1.errors import DeviceError

    cfg = _cfg(assets, tmp_path / "run")
    cfg = replace(cfg, model=replace(cfg.model, liger="on", path=str(tmp_path / "no-model-here")))  # a CUDA config
    monkeypatch.setattr(context, "liger_unavailable_reason", lambda: "liger-kernel is not installed: pip install x")
    with pytest.raises(DeviceError, match=r"model.liger = \"on\": liger-kernel is not installed: pip install x"):
        context.build_model(cfg)
