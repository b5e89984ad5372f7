"""The embedded world's text towers: a word-level CLIP tokenizer built with no files, and tiny seeded CLIP encoders.

Every toy word is one token: the BPE merges are derived so that each word's letters join into it (r + e -> re,
re + d</w> -> red</w>). Single letters stay in the vocabulary, so any lowercase text still tokenizes (unknown words
letter by letter, other characters as <|endoftext|>).
"""

from __future__ import annotations

import itertools
import string

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from didr.toy.data import VOCAB

WORDS = ("a", "at", "the", "on", *(w for values in VOCAB.values() for w in values))
WINDOW = 12
"""Tokens per prompt, <|startoftext|> and <|endoftext|> included (the longest toy prompt takes 10)."""


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's BPE of one word: letters (the last with </w>), merged lowest-ranked pair first."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(pieces)))
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def word_merges(words: tuple[str, ...] = WORDS) -> list[tuple[str, str]]:
    """BPE merges under which every word is one token: each word's remaining pieces are joined left to right,
    repeated until no earlier merge splits a later word differently."""
    merges: list[tuple[str, str]] = []
    changed = True
    while changed:
        changed = False
        for word in words:
            while len(pieces := _bpe(word, merges)) > 1:
                merges.append((pieces[0], pieces[1]))
                changed = True
    return merges


def toy_tokenizer(window: int = WINDOW) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters plus every toy word, with a `window`-token context."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = [*string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]
    merges = word_merges()
    for token in [*letters, *(left + right for left, right in merges)]:
        vocab.setdefault(token, len(vocab))
    # transformers annotates merges as list[str], but hands them to tokenizers' BPE, which takes (left, right) pairs
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=window)  # type: ignore[arg-type]


def toy_text_encoder(
    tokenizer: CLIPTokenizer, hidden: int = 32, projection: bool = False, layers: int = 2, seed: int = 0
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A tiny CLIP text encoder (with a `hidden`-wide projection for flow teachers), seeded."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=int(tokenizer.model_max_length),
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
