"""KD terms between a student and a teacher with different tokenizers (`distillab.signals.cross_tokenizer`
aligns the two tokenizations of a window by byte spans).

    uld  Universal Logit Distillation (Boizard et al., 2024): at each aligned position (student
         and teacher predict a token that starts at the same byte, after the same text), the L1
         distance between the two distributions' probabilities sorted in decreasing order, the
         shorter vocabulary padded with zeros (the Wasserstein-1 distance of the sorted vectors).
         No mapping between vocabularies; ranks are compared, not tokens.
    alm  Approximate Likelihood Matching (Minixhofer et al., 2025, tokenkit): the text is cut at
         the byte offsets where both tokenizations have a token boundary; for each chunk, the
         log-likelihood of its tokens under the teacher (l_T) and under the student (l_S), and the
         binary KL between Bernoulli(exp(l_T / T)) and Bernoulli(exp(l_S / T)). Exact per chunk:
         both models score the same bytes after the same prefix.

Both are summed over their positions / chunks and divided by the student's target tokens (as
every KD term here), with the factor c = T^2 for ULD (1 for ALM, whose T scales log-likelihoods),
and enter `total = w_ce CE + w_kd c D`. They are written with autograd over the student logits
(neither is row-local: see `distillab.losses.aligned_loss`) and registered as the `aligned`
kernels of `distillab.losses.divergences.DIVERGENCES`, all with the signature
(student logits [N, V], labels [N], AlignedTeacher, T) -> D summed over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AlignedTeacher:
    """A cross-tokenizer teacher signal for a batch, indexed by flattened student rows (batch x seq).

    pair_rows [P]             student rows with an aligned teacher position
    pair_sorted [P, V_T]      the teacher's T = 1 log-probs there, sorted decreasing
    row_chunk [N]             the chunk each student row's target token lies in (-1: none)
    chunk_logp [C]            the teacher's log-likelihood of each chunk's bytes
    """

    pair_rows: torch.Tensor
    pair_sorted: torch.Tensor
    row_chunk: torch.Tensor
    chunk_logp: torch.Tensor


def uld_sum(student: torch.Tensor, labels: torch.Tensor, aligned: AlignedTeacher, temperature: float) -> torch.Tensor:
    """Sum over aligned rows of sum_r |sorted q_T(r) - sorted p_T(r)| (zero-padded); differentiable in `student`."""
    if aligned.pair_rows.numel() == 0:
        return student.sum() * 0.0
    q = torch.softmax(student[aligned.pair_rows] / temperature, dim=-1).sort(dim=-1, descending=True).values
    p = torch.softmax(aligned.pair_sorted.to(q.dtype) / temperature, dim=-1)
    width = min(q.shape[-1], p.shape[-1])
    head = (q[:, :width] - p[:, :width]).abs().sum()
    return head + q[:, width:].sum() + p[:, width:].sum()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def alm_sum(student: torch.Tensor, labels: torch.Tensor, aligned: AlignedTeacher, temperature: float) -> torch.Tensor:
    """Sum over chunks of KL(Bern(exp(l_T / T)) || Bern(exp(l_S / T))); differentiable in `student`."""
    chunks = aligned.chunk_logp.shape[0]
    in_chunk = aligned.row_chunk >= 0
    if chunks == 0 or not bool(in_chunk.any()):
        return student.sum() * 0.0
    rows = in_chunk.nonzero().squeeze(1)
    token_logp = torch.log_softmax(student[rows], dim=-1).gather(1, labels[rows, None].clamp(min=0)).squeeze(1)
    student_logp = torch.zeros(chunks, dtype=token_logp.dtype, device=student.device)
    student_logp = student_logp.index_add(0, aligned.row_chunk[rows], token_logp)
    a = (aligned.chunk_logp.to(token_logp.dtype) / temperature).clamp(max=0.0)
    b = (student_logp / temperature).clamp(max=0.0)
    value = a.exp() * (a - b) + torch.exp(log1mexp(a)) * (log1mexp(a) - log1mexp(b))
    return value.sum()
