"""Perplexity over fixed-length windows of a token array.

A set of `n` tokens is cut into windows of `seq_len + 1` tokens that step by `seq_len`, so
every token after the first is predicted exactly once with up to `seq_len` tokens of context
from its own window. When there are more windows than `max_windows`, evenly spaced ones are
kept (deterministic, covering the whole set). Mean token loss = summed negative
log-likelihood / predicted tokens; perplexity = exp(mean loss) (infinite past float range).

The in-domain `train` set replays the run's own training stream: evenly spaced sequences
among those the run trained on, in its data order (the paper's "train-0.001").
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from distillab.data.loader import WindowStream, stack_windows
from distillab.errors import DataError
from distillab.progress import progress


def window_starts(n_tokens: int, seq_len: int, max_windows: int | None) -> np.ndarray:
    n_windows = (n_tokens - 1) // seq_len
    if n_windows < 1:
        raise DataError(f"an evaluation set of {n_tokens} tokens is shorter than one window of {seq_len + 1}")
    starts = np.arange(n_windows, dtype=np.int64) * seq_len
    if max_windows is not None and n_windows > max_windows:
        keep = np.linspace(0, n_windows - 1, max_windows).round().astype(np.int64)
        starts = starts[np.unique(keep)]
    return starts


def replay_starts(tokens: np.ndarray, train_stream: dict, max_windows: int | None) -> np.ndarray:
    """Token offsets of evenly spaced windows among the sequences a run trained on, in its order.

    `train_stream`: {"seq_len", "data_seed", "sequences"} as recorded in the checkpoint.
    """
    stream = WindowStream(tokens, train_stream["seq_len"], train_stream["data_seed"])
    seen = max(1, train_stream["sequences"])
    count = min(seen, max_windows or seen)
    positions = np.unique(np.linspace(0, seen - 1, count).round().astype(np.int64))
    return np.array([stream.window_indices(int(p), 1)[0] for p in positions], dtype=np.int64) * stream.seq_len


def vocab_limit(model, tokenizer_size: int | None) -> int | None:
    if tokenizer_size is not None and model.config.vocab_size > tokenizer_size:
        return tokenizer_size
    return None


def safe_exp(loss: float) -> float:
    return math.exp(loss) if loss < 709.0 else math.inf


@torch.inference_mode()
def perplexity(model, tokens: np.ndarray, seq_len: int, max_windows: int | None = 64, batch_size: int = 8,
               device: torch.device | str = "cpu", vocab_size: int | None = None, desc: str = "eval",
               starts: np.ndarray | None = None) -> dict:
    """{"loss", "ppl", "tokens", "windows", "seq_len"} of `model` on `tokens` (or on the given window starts)."""
    was_training = model.training
    model.eval()
    starts = window_starts(len(tokens), seq_len, max_windows) if starts is None else starts
    limit = vocab_limit(model, vocab_size)
    total_nll = 0.0
    total_tokens = 0
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    for batch_starts in progress(batches, desc=desc, unit="batch"):
        window = stack_windows(tokens, batch_starts, seq_len + 1).to(device)
        logits = model(input_ids=window[:, :-1], use_cache=False).logits
        if limit is not None:
            logits = logits[..., :limit]
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += window[:, 1:].numel()
    if was_training:
        model.train()
    loss = total_nll / total_tokens
    return {"loss": loss, "ppl": safe_exp(loss), "tokens": total_tokens, "windows": int(len(starts)),
            "seq_len": seq_len}


def evaluate_prepared_sets(model, data, config, device, train_stream: dict, sets=None) -> dict:
    """Perplexity of a training run's model on its prepared sets (`eval.sets`: validation, train)."""
    results = {}
    for name in sets or config.eval.sets:
        if name == "train":
            tokens = data.tokens("train")
            starts = replay_starts(tokens, train_stream, config.eval.max_windows)
            seq_len = train_stream["seq_len"]
        else:
            tokens, starts = data.tokens("validation"), None
            seq_len = config.eval.seq_len or config.train.seq_len
        results[name] = perplexity(model, tokens, seq_len, config.eval.max_windows, config.eval.batch_size, device,
                                   data.vocab_size, desc=f"eval {name}", starts=starts)
    return results
