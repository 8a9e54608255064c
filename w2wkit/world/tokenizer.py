"""An offline CLIP tokenizer whose vocabulary is the miniature world's words.

The vocabulary holds the 256 byte-level symbols (alone and word-final, so any
text tokenizes without unknown tokens), one merge chain per known word (so
known words are single tokens), and the special tokens. It is written as the
``vocab.json`` / ``merges.txt`` pair that :class:`transformers.CLIPTokenizer`
(and therefore ``StableDiffusionPipeline.from_pretrained``) reads.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from w2wkit.world import CONCEPTS

__all__ = [
    "BOS",
    "EOS",
    "RARE_TOKEN",
    "build_vocabulary",
    "byte_symbols",
    "token_ids",
    "world_words",
    "write_tokenizer",
]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
RARE_TOKEN = "sks"
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def token_ids(tokenizer: Any, texts: Sequence[str]) -> Any:
    """Token ids of ``texts``, padded/truncated to the tokenizer's length.

    Parameters
    ----------
    tokenizer : transformers.CLIPTokenizer
        The pipeline's tokenizer.
    texts : sequence of str
        ``n`` prompts.

    Returns
    -------
    torch.Tensor
        Shape ``(n, tokenizer.model_max_length)``, int64 (on the CPU).
    """
    return tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of bytes used by byte-level BPE (GPT-2/CLIP)."""
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


def world_words(packs: Sequence[str] = CONCEPTS, extra: Iterable[str] = ()) -> list[str]:
    """Words of the captions and prompts of the given concept packs, plus ``sks``.

    Parameters
    ----------
    packs : sequence of str
        Concept-pack names; their class prompts, attribute phrases and the
        caption template words are collected.
    extra : iterable of str
        More words (or phrases) to include.

    Returns
    -------
    list of str
        Sorted, lower-case, unique words.
    """
    from w2wkit.concepts import get_pack

    texts = ["a photo of an with and", RARE_TOKEN, *extra]
    for name in packs:
        pack = get_pack(name)
        texts += [pack.class_prompt, pack.instance_prompt]
        for spec in pack.attributes:
            texts += [spec.phrase, spec.negative]
    words = {w for t in texts for w in _WORD.findall(t.lower())}
    return sorted(words)


def build_vocabulary(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merge list making every word of ``words`` one token.

    Returns
    -------
    vocab : dict of str to int
        Token -> id; the last two ids are ``<|startoftext|>`` and
        ``<|endoftext|>`` (as in CLIP).
    merges : list of tuple of str
        Merge rules, best first.
    """
    symbols = byte_symbols()
    tokens: list[str] = [*symbols, *(s + "</w>" for s in symbols)]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    # longest words first: their chains win over fragments of shorter words
    for word in sorted({w.lower() for w in words if w}, key=lambda w: (-len(w), w)):
        encoded = "".join(symbols[b] for b in word.encode("utf-8"))
        parts = [*encoded[:-1], encoded[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            pair = (left, right)
            if pair not in seen_merges:
                seen_merges.add(pair)
                merges.append(pair)
            left = left + right
            if left not in known:
                known.add(left)
                tokens.append(left)
    # repair words that other words' merges split: join their pieces left to right
    ranks = {m: i for i, m in enumerate(merges)}
    for _ in range(10):
        broken = False
        for word in sorted({w.lower() for w in words if w}):
            encoded = "".join(symbols[b] for b in word.encode("utf-8"))
            pieces = _bpe([*encoded[:-1], encoded[-1] + "</w>"], ranks)
            while len(pieces) > 1:
                broken = True
                pair = (pieces[0], pieces[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                joined = pieces[0] + pieces[1]
                if joined not in known:
                    known.add(joined)
                    tokens.append(joined)
                pieces = [joined, *pieces[2:]]
        if not broken:
            break
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def _bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word (lowest-rank pair merged first)."""
    parts = list(parts)
    while len(parts) > 1:
        best = min(
            (
                (ranks.get((x, y), len(ranks) + 1), k)
                for k, (x, y) in enumerate(itertools.pairwise(parts))
            ),
        )
        if best[0] > len(ranks):
            break
        pair = (parts[best[1]], parts[best[1] + 1])
        out: list[str] = []
        k = 0
        while k < len(parts):
            if k + 1 < len(parts) and (parts[k], parts[k + 1]) == pair:
                out.append(parts[k] + parts[k + 1])
                k += 2
            else:
                out.append(parts[k])
                k += 1
        parts = out
    return parts


def write_tokenizer(
    folder: str | os.PathLike[str], words: Iterable[str], model_max_length: int = 32
) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json``.

    Parameters
    ----------
    folder : path
        Target folder (created).
    words : iterable of str
        Words that must be single tokens.
    model_max_length : int
        Padded length of every prompt (the text encoder's positions).

    Returns
    -------
    pathlib.Path
        The folder; ``CLIPTokenizer.from_pretrained(folder)`` loads it offline.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocabulary(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": int(model_max_length),
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
