"""`tinyr1 eval` on the synthetic held-out split: the reported accuracy is the fraction computed by hand
from its own per-sample JSONL, two runs are byte-identical, a missing video or malformed row is
reported and skipped, and a completion without a valid answer counts as wrong (never a guessed letter;
the parser itself is tested in test_answers.py).

A tiny checkpoint gets a LoRA adapter trained for a few seconds on answer-only targets, so that
its greedy completions hold real `<answer>X</answer>` tags (some right, some wrong).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tiny_adapter import train_answer_adapter

from tinyr1.cli import main
from tinyr1.data import load_dataset
from tinyr1.evaluate import category_of, evaluate, load_for_inference, prompt_tensor
from tinyr1.model.loading import load_tinyllava
from tinyr1.model.writing import write_tiny_checkpoint
from tinyr1.synth import write_synthetic
from tinyr1.video import load_frames

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    model = write_tiny_checkpoint(root / "model", seed=0)
    paths = write_synthetic(root / "data", 16, seed=0, eval_n=12, coldstart_n=0)
    train_answer_adapter(model, paths["train"], root / "adapter")
    rows = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    for i, row in enumerate(rows):  # two categories, so the per-category table has something to split
        row["category"] = "color" if i % 2 == 0 else "colour-again"
    missing = dict(rows[0], id="gone", video="videos/not_there.mp4")
    lines = [json.dumps(r) for r in rows[:6]] + [json.dumps(missing), '{"video": "x.mp4"}']
    lines += [json.dumps(r) for r in rows[6:]]
    data = root / "data" / "eval_with_problems.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return {"root": root, "model": model, "adapter": root / "adapter", "data": data, "eval": paths["eval"]}


def test_category_of(assets: dict[str, Path]) -> None:
    sample = load_dataset(assets["eval"])[0]
    assert category_of(sample) == "color"
    assert category_of(type(sample)("x", sample.video, "q", "A")) is None


def test_eval_prompt_lists_options_then_suffix_on_a_new_line(assets: dict[str, Path]) -> None:
    loaded = load_tinyllava(assets["model"], device="cpu")
    sample = load_dataset(assets["eval"])[0]
    ids = prompt_tensor(loaded.tokenizer, sample.question, "eval")
    assert int((ids == -200).sum()) == 1
    text = loaded.tokenizer.decode([i for i in ids.tolist() if i >= 0])
    want = ("USER: \nWhat colour is the square?\nA. red\nB. green\nC. blue\nD. yellow\n"
            "Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> "
            "tags. ASSISTANT:")
    assert text.endswith(want)


def run_eval(assets: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["eval", "--model", str(assets["model"]), "--adapter", str(assets["adapter"]),
                 "--data", str(assets["data"]), "--max-new-tokens", "8", "--batch-size", "5",
                 "--out", str(out), *extra])


def test_cli_eval_accuracy_by_hand_deterministic_and_skips(assets: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert run_eval(assets, tmp_path / "a.jsonl") == 0
    printed = capsys.readouterr().out.replace("\n", " ")
    assert run_eval(assets, tmp_path / "b.jsonl") == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "a.summary.json").read_text())
    # the missing video and the malformed row are reported and skipped
    assert len(rows) == 12 and "gone" not in {r["id"] for r in rows}
    assert summary["skipped"] == 1 and "not_there.mp4" in summary["skipped_rows"][0]
    assert "not_there.mp4" in printed and "eval_with_problems.jsonl:8" in printed
    # accuracy and format rate recomputed by hand from the completions
    preds = []
    for r in rows:
        m = re.search(r"<answer>(.*?)</answer>", r["completion"], re.DOTALL)
        body = m.group(1).strip() if m else ""
        preds.append(body[0] if body and body[0] in "ABCD" else None)
    assert [r["prediction"] for r in rows] == preds
    assert any(p is not None for p in preds), "the trained adapter should produce answer tags"
    correct = [p == r["answer"] for p, r in zip(preds, rows)]
    assert 0 < sum(correct) < len(rows)
    assert [r["correct"] for r in rows] == correct
    assert summary["accuracy"] == pytest.approx(sum(correct) / len(rows), abs=0)
    assert f"{sum(correct) / len(rows):.4f}" in printed
    fmt = [re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", r["completion"], re.DOTALL) is not None
           for r in rows]
    assert summary["format_rate"] == pytest.approx(sum(fmt) / len(rows))
    for cat in ("color", "colour-again"):
        sel = [c for c, r in zip(correct, rows) if r["category"] == cat]
        assert summary["by_category"][cat]["n"] == len(sel) == 6
        assert summary["by_category"][cat]["accuracy"] == pytest.approx(sum(sel) / len(sel))
    assert "colour-again" in printed


def test_sampled_eval_rows_per_completion_and_seeded(assets: dict[str, Path]) -> None:
    loaded = load_for_inference(str(assets["model"]), str(assets["adapter"]), device="cpu")
    samples = load_dataset(assets["eval"])[:4]

    def frames(s: object) -> torch.Tensor:
        return load_frames(s.video, 8, 32)  # type: ignore[attr-defined]

    runs = [evaluate(loaded.model, loaded.tokenizer, samples, load_frames=frames, max_new_tokens=6, batch_size=3,
                     temperature=1.0, num_samples=3, seed=5) for _ in range(2)]
    assert runs[0].rows == runs[1].rows
    res = runs[0]
    assert res.n == 4 and len(res.rows) == 12
    assert [r["id"] for r in res.rows] == [s.id for s in samples for _ in range(3)]
    assert [r["sample"] for r in res.rows] == [0, 1, 2] * 4
    assert res.accuracy == pytest.approx(sum(r["correct"] for r in res.rows) / 12)
    assert len({r["completion"] for r in res.rows}) > 1  # sampling, not greedy


def test_bad_arguments_are_reported(assets: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert run_eval(assets, tmp_path / "c.jsonl", "--num-samples", "3") == 2
    assert "--num-samples > 1 needs --temperature > 0" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"video": "x.mp4"}\n')
    code = main(["eval", "--model", str(assets["model"]), "--data", str(empty), "--out", str(tmp_path / "d.jsonl")])
    assert code == 2 and "no readable rows" in capsys.readouterr().err


def test_clip_stderr_counts_clips_not_completions() -> None:
    import random

    from tinyr1.evaluate import binomial_stderr, clip_stderr

    rng = random.Random(3)
    greedy = [{"correct": rng.random() < 0.3} for _ in range(200)]
    p = sum(r["correct"] for r in greedy) / 200
    assert clip_stderr(greedy) == pytest.approx(binomial_stderr(p, 200), rel=1e-12)
    # 4 samples per clip (consecutive rows): the standard error over clips of their fraction correct
    sampled = [{"correct": rng.random() < (0.9 if i % 2 else 0.1)} for i in range(100) for _ in range(4)]
    fractions = [sum(r["correct"] for r in sampled[4 * i : 4 * i + 4]) / 4 for i in range(100)]
    mu = sum(fractions) / 100
    naive = (sum((f - mu) ** 2 for f in fractions) / 100) ** 0.5 / 100**0.5
    assert clip_stderr(sampled, 4) == pytest.approx(naive, rel=1e-12)
    assert clip_stderr(sampled, 4) > binomial_stderr(mu, 400)  # clips, not completions, are the draws
    assert clip_stderr([]) == 0.0
