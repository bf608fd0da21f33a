"""Dataset formats, malformed-row reports, and `tinyr1 data check`."""

import json
import shutil
from pathlib import Path

import pytest

from tinyr1.cli import main as cli_main
from tinyr1.data import Sample, load_dataset, scan_dataset, sft_pair
from tinyr1.errors import DataError
from tinyr1.prompts import R1_SUFFIX
from tinyr1.synth import write_synthetic

PROBLEM = "What is the man doing?\nA. running\nB. cooking\nC. pick up\nD. sleeping\nE. singing"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_synthetic(tmp_path_factory.mktemp("synth"), 40, 7, tasks=("color", "count"), eval_n=12,
                           coldstart_n=6)


def test_r1_format(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "train.jsonl", [
        {"problem": PROBLEM, "solution": "<answer>C</answer>", "video_filename": "./NextQA/a.mp4", "qid": 7},
        {"problem": "Q?\nA. x\nB. y", "solution": "<answer> B </answer>", "video_filename": "b.mp4", "id": "b"},
    ])
    s = load_dataset(f, video_root="/data/videos")
    assert s[0] == Sample(
        "train.jsonl:1", Path("/data/videos/NextQA/a.mp4"), PROBLEM, "C",
        ["running", "cooking", "pick up", "sleeping", "singing"],
        {"problem": PROBLEM, "solution": "<answer>C</answer>", "video_filename": "./NextQA/a.mp4", "qid": 7},
    )
    assert s[1].id == "b" and s[1].answer == "B" and s[1].options == ["x", "y"]
    assert load_dataset(f)[0].video == tmp_path / "NextQA/a.mp4"  # default root: the file's folder
    cols = s[0].columns()
    assert cols["solution"] == "<answer>C</answer>" and cols["answer"] == "C" and cols["qid"] == 7


def test_llava_format_with_lines(tmp_path: Path) -> None:
    rows = [
        {"id": "x1", "video": "v/1.mp4", "conversations": [
            {"from": "human", "value": "<image>\n" + PROBLEM + R1_SUFFIX},
            {"from": "gpt", "value": "<think>He lifts it.</think> <answer>C</answer>"}]},
        {"video": "v/2.mp4", "conversations": [
            {"from": "human", "value": "<image>\nQ?\nA. x\nB. y\nOutput the thinking process in <think> </think> "
                                       "and final answer (option) in <answer> </answer> tags."},
            {"from": "gpt", "value": "<think>..</think> <answer>B</answer>"}]},
    ]
    f = tmp_path / "cold.json"
    f.write_text(json.dumps(rows, indent=2))
    s = load_dataset(f, video_root=tmp_path / "root")
    assert s[0].question == PROBLEM and s[0].answer == "C" and s[0].video == tmp_path / "root/v/1.mp4"
    assert s[1].question == "Q?\nA. x\nB. y" and s[1].options == ["x", "y"]
    assert sft_pair(s[0]) == ("<image>\n" + PROBLEM + R1_SUFFIX, "<think>He lifts it.</think> <answer>C</answer>")
    # a malformed item reports the line it starts on
    rows[1]["conversations"][1]["value"] = "B"
    f.write_text(json.dumps(rows, indent=2))
    _, problems = scan_dataset(f)
    starts = [i + 1 for i, line in enumerate(f.read_text().splitlines()) if line == "  {"]
    assert len(starts) == 2
    start_line = starts[1]
    assert [(p.line, "no <answer>" in p.message) for p in problems] == [(start_line, True)]


def test_generic_format(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "g.jsonl", [
        {"video": "a.mp4", "question": "Which?", "options": ["red", "blue"], "answer": "B"},
        {"video": "b.mp4", "question": "Which?", "options": ["red", "blue"], "answer": "red"},
        {"video": "c.mp4", "question": "Free?", "options": None, "answer": "D"},
    ])
    s = load_dataset(f)
    assert [x.answer for x in s] == ["B", "A", "D"]
    assert s[0].question == "Which?\nA. red\nB. blue" and s[2].question == "Free?" and s[2].options is None
    assert sft_pair(s[0]) == ("<image>\nWhich?\nA. red\nB. blue" + R1_SUFFIX, "<answer>B</answer>")


def test_malformed_rows_name_file_line_and_cause(tmp_path: Path) -> None:
    good = {"problem": "Q?\nA. x\nB. y", "solution": "<answer>A</answer>", "video_filename": "./a.mp4"}
    f = write_jsonl(tmp_path / "bad.jsonl", [
        good,
        '{"problem": "Q", "solution": ',                                   # 2: broken JSON
        {**good, "solution": "A"},                                          # 3: no tag
        {k: v for k, v in good.items() if k != "video_filename"},          # 4: missing key
        {**good, "solution": "<answer>E</answer>"},                         # 5: only 2 options
        [1, 2],                                                             # 6: not an object
        {**good, "problem": ""},                                            # 7: empty problem
        {**good, "solution": "<answer>maybe</answer>"},                     # 8: not a letter
    ])
    samples, problems = scan_dataset(f)
    assert len(samples) == 1
    got = {p.line: p.message for p in problems}
    assert sorted(got) == [2, 3, 4, 5, 6, 7, 8]
    assert "invalid JSON" in got[2] and "<answer>X</answer>" in got[3] and "video_filename" in got[4]
    assert "only 2 options" in got[5] and "JSON object" in got[6] and "'problem'" in got[7]
    assert "not an option letter" in got[8]
    with pytest.raises(DataError) as err:
        load_dataset(f)
    assert f"{f}:2: invalid JSON" in str(err.value) and f"{f}:5:" in str(err.value)


def test_unknown_rows_and_files(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=r"u.jsonl:1: unrecognised row"):
        load_dataset(f)
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl")
    broken = tmp_path / "b.json"
    broken.write_text('[\n {"video": "a.mp4",\n  "conversations": [}\n]')
    with pytest.raises(DataError, match=r"b.json:3: invalid JSON"):
        load_dataset(broken)
    with pytest.raises(DataError, match="no rows"):
        load_dataset(write_jsonl(tmp_path / "empty.jsonl", []))


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setenv("COLUMNS", "400")
    code = cli_main(args)
    return code, capsys.readouterr().out


def test_data_check_ok_then_three_bad(synth: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    for key in ("train", "eval", "coldstart"):
        code, out = run_cli(["data", "check", str(synth[key])], capsys, monkeypatch)
        assert code == 0, out
        assert "all rows and videos are usable" in out
    root = tmp_path / "copy"
    shutil.copytree(synth["train"].parent, root)
    (root / "videos/train_00002.mp4").unlink()
    corrupt = root / "videos/train_00003.mp4"
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    lines = (root / "train.jsonl").read_text().splitlines()
    lines[9] = lines[9].replace('"solution"', '"answer_text"')
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    code, out = run_cli(["data", "check", str(root / "train.jsonl"), "--video-root", str(root)], capsys, monkeypatch)
    assert code == 1
    assert "train_00002.mp4" in out and "train_00003.mp4" in out and "train.jsonl:10" in out
    assert "missing" in out and "corrupt" in out and "malformed" in out
    assert "3 unusable row(s)" in out
