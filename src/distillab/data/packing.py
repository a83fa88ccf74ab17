"""Document packing (`data.packing: documents`): whole documents packed first-fit into windows.

The prepared token stream holds every document followed by the end-of-text token. Packing
cuts it into one *run* per document: the end-of-text before the document (it plays the part
of a beginning-of-sequence token) and the document's tokens as inputs, the document's tokens
and its own end-of-text as labels. So every token of a document is predicted, from its own
document only, and the runs of all documents together predict every token of the stream
exactly once (the first document has no end-of-text before it and starts at its first token).

A run longer than a window (`seq_len` positions) is split into window-sized pieces, each
packed as a document of its own (its later pieces start without the earlier context); the
authors' pipeline truncated such documents instead, dropping their tails.

Pieces are packed in stream order by first-fit over groups of `PACKING_BINS` = 30 windows,
as the authors' pipeline did (grain's first-fit packing with 30 bins): a piece goes into the
first window of the open group with room for it; when none has room, the group is closed and
a new one opened with that piece. The rest of a window is padding: label -100 (no loss),
its own positions, never attended to by a document. Within a window, position ids restart
at 0 at every piece, so HF models attend within each piece only (transformers builds the
block-diagonal causal mask from position ids that restart, with no 2-D attention mask).

Windows are fixed by the token stream alone (the packing plan does not depend on the data
seed, so a window id names the same tokens under every seed, as teacher caches need); the
data seed only orders them, epoch by epoch, as for `WindowStream`. The authors shuffled
documents before packing; here the windows are shuffled after it.

The plan (which pieces fill which window) is computed once per (token stream, window length)
and cached beside the prepared data, memory-mapped when read.

Chat data (`distillab.data.chat`, for `distillab sft`) is packed the same way, conversation by
conversation (`conversation_stream`): a conversation's run is its tokens as inputs (but the
last) and as labels (but the first), and a label is kept only where the token is the
assistant's (every other label is -100). A conversation longer than a window is cut to it (its
tail dropped, so every piece keeps the start of its conversation); one whose kept part holds
no assistant token is left out. The plan is computed in memory (one first-fit pass).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distillab.data.loader import Batch, ShuffledWindows, WindowStream
from distillab.errors import DataError, StorageError
from distillab.artefact import AtomicDirectory, entry_lock
from distillab.files import write_json_atomic

PACKING_BINS = 30
PLAN_FORMAT = 1
PAD_LABEL = -100


@dataclass(frozen=True)
class PackingPlan:
    """The pieces of the token stream in window order, and where each window's pieces begin.

    Piece p is the run starting at token `starts[p]` with `lengths[p]` positions: inputs
    tokens[s : s + n], labels tokens[s + 1 : s + n + 1]. Window w holds pieces
    `offsets[w] : offsets[w + 1]`, in that order, then padding.
    """

    starts: np.ndarray  # int64 [pieces]
    lengths: np.ndarray  # int32 [pieces]
    offsets: np.ndarray  # int64 [windows + 1]

    @property
    def n_windows(self) -> int:
        return len(self.offsets) - 1


def document_runs(tokens: np.ndarray, eos_id: int, chunk: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """(start, positions) of each document's run: from the end-of-text before it (token 0 for the
    first) to the one closing it; a tail without a closing end-of-text is a run too."""
    ends = [np.flatnonzero(np.asarray(tokens[i : i + chunk]) == eos_id) + i for i in range(0, len(tokens), chunk)]
    ends = np.concatenate(ends).astype(np.int64) if ends else np.zeros(0, dtype=np.int64)
    if len(tokens) and (len(ends) == 0 or ends[-1] != len(tokens) - 1):
        ends = np.append(ends, len(tokens) - 1)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    lengths = ends - starts
    keep = lengths > 0  # a stream that opens with end-of-text has an empty first run
    return starts[keep], lengths[keep]


def split_runs(starts: np.ndarray, lengths: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs longer than `size` positions cut into consecutive pieces of `size` (the last shorter)."""
    counts = -(-lengths // size)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    index = np.arange(int(counts.sum()), dtype=np.int64) - first  # piece number within its run
    piece_starts = np.repeat(starts, counts) + index * size
    piece_lengths = np.minimum(size, np.repeat(lengths, counts) - index * size)
    return piece_starts, piece_lengths


def first_fit(lengths: np.ndarray, capacity: int, bins: int = PACKING_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(pieces in window order, window offsets) of first-fit packing over groups of `bins` windows.

    Each piece goes into the first window of the open group that has room; when none has,
    the group is closed and the piece opens a new one. Every length must be <= capacity.
    """
    window_of = np.empty(len(lengths), dtype=np.int64)
    free: list[int] = []  # room left in each window of the open group
    group_start = 0
    for piece, n in enumerate(lengths.tolist()):
        for slot, room in enumerate(free):
            if n <= room:
                free[slot] = room - n
                window_of[piece] = group_start + slot
                break
        else:
            if len(free) == bins:
                group_start += bins
                free = []
            free.append(capacity - n)
            window_of[piece] = group_start + len(free) - 1
    n_windows = group_start + len(free)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(window_of, minlength=n_windows))]).astype(np.int64)
    return np.argsort(window_of, kind="stable").astype(np.int64), offsets


def pack_documents(tokens: np.ndarray, eos_id: int, seq_len: int, bins: int = PACKING_BINS) -> PackingPlan:
    """The packing plan of a token stream into windows of `seq_len` positions."""
    if len(tokens) < 2:
        raise DataError(f"the training split has {len(tokens)} tokens; packing needs at least 2")
    starts, lengths = split_runs(*document_runs(tokens, eos_id), seq_len)
    order, offsets = first_fit(lengths, seq_len, bins)
    return PackingPlan(starts[order], lengths[order].astype(np.int32), offsets)


def pack_conversations(starts: np.ndarray, first_targets: np.ndarray, n_tokens: int, seq_len: int,
                       bins: int = PACKING_BINS) -> PackingPlan:
    """The packing plan of conversations starting at `starts` (back to back in a stream of `n_tokens`),
    each cut to `seq_len` positions and left out when its first target falls beyond that."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.append(starts[1:], n_tokens)
    lengths = np.minimum(ends - starts - 1, seq_len)
    keep = (lengths > 0) & (np.asarray(first_targets, dtype=np.int64) - starts <= lengths)
    order, offsets = first_fit(lengths[keep], seq_len, bins)
    return PackingPlan(starts[keep][order], lengths[keep][order].astype(np.int32), offsets)


def cached_plan(tokens: np.ndarray, eos_id: int, seq_len: int, cache: Path | None, log=print) -> PackingPlan:
    """`pack_documents`, read from (or written to) `cache/documents-L{seq_len}-b{bins}-v{format}/`.

    The cache lives beside the prepared data, whose token stream never changes in place; one
    that does not describe this stream (token count, end-of-text id) is recomputed. Its arrays
    are memory-mapped, so processes on one machine share them. Without a writable cache the
    plan is computed in memory.
    """
    if cache is None:
        return pack_documents(tokens, eos_id, seq_len)
    path = cache / f"documents-L{seq_len}-b{PACKING_BINS}-v{PLAN_FORMAT}"
    identity = {"n_tokens": int(len(tokens)), "eos_id": int(eos_id)}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with entry_lock(path):
            plan = read_plan(path, identity)
            if plan is None:
                plan = pack_documents(tokens, eos_id, seq_len)
                write_plan(path, plan, identity)
                log(f"data: packed {len(plan.starts):,} documents (or window-sized pieces of them) into "
                    f"{plan.n_windows:,} windows of {seq_len} ({PACKING_BINS} first-fit bins); plan cached in {path}")
                plan = read_plan(path, identity) or plan
            return plan
    except (OSError, StorageError):  # a read-only or full cache: compute the plan in memory
        return pack_documents(tokens, eos_id, seq_len)


def read_plan(path: Path, identity: dict) -> PackingPlan | None:
    """The cached plan in `path`, memory-mapped; None when absent, damaged or of another stream."""
    try:
        if json.loads((path / "plan.json").read_text()) != {**identity, "format": PLAN_FORMAT}:
            return None
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ("starts", "lengths", "offsets")}
    except (OSError, ValueError):
        return None  # a damaged cache is recomputed, never trusted
    return PackingPlan(**arrays)


def write_plan(path: Path, plan: PackingPlan, identity: dict) -> None:
    """The plan's arrays and identity, written to a temporary directory renamed into place."""
    with AtomicDirectory(path, "a packing plan") as tmp:
        for name in ("starts", "lengths", "offsets"):
            np.save(tmp / f"{name}.npy", getattr(plan, name))
        write_json_atomic(tmp / "plan.json", {**identity, "format": PLAN_FORMAT})


class PackedStream(ShuffledWindows):
    """Windows of whole documents (see the module docstring), with the interface of `WindowStream`.

    With `targets` (a 0/1 flag per token of the stream: chat data) a label is kept only where its
    token is flagged, and the stream's packing is `conversations`.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, data_seed: int, eos_id: int,
                 plan: PackingPlan | None = None, targets: np.ndarray | None = None):
        self.tokens, self.seq_len, self.data_seed, self.eos_id = tokens, seq_len, data_seed, eos_id
        self.plan = plan if plan is not None else pack_documents(tokens, eos_id, seq_len)
        self.n_windows = self.plan.n_windows
        self.targets = targets
        self.packing = "documents" if targets is None else "conversations"

    def row(self, window_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, labels, position ids) of one window, each [seq_len]."""
        plan, size = self.plan, self.seq_len
        inputs = np.full(size, self.eos_id, dtype=np.int64)
        labels = np.full(size, PAD_LABEL, dtype=np.int64)
        positions = np.empty(size, dtype=np.int64)
        at = 0
        for piece in range(int(plan.offsets[window_id]), int(plan.offsets[window_id + 1])):
            start, n = int(plan.starts[piece]), int(plan.lengths[piece])
            run = np.asarray(self.tokens[start : start + n + 1], dtype=np.int64)
            inputs[at : at + n], labels[at : at + n] = run[:-1], run[1:]
            if self.targets is not None:
                flags = np.asarray(self.targets[start + 1 : start + n + 1], dtype=bool)
                labels[at : at + n][~flags] = PAD_LABEL
            positions[at : at + n] = np.arange(n)
            at += n
        positions[at:] = np.arange(size - at)  # padding: a segment of its own
        return inputs, labels, positions

    def window(self, window_ids: np.ndarray) -> Batch:
        """The batch of the given windows (in that order), with per-document position ids."""
        rows = [self.row(int(w)) for w in np.asarray(window_ids)]
        inputs, labels, positions = (torch.from_numpy(np.stack(column)) for column in zip(*rows))
        return Batch(inputs, labels, torch.as_tensor(np.asarray(window_ids)), positions)


def conversation_stream(data, split: str, seq_len: int, data_seed: int) -> PackedStream:
    """A split of prepared chat data as packed conversations, labels on the assistant's tokens only."""
    tokens = data.tokens(split)
    plan = pack_conversations(data.array(split, "starts"), data.array(split, "first_targets"), len(tokens), seq_len)
    if plan.n_windows == 0:
        raise DataError(f"{data.path}: no {split} conversation has an assistant token within train.seq_len = "
                        f"{seq_len}; raise train.seq_len")
    eos_id = int(data.manifest["tokenizer"]["eos_token_id"])
    return PackedStream(tokens, seq_len, data_seed, eos_id, plan, targets=data.array(split, "targets"))


def training_stream(data, seq_len: int, data_seed: int, packing: str, log=print) -> ShuffledWindows:
    """The training split of prepared `data` as the stream `packing` names: concat | documents (`data.packing`),
    or conversations (chat data)."""
    if packing == "conversations":
        return conversation_stream(data, "train", seq_len, data_seed)
    tokens = data.tokens("train")
    if packing == "concat":
        return WindowStream(tokens, seq_len, data_seed)
    eos_id = int(data.manifest["tokenizer"]["eos_token_id"])
    plan = cached_plan(tokens, eos_id, seq_len, Path(data.path) / "packing", log)
    return PackedStream(tokens, seq_len, data_seed, eos_id, plan)
