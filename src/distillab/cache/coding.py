"""Value codings of a teacher cache: one window's top-K rows <-> bytes.

A window's rows are, per target position, the K most likely token ids (most likely first),
their log-probabilities at T = 1 and the log of the remaining mass (the tail).

    float32   ids as int32 in rank order, log-probs and log-tail as float32: exact, 8K + 4
              bytes per token. The accuracy yardstick.
    compact   per row, the ids sorted ascending and stored as gaps (id[j] - id[j-1] - 1), the
              log-probs quantised in log space (code = round(-log p / step), the same step for
              every value: a relative probability error of at most step / 2) and permuted along
              with the ids, the rank of the most likely token, and log-tail as float16. Each
              integer array is split into byte planes (all low bytes, then the next byte, ...),
              so the mostly-zero high bytes of small gaps compress to almost nothing, and the
              window is compressed with zlib. Any vocabulary size (the id planes grow with it).

Decoding the compact form restores rank order by sorting each row by code (ties broken by
id, ascending) with the stored most likely token first, so `decode(encode(rows))` returns
exactly: the same id set per row, the same most likely token, log-probs -code * step (equal
to the input within step / 2), tokens of equal code in ascending id order, and log-tail
rounded to float16. Decoding is vectorised numpy over the whole window.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from distillab.errors import DataError

# The compact coding's quantisation step in nats (2^-6): log-probs within 1/128 nat, i.e. each
# probability within 0.8 % of its value. Its cost in bytes and student loss: benchmarks/cache_size.py.
LOG_STEP = 1.0 / 64.0
# The largest code: log-probs below -MAX_CODE * step (about -1024 nats, probability 0 in
# float32) are stored as that; -inf too.
MAX_CODE = (1 << 16) - 1
ZLIB_LEVEL = 6


@dataclass
class TopKRows:
    """K most likely tokens per position: ids [n, K] int64 (most likely first), their T = 1
    log-probabilities [n, K] float32 and the log of the mass outside them [n] float32."""

    ids: np.ndarray
    logprobs: np.ndarray
    log_tail: np.ndarray

    def __len__(self) -> int:
        return self.ids.shape[0]

    @classmethod
    def concat(cls, parts: list["TopKRows"]) -> "TopKRows":
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.logprobs for p in parts]),
                   np.concatenate([p.log_tail for p in parts]))


def byte_width(largest: int) -> int:
    """Bytes needed to hold integers up to `largest` (at least 1)."""
    return max(1, (int(largest).bit_length() + 7) // 8)


def to_planes(values: np.ndarray, width: int) -> bytes:
    """Non-negative integers as `width` byte planes: every value's lowest byte, then the next, ..."""
    little = np.ascontiguousarray(values, dtype="<u4").reshape(-1).view(np.uint8).reshape(-1, 4)
    return np.ascontiguousarray(little[:, :width].T).tobytes()


def from_planes(buffer: bytes, offset: int, count: int, width: int) -> tuple[np.ndarray, int]:
    """Inverse of `to_planes`: (`count` uint32 values, the offset after them)."""
    planes = np.frombuffer(buffer, dtype=np.uint8, count=count * width, offset=offset).reshape(width, count)
    out = np.zeros((count, 4), dtype=np.uint8)
    out[:, :width] = planes.T
    return out.view("<u4").reshape(count), offset + count * width


class Float32Coding:
    """Exact: ids int32 in rank order, log-probs and log-tail float32, no compression."""

    name = "float32"

    def __init__(self, vocab_size: int, top_k: int):
        self.vocab_size, self.top_k = vocab_size, top_k

    def describe(self) -> dict:
        return {"name": self.name}

    def encode(self, rows: TopKRows) -> bytes:
        return (np.ascontiguousarray(rows.ids, dtype="<i4").tobytes()
                + np.ascontiguousarray(rows.logprobs, dtype="<f4").tobytes()
                + np.ascontiguousarray(rows.log_tail, dtype="<f4").tobytes())

    def decode(self, blob: bytes, n: int) -> TopKRows:
        k = self.top_k
        if len(blob) != n * (8 * k + 4):
            raise DataError(f"a float32 cache window holds {len(blob)} bytes, expected {n * (8 * k + 4)}")
        ids = np.frombuffer(blob, dtype="<i4", count=n * k).reshape(n, k).astype(np.int64)
        logprobs = np.frombuffer(blob, dtype="<f4", count=n * k, offset=4 * n * k).reshape(n, k).astype(np.float32)
        log_tail = np.frombuffer(blob, dtype="<f4", count=n, offset=8 * n * k).astype(np.float32)
        return TopKRows(ids, logprobs, log_tail)


class CompactCoding:
    """Sorted, gap-coded ids with quantised log-probs permuted along, byte planes, zlib (module docstring)."""

    name = "compact"

    def __init__(self, vocab_size: int, top_k: int, log_step: float = LOG_STEP, level: int = ZLIB_LEVEL):
        self.vocab_size, self.top_k, self.log_step, self.level = vocab_size, top_k, log_step, level
        self.id_width = byte_width(vocab_size - 1)
        self.code_width = byte_width(MAX_CODE)
        self.rank_width = byte_width(top_k - 1)

    def describe(self) -> dict:
        return {"name": self.name, "log_step": self.log_step, "max_code": MAX_CODE, "compressor": "zlib",
                "level": self.level, "tail": "float16"}

    def quantise(self, logprobs: np.ndarray) -> np.ndarray:
        """code = round(-log p / step), clipped to [0, MAX_CODE] (-inf -> MAX_CODE)."""
        scaled = np.nan_to_num(-np.asarray(logprobs, dtype=np.float64) / self.log_step, posinf=MAX_CODE)
        return np.clip(np.rint(scaled), 0, MAX_CODE).astype(np.uint32)

    def encode(self, rows: TopKRows) -> bytes:
        order = np.argsort(rows.ids, axis=1, kind="stable")
        ids = np.take_along_axis(rows.ids, order, axis=1)
        gaps = np.diff(ids, axis=1, prepend=-1) - 1
        if (gaps < 0).any():
            raise ValueError("a row repeats a token id")
        codes = np.take_along_axis(self.quantise(rows.logprobs), order, axis=1)
        first = np.argmax(order == 0, axis=1)  # where the most likely token went
        payload = b"".join([to_planes(gaps, self.id_width), to_planes(codes, self.code_width),
                            to_planes(first, self.rank_width),
                            np.ascontiguousarray(rows.log_tail, dtype="<f2").tobytes()])
        return zlib.compress(payload, self.level)

    def decode(self, blob: bytes, n: int) -> TopKRows:
        k = self.top_k
        try:
            payload = zlib.decompress(blob)
        except zlib.error:
            raise DataError("a compact cache window does not decompress; the cache is corrupt") from None
        if len(payload) != n * k * (self.id_width + self.code_width) + n * (self.rank_width + 2):
            raise DataError(f"a compact cache window holds {len(payload)} bytes, not {n} rows of top-{k}")
        gaps, offset = from_planes(payload, 0, n * k, self.id_width)
        codes, offset = from_planes(payload, offset, n * k, self.code_width)
        first, offset = from_planes(payload, offset, n, self.rank_width)
        log_tail = np.frombuffer(payload, dtype="<f2", count=n, offset=offset).astype(np.float32)
        ids = np.cumsum(gaps.reshape(n, k).astype(np.int64) + 1, axis=1) - 1
        codes = codes.reshape(n, k).astype(np.int64)
        key = 2 * codes + 1
        key[np.arange(n), first] -= 1  # the most likely token first among equal codes
        rank = np.argsort(key, axis=1, kind="stable")
        logprobs = (np.take_along_axis(codes, rank, axis=1) * -self.log_step).astype(np.float32)
        return TopKRows(np.take_along_axis(ids, rank, axis=1), logprobs, log_tail)


CODINGS = {"compact": CompactCoding, "float32": Float32Coding}


def make_coding(description: dict | str, vocab_size: int, top_k: int):
    """The coding a manifest describes (or a coding name with its defaults)."""
    if isinstance(description, str):
        description = {"name": description}
    name = description.get("name")
    if name == "float32":
        return Float32Coding(vocab_size, top_k)
    if name == "compact":
        return CompactCoding(vocab_size, top_k, float(description.get("log_step", LOG_STEP)),
                             int(description.get("level", ZLIB_LEVEL)))
    raise DataError(f"unknown cache coding {name!r} (known: {', '.join(CODINGS)})")
