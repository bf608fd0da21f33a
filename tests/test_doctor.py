"""`tinyr1 doctor` on this CPU machine: the checks that can run PASS, the CUDA ones SKIP with the
reason, and a corrupted kernel, optimizer or training step turns into a FAIL and a non-zero exit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tinyr1.doctor as doctor
from tinyr1.cli import main
from tinyr1.doctor import CHECK_NAMES, LOGPROB_TOL, Check, logprob_errors, run_checks
from tinyr1.kernels import token_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
GPU_ONLY = {"logprob-triton", "liger", "preset", "unsloth"}


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps table cells at 80 columns when not on a terminal


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU expectations: on a GPU every check runs")
def test_cpu_doctor_exits_0_runs_what_it_can_and_skips_gpu_checks(tmp_path: Path, capsys) -> None:
    out_json = tmp_path / "doctor.json"
    assert main(["doctor", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "bitsandbytes" in out and "CUDA build" in out  # the environment table
    assert "on a CUDA GPU these run too: logprob-triton, liger, preset, unsloth" in out
    res = json.loads(out_json.read_text())
    assert res["ok"] is True and res["environment"]["GPU"].startswith("none visible")
    status = {c["name"]: c["status"] for c in res["checks"]}
    assert list(status) == list(CHECK_NAMES)
    assert {n for n, s in status.items() if s == "SKIP"} == GPU_ONLY
    assert {n for n, s in status.items() if s == "PASS"} == set(CHECK_NAMES) - GPU_ONLY
    for c in res["checks"]:
        if c["name"] in GPU_ONLY:
            assert c["detail"].startswith("needs a CUDA GPU"), c
    memory = next(c for c in res["checks"] if c["name"] == "memory")["detail"]
    assert "measured vs" in memory and "planned" in memory and "live tensor bytes" in memory


def test_corrupted_nf4_matmul_fails_and_exits_1(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import bitsandbytes as bnb

    real = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: real(self, x) * 1.01)  # 1% off
    assert main(["doctor", "--only", "nf4"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 row off by" in out and "8 rows off by" in out and "training forward off by" in out
    assert "1 FAIL" in out


def test_corrupted_8bit_optimizer_step_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes as bnb

    real = bnb.optim.AdamW8bit.step

    def half_step(self: torch.optim.Optimizer, closure: object = None) -> None:
        before = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        real(self)
        with torch.no_grad():  # only half of the update lands
            for p, b in zip((p for g in self.param_groups for p in g["params"]), before):
                p.copy_((p + b) / 2)

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", half_step)
    (res,) = run_checks(["adamw8bit"], device=CPU)
    assert res.status == "FAIL" and "update off torch AdamW's by" in res.detail, res


def test_logprob_comparison_catches_a_wrong_forward_or_backward() -> None:
    """The comparison the Triton check runs on a GPU, here with the torch path as both sides and
    then with a candidate whose log-probs, or only whose backward, is wrong."""
    ref = token_logprobs
    ok = logprob_errors(ref, ref, CPU, torch.float32)
    assert set(ok) == {"logp", "entropy", "d hidden", "d weight"} and max(ok.values()) == 0.0

    def shifted(*args: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        lp, ent = token_logprobs(*args, **kw)
        return lp * 1.001, ent

    class ScaledGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
            return g * 1.01

    def wrong_backward(hidden: torch.Tensor, *args: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        return token_logprobs(ScaledGrad.apply(hidden), *args, **kw)

    tol = LOGPROB_TOL[torch.float32]
    bad_fwd = logprob_errors(shifted, ref, CPU, torch.float32)
    assert bad_fwd["logp"] > tol and bad_fwd["entropy"] == 0.0
    bad_bwd = logprob_errors(wrong_backward, ref, CPU, torch.float32)
    assert bad_bwd["logp"] == 0.0 and bad_bwd["d hidden"] > tol and bad_bwd["d weight"] == 0.0


def test_a_check_that_raises_is_a_fail_with_its_message_and_the_rest_still_run(monkeypatch) -> None:
    def boom(probe: doctor.Probe) -> Check:
        raise RuntimeError("kernel exploded")

    checks = tuple((n, boom if n == "nf4" else fn, d) for n, fn, d in doctor.CHECKS)
    monkeypatch.setattr(doctor, "CHECKS", checks)
    results = run_checks(["nf4", "adamw8bit", "preset"], device=CPU)
    assert [(r.name, r.status) for r in results] == [("nf4", "FAIL"), ("adamw8bit", "PASS"), ("preset", "SKIP")]
    assert results[0].detail == "RuntimeError: kernel exploded" and results[0].seconds >= 0
    with pytest.raises(ValueError, match="unknown check"):
        run_checks(["nf5"], device=CPU)


def test_broken_grpo_step_and_memory_mismatch_fail(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    real_step = doctor.grpo_step

    def nan_step(ctx, batch):  # noqa: ANN001, ANN202
        ro, metrics = real_step(ctx, batch)
        return ro, {**metrics, "loss": math.nan, "skipped": 1.0}

    real_measure = doctor.measure_phases
    monkeypatch.setattr(doctor, "grpo_step", nan_step)
    monkeypatch.setattr(doctor, "measure_phases", lambda ctx, batch: (lambda r, u, ro: (3 * r, u, ro))(
        *real_measure(ctx, batch)))  # the rollout measured 3x what it is
    assert main(["doctor", "--only", "grpo,memory"]) == 1
    out = capsys.readouterr().out
    assert "non-finite loss" in out and "update skipped" in out
    assert "rollout: measured/planned" in out and "2 FAIL" in out


def test_unknown_check_name_is_a_clear_error(capsys) -> None:
    assert main(["doctor", "--only", "nf4,warp-drive"]) == 2
    assert "unknown check(s) warp-drive" in capsys.readouterr().err
