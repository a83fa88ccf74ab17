"""Several teachers at once (`kd.teachers`): their signals combined into one for the loss.

    mixture  p = sum_k w_k p_k, the weighted mixture of the teachers' distributions at T = 1 (then
             tempered and truncated like any teacher). Online: dense log-probabilities
             log sum_k w_k softmax(l_k). Sampled (online or cached): each teacher's draws with
             p_hat weighted by w_k, an unbiased estimate of the mixture (its logged KL value is
             sum_k w_k KL(p_k || q), which differs from KL(p || q) by a constant: same gradient).
             A mixture of top-K caches is refused at config time (a token one teacher kept lies
             in another's tail, with an unknown probability).
    route    each document goes to one teacher, drawn with probabilities w_k from a hash of the
             document's position in the training split (concat windows: the number of end-of-text
             tokens before it; packed windows: the window id and the document's place in it), so
             a document meets the same teacher in every epoch and every run. Every teacher still
             runs on every batch; each position takes its document's teacher's signal.
"""

from __future__ import annotations

import numpy as np
import torch

from distillab.data.loader import Batch
from distillab.losses import SampledTeacher, SparseTeacher


def splitmix(values: np.ndarray) -> np.ndarray:
    """A 64-bit mixing hash of non-negative integers, as uniform floats in [0, 1)."""
    x = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class DocumentRouter:
    """Which teacher each position of a batch learns from: one per document, drawn by weight."""

    def __init__(self, tokens: np.ndarray, eos_id: int, seq_len: int, packing: str, weights: tuple[float, ...]):
        self.seq_len, self.packing = seq_len, packing
        self.eos_positions = np.flatnonzero(np.asarray(tokens) == eos_id) if packing == "concat" else None
        self.edges = np.cumsum(weights)[:-1]

    def documents(self, batch: Batch) -> np.ndarray:
        """A number naming each position's document [batch, seq] (a pure function of the data)."""
        size, seq = batch.inputs.shape
        window_ids = np.asarray(batch.window_ids.cpu(), dtype=np.int64)
        if self.packing == "concat":
            positions = window_ids[:, None] * self.seq_len + np.arange(seq)[None, :]
            return np.searchsorted(self.eos_positions, positions, side="right")
        starts = np.asarray(batch.position_ids.cpu()) == 0
        return window_ids[:, None] * (seq + 1) + np.cumsum(starts, axis=1)

    def route(self, batch: Batch) -> torch.Tensor:
        return torch.from_numpy(np.searchsorted(self.edges, splitmix(self.documents(batch)), side="right"))


class SeveralTeachers:
    """k teacher signals combined by `mix` (mixture or route) with normalised `weights`."""

    def __init__(self, signals: list, weights: tuple[float, ...], mix: str, router: DocumentRouter | None = None):
        self.signals, self.weights, self.mix, self.router = signals, weights, mix, router
        self.description = f"{mix} of " + ", ".join(f"{w:.2g} {s.description}" for w, s in zip(weights, signals))

    def inference_flops_per_token(self) -> float:
        return sum(s.inference_flops_per_token() for s in self.signals)

    def check_covers(self, stream, sequences: int) -> None:
        for signal in self.signals:
            if hasattr(signal, "check_covers"):
                signal.check_covers(stream, sequences)

    def signal(self, batch: Batch, head: bool = False):
        outputs = []
        for s in self.signals:
            out = s.signal(batch)
            outputs.append(out.clone() if isinstance(out, torch.Tensor) else out)  # online buffers are reused
        if self.mix == "mixture":
            return mixture(outputs, self.weights)
        return routed(outputs, self.router.route(batch).to(batch.inputs.device))


def mixture(outputs: list, weights: tuple[float, ...]):
    """The weighted mixture of dense logits (as log-probabilities) or of sampled signals."""
    if all(isinstance(o, SampledTeacher) for o in outputs):
        return SampledTeacher(torch.cat([o.indices for o in outputs], -1),
                              torch.cat([o.weights * w for o, w in zip(outputs, weights)], -1),
                              torch.cat([o.logprobs for o in outputs], -1))
    if not all(isinstance(o, torch.Tensor) for o in outputs):
        raise ValueError("a mixture takes dense or sampled teacher signals (not top-K rows)")
    logs = [torch.log_softmax(o.float(), dim=-1) + float(np.log(w)) for o, w in zip(outputs, weights)]
    return torch.logsumexp(torch.stack(logs), dim=0)


def pad_last(tensor: torch.Tensor, width: int, value=0) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1]), value=value)


def routed(outputs: list, route: torch.Tensor):
    """Each position's signal from the teacher `route` names ([batch, seq] teacher indices)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        out = first.clone()
        for k, o in enumerate(outputs[1:], start=1):
            out[route == k] = o[route == k].to(out.dtype)
        return out
    fields = ("indices", "weights", "logprobs") if isinstance(first, SampledTeacher) else \
        ("indices", "logprobs", "log_tail")
    width = max(o.indices.shape[-1] for o in outputs)
    if isinstance(first, SparseTeacher) and any(o.indices.shape[-1] != width for o in outputs):
        raise ValueError("routed top-K caches must hold the same K")
    parts = {}
    for name in fields:
        tensors = [getattr(o, name) for o in outputs]
        if tensors[0].dim() == route.dim() + 1:
            tensors = [pad_last(t, width) for t in tensors]
        stacked = torch.stack(tensors)
        index = route.view(1, *route.shape, *([1] * (stacked.dim() - 1 - route.dim())))
        index = index.expand(1, *stacked.shape[1:])
        parts[name] = stacked.gather(0, index.to(stacked.device)).squeeze(0)
    return type(first)(**parts)
