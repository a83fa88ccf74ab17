"""The sampled teacher signal in the loss: forward KL against an unbiased estimate of p.

Per target position the teacher signal holds S token ids x_s (the distinct ones among m draws
from a proposal r), their estimated probabilities

    p_hat(x) = count(x) / m * p(x) / r(x)        E[p_hat(x)] = p(x) for every token x

(r = p at proposal temperature 1, so p_hat = count / m) and the teacher's log-probabilities
log p(x) at them. The KD term is the importance-sampling estimate of KL(p || q):

    value  = sum_s p_hat(x_s) (log p(x_s) - log q(x_s))
    dD/dz  = q * sum_s p_hat(x_s) - p_hat               (z the student logits, T = 1)

Both are linear in p_hat, so their expectations over the draws are KL(p || q) and its gradient
q - p exactly: the estimator is unbiased. Only forward KL is linear in p this way (reverse KL
needs log p at every token, JSD / skew KL / TVD are non-linear in p): forward KL's registry entry
names `sampled_forward_kl` as its `sampled` kernel, and the objective refuses kd.samples with a
divergence that has none. Padding columns have p_hat = 0 and add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The most draws per position (a sampled cache stores each count in one byte).
MAX_SAMPLES = 255


@dataclass
class SampledTeacher:
    """A sampled teacher signal: ids [..., S] (distinct draws, padded), p_hat [..., S] (0 on padding)
    and the teacher's T = 1 log-probabilities at the ids [..., S] (0 on padding)."""

    indices: torch.Tensor
    weights: torch.Tensor
    logprobs: torch.Tensor

    def flat(self) -> "SampledRows":
        s = self.indices.shape[-1]
        return SampledRows(self.indices.reshape(-1, s), self.weights.reshape(-1, s), self.logprobs.reshape(-1, s))


@dataclass
class SampledRows:
    """Rows [rows, S] of a sampled signal (see `SampledTeacher`)."""

    indices: torch.Tensor
    weights: torch.Tensor
    logprobs: torch.Tensor

    def chunk(self, start: int, end: int, dtype: torch.dtype) -> "SampledRows":
        return SampledRows(self.indices[start:end].long(), self.weights[start:end].to(dtype),
                           self.logprobs[start:end].to(dtype))


def sampled_forward_kl(student: torch.Tensor, rows: SampledRows, out: torch.Tensor):
    """(value per row, dD/dz written into `out`) of the importance-sampled forward KL at T = 1."""
    lse = torch.logsumexp(student, dim=-1, keepdim=True)
    log_q = student.gather(1, rows.indices) - lse
    weights = rows.weights
    value = (weights * (rows.logprobs - log_q)).sum(-1)
    torch.softmax(student, dim=-1, out=out)
    out.mul_(weights.sum(-1, keepdim=True)).scatter_add_(1, rows.indices, -weights)
    return value, out


def sampled_gradient_float64(student: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """dD/dz = q sum(p_hat) - p_hat in float64, dense (for tests and benchmarks)."""
    q = torch.softmax(student.double(), dim=-1)
    p_hat = torch.zeros_like(q).scatter_add_(-1, indices, weights.double())
    return q * p_hat.sum(-1, keepdim=True) - p_hat
