"""Value codings of a teacher cache: one window's top-K rows <-> bytes.

A window's rows are, per target position, the K most likely token ids (most likely first),
their log-probabilities at T = 1 and the log of the remaining mass (the tail).

    sampled   not a top-K: the distinct token ids drawn from the teacher per position, their
              counts and log-probs (`SampledCoding`, below; `distillab.signals.sampling`).
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





# ----------------------------------------------------------------------------- sampled
#
# The `sampled` cache coding: per position, the distinct token ids drawn from a teacher, their
# draw counts and the teacher's log-probabilities at them (`distillab.signals.sampling`).
#
# A window's rows are variable-length: row i holds n_i distinct ids (1 <= n_i <= m draws). Stored:
#
#     n_i            one byte per row
#     ids            per row sorted ascending, as gaps (id[j] - id[j-1] - 1), byte planes
#     counts         one byte each (m <= 255)
#     log p codes    round(-log p / step) as in the compact coding (within step / 2 nat), byte planes
#     log Z          float32 per row, only at a proposal temperature tau != 1: log sum_x p(x)^(1/tau),
#                    from which the proposal r(x) = p(x)^(1/tau) / Z is recovered at any drawn id
#
# then zlib. Decoding pads rows to the window's largest n_i with count 0 (weight 0 in the loss).
# With tau = 1 the estimator needs the counts only; the log-probs give the logged KL value. With
# tau != 1 the importance weights p / r come from the stored log p (each within step / 2 nat), so
# a cached tau != 1 signal carries that rounding (a relative weight error of at most
# step / 2 * |1 - 1/tau|); tau = 1 is exact.


@dataclass
class DrawnRows:
    """Per position: distinct drawn ids [n, S] (padded), counts [n, S] (0 on padding), the teacher's
    T = 1 log-probs at them [n, S] and log Z of the proposal [n] (0 at tau = 1)."""

    ids: np.ndarray
    counts: np.ndarray
    logprobs: np.ndarray
    log_z: np.ndarray

    def __len__(self) -> int:
        return self.ids.shape[0]

    @classmethod
    def concat(cls, parts: list["DrawnRows"]) -> "DrawnRows":
        width = max(p.ids.shape[1] for p in parts)

        def pad(a, value=0):
            return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value)

        return cls(np.concatenate([pad(p.ids) for p in parts]), np.concatenate([pad(p.counts) for p in parts]),
                   np.concatenate([pad(p.logprobs) for p in parts]), np.concatenate([p.log_z for p in parts]))


class SampledCoding:
    """Distinct drawn ids, counts and quantised log-probs per row (module docstring)."""

    name = "sampled"

    def __init__(self, vocab_size: int, samples: int, proposal_temperature: float = 1.0, log_step: float = 1 / 64,
                 level: int = 6):
        self.vocab_size, self.samples, self.proposal_temperature = vocab_size, samples, proposal_temperature
        self.log_step, self.level, self.max_code = log_step, level, MAX_CODE
        self.id_width, self.code_width = byte_width(vocab_size - 1), byte_width(MAX_CODE)

    def describe(self) -> dict:
        return {"name": self.name, "samples": self.samples, "proposal_temperature": self.proposal_temperature,
                "log_step": self.log_step, "max_code": self.max_code, "compressor": "zlib", "level": self.level}

    def encode(self, rows: DrawnRows) -> bytes:
        kept = rows.counts > 0
        widths = kept.sum(1)
        ids = np.where(kept, rows.ids, np.iinfo(np.int64).max)
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        sorted_kept = np.take_along_axis(kept, order, axis=1)
        gaps = (np.diff(np.where(sorted_kept, ids, 0), axis=1, prepend=-1) - 1)[sorted_kept]
        if (gaps < 0).any():
            raise ValueError("a row repeats a drawn id")
        counts = np.take_along_axis(rows.counts, order, axis=1)[sorted_kept]
        scaled = np.nan_to_num(-np.take_along_axis(rows.logprobs, order, axis=1)[sorted_kept].astype(np.float64)
                               / self.log_step, posinf=self.max_code)
        codes = np.clip(np.rint(scaled), 0, self.max_code).astype(np.uint32)
        parts = [widths.astype(np.uint8).tobytes(), to_planes(gaps, self.id_width),
                 counts.astype(np.uint8).tobytes(), to_planes(codes, self.code_width)]
        if self.proposal_temperature != 1.0:
            parts.append(np.ascontiguousarray(rows.log_z, dtype="<f4").tobytes())
        return zlib.compress(b"".join(parts), self.level)

    def decode(self, blob: bytes, n: int) -> DrawnRows:
        try:
            payload = zlib.decompress(blob)
        except zlib.error:
            raise DataError("a sampled cache window does not decompress; the cache is corrupt") from None
        widths = np.frombuffer(payload, dtype=np.uint8, count=n).astype(np.int64)
        total = int(widths.sum())
        expected = n + total * (self.id_width + 1 + self.code_width) + (4 * n if self.proposal_temperature != 1 else 0)
        if len(payload) != expected:
            raise DataError(f"a sampled cache window holds {len(payload)} bytes, expected {expected}")
        gaps, offset = from_planes(payload, n, total, self.id_width)
        counts = np.frombuffer(payload, dtype=np.uint8, count=total, offset=offset).astype(np.int64)
        codes, offset = from_planes(payload, offset + total, total, self.code_width)
        log_z = (np.frombuffer(payload, dtype="<f4", count=n, offset=offset).astype(np.float32)
                 if self.proposal_temperature != 1.0 else np.zeros(n, dtype=np.float32))
        width = max(1, int(widths.max()) if n else 1)
        row = np.repeat(np.arange(n), widths)
        column = np.arange(total) - np.repeat(np.cumsum(widths) - widths, widths)
        out_ids = np.zeros((n, width), dtype=np.int64)
        out_counts = np.zeros((n, width), dtype=np.int64)
        out_logprobs = np.zeros((n, width), dtype=np.float32)
        out_ids[row, column] = gaps.astype(np.int64) + 1
        out_ids = np.where(np.arange(width)[None, :] < widths[:, None], np.cumsum(out_ids, axis=1) - 1, 0)
        out_counts[row, column] = counts
        out_logprobs[row, column] = codes.astype(np.float32) * -self.log_step
        return DrawnRows(out_ids, out_counts, out_logprobs, log_z)


CODINGS = {"compact": CompactCoding, "float32": Float32Coding, "sampled": SampledCoding}


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
    if name == "sampled":
        return SampledCoding(vocab_size, int(description.get("samples", top_k)),
                             float(description.get("proposal_temperature", 1.0)),
                             float(description.get("log_step", LOG_STEP)), int(description.get("level", ZLIB_LEVEL)))
    raise DataError(f"unknown cache coding {name!r} (known: {', '.join(CODINGS)})")
