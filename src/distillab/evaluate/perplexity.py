"""Perplexity over fixed-length windows of a token array.

A set of `n` tokens is cut into windows of `seq_len + 1` tokens that step by `seq_len`, so
every token after the first is predicted exactly once with up to `seq_len` tokens of context
from its own window. When there are more windows than `max_windows`, evenly spaced ones are
kept (deterministic, covering the whole set). Mean token loss = summed negative
log-likelihood / predicted tokens; perplexity = exp(mean loss) (infinite past float range).

The in-domain `train` set replays the run's own training stream: evenly spaced sequences
among those the run trained on, in its data order (the paper's "train-0.001"), each scored as
it was trained (with document packing: positions restart per document, padding unscored).
For an SFT run (chat data, packed conversations) `validation` is scored the same way: evenly
spaced windows of the held-out conversations, the loss over the assistant's tokens only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from distillab.data.loader import ShuffledWindows, model_inputs, stack_windows
from distillab.data.packing import conversation_stream, training_stream
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


def replay_windows(stream: ShuffledWindows, sequences: int, max_windows: int | None) -> np.ndarray:
    """Window ids of evenly spaced sequences among the first `sequences` a run trained on, in its order."""
    seen = max(1, sequences)
    count = min(seen, max_windows or seen)
    positions = np.unique(np.linspace(0, seen - 1, count).round().astype(np.int64))
    return np.array([stream.window_indices(int(p), 1)[0] for p in positions], dtype=np.int64)


def replay_stream(data, train_stream: dict) -> ShuffledWindows:
    """The training stream a checkpoint recorded (`train_stream` in its distillab.json)."""
    return training_stream(data, train_stream["seq_len"], train_stream["data_seed"],
                           train_stream.get("packing", "concat"), log=lambda *a: None)


def stream_set(data, name: str, train_stream: dict, max_windows: int | None,
               stream: ShuffledWindows | None = None) -> tuple[ShuffledWindows, np.ndarray] | None:
    """(stream, window ids) of a prepared set scored as trained: `train` (the run's replayed stream, or
    `stream` when given: it must be that one), and `validation` of chat data (held-out conversations);
    None for a set scored as plain windows of its tokens."""
    if name == "train":
        stream = stream or replay_stream(data, train_stream)
        return stream, replay_windows(stream, train_stream["sequences"], max_windows)
    if train_stream.get("packing") == "conversations":
        held = conversation_stream(data, "validation", train_stream["seq_len"], train_stream["data_seed"])
        count = min(held.n_windows, max_windows or held.n_windows)
        return held, np.unique(np.linspace(0, held.n_windows - 1, count).round().astype(np.int64))
    return None


def vocab_limit(model, tokenizer_size: int | None) -> int | None:
    if tokenizer_size is not None and model.config.vocab_size > tokenizer_size:
        return tokenizer_size
    return None


def safe_exp(loss: float) -> float:
    return math.exp(loss) if loss < 709.0 else math.inf


def scoring_mode(model):
    """inference_mode, but no_grad for an FSDP model: these also score a sharded model while it
    trains, and one whose first forward runs in inference mode keeps inference tensors as the
    buffers it gathers its parameters into, which its next training step may not write (an SFT run
    scores its start first). (A DDP model scored on one rank needs inference mode: under no_grad
    its forward would broadcast its buffers to ranks that are not scoring.)"""
    from torch.distributed.fsdp import FSDPModule

    return torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode()


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
    with scoring_mode(model):
        for batch_starts in progress(batches, desc=desc, unit="batch"):
            window = stack_windows(tokens, batch_starts, seq_len + 1).to(device)
            logits = model(input_ids=window[:, :-1], use_cache=False).logits
            if limit is not None:
                logits = logits[..., :limit]
            targets = window[:, 1:].reshape(-1)
            total_nll += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, reduction="sum"))
            total_tokens += window[:, 1:].numel()
    if was_training:
        model.train()
    loss = total_nll / total_tokens
    return {"loss": loss, "ppl": safe_exp(loss), "tokens": total_tokens, "windows": int(len(starts)),
            "seq_len": seq_len}


def stream_perplexity(model, stream: ShuffledWindows, window_ids: np.ndarray, batch_size: int = 8,
                      device: torch.device | str = "cpu", vocab_size: int | None = None, desc: str = "eval") -> dict:
    """Like `perplexity`, over windows of a training stream as they were trained (their position
    ids and unscored padding included): the mean loss over their target tokens."""
    was_training = model.training
    model.eval()
    limit = vocab_limit(model, vocab_size)
    total_nll, total_tokens = 0.0, 0
    chunks = [window_ids[i : i + batch_size] for i in range(0, len(window_ids), batch_size)]
    with scoring_mode(model):
        for ids in progress(chunks, desc=desc, unit="batch"):
            batch = stream.window(ids).to(device)
            logits = model(**model_inputs(batch)).logits
            if limit is not None:
                logits = logits[..., :limit]
            total_nll += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                                               ignore_index=-100, reduction="sum"))
            total_tokens += batch.targets
    if was_training:
        model.train()
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "ppl": safe_exp(loss), "tokens": total_tokens, "windows": int(len(window_ids)),
            "seq_len": int(stream.seq_len)}


def evaluate_prepared_sets(model, data, config, device, train_stream: dict, stream: ShuffledWindows | None = None,
                           sets=None) -> dict:
    """Perplexity of a training run's model on its prepared sets (`eval.sets`: validation, train).

    `train` replays `train_stream` (the run's own stream, or `stream` when given: it must be that one)."""
    results = {}
    for name in sets or config.eval.sets:
        scored = stream_set(data, name, train_stream, config.eval.max_windows, stream if name == "train" else None)
        if scored is not None:
            results[name] = stream_perplexity(model, *scored, config.eval.batch_size, device, data.vocab_size,
                                              desc=f"eval {name}")
            continue
        seq_len = config.eval.seq_len or config.train.seq_len
        results[name] = perplexity(model, data.tokens("validation"), seq_len, config.eval.max_windows,
                                   config.eval.batch_size, device, data.vocab_size, desc=f"eval {name}")
    return results
