"""Tokenizers: an offline tiny Qwen2-style BPE, folder loading, and the original's prompt split.

The tiny tokenizer is written in the same slow-tokenizer layout as the released checkpoints
(`vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`, no
`tokenizer.json`), so tiny test checkpoints go through the same loader as real ones. Its vocab
is a few hundred tokens (the tiny model's embedding matrix depends on it), trained on every
string the prompts and the synthetic data contain.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, Qwen2Tokenizer

from tinyr1.errors import CheckpointError
from tinyr1.prompts import (
    EOS,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    R1_SUFFIX,
    SFT_SEPARATOR,
    SYSTEM,
    THINK_TAGS,
    render_sft,
)
from tinyr1.synth import corpus_texts

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer rebuilds it from vocab + merges).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_COMMON_WORDS = (
    "the a an is are was be it this that there here what which where when who how why yes no not and or "
    "so because of in on at to from with for by as first then next last before after left right up down "
    "top bottom middle corner frame frames video clip square squares shape object objects color colour "
    "red green blue yellow one two three four five count move moves moving stays starts ends option "
    "options answer think see I count number"
)
TINY_VOCAB_SIZE = 768  # BPE part (256 bytes + merges); the 5 added tokens come after it


def _tiny_corpus() -> list[str]:
    """Training text, weighted so completions (think/answer) and questions get whole-word tokens
    first; the constant system prompt is prefilled once per prompt and may stay in pieces."""
    # The system prompt is in every prompt: whole-word tokens keep the tiny demo's sequences short.
    texts = [f"{SYSTEM} USER: ", " ASSISTANT:", SFT_SEPARATOR] * 8 + [R1_SUFFIX, R1_SUFFIX.lstrip()] * 4
    # " \n" is one token in Qwen2.5 ("ĠĊ"): learn it so tokenizing a prompt whole vs. split at
    # <image> differs here exactly as it does for the real tokenizer.
    texts += ["USER: \nWhat"] * 16
    texts += corpus_texts() * 8
    texts += [" ".join("0123456789"), "0123456789", " ".join("ABCDE"), "A. B. C. D. E.", _COMMON_WORDS]
    texts += [_COMMON_WORDS.title(), " ".join(f"({c})" for c in "ABCDE")]
    return texts


def _added_token(content: str, special: bool) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def build_tiny_tokenizer(out_dir: str | os.PathLike[str]) -> Path:
    """Train a small byte-level BPE offline and save it in Qwen2.5's slow-tokenizer layout.

    Ids: the 256 byte symbols and the merges first, then `<|endoftext|>` (bos = eos = pad, as in
    Qwen2.5), then `<think> </think> <answer> </answer>` as normal (not special) added tokens,
    each a single id that `decode(skip_special_tokens=True)` keeps.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    corpus = [t for text in _tiny_corpus() for t in _split_tags(text)]
    tok.train_from_iterator(corpus, trainer)
    vocab: dict[str, int] = tok.get_vocab()
    merges = json.loads(tok.to_str())["model"]["merges"]
    n = len(vocab)
    (out / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])),
                                               ensure_ascii=False), encoding="utf-8")
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    added = {str(n): _added_token(EOS, True)}
    added.update({str(n + 1 + i): _added_token(tag, False) for i, tag in enumerate(THINK_TAGS)})
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "add_prefix_space": False,
        "bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "unk_token": None,
        "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 3072,
        "split_special_tokens": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return out


def _split_tags(text: str) -> list[str]:
    """Training text without the four tags (they are added tokens, never BPE pieces)."""
    for tag in THINK_TAGS:
        text = text.replace(tag, "\x00")
    return [piece for piece in text.split("\x00") if piece]


_TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.json")


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """Load a Qwen2-style tokenizer from a checkpoint folder, offline (no hub lookups).

    Accepts the slow layout (vocab.json + merges.txt) with or without tokenizer.json; sets
    pad = eos when the folder names no pad token.
    """
    path = Path(folder)
    has = {name: (path / name).is_file() for name in _TOKENIZER_FILES}
    if not has["tokenizer.json"] and not (has["vocab.json"] and has["merges.txt"]):
        missing = [n for n in ("vocab.json", "merges.txt") if not has[n]]
        raise CheckpointError(
            f"{path}: no tokenizer files (missing {', '.join(missing)}; or tokenizer.json). A checkpoint folder "
            f"must hold its tokenizer; copy vocab.json, merges.txt and tokenizer_config.json from the base model"
        )
    cls_name = ""
    if has["tokenizer_config.json"]:
        try:
            cls_name = str(json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class") or "")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path / 'tokenizer_config.json'}: not valid JSON ({err})") from err
    try:
        if cls_name in ("", "Qwen2Tokenizer", "Qwen2TokenizerFast"):
            # The folder's config.json says model_type "tinyllava", which AutoTokenizer cannot map.
            tok = Qwen2Tokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({err})") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt with IMAGE_TOKEN_INDEX (-200) where `<image>` is.

    Like the original, each piece between `<image>` markers is tokenized on its own, so the text
    before the video ends in its own token (`"... USER: "` -> `..., "USER", ":", " "`); tokenizing
    the whole string at once would merge that space into the next word.
    """
    ids: list[int] = []
    for i, piece in enumerate(prompt.split(IMAGE_TOKEN)):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def tokenize_sft(tokenizer: Any, user_text: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one SFT example; labels are IGNORE_INDEX over the prompt.

    Matches the original's `make_labels`: the prompt part is the text up to and including
    " ASSISTANT: ", tokenized on its own, minus one token (its trailing space merges into the
    answer's first token in the full tokenization). The answer and `<|endoftext|>` are learned.
    """
    text = render_sft(user_text, answer)
    ids = tokenize_prompt(tokenizer, text)
    head = text[: text.index(SFT_SEPARATOR) + len(SFT_SEPARATOR)]
    n_prompt = len(tokenize_prompt(tokenizer, head)) - 1
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    labels = [IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else t for t in labels]
    return ids, labels
