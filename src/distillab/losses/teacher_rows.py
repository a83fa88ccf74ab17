"""The teacher's side of one chunk of rows: dense logits, or sparse top-K log-probabilities.

Sparse rows are what a teacher cache stores per target position: the K most likely token
ids (most likely first), their log-probabilities at T = 1, and the probability mass of all
other tokens (the tail). Dense rows under top-k / top-p are turned into the same form, so one
code path serves truncation of an online teacher and a cached one.

Truncation keeps a set S of tokens per row:
  top_k  the k most likely;
  top_p  the fewest most likely whose mass reaches p (at T = 1; the token that crosses p is kept).
The teacher over S at temperature T is then
  renormalised   p_S = softmax(log p_S / T) over S;
  tail bucket    the categories S + {tail} with masses (p_S, tail) tempered the same way.
From a cache captured with K: top_k <= K and every T are exact for the renormalised form; the
tail bucket is exact at T = 1 and at T != 1 tempers the tail as one category (what an online
teacher with tail_bucket does too); top_p is exact wherever the captured K tokens reach p, and
keeps all K in rows where they do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class SparseRows:
    indices: torch.Tensor  # [rows, K] int64
    logprobs: torch.Tensor  # [rows, K] float, T = 1, -inf where a token is not kept
    log_tail: torch.Tensor  # [rows] float, log of the mass outside the kept tokens


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_of(logprobs: torch.Tensor) -> torch.Tensor:
    """log of the mass outside the kept tokens: log(1 - sum exp(logprobs))."""
    return log1mexp(torch.logsumexp(logprobs, dim=-1))


def truncate_dense(teacher: torch.Tensor, top_k: int | None, top_p: float | None) -> SparseRows:
    """Dense teacher logits [rows, V] -> the kept tokens as sparse rows (T = 1 log-probs)."""
    lse = torch.logsumexp(teacher, dim=-1, keepdim=True)
    if top_k is not None:
        values, indices = teacher.topk(top_k, dim=-1)
        logprobs = values - lse
        return SparseRows(indices, logprobs, tail_of(logprobs))
    values, indices = teacher.sort(dim=-1, descending=True)
    return keep_top_p(SparseRows(indices, values - lse, torch.zeros(teacher.shape[0], device=teacher.device)), top_p)


def keep_top_p(rows: SparseRows, top_p: float) -> SparseRows:
    """The fewest leading tokens whose mass reaches top_p; the rest become -inf (part of the tail).

    Rows must be sorted, most likely first (as captured). The first token is always kept.
    """
    mass_before = torch.cumsum(rows.logprobs.exp(), dim=-1) - rows.logprobs.exp()
    keep = mass_before < top_p
    keep[:, 0] = True
    logprobs = rows.logprobs.masked_fill(~keep, NEG_INF)
    width = int(keep.sum(-1).max())  # drop columns no row keeps
    logprobs, indices = logprobs[:, :width], rows.indices[:, :width]
    return SparseRows(indices, logprobs, tail_of(logprobs))


def select(rows: SparseRows, top_k: int | None, top_p: float | None) -> SparseRows:
    """Apply a truncation to already sparse rows (a cache captured at K >= top_k)."""
    if top_k is not None:
        logprobs = rows.logprobs[:, :top_k]
        return SparseRows(rows.indices[:, :top_k], logprobs, tail_of(logprobs))
    if top_p is not None:
        return keep_top_p(rows, top_p)
    return rows


def tempered_categories(rows: SparseRows, temperature: float, tail_bucket: bool) -> torch.Tensor:
    """log p over the categories at temperature T: [rows, K] renormalised, or [rows, K + 1] with the tail last."""
    logits = torch.cat([rows.logprobs, rows.log_tail[:, None]], dim=-1) if tail_bucket else rows.logprobs
    return torch.log_softmax(logits / temperature, dim=-1)
