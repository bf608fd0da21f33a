"""`tinyr1 bench --preset`: real GRPO steps measured beside the planner, on the CPU."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from tinyr1.cli import main
from tinyr1.config_io import load_config
from tinyr1.memory_arch import Arch
from tinyr1.model.tinyllava import TinyLlavaConfig
from tinyr1.preset_bench import NeverEosTokenizer, bench_context, measured_step, raw_config_for, reduce_arch

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_reduced_arch_keeps_ratios_and_round_trips_through_config_json() -> None:
    full = Arch.qwen25_3b()
    small = reduce_arch(full, layers=2, hidden=256, vision_layers=1, vision_hidden=128)
    assert (small.layers, small.hidden, small.vision_layers, small.vision_hidden) == (2, 256, 1, 128)
    assert small.head_dim == full.head_dim == 128 and small.hidden % small.heads == 0
    assert small.heads % small.kv_heads == 0 and small.kv_heads == 1
    assert small.ffn == 1376  # 256 * 11008 / 2048 = 1376, a multiple of 32
    assert small.vision_hidden % small.vision_heads == 0 and small.vision_ffn == 480  # 128 * 4304 / 1152 = 478 -> 480
    assert (small.vocab, small.num_queries, small.group, small.image_size) == (151936, 512, 16, 384)
    for arch in (full, small, reduce_arch(full, vocab=1000)):
        raw = raw_config_for(arch, 7, frames=16, demo=False)
        assert Arch.from_tinyllava(TinyLlavaConfig.from_dict(raw)) == arch
    with pytest.raises(TypeError):
        reduce_arch(full, width=3)


def test_tiny_preset_cli_prints_measurement_beside_estimate(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    out_json = tmp_path / "tiny.json"
    assert main(["bench", "--preset", "tiny", "--steps", "1", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "planner estimate" in out and "measured peak" in out and "reduced scale" not in out
    for phase in ("rollout", "update", "step"):
        assert f"│ {phase}" in out
    res = json.loads(out_json.read_text())
    cfg = load_config("tiny")
    ro = cfg.rollout
    # EOS suppressed: every completion runs to max_new_tokens, so the count is exact.
    assert res["new_tokens"] == [ro.prompts_per_step * ro.num_generations * ro.max_new_tokens]
    assert res["scale"] is None and res["full_estimate"] is None
    assert res["shape"]["prompts"] == ro.prompts_per_step and res["shape"]["max_new_tokens"] == ro.max_new_tokens
    for phase in ("rollout", "update", "step"):
        assert _positive(res["seconds"][phase]) and _positive(res["tokens_per_s"][phase])
        assert _positive(res["measured"][phase]) and _positive(res["estimate"][phase])
        # The planner is validated to 20% elsewhere (test_memory); here: the same shapes, a loose band.
        assert 0.75 < res["measured"][phase] / res["estimate"][phase] < 1.33
    assert res["seconds"]["step"] == pytest.approx(res["seconds"]["rollout"] + res["seconds"]["update"])
    assert res["peak_rss"] > res["measured"]["step"]


def test_generated_tokens_count_stops_at_the_first_eos(tmp_path: Path) -> None:
    from tinyr1.model.writing import write_tiny_checkpoint

    cfg = load_config("tiny", ["rollout.prompts_per_step=2", "rollout.num_generations=4", "train.micro_batch_size=8",
                               "rollout.temperature=0.3", "rollout.top_k=0"])  # full vocabulary: lengths vary
    write_tiny_checkpoint(tmp_path / "m", frames=cfg.video.num_frames, image_size=32)
    cfg = replace(cfg, model=replace(cfg.model, path=str(tmp_path / "m"), synth=False))
    ctx, feeder = bench_context(cfg, tmp_path / "d", 0, allow_eos=True)
    *_, ro = measured_step(ctx, feeder)
    ids = ro.completion_ids.flatten().tolist()
    frequent = max(set(ids), key=ids.count)  # a token the random model samples often: EOS now

    class FrequentEos(NeverEosTokenizer):
        eos_token_id = frequent

    ctx.tokenizer = FrequentEos(ctx.tokenizer)
    lengths: list[int] = []
    for _ in range(2):
        r, u, n, peaks, ro = measured_step(ctx, feeder)
        assert r > 0 and u > 0 and peaks == {"rollout": 0, "update": 0}  # CPU: memory comes from a tracker
        expected = 0
        for row in ro.completion_ids.tolist():
            count = 0
            for tok in row:
                count += 1
                if tok == frequent:
                    break
            expected += count
            lengths.append(count)
        assert n == expected
    assert min(lengths) < cfg.rollout.max_new_tokens == max(lengths)  # some stopped early, some ran out


def test_non_tiny_preset_on_cpu_runs_at_a_stated_reduced_scale(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    out_json = tmp_path / "12gb.json"
    argv = ["bench", "--preset", "12gb", "--steps", "1", "--layers", "1", "--hidden", "64", "--vision-hidden", "32",
            "--vocab", "1024", "--set", "rollout.max_new_tokens=4", "--set", "lora.r=4", "--json", str(out_json)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "CPU: reduced scale:" in out and "layers=1, hidden=64" in out and "vision_layers=1" in out
    assert "full-size planner estimate" in out
    res = json.loads(out_json.read_text())
    assert res["arch"]["layers"] == 1 and res["arch"]["hidden"] == 64 and res["arch"]["vocab"] == 1024
    assert res["shape"]["prompts"] == 2 and res["shape"]["max_new_tokens"] == 4 and res["shape"]["quant"] == "nf4"
    assert res["estimate"]["shape"] == res["shape"]  # the estimate is for the shapes that ran
    assert res["new_tokens"] == [2 * 8 * 4]  # 12gb: G = 8
    full = res["full_estimate"]
    # Full size: the preset's 8 prompts on its GPU; the user's --set values apply there too.
    assert full["shape"]["prompts"] == 8 and full["shape"]["max_new_tokens"] == 4 and full["shape"]["lora_r"] == 4
    assert full["shape"]["device"] == "cuda" and "tinyr1 plan --preset 12gb --set rollout.max_new_tokens=4" in out
    assert full["step"] > 10 * res["estimate"]["step"]
    for phase in ("rollout", "update", "step"):
        assert _positive(res["measured"][phase]) and _positive(res["seconds"][phase])
        assert 0.75 < res["measured"][phase] / res["estimate"][phase] < 1.33


def test_bad_steps_is_a_clear_error(capsys) -> None:
    assert main(["bench", "--preset", "tiny", "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--layers", "0"]) == 2
    assert "--layers must be at least 1" in capsys.readouterr().err
