"""The tiny offline tokenizer, folder loading, and the original's split-at-<image> tokenization."""

import json
import shutil
from pathlib import Path

import pytest

from tinyr1.errors import CheckpointError
from tinyr1.prompts import IGNORE_INDEX, IMAGE_TOKEN_INDEX, SYSTEM, build_prompt, render_chat, render_sft
from tinyr1.synth import corpus_texts
from tinyr1.tokenizer import build_tiny_tokenizer, load_tokenizer, tokenize_prompt, tokenize_sft

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tiny_dir: Path):
    return load_tokenizer(tiny_dir)


def test_layout_matches_the_real_checkpoint(tiny_dir: Path) -> None:
    assert sorted(p.name for p in tiny_dir.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert (tiny_dir / "merges.txt").read_text().startswith("#version: 0.2\n")


def test_vocab_is_small_and_specials(tok) -> None:
    assert 300 <= len(tok) <= 800
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == eos
    assert tok("abc")["input_ids"] == tok("abc", add_special_tokens=False)["input_ids"]  # no bos added


def test_tags_are_single_non_special_tokens(tok) -> None:
    ids = [tok.convert_tokens_to_ids(t) for t in TAGS]
    assert len(set(ids)) == 4 and all(i != tok.unk_token_id for i in ids)
    text = "<think>The square is red.</think> <answer>A</answer>"
    enc = tok(text + "<|endoftext|>")["input_ids"]
    assert [i for i in enc if i in ids] == ids
    assert tok.decode(enc, skip_special_tokens=True) == text  # tags survive, eos does not


def test_covers_all_synthetic_text_compactly(tok) -> None:
    for text in corpus_texts():
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        if text.startswith("<think>"):
            assert len(ids) <= 40, (text, tok.convert_ids_to_tokens(ids))
    # byte-level: arbitrary text round-trips even outside the training corpus
    odd = "Ünïcödé 🚀 {x: 3.14}\t\n"
    assert tok.decode(tok(odd)["input_ids"]) == odd


def test_tokenize_prompt_splits_at_image_like_the_original(tok) -> None:
    prompt = render_chat(build_prompt("What colour is the square?\nA. red\nB. green", mode="train"))
    ids = tokenize_prompt(tok, prompt)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    head, tail = prompt.split("<image>")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids == enc(head) + [IMAGE_TOKEN_INDEX] + enc(tail)
    cut = ids.index(IMAGE_TOKEN_INDEX)
    assert tok.convert_ids_to_tokens(ids[cut - 2 : cut]) == [":", "Ġ"]  # "... USER: " ends in a lone " "
    # tokenizing the whole string (video removed) merges " \n" into one token: different ids
    whole = enc(prompt.replace("<image>", ""))
    assert [i for i in ids if i != IMAGE_TOKEN_INDEX] != whole
    assert "ĠĊ" in tok.convert_ids_to_tokens(whole)
    # several images and an image at the very start
    assert tokenize_prompt(tok, "<image>a<image>") == [IMAGE_TOKEN_INDEX] + enc("a") + [IMAGE_TOKEN_INDEX]


def test_tokenize_sft_masks_the_prompt_like_make_labels(tok) -> None:
    user = build_prompt("What colour is the square?", mode="train")
    answer = "<think>The square is red.</think> <answer>A</answer>"
    ids, labels = tokenize_sft(tok, user, answer)
    assert ids == tokenize_prompt(tok, render_sft(user, answer)) and len(labels) == len(ids)
    head = render_sft(user, answer).split(" ASSISTANT: ")[0] + " ASSISTANT: "
    n_prompt = len(tokenize_prompt(tok, head)) - 1
    assert all(label == IGNORE_INDEX for label in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:] and labels[-1] == tok.eos_token_id
    learned = tok.decode(labels[n_prompt:])
    assert learned == " " + answer + "<|endoftext|>"
    assert IMAGE_TOKEN_INDEX not in labels


def test_load_variants(tiny_dir: Path, tok, tmp_path: Path) -> None:
    # a checkpoint folder whose config.json names the unknown "tinyllava" model type
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "tinyllava"}))
    prompt = render_chat(build_prompt("Q?\nA. x", mode="eval"))
    assert tokenize_prompt(load_tokenizer(ckpt), prompt) == tokenize_prompt(tok, prompt)
    # the same tokenizer saved with a tokenizer.json
    saved = tmp_path / "saved"
    tok.save_pretrained(saved)
    assert (saved / "tokenizer.json").is_file()
    assert tokenize_prompt(load_tokenizer(saved), prompt) == tokenize_prompt(tok, prompt)
    # no pad token named -> pad = eos
    nopad = tmp_path / "nopad"
    shutil.copytree(tiny_dir, nopad)
    cfg = json.loads((nopad / "tokenizer_config.json").read_text())
    cfg.pop("pad_token")
    (nopad / "tokenizer_config.json").write_text(json.dumps(cfg))
    (nopad / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    t2 = load_tokenizer(nopad)
    assert t2.pad_token_id == t2.eos_token_id


def test_missing_files_error_names_folder(tmp_path: Path, tiny_dir: Path) -> None:
    empty = tmp_path / "model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(empty)
    assert str(empty) in str(err.value) and "vocab.json" in str(err.value) and "merges.txt" in str(err.value)
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(tiny_dir / "vocab.json", half / "vocab.json")
    with pytest.raises(CheckpointError, match="merges.txt"):
        load_tokenizer(half)


def test_build_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_tokenizer(tmp_path / "again")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes()


def test_system_prompt_round_trips(tok) -> None:
    assert tok.decode(tokenize_prompt(tok, SYSTEM)) == SYSTEM
