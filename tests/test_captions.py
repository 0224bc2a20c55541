"""Captions for GroundingDINO: packing under the token limit, exact token spans, and the
query -> phrase mapping that replaces decoding token strings."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from backend.models.captions import (
    assign_phrases,
    build_captions,
    normalize_phrase,
    phrase_scores,
)
from tests.tiny_models import build_bert_tokenizer

WORDS = ("cat", "dog", "red", "car", "traffic", "light", "person", "bicycle")
CLS, SEP, DOT = 101, 102, 1012


@pytest.fixture(scope="module")
def tokenizer():
    return build_bert_tokenizer(WORDS)


def many_labels(count: int) -> list[str]:
    """Labels of 4 to 12 tokens: vocabulary words plus words spelled out in characters."""
    extra = ["zebra", "number", "xylophone", "quartz", "wagon"]
    return [f"{WORDS[i % len(WORDS)]} {extra[i % len(extra)]} {i}" for i in range(count)]


def check_caption_layout(tokenizer, caption, phrases) -> None:
    """[CLS] phrase . phrase . ... [SEP], every span decoding to exactly its phrase."""
    ids = caption.input_ids
    assert ids[0] == CLS and ids[-1] == SEP
    assert list(ids) == tokenizer(caption.text)["input_ids"]
    previous_end = 1
    for (start, end), index in zip(caption.spans, caption.phrase_indices, strict=True):
        assert start == previous_end, "spans must tile the caption between separators"
        assert ids[end] == DOT
        assert DOT not in ids[start:end]
        assert tokenizer.decode(list(ids[start:end])) == normalize_phrase(phrases[index])
        previous_end = end + 1
    assert previous_end == len(ids) - 1


def test_single_caption_exact_spans(tokenizer):
    phrases = ["cat", "Red car", "zebra", "traffic light"]
    (caption,) = build_captions(phrases, tokenizer)
    assert caption.text == "cat . red car . zebra . traffic light ."
    assert caption.phrase_indices == (0, 1, 2, 3)
    # [CLS] cat . red car . z ##e ##b ##r ##a . traffic light . [SEP]
    assert caption.spans == ((1, 2), (3, 5), (6, 11), (12, 14))
    check_caption_layout(tokenizer, caption, phrases)


def test_sixty_labels_split_into_few_full_captions(tokenizer):
    phrases = many_labels(60)
    captions = build_captions(phrases, tokenizer, max_tokens=256)
    assert len(captions) > 1
    for caption in captions:
        assert len(caption.input_ids) <= 256
        check_caption_layout(tokenizer, caption, phrases)
    indices = [index for caption in captions for index in caption.phrase_indices]
    assert indices == list(range(60)), "every label exactly once, in order"
    # greedy packing: the next caption's first phrase would not have fit in the previous one
    for current, following in zip(captions, captions[1:], strict=False):
        first = following.spans[0]
        needed = first[1] - first[0] + 1  # its tokens and its "."
        assert len(current.input_ids) + needed > 256
    total = sum(len(c.input_ids) - 2 for c in captions)
    assert len(captions) == -(-total // 254), "as few captions as the token count allows"


@pytest.mark.parametrize("max_tokens", [8, 16, 40])
def test_small_limits_respected(tokenizer, max_tokens):
    phrases = many_labels(12)
    captions = build_captions(phrases, tokenizer, max_tokens=max_tokens)
    assert all(len(c.input_ids) <= max_tokens for c in captions)
    for caption in captions:
        for start, end in caption.spans:
            assert end > start


def test_too_long_phrase_is_cut_to_fit(tokenizer, caplog):
    long_phrase = "cat " * 30 + "dog"
    with caplog.at_level(logging.WARNING):
        captions = build_captions(["red", long_phrase, "car"], tokenizer, max_tokens=16)
    assert "phrase 1" in caplog.text
    assert all(len(c.input_ids) <= 16 for c in captions)
    cut = next(c for c in captions if 1 in c.phrase_indices)
    start, end = cut.spans[cut.phrase_indices.index(1)]
    assert end - start == 16 - 3  # [CLS] + phrase + "." + [SEP]
    assert sorted(i for c in captions for i in c.phrase_indices) == [0, 1, 2]


def test_normalization_duplicates_and_empty(tokenizer):
    phrases = ["Cat", "cat ", "st. bernard?", "", "   ", "dog"]
    (caption,) = build_captions(phrases, tokenizer)
    assert caption.text == "cat . st bernard . dog ."
    assert caption.phrase_indices == (0, 2, 5)
    check_caption_layout(tokenizer, caption, phrases)
    assert build_captions(["", " . "], tokenizer) == []


def test_assign_phrases_max_over_phrase_tokens():
    # tokens: 0 [CLS] | 1 cat | 2 . | 3 red 4 car | 5 . | 6..10 zebra | 11 . | 12 [SEP]
    spans = [(1, 2), (3, 5), (6, 11)]
    probs = np.full((6, 13), 0.01, dtype=np.float32)
    probs[0, 1] = 0.9  # cat
    probs[1, 4] = 0.8  # the second token of "red car"
    probs[1, 1] = 0.5  # cat too, but lower
    probs[2, 10] = 0.7  # the last token of zebra
    probs[3, 2] = 0.99  # only the "." after cat: no phrase
    probs[4, [0, 12]] = 0.99  # only [CLS]/[SEP]: no phrase
    probs[5, 7] = 0.2  # zebra but under the threshold
    assert assign_phrases(probs, spans, text_threshold=0.25) == [
        (0, pytest.approx(0.9)),
        (1, pytest.approx(0.8)),
        (2, pytest.approx(0.7)),
        None,
        None,
        None,
    ]
    np.testing.assert_allclose(phrase_scores(probs, spans)[1], [0.5, 0.8, 0.01])


def test_assign_phrases_never_defaults_to_first_phrase():
    spans = [(1, 2), (3, 4)]
    zeros = np.zeros((3, 6), dtype=np.float32)
    assert assign_phrases(zeros, spans, text_threshold=0.1) == [None, None, None]
    assert assign_phrases(zeros, [], text_threshold=0.0) == [None, None, None]
    with pytest.raises(ValueError, match="queries, tokens"):
        assign_phrases(np.zeros(5), spans, 0.1)


def test_assign_phrases_threshold_is_inclusive():
    probs = np.array([[0.0, 0.25, 0.0]], dtype=np.float32)
    assert assign_phrases(probs, [(1, 2)], text_threshold=0.25) == [(0, 0.25)]
