"""Tiny random detectors saved with ``save_pretrained``, so tests load them through the same
``from_pretrained`` path a Hugging Face id or a user's local directory goes through.

No network is needed: tokenizers are built from in-memory vocabularies. The weights are
random, so these models test plumbing (loading, pre/post-processing, label mapping,
geometry), never accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertTokenizer,
    CLIPTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    MMGroundingDinoConfig,
    MMGroundingDinoForObjectDetection,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
    SwinConfig,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

# GroundingDINO hard-codes these bert-base-uncased ids (SPECIAL_TOKENS = [CLS], [SEP], ".", "?")
_BERT_VOCAB_SIZE = 30522
_BERT_FIXED = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}
_FIRST_FREE_ID = 1100  # words go from here: clear of the fixed ids above
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"

DEFAULT_WORDS = ("cat", "dog", "person", "car", "red", "traffic", "light", "bicycle")


def _bert_vocab(words: Iterable[str]) -> dict[str, int]:
    """A 30522-id WordPiece vocabulary with bert-base-uncased's special ids in place.

    Every single letter/digit and its ``##`` continuation is included, so any lower-case
    word tokenizes (as characters if it is not in ``words``): phrases of several tokens
    come for free, which is what span tests need.
    """
    tokens = list(dict.fromkeys([*words, *_LETTERS, *(f"##{c}" for c in _LETTERS), ",", "-", "'"]))
    by_id = dict(_BERT_FIXED)
    next_id = _FIRST_FREE_ID
    for token in tokens:
        if token in by_id.values():
            continue
        by_id[next_id] = token
        next_id += 1
    if next_id > _BERT_VOCAB_SIZE:
        raise ValueError(f"too many words for a {_BERT_VOCAB_SIZE}-id vocabulary")
    return {by_id.get(i, f"[unused{i}]"): i for i in range(_BERT_VOCAB_SIZE)}


def build_bert_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> BertTokenizer:
    """The GroundingDINO test tokenizer (also used alone by caption tests)."""
    tokenizer = BertTokenizer(vocab=_bert_vocab(words), do_lower_case=True)
    assert tokenizer.convert_tokens_to_ids([".", "[CLS]", "[SEP]"]) == [1012, 101, 102]
    return tokenizer


def _grounding_dino_kwargs() -> dict:
    """The smallest sizes that build, save and reload (decoder_layers must be >= 2: with 1 the
    tied bbox_embed weights break save/load)."""
    return {
        "backbone_config": SwinConfig(
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            out_indices=[2, 3, 4],
        ),
        "text_config": BertConfig(
            vocab_size=_BERT_VOCAB_SIZE,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        "d_model": 32,
        "num_queries": 30,
        "encoder_layers": 1,
        "decoder_layers": 2,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_n_points": 2,
        "decoder_n_points": 2,
    }


def _save_grounding_dino(model, path: str | Path, words: Iterable[str]) -> Path:
    path = Path(path)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 96, "longest_edge": 160}),
        tokenizer=build_bert_tokenizer(words),
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_grounding_dino(path: str | Path, words: Iterable[str] = DEFAULT_WORDS) -> Path:
    """A random ~1.5M-parameter GroundingDINO (+ processor) saved to ``path``; returns it."""
    torch.manual_seed(0)  # random weights, but the same ones every run: no flaky tests
    model = GroundingDinoForObjectDetection(GroundingDinoConfig(**_grounding_dino_kwargs()))
    return _save_grounding_dino(model, path, words)


def build_tiny_mm_grounding_dino(path: str | Path, words: Iterable[str] = DEFAULT_WORDS) -> Path:
    """A random MM-GroundingDINO (same processor and tokenizer family as GroundingDINO)."""
    torch.manual_seed(0)
    model = MMGroundingDinoForObjectDetection(MMGroundingDinoConfig(**_grounding_dino_kwargs()))
    return _save_grounding_dino(model, path, words)


def clip_tokenizer(words: Iterable[str], max_length: int) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer: all 256 byte symbols (alone and word-final), merges
    that build each of ``words`` left to right, and the special tokens last.

    OWLv2 pools the text at ``input_ids.argmax()``, i.e. it assumes ``<|endoftext|>`` has the
    highest id, so it must come last.
    """
    symbols = list(bytes_to_unicode().values())
    vocab_tokens = [*symbols, *(f"{s}</w>" for s in symbols)]
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [*word[:-1], f"{word[-1]}</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pieces[0] + pieces[1]
            if pair not in merges:
                merges.append(pair)
                vocab_tokens.append(merged)
            pieces = [merged, *pieces[2:]]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token="!")


def clip_text_config(tokenizer: CLIPTokenizer, num_hidden_layers: int = 1, **extra: Any) -> dict[str, Any]:
    """A tiny CLIP-style text tower (CLIP, CLIPSeg, OWLv2, SAM 3) fitted to ``tokenizer``.

    The vocabulary size, the padded length and the special ids must be the tokenizer's: a
    mismatch fails at the first forward, or pools the text at the wrong token without an error.
    """
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def build_tiny_owlv2(path: str | Path, words: Iterable[str] = DEFAULT_WORDS) -> Path:
    """A random OWLv2 (96 px input, 16 px patches: 36 box queries) + processor at ``path``."""
    path = Path(path)
    text_length = 16
    tokenizer = clip_tokenizer(words, text_length)
    config = Owlv2Config(
        text_config=clip_text_config(tokenizer),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 96,
            "patch_size": 16,
        },
        projection_dim=32,
    )
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 96, "width": 96}), tokenizer=tokenizer
    )
    torch.manual_seed(0)
    Owlv2ForObjectDetection(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path
