"""Text captions for GroundingDINO-style detectors, and mapping query scores back to phrases.

GroundingDINO scores every box query against every *token* of one caption
(``"cat . red car ."``), not against labels. Decoding the thresholded tokens back to text
(what ``post_process_grounded_object_detection`` does) yields strings that span several
phrases ("cat red car"), so the label of a box is decided here from token positions:
each phrase's token span in the tokenized caption, and the best phrase per query.

The text encoder takes at most ``max_text_len`` tokens (256 for GroundingDINO, counting
[CLS] and [SEP]); longer phrase lists are split into as few captions as fit.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SEPARATOR = " ."
# GroundingDINO treats "." and "?" as phrase boundaries when it builds the text attention
# mask; inside a label they would cut it in two, so they become spaces.
_BOUNDARY_CHARS = re.compile(r"[.?]")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Caption:
    """One caption and where its phrases landed.

    ``phrase_indices[k]`` is the index (into the caller's phrase list) of the k-th phrase in
    this caption; ``spans[k]`` is its ``(start, end)`` token range, end exclusive, in
    ``input_ids`` (position 0 is [CLS]). ``input_ids`` is the exact tokenization the spans
    refer to, so the model must be fed these ids, not a re-tokenization.
    """

    text: str
    phrase_indices: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    input_ids: tuple[int, ...]


def normalize_phrase(phrase: str) -> str:
    """Lower-case, "." and "?" to spaces, whitespace collapsed.

    Lower-casing matches what transformers' GroundingDINO processor does with label lists
    (both GroundingDINO and MM-GroundingDINO use uncased BERT).
    """
    return _WHITESPACE.sub(" ", _BOUNDARY_CHARS.sub(" ", phrase)).strip().lower()


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _token_count_with_specials(tokenizer: Any) -> int:
    """How many tokens the tokenizer adds around a text ([CLS] and [SEP] for BERT: 2)."""
    return len(tokenizer("", add_special_tokens=True)["input_ids"])


def _truncate_to_tokens(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The longest prefix of ``text`` that is ``max_tokens`` tokens, cut at a token end."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text[: offsets[max_tokens - 1][1]].strip()


def _tokenize_caption(
    tokenizer: Any, texts: Sequence[str], indices: Sequence[int]
) -> tuple[str, tuple[tuple[int, int], ...], tuple[int, ...]]:
    """Join phrases as ``"a . b ."``, tokenize once, and find each phrase's token span from
    the offsets mapping (character ranges -> token ranges), so spans are exact for any
    tokenizer with offsets, whatever it does at phrase boundaries."""
    char_spans: list[tuple[int, int]] = []
    text = ""
    for phrase in texts:
        if text:
            text += " "
        char_spans.append((len(text), len(text) + len(phrase)))
        text += phrase + SEPARATOR
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    spans = []
    for (char_start, char_end), index in zip(char_spans, indices, strict=True):
        tokens = [
            position
            for position, (start, end) in enumerate(offsets)
            if end > start and start >= char_start and end <= char_end
        ]
        if not tokens:
            raise ValueError(f"phrase {index} ({text[char_start:char_end]!r}) produced no tokens")
        spans.append((tokens[0], tokens[-1] + 1))
    return text, tuple(spans), tuple(encoded["input_ids"])


def build_captions(phrases: Sequence[str], tokenizer: Any, max_tokens: int = 256) -> list[Caption]:
    """Pack ``phrases`` into as few captions as fit ``max_tokens`` tokens each.

    Phrases keep their order (greedy packing: captions, and so detections, are stable from
    call to call). Phrases that normalize to the same text appear once, under the index of
    their first occurrence: repeating a phrase only splits the model's score between
    copies. Empty phrases are skipped and can never be matched. A phrase too long for an
    empty caption is cut to fit, with a warning.

    ``tokenizer`` must be a fast (offsets-capable) tokenizer whose special tokens wrap the
    text as one token before and one after, like BERT's [CLS] ... [SEP].
    """
    special = _token_count_with_specials(tokenizer)
    separator_tokens = _token_count(tokenizer, SEPARATOR.strip())
    budget = max_tokens - special
    unique: dict[str, int] = {}
    for index, phrase in enumerate(phrases):
        text = normalize_phrase(phrase)
        if text and text not in unique:
            unique[text] = index

    groups: list[tuple[list[str], list[int]]] = []
    used = budget + 1  # forces a first group
    for text, index in unique.items():
        count = _token_count(tokenizer, text)
        if count + separator_tokens > budget:
            logger.warning(
                "phrase %d is %d tokens, more than a caption holds (%d); it is cut", index, count, budget
            )
            text = _truncate_to_tokens(tokenizer, text, budget - separator_tokens)
            count = _token_count(tokenizer, text)
        if used + count + separator_tokens > budget:
            groups.append(([], []))
            used = 0
        groups[-1][0].append(text)
        groups[-1][1].append(index)
        used += count + separator_tokens

    captions = []
    for texts, indices in groups:
        text, spans, input_ids = _tokenize_caption(tokenizer, texts, indices)
        if len(input_ids) > max_tokens:
            # only a tokenizer that merges across " ." could get here; fail loudly rather
            # than let the model truncate the caption and lose phrases silently
            raise ValueError(f"caption of {len(input_ids)} tokens exceeds {max_tokens}: {text!r}")
        captions.append(Caption(text, tuple(indices), spans, input_ids))
    return captions


def phrase_scores(token_probs: Any, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """(queries x phrases) scores: for each phrase the max probability over its tokens."""
    probs = np.asarray(token_probs, dtype=np.float32)
    if probs.ndim != 2:
        raise ValueError(f"token_probs must be (queries, tokens), got shape {probs.shape}")
    if not spans:
        return np.zeros((probs.shape[0], 0), dtype=np.float32)
    return np.stack([probs[:, start:end].max(axis=1) for start, end in spans], axis=1)


def assign_phrases(
    token_probs: Any, spans: Sequence[tuple[int, int]], text_threshold: float
) -> list[tuple[int, float] | None]:
    """For each query, ``(k, score)`` of the phrase ``spans[k]`` with the best score (max
    probability over the phrase's tokens), or ``None`` when no phrase reaches
    ``text_threshold``.

    ``token_probs`` is (queries x tokens) of probabilities (sigmoid of the logits), a numpy
    array or a CPU tensor. Tokens outside every span ([CLS], ".", [SEP], padding) never
    decide a label: a query that only lights up separators is unassigned, never given a
    default phrase.
    """
    scores = phrase_scores(token_probs, spans)
    if scores.shape[1] == 0:
        return [None] * scores.shape[0]
    best = scores.argmax(axis=1)
    best_scores = scores[np.arange(scores.shape[0]), best]
    return [
        (int(k), float(score)) if score >= text_threshold else None
        for k, score in zip(best, best_scores, strict=True)
    ]
