"""Batches from a flat token array: fixed windows, shuffled per epoch by the data seed.

The training stream is cut into non-overlapping windows of `seq_len + 1` tokens (inputs and
their next-token labels; windows may span document boundaries, which the end-of-text token
marks). Epoch `e` visits the windows in the order `permutation(data_seed, e)`. A batch is a
pure function of (data seed, sequence index), so the data position is one integer: resuming,
or running a baseline with the student's data seed, sees exactly the same batches.

Every batch carries the ids of its windows: a window id names the same tokens whatever the
data seed, which is what a teacher cache is keyed by. `distillab.data.packing.PackedStream`
is the same interface over whole documents packed into windows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache

import numpy as np
import torch

from distillab.errors import DataError


@dataclass
class Batch:
    """Inputs and next-token labels [batch, seq] (label -100: no target), and the window ids [batch].

    With document packing, `position_ids` restart at 0 at every document: HF models then attend
    within each document only (a block-diagonal causal mask built from the position ids).
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    window_ids: torch.Tensor
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})

    @property
    def targets(self) -> int:
        return int((self.labels >= 0).sum())


def model_inputs(batch: Batch) -> dict:
    """Keyword arguments of an HF causal LM's forward for a batch (packed documents included)."""
    extra = {"position_ids": batch.position_ids} if batch.position_ids is not None else {}
    return {"input_ids": batch.inputs, "use_cache": False, **extra}


def stack_windows(tokens: np.ndarray, starts, length: int) -> torch.Tensor:
    """[len(starts), length] int64: the token runs tokens[s : s + length] for each start."""
    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + length], dtype=np.int64) for s in starts]))


class ShuffledWindows:
    """`n_windows` fixed windows visited epoch by epoch in an order drawn from the data seed.

    Subclasses say what a window holds (`window(ids) -> Batch`); the order, and with it every
    batch, is a pure function of (data seed, position), and window ids never depend on the seed.
    """

    n_windows: int
    data_seed: int
    packing: str  # what the run records as its stream's packing (concat | documents | conversations)

    @lru_cache(maxsize=2)
    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.data_seed, epoch]).permutation(self.n_windows)

    def window_indices(self, start: int, count: int) -> np.ndarray:
        """Window ids for sequences start .. start+count-1 of the stream (crossing epochs)."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, position = divmod(start + i, self.n_windows)
            out[i] = self.order(epoch)[position]
        return out

    def windows_read(self, sequences: int) -> np.ndarray:
        """The distinct window ids that sequences 0 .. sequences-1 of the stream visit, ascending
        (what a teacher cache must hold for a run that trains on that many sequences)."""
        if sequences >= self.n_windows:
            return np.arange(self.n_windows, dtype=np.int64)
        return np.sort(self.order(0)[:sequences]).astype(np.int64)

    def window(self, window_ids: np.ndarray) -> Batch:
        raise NotImplementedError

    def batch(self, start: int, count: int) -> Batch:
        """The batch of sequences start .. start+count-1 of the stream, each [count, seq_len]."""
        return self.window(self.window_indices(start, count))

    def epochs(self, sequences: int) -> float:
        return sequences / self.n_windows


class WindowStream(ShuffledWindows):
    """Fixed windows over the concatenated token stream (`data.packing: concat`)."""

    packing = "concat"

    def __init__(self, tokens: np.ndarray, seq_len: int, data_seed: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.data_seed = data_seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(
                f"the training split has {len(tokens):,} tokens, fewer than one window of "
                f"train.seq_len + 1 = {seq_len + 1}; lower train.seq_len or use a larger corpus"
            )

    def window(self, window_ids: np.ndarray) -> Batch:
        """The batch of the given windows (in that order)."""
        rows = stack_windows(self.tokens, np.asarray(window_ids) * self.seq_len, self.seq_len + 1)
        return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), torch.as_tensor(window_ids))
