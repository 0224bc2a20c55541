"""Label Studio brush RLE with numpy: the same bytes as label-studio-sdk, without its per-bit Python.

The SDK's ``mask2rle`` builds a string of "0"/"1" characters run by run and its ``decode_rle``
turns every byte into eight characters before parsing. Measured on a 1024x768 mask on a
2-core CPU: 42-48 ms to encode a smooth mask, 0.4-1.2 s for a ragged one, 143-233 ms to
decode -- as long as or longer than the SAM decoder call that made the mask, on every click.
Here the run lengths and bit fields are computed with array operations (2.3 ms and 110 ms to
encode those masks); only the decoder's walk over variable-length tokens is a Python loop,
over integers, once per run (25 ms).

Format (thi-ng rle-pack, what the Label Studio brush reads), big-endian bit stream:
32 bits value count, 5 bits word size - 1, four 4-bit "length field size - 1" entries, then
tokens until the count is reached: 1 bit repeat flag, 2 bits choosing a length field size,
that many bits of run length - 1, then one word (repeat) or run-length words (literal).
The stream is zero-padded to whole bytes (always at least one bit of padding, as the SDK).
"""

from __future__ import annotations

import numpy as np

WORD_SIZE = 8
RLE_SIZES = (3, 4, 8, 16)
_MAX_PIECE = 1 << RLE_SIZES[-1]  # the longest run one token can carry


def _bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The ``widths[i]`` (<= 32) low bits of each ``values[i]``, most significant first, concatenated."""
    aligned = (values.astype(np.uint64) << (32 - widths).astype(np.uint64)).astype(">u4")  # left-aligned
    bits = np.unpackbits(aligned.view(np.uint8).reshape(-1, 4), axis=1)
    return bits[np.arange(32) < widths[:, None]]


def _header(count: int) -> np.ndarray:
    fields = np.array([count, WORD_SIZE - 1, *(size - 1 for size in RLE_SIZES)], dtype=np.int64)
    return _bits(fields, np.array([32, 5, 4, 4, 4, 4]))


def encode_runs(lengths: np.ndarray, values: np.ndarray) -> list[int]:
    """RLE bytes of runs (``lengths[i]`` copies of byte ``values[i]``), exactly as the SDK's
    ``encode_rle`` writes the expanded array (adjacent runs must hold different values).

    SDK rules kept bit for bit: a run of 1 is a one-word literal; a longer run is a repeat
    token with the smallest length field that holds it; runs over 256 use the 16-bit field,
    and runs over 65536 are cut into 65536-long tokens plus the rest.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    size_index = np.searchsorted(np.array([2**s for s in RLE_SIZES]), lengths)  # smallest field that fits
    size_index = np.minimum(size_index, len(RLE_SIZES) - 1)
    pieces = np.where(lengths > _MAX_PIECE, (lengths - 1) // _MAX_PIECE, 0) + 1
    run_of_token = np.repeat(np.arange(lengths.size), pieces)
    first_token = np.cumsum(pieces) - pieces
    is_last = np.zeros(run_of_token.size, dtype=bool)
    is_last[first_token + pieces - 1] = True
    done_before = (np.arange(run_of_token.size) - first_token[run_of_token]) * _MAX_PIECE
    token_length = np.where(is_last, lengths[run_of_token] - done_before, _MAX_PIECE)
    index = size_index[run_of_token]
    field = np.array(RLE_SIZES)[index]
    repeat = (lengths[run_of_token] > 1).astype(np.int64)
    token = (repeat << (2 + field + WORD_SIZE)) | (index << (field + WORD_SIZE))
    token |= (token_length - 1) << WORD_SIZE
    token |= values[run_of_token]
    body = _bits(token, 1 + 2 + field + WORD_SIZE)
    header = _header(int(lengths.sum()))
    padding = np.zeros(8 - (header.size + body.size) % 8, dtype=np.uint8)
    return np.packbits(np.concatenate([header, body, padding])).tolist()


def encode_mask(mask: np.ndarray) -> list[int]:
    """Brush RLE of a boolean (H, W) mask: RGBA, 255 in every channel where set, 0 elsewhere
    -- the bytes of the SDK's ``mask2rle(mask * 255)``."""
    flat = np.asarray(mask, dtype=bool).ravel()
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(np.append(starts, flat.size)) * 4  # four channels per pixel, all alike
    return encode_runs(lengths, np.where(flat[starts], 255, 0))


HEADER_BITS = 32 + 5 + 4 * 4  # value count, word size - 1, four length-field sizes - 1


def _windows(data: bytes) -> np.ndarray:
    """``windows[i]``: the 32 bits starting at bit ``i`` of ``data`` as one integer (zeros past
    the end), so reading any field of up to 32 bits is one shift."""
    raw = np.frombuffer(data + bytes(5), dtype=np.uint8).astype(np.int64)
    n = len(data)
    forty = (raw[:n] << 32) | (raw[1 : n + 1] << 24) | (raw[2 : n + 2] << 16) | (raw[3 : n + 3] << 8) | raw[4 : n + 4]
    return ((forty[:, None] >> (8 - np.arange(8))) & 0xFFFFFFFF).ravel()


def _read_header(data: bytes) -> tuple[int, int, list[int]]:
    """(value count, word size, the four length-field sizes) of a brush RLE stream."""
    if 8 * len(data) < HEADER_BITS:
        raise ValueError(f"RLE stream of {len(data)} bytes is shorter than its header")
    count, word = _field(data, 0, 32), _field(data, 32, 5) + 1
    if word > WORD_SIZE:
        raise ValueError(f"RLE word size {word} is over {WORD_SIZE} bits (not a brush mask)")
    return count, word, [_field(data, 37 + 4 * k, 4) + 1 for k in range(4)]


def decode(data: bytes | bytearray) -> np.ndarray:
    """The uint8 values of an RLE stream (word size up to 8 bits, any length field sizes).

    Raises ``ValueError`` when the stream ends before its declared value count.
    """
    data = bytes(data)
    end = 8 * len(data)
    count, word, sizes = _read_header(data)
    windows = _windows(data).tolist()

    def read(position: int, width: int) -> int:
        if position + width > end:
            raise ValueError("RLE stream is truncated")
        return windows[position] >> (32 - width)

    position = HEADER_BITS
    run_values: list[int] = []
    run_lengths: list[int] = []
    filled = 0
    while filled < count:
        head = read(position, 3)  # repeat flag and length field choice
        size = sizes[head & 3]
        length = read(position + 3, size) + 1
        position += 3 + size
        if head >> 2:
            run_values.append(read(position, word))
            run_lengths.append(length)
            position += word
        else:
            for _ in range(length):
                run_values.append(read(position, word))
                run_lengths.append(1)
                position += word
        filled += length
    return np.repeat(np.asarray(run_values, dtype=np.uint8), run_lengths)[:count]


_PREFIX_CHUNK_BYTES = 4096  # windows are built this many bytes at a time, so work stops near the index


def _field(data: bytes, position: int, width: int) -> int:
    """The ``width`` bits of ``data`` at bit ``position``, as one integer; ``ValueError`` past the end."""
    if position + width > 8 * len(data):
        raise ValueError("RLE stream is truncated")
    first, last = position >> 3, (position + width + 7) >> 3
    chunk = int.from_bytes(data[first:last], "big")
    return (chunk >> (8 * last - position - width)) & ((1 << width) - 1)


def value_at(data: bytes | bytearray, index: int) -> int:
    """``decode(data)[index]``, reading only the tokens before it.

    Why: a click asks whether one pixel lies inside a brush region (alpha of pixel ``(y, x)``
    at ``4 * (y * width + x) + 3``). Decoding the whole mask for that took ~20 ms a region;
    this walks token heads only up to the index (a few ms for a mid-image pixel of a ragged
    640x480 mask) and reads no value but the one asked for. Raises ``ValueError`` for a
    stream that is truncated before the index or is not a brush mask, ``IndexError`` for an
    index outside the declared value count.
    """
    data = bytes(data)
    count, word, sizes = _read_header(data)
    masks = [(1 << size) - 1 for size in sizes]
    if not 0 <= index < count:
        raise IndexError(f"value index {index} is outside the stream's {count} values")
    position, filled = HEADER_BITS, 0
    while True:
        first = position >> 3
        if first >= len(data):
            raise ValueError("RLE stream is truncated")
        # a window needs the 4 bytes after its own, so those come along; windows are trusted
        # only for token heads that start inside the chunk proper
        # indexed through a memoryview, the array gives Python ints without building a list
        # (which costs as much as walking the tokens)
        windows = memoryview(_windows(data[first : first + _PREFIX_CHUNK_BYTES + 4]))
        base = 8 * first
        limit = 8 * min(_PREFIX_CHUNK_BYTES, len(data) - first)
        offset = position - base
        while offset < limit:
            window = windows[offset]
            choice = (window >> 29) & 3
            size = sizes[choice]
            length = ((window >> (29 - size)) & masks[choice]) + 1
            repeat = window >> 31
            if filled + length > index:
                skip = 0 if repeat else (index - filled) * word
                return _field(data, base + offset + 3 + size + skip, word)
            filled += length
            offset += 3 + size + (word if repeat else length * word)
        position = base + offset
