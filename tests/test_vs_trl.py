"""benchmarks/vs_trl.py at a micro size: both frameworks run, on matched prompts and completions.

Speed and memory are never asserted (docs/DESIGN.md); what is checked is that the comparison is a fair
one: equal prompt and completion token counts in both frameworks, finite positive timings whose
parts add up, memory numbers present, and the text prompt matched to the exact token count.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tinyr1.tokenizer import build_tiny_tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vs_trl.py"


def _module():  # benchmarks/ is not a package
    spec = importlib.util.spec_from_file_location("vs_trl", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["vs_trl"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("total", [120, 157, 300])
def test_matched_text_prompt_has_exact_length(tmp_path: Path, total: int) -> None:
    vs = _module()
    build_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = vs.matched_text_prompt(tok, total)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == total
    assert text.endswith("ASSISTANT:") and "<image>" not in text


def test_both_frameworks_one_step(tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="the comparison runs TRL's GRPOTrainer: needs the optional trl package "
                                      "(pip install 'tinyr1[dev]')")
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(SCRIPT), "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
           "--vocab", "1024", "--frames", "4", "--video-tokens", "16", "-G", "4", "--micro-batch", "2",
           "--max-new-tokens", "4", "--lora-r", "4", "--warmup", "0", "--steps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    res = data["results"]
    assert set(res) == {"tinyr1", "trl"}
    prompt = data["spec"]["prompt_tokens"]
    for name, r in res.items():
        assert r["prompt_tokens"] == prompt, name
        assert r["completion_tokens"] == 4.0, name  # EOS suppressed in both: every row runs to the limit
        for key in ("rollout", "update", "total", "peak_bytes", "step_peak_bytes", "resident_bytes", "peak_rss_bytes"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["rollout"] + r["update"] == pytest.approx(r["total"], rel=1e-6)
        assert [s["kind"] for s in r["steps"]] == ["memory", "timed"]
    assert "TRL / tinyr1" in proc.stdout
