"""examples/, benchmarks/gpu_check.sh and the README's "Evaluate, ask, release" section: scripts have
their header, every `tinyr1` command in them parses with the real CLI (and its `--set` keys validate
against the preset), the custom reward plugs in by `module:function`, the GPU check script keeps its
time budget and reports every step (with stub commands, on the CPU), and (slow) the tiny CPU pipeline
and the documented commands run end to end as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinyr1.cli import build_parser
from tinyr1.config_io import load_config
from tinyr1.rewards import compute_rewards, resolve_rewards

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"
README = ROOT / "README.md"
USAGE_HEADING = "## Evaluate, ask, release"
SCRIPTS = ("tiny_cpu.sh", "nextqa_24gb.sh", "custom_reward.py")
QUICK_TRAIN = ["--set", "coldstart.steps=2", "--set", "train.steps=2", "--set", "data.synth_n=32",
               "--set", "data.synth_eval_n=16", "--set", "rollout.prompts_per_step=2",
               "--set", "rollout.num_generations=4", "--set", "train.micro_batch_size=8", "--set", "log.progress=false"]


def usage_section() -> str:
    """The README section whose commands must run as written on the tiny model."""
    text = README.read_text()
    assert USAGE_HEADING in text, f"README.md lost its {USAGE_HEADING!r} section"
    return text.split(USAGE_HEADING, 1)[1].split("\n## ", 1)[0]


def tinyr1_commands(text: str) -> list[list[str]]:
    """Every `tinyr1 ...` invocation in a shell script or markdown, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("tinyr1 "):
            out.append(shlex.split(line.split(" #")[0]))
    return out


# after these words `tinyr1` is a name, not a command run: `command -v tinyr1`, `[ "$1" = tinyr1 ]`
LOOKUPS = ("command", "-v", "which", "type", "-P", "hash", "=", "==")


def wrapped_tinyr1_commands(text: str) -> list[list[str]]:
    """Every `tinyr1 ...` command in a shell script, also where a helper runs it (`run_step NAME
    LIMIT tinyr1 ...`): from the `tinyr1` word to the end of the command (`|`, `;`, `&&`, `>`)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        if line.strip().startswith("#") or "tinyr1 " not in line:
            continue
        words = shlex.split(line, comments=True)
        starts = [i for i, w in enumerate(words) if w == "tinyr1" and (i == 0 or words[i - 1] not in LOOKUPS)]
        if starts:
            argv = words[starts[0]:]
            ends = [i for i, w in enumerate(argv) if w in ("|", "||", "&&", ";", ">", ">>", "2>&1")]
            out.append(argv[: ends[0]] if ends else argv)
    return out


def with_dummy_values(argv: list[str]) -> list[str]:
    """Shell variables -> placeholders (counts for *_N / *STEPS, else paths); "${X[@]}" dropped."""
    out = []
    for tok in argv:
        if re.fullmatch(r"\$\{\w+\[@\]\}", tok):
            continue
        out.append(re.sub(r"\$\{?(\w+)\}?", _placeholder, tok))
    return out


def _placeholder(m: re.Match[str]) -> str:
    name = m.group(1)
    return "2" if name.endswith(("_N", "STEPS")) else f"/tmp/{name.lower()}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_have_a_header_saying_what_they_need_and_take(name: str) -> None:
    head = (EXAMPLES / name).read_text().split("\n\n")[0] + (EXAMPLES / name).read_text()[:3000]
    assert "Needs:" in head and "Takes:" in head, f"{name}: header must say what it needs and how long it takes"
    if name.endswith(".sh"):
        assert subprocess.run(["bash", "-n", str(EXAMPLES / name)], capture_output=True).returncode == 0
        assert (EXAMPLES / name).stat().st_mode & 0o111, f"{name} should be executable"


@pytest.mark.parametrize("source", ["tiny_cpu.sh", "nextqa_24gb.sh", "README.md"])
def test_every_tinyr1_command_parses(source: str) -> None:
    text = usage_section() if source == "README.md" else (EXAMPLES / source).read_text()
    commands = tinyr1_commands(text)
    assert len(commands) >= 4
    parser = build_parser()
    seen = set()
    for argv in commands:
        args = parser.parse_args(with_dummy_values(argv[1:]))
        seen.add(args.command)
        if args.command == "train" and getattr(args, "preset", None):
            overrides = [o for o in args.overrides if "custom_reward" not in o]
            load_config(args.preset, overrides)  # every --set key exists and validates
    assert {"train", "eval", "merge"} <= seen


def test_every_tinyr1_command_anywhere_in_the_readme_parses() -> None:
    parser = build_parser()
    commands = tinyr1_commands(README.read_text())
    assert {"doctor", "plan", "train"} <= {c[1] for c in commands}
    for argv in commands:
        args = parser.parse_args(with_dummy_values(argv[1:]))
        if args.command == "train" and getattr(args, "preset", None) not in (None, "auto"):
            load_config(args.preset, args.overrides)


def test_gpu_check_script_parses_and_every_tinyr1_command_in_it_parses() -> None:
    head = GPU_CHECK.read_text()[:3000]
    assert "Needs:" in head and "Takes:" in head and "Usage:" in head
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0
    assert GPU_CHECK.stat().st_mode & 0o111, "gpu_check.sh should be executable"
    assert not (ROOT / "benchmarks" / "gpu_presets.sh").exists(), "gpu_check.sh replaces gpu_presets.sh"
    parser = build_parser()
    seen = []
    for argv in wrapped_tinyr1_commands(GPU_CHECK.read_text()):
        args = parser.parse_args(with_dummy_values(argv[1:]))
        seen.append(args.command + (f" {args.bench_command or '--preset'}" if args.command == "bench" else ""))
        if args.command == "train":
            load_config(args.preset, args.overrides)  # every --set key exists and validates
    assert seen == ["doctor", "bench kernels", "init-tiny", "train", "bench --preset", "bench --preset"], seen  # + backends


STUB_TINYR1 = """#!/usr/bin/env bash
echo "tinyr1 $*" >> "$STUB_LOG"
case "$1 $2" in
  "bench kernels") echo "kernel trouble"; exit 3 ;;
  "train --preset") sleep "$STUB_TRAIN_S" ;;
esac
echo "stub: tinyr1 $1 ok"
"""


def test_gpu_check_script_runs_every_step_within_its_budget_and_reports_each(tmp_path: Path) -> None:
    """With stub `python3` (says CUDA is there) and `tinyr1` commands: the steps run in order with
    their arguments, a failing step is reported and makes the exit status 1, and the steps that
    the time budget no longer allows are skipped and listed, not started."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "python3").write_text("#!/usr/bin/env bash\necho stub-python\n")
    (stubs / "tinyr1").write_text(STUB_TINYR1)
    for f in stubs.iterdir():
        f.chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", STUB_LOG=str(log), STUB_TRAIN_S="4",
               BUDGET_S="23", PRESETS="8gb 24gb")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(GPU_CHECK), str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[1] for c in calls] == ["doctor", "bench", "init-tiny", "train"], calls
    assert f"--json {out}/doctor.json" in calls[0] and "model.device=cuda" in calls[3]
    assert f"train.output_dir={out}/tiny-run" in calls[3] and "train.steps=20" in calls[3]
    summary = {line.split()[0]: line.split()[1] for line in (out / "summary.txt").read_text().splitlines()}
    assert summary == {"doctor": "ok", "kernels": "failed", "tiny-init": "ok", "tiny": "ok", "gpu-tests": "skipped",
                       "rollout": "skipped", "bench-8gb": "skipped", "bench-24gb": "skipped"}, summary
    assert "kernel trouble" in (out / "kernels.txt").read_text()
    assert (out / "machine.txt").is_file() and "budget 23s" in (out / "machine.txt").read_text()


def test_custom_reward_plugs_in_by_name() -> None:
    funcs = resolve_rewards({"custom_reward:concise_think": 1.0, "custom_reward:names_the_answer": 2.0}, [EXAMPLES])
    completions = [
        f"<think>{'x' * 10}</think> <answer>A</answer>",  # short: 10 / 20
        "<think>The square is red in every frame.</think> <answer>A</answer>",  # in range, names A
        f"<think>{'y' * 600} blue</think> <answer>C</answer>",  # 605 chars: 1 - 205 / 400
        "<answer>A</answer>",  # no think
    ]
    columns = {"answer": ["A", "A", "C", "A"], "solution": ["<answer>A</answer>"] * 4,
               "options": [["red", "green", "blue", "yellow"]] * 4}
    per, total = compute_rewards(funcs, completions, columns)
    want_concise = [0.5, 1.0, 1 - 205 / 400, 0.0]
    want_names = [0.0, 1.0, 1.0, 0.0]
    assert per[:, 0].tolist() == pytest.approx(want_concise)
    assert per[:, 1].tolist() == pytest.approx(want_names)
    assert total.tolist() == pytest.approx([c + 2 * n for c, n in zip(want_concise, want_names)])


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 1800) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow
def test_tiny_cpu_script_end_to_end(tmp_path: Path) -> None:
    if shutil.which("tinyr1") is None:
        pytest.skip("the `tinyr1` command is not on PATH (pip install -e .)")
    env = dict(os.environ, QUICK="1")
    out = _run(["bash", str(EXAMPLES / "tiny_cpu.sh"), str(tmp_path / "demo")], cwd=tmp_path, env=env)
    work = tmp_path / "demo"
    assert (work / "run" / "final" / "adapter_config.json").is_file()
    assert (work / "merged" / "config.json").is_file() and (work / "merged" / "README.md").is_file()
    adapter = json.loads((work / "eval" / "adapter.summary.json").read_text())
    merged = json.loads((work / "eval" / "merged.summary.json").read_text())
    assert adapter["n"] == merged["n"] == 16
    assert "accuracy: base + adapter" in out
    assert re.search(r"^answer: ", out, re.MULTILINE), out[-2000:]


@pytest.mark.slow
def test_usage_doc_commands_run_as_written(tmp_path: Path) -> None:
    """The documented train command (made quick with extra --set values), then every other
    documented command exactly as written, from a fresh folder."""
    commands = tinyr1_commands(usage_section())
    assert commands[0][:2] == ["tinyr1", "train"]
    cli = [sys.executable, "-m", "tinyr1"]
    _run(cli + commands[0][1:] + QUICK_TRAIN, cwd=tmp_path)
    outputs = [_run(cli + argv[1:], cwd=tmp_path) for argv in commands[1:]]
    assert any(re.search(r"^answer: ", o, re.MULTILINE) for o in outputs)
    assert (tmp_path / "release" / "tiny-demo" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "tiny-demo" / "heldout-merged.summary.json").is_file()
