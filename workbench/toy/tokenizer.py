"""A CLIP BPE tokenizer for the toy world's vocabulary, written from scratch.

CLIP's BPE marks the last symbol of a word with ``</w>`` and joins symbols by ranked
merges. We give every caption word a merge chain that rebuilds it whole, so each
word becomes exactly one token; single characters stay in the vocabulary so that
unknown words still tokenize (letter by letter) instead of failing.

The files must live in a folder loaded with ``CLIPTokenizer.from_pretrained(dir)``:
transformers 5 silently ignores ``CLIPTokenizer(vocab_file=...)``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

from workbench.toy.world import vocabulary

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# Longest toy caption is 13 tokens; 16 leaves room for BOS/EOS and a spare word.
MAX_LENGTH = 16


def _symbols(word: str) -> list[str]:
    return [*word[:-1], word[-1] + "</w>"]


def _apply(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as CLIP runs it: repeatedly join the adjacent pair with the lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def _merges_for(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """New merges that finish building ``word`` after the existing ones have run.

    Earlier words' merges outrank ours and may split this word differently (``ri``
    from "right" inside "triangle"), so we start from what they leave behind.
    """
    symbols = _apply(_symbols(word), ranks)
    merges, current = [], symbols[0]
    for nxt in symbols[1:]:
        merges.append((current, nxt))
        current += nxt
    return merges


def build_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token -> id) and the ordered merge list."""
    tokens: list[str] = []
    for ch in string.ascii_lowercase + string.digits + ",.!?'-":
        tokens += [ch, ch + "</w>"]
    ranks: dict[tuple[str, str], int] = {}
    for word in vocabulary():
        for pair in _merges_for(word, ranks):
            ranks[pair] = len(ranks)
            tokens.append(pair[0] + pair[1])
    merges = list(ranks)
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def save(directory: Path) -> CLIPTokenizer:
    """Write vocab.json/merges.txt and the tokenizer config into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_files()
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
    # A minimal config so from_pretrained knows the special tokens and max length.
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "model_max_length": MAX_LENGTH,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer
