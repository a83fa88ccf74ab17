"""Batches from a flat token array: fixed windows, shuffled per epoch by the data seed.

The training stream is cut into non-overlapping windows of `seq_len + 1` tokens (inputs and
their next-token labels; windows may span document boundaries, which the end-of-text token
marks). Epoch `e` visits the windows in the order `permutation(data_seed, e)`. A batch is a
pure function of (data seed, sequence index), so the data position is one integer: resuming,
or running a baseline with the student's data seed, sees exactly the same batches.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from distillab.errors import DataError


class WindowStream:
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

    @lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.data_seed, epoch]).permutation(self.n_windows)

    def window_indices(self, start: int, count: int) -> np.ndarray:
        """Window ids for sequences start .. start+count-1 of the stream (crossing epochs)."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, position = divmod(start + i, self.n_windows)
            out[i] = self._order(epoch)[position]
        return out

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each [count, seq_len] int64, for sequences start .. start+count-1."""
        rows = np.stack(
            [
                np.asarray(self.tokens[w * self.seq_len : w * self.seq_len + self.seq_len + 1], dtype=np.int64)
                for w in self.window_indices(start, count)
            ]
        )
        window = torch.from_numpy(rows)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def epochs(self, sequences: int) -> float:
        return sequences / self.n_windows
