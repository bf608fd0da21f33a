"""`model.backend` and `gradient_checkpointing = "offload"` without unsloth installed: the config
rules, the error a missing unsloth gives, that nothing imports unsloth unless the backend is chosen,
and what the planner says about both. (The backend's numerics: tests/test_unsloth.py.)"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import tinyr1
from tinyr1.config_io import load_config, save_config
from tinyr1.errors import ConfigError, DeviceError
from tinyr1.memory import Estimate, arch_for_config, estimate
from tinyr1.memory_arch import RunShape

UNSLOTH = importlib.util.find_spec("unsloth") is not None


def test_unsloth_needs_lora_dropout_0_and_no_liger() -> None:
    with pytest.raises(ConfigError, match=r"lora.dropout = 0.05.*fix: set lora.dropout = 0"):
        load_config("24gb", ["model.backend=unsloth"])
    with pytest.raises(ConfigError, match="model.liger = 'on' with model.backend = 'unsloth'"):
        load_config("24gb", ["model.backend=unsloth", "lora.dropout=0", "model.liger=on"])
    with pytest.raises(ConfigError, match="must be one of 'peft', 'unsloth'"):
        load_config("24gb", ["model.backend=unslot"])
    cfg = load_config("24gb", ["model.backend=unsloth", "lora.dropout=0"])
    assert cfg.model.backend == "unsloth" and load_config("24gb").model.backend == "peft"


@pytest.mark.parametrize("text,value", [("offload", "offload"), ("true", True), ("false", False)])
def test_gradient_checkpointing_takes_offload_and_round_trips(tmp_path: Path, text: str, value: object) -> None:
    cfg = load_config("tiny", [f"model.gradient_checkpointing={text}"])
    assert cfg.model.gradient_checkpointing == value
    save_config(cfg, tmp_path / "config.toml")
    assert load_config(str(tmp_path / "config.toml")).model.gradient_checkpointing == value


def test_gradient_checkpointing_rejects_other_words() -> None:
    with pytest.raises(ConfigError, match=r"model.gradient_checkpointing = 'sometimes': must be one of 'offload'"):
        load_config("tiny", ["model.gradient_checkpointing=sometimes"])


@pytest.mark.skipif(UNSLOTH, reason="unsloth is installed here; the missing-package error cannot happen")
def test_missing_unsloth_is_a_clear_error_before_any_weights_load(tmp_path: Path) -> None:
    from tinyr1.context import build_model

    cfg = load_config("tiny", [f"model.path={tmp_path / 'no-such-model'}", "model.synth=false",
                               "model.backend=unsloth", "model.device=cpu"])
    with pytest.raises(DeviceError, match=r"unsloth is not installed: pip install 'tinyr1\[unsloth\]'"):
        build_model(cfg)  # the model folder does not exist: the backend check came first


def test_nothing_imports_unsloth_at_module_level() -> None:
    """Importing unsloth patches torch/transformers process-wide: only the backend module may import
    it, inside functions, and only code that selects the backend imports that module (inside functions)."""
    root = Path(tinyr1.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "unsloth" or n.startswith("tinyr1.backends.unsloth") for n in names):
                offenders.append(str(path.relative_to(root)))
    assert not offenders, offenders


def test_importing_the_package_and_the_backend_module_does_not_import_unsloth() -> None:
    code = ("import sys, tinyr1.cli, tinyr1.context, tinyr1.trainer, tinyr1.doctor, tinyr1.backends.unsloth; "
            "print(any(m == 'unsloth' or m.startswith('unsloth.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _est(*sets: str) -> tuple[Estimate, RunShape]:
    cfg = load_config("16gb", list(sets))
    shape = RunShape.from_config(cfg)
    return estimate(arch_for_config(cfg), shape), shape


def test_planner_fused_backend_saves_less_in_the_layer_backward() -> None:
    peft, _ = _est("lora.dropout=0")
    fused, shape = _est("lora.dropout=0", "model.backend=unsloth")
    assert shape.backend == "unsloth" and not shape.liger  # liger auto is off under unsloth
    key = "update: layer backward"
    assert fused.moments[key] < 0.95 * peft.moments[key]
    # (other moments can grow a little: liger's RMSNorm is off under unsloth, so norms keep fp32 copies)


def test_planner_offload_moves_the_checkpoints_to_host_ram() -> None:
    on, shape = _est()
    off, off_shape = _est("model.gradient_checkpointing=offload")
    host = [ln for ln in off.lines if ln.kind == "host"]
    assert not [ln for ln in on.lines if ln.kind == "host"] and len(host) == 1
    gpu_ckpt = next(ln.update for ln in on.lines if ln.name == "layer inputs (checkpoints)")
    assert host[0].update == pytest.approx(gpu_ckpt, rel=0.05)  # the same bytes, now in host RAM
    assert off.phase_total("update") < on.phase_total("update") - 0.9 * host[0].update
    assert off.allocated_peak == max(off.phase_total("rollout"), off.phase_total("update"))  # host not counted


def test_plan_cli_prints_the_backend_and_the_host_line(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    from tinyr1.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plan", "--preset", "16gb", "--set", "model.backend=unsloth", "--set", "lora.dropout=0",
                 "--set", "model.gradient_checkpointing=offload"]) == 0
    out = capsys.readouterr().out
    assert "backend unsloth, offloaded checkpoints" in out and "offloaded checkpoints (host RAM)" in out
