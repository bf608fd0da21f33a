"""A busy CPU slows a run down, it does not stall it (issue 16, item 11): OpenMP threads wait
passively unless the user chose otherwise, set before torch loads, and torch gets one thread per
core that other processes leave free."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyr1.cpu import choose_threads, configure_cpu_env, default_threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("cores", "load", "torch_default", "want"), [
    (2, 0.2, 2, 2),    # idle 2-core machine: torch's own default
    (2, 0.9, 2, 1),    # one other busy process: the core left
    (2, 2.3, 2, 1),    # two busy processes (the case): one thread, never zero
    (16, 3.0, 16, 13),
    (16, 0.0, 8, 8),   # never above torch's default (physical cores)
    (4, None, 4, 4),   # no load average (Windows): torch's default
])
def test_default_threads_leave_the_busy_cores(cores: int, load: float | None, torch_default: int, want: int) -> None:
    assert default_threads(cores, load, torch_default) == want


def test_an_explicit_choice_always_wins() -> None:
    assert choose_threads(3, 2, {}) == (3, "CPU: 3 torch thread(s) (--threads)")
    assert choose_threads(None, 2, {"OMP_NUM_THREADS": "2"}) == (None, "")  # torch read it already


def test_passive_wait_policy_unless_the_user_set_one() -> None:
    env: dict[str, str] = {}
    assert configure_cpu_env(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and env["OMP_WAIT_POLICY"] == "PASSIVE"
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert configure_cpu_env(mine) == {} and mine["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_cli_sets_the_policy_before_torch_is_imported() -> None:
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads: `tinyr1` must set it first."""
    code = ("import sys\nfrom tinyr1.cli import main\nmain(['presets', 'list'])\nimport os\n"
            "print('policy', os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "policy PASSIVE False"
