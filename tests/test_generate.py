"""`tinyr1 generate`: text arrives through the streamer one generation step at a time, the streamed
text is the completion HF `generate` returns (and the one the eval sampler produces greedily), and
the CLI prints it followed by the parsed answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_adapter import train_answer_adapter

from tinyr1.answers import answer_letter
from tinyr1.cli import main
from tinyr1.data import load_dataset
from tinyr1.evaluate import TokenStreamer, answer_question, evaluate, load_for_inference
from tinyr1.model.writing import write_tiny_checkpoint
from tinyr1.synth import write_synthetic
from tinyr1.tokenizer import load_tokenizer
from tinyr1.video import load_frames

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]
QUESTION, OPTIONS = "What colour is the square?", ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen")
    model = write_tiny_checkpoint(root / "model", seed=1)
    paths = write_synthetic(root / "data", 16, seed=1, eval_n=2, coldstart_n=0)
    train_answer_adapter(model, paths["train"], root / "adapter",
                         targets=["q_proj", "v_proj", "up_proj", "down_proj"])
    return {"model": model, "adapter": root / "adapter", "eval": paths["eval"],
            "video": root / "data" / "videos" / "eval_00000.mp4"}


def test_streamer_emits_text_per_generation_step(assets: dict[str, Path]) -> None:
    loaded = load_for_inference(str(assets["model"]), device="cpu")  # random weights: a long reply
    events: list[tuple[int, str]] = []
    streamer = TokenStreamer(loaded.tokenizer, lambda piece: events.append((streamer.puts, piece)))
    pixels = load_frames(assets["video"], 8, 32)  # [T, 3, S, S]
    text, letter = answer_question(loaded.model, loaded.tokenizer, pixels, QUESTION, options=OPTIONS,
                                   max_new_tokens=10, streamer=streamer)
    steps = [step for step, _ in events]
    assert streamer.puts == 10 and len(events) >= 5
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # one piece per step, in order
    assert steps[0] <= 2  # the first text arrives right after the first tokens, not at the end
    assert "".join(piece for _, piece in events) == text
    assert letter == answer_letter(text, 4)
    # streamed (a device read per token) and batched evaluation (every 16 tokens) agree token for token
    sample = load_dataset(assets["eval"])[0]
    res = evaluate(loaded.model, loaded.tokenizer, [sample], load_frames=lambda s: pixels, max_new_tokens=10)
    assert res.rows[0]["completion"] == text


def test_streamer_holds_back_incomplete_utf8(assets: dict[str, Path]) -> None:
    tok = load_tokenizer(assets["model"])
    ids = tok("é ü", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 3  # byte-level pieces of two-byte characters
    pieces: list[str] = []
    streamer = TokenStreamer(tok, pieces.append)
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(pieces) == "é ü"
    assert all("\ufffd" not in p for p in pieces)
    with pytest.raises(ValueError, match="batch size 1"):
        streamer.put(torch.zeros(2, dtype=torch.long))


def test_cli_prints_stream_and_parsed_answer(assets: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--model", str(assets["model"]), "--adapter", str(assets["adapter"]),
                 "--video", str(assets["video"]), "--question", QUESTION, "--options", *OPTIONS,
                 "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert code == 0
    reply, answer_line = out.rstrip("\n").rsplit("\n", 1)
    letter = answer_letter(reply, 4)
    assert letter is not None, reply
    assert answer_line == f"answer: {letter}. {OPTIONS[ord(letter) - ord('A')]}"
    loaded = load_for_inference(str(assets["model"]), str(assets["adapter"]), device="cpu")
    text, _ = answer_question(loaded.model, loaded.tokenizer, load_frames(assets["video"], 8, 32), QUESTION,
                              options=OPTIONS, max_new_tokens=8)
    assert reply == text


def test_cli_missing_video(assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--model", str(assets["model"]), "--video", str(tmp_path / "nope.mp4"),
                 "--question", QUESTION])
    assert code == 2 and "nope.mp4: no such file" in capsys.readouterr().err
