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


def with_dropped(log_tail: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """log(tail mass + sum exp(dropped)): the tail after dropping more tokens, with no cancellation
    however small it is (-inf entries of `dropped` add nothing)."""
    return torch.logsumexp(torch.cat([log_tail[:, None], dropped], dim=-1), dim=-1)


def truncate_dense(teacher: torch.Tensor, top_k: int | None, top_p: float | None) -> SparseRows:
    """Dense teacher logits [rows, V] -> the kept tokens as sparse rows (T = 1 log-probs); the
    tail is the dropped tokens' mass summed, exact even when it is far below 1e-7."""
    lse = torch.logsumexp(teacher, dim=-1, keepdim=True)
    if top_k is not None:
        values, indices = teacher.topk(top_k, dim=-1)
        rest = torch.logsumexp(teacher.scatter(-1, indices, NEG_INF), dim=-1)
        return SparseRows(indices, values - lse, rest - lse[:, 0])
    values, indices = teacher.sort(dim=-1, descending=True)
    nothing = torch.full((teacher.shape[0],), NEG_INF, dtype=teacher.dtype, device=teacher.device)
    return keep_top_p(SparseRows(indices, values - lse, nothing), top_p)


def keep_top_p(rows: SparseRows, top_p: float) -> SparseRows:
    """The fewest leading tokens whose mass reaches top_p; the rest become -inf (part of the tail).

    Rows must be sorted, most likely first (as captured). The first token is always kept.
    """
    mass_before = torch.cumsum(rows.logprobs.exp(), dim=-1) - rows.logprobs.exp()
    keep = mass_before < top_p
    keep[:, 0] = True
    logprobs = rows.logprobs.masked_fill(~keep, NEG_INF)
    log_tail = with_dropped(rows.log_tail, rows.logprobs.masked_fill(keep, NEG_INF))
    width = int(keep.sum(-1).max())  # drop columns no row keeps
    return SparseRows(rows.indices[:, :width], logprobs[:, :width], log_tail)


def select(rows: SparseRows, top_k: int | None, top_p: float | None) -> SparseRows:
    """Apply a truncation to already sparse rows (a cache captured at K >= top_k)."""
    if top_k is not None:
        return SparseRows(rows.indices[:, :top_k], rows.logprobs[:, :top_k],
                          with_dropped(rows.log_tail, rows.logprobs[:, top_k:]))
    if top_p is not None:
        return keep_top_p(rows, top_p)
    return rows


def tempered_categories(rows: SparseRows, temperature: float, tail_bucket: bool) -> torch.Tensor:
    """log p over the categories at temperature T: [rows, K] renormalised, or [rows, K + 1] with the tail last."""
    logits = torch.cat([rows.logprobs, rows.log_tail[:, None]], dim=-1) if tail_bucket else rows.logprobs
    return torch.log_softmax(logits / temperature, dim=-1)
