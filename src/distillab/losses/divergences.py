"""Divergences between the teacher's distribution p and the student's q, row by row.

Each divergence D(p, q) is written once, on "categories": the whole vocabulary, or the
teacher's kept tokens (plus a tail category) when the teacher is truncated. A kernel gets the
log-probabilities of both sides over those categories and returns

    value  [rows]      D(p, q) per row
    u      [rows, C]   q * dD/dq per category (up to a multiple of q, which cancels)

from which `distillab.losses.fused` builds the gradient with respect to the student logits
z: dD/dz = u - q * sum(u) (the softmax Jacobian applied to dD/dq). Writing u rather than
dD/dq avoids dividing by tiny student probabilities (forward KL: u = -p).

A divergence may leave `u` out: the loss then differentiates `value` with autograd, chunk by
chunk (the fallback; tested to agree with every closed form here).

`DIVERGENCES` is the one list of divergences: each entry names its kernel, its label, the
parameters it reads, how it treats a truncated teacher, and its other kernels: `sampled` (an
unbiased estimate from drawn teacher tokens, `distillab.losses.sampled`) and, for a teacher with
another tokenizer, `aligned` (over byte-aligned positions or chunks instead of categories,
`distillab.losses.cross_tokenizer`). A parameter is a field of `Params`
(its default and its range beside it); the objective (`distillab.losses.objective.KDObjective`)
inherits those fields, so each is a `kd.<name>` config key, checked, labelled and swept with
the rest. Adding a divergence: a function below and one entry in DIVERGENCES (and a field in
`Params` for a new parameter); nothing else enumerates them. (A cross-tokenizer divergence's
kernel goes beside `AlignedTeacher` in `distillab.losses.cross_tokenizer` instead.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from distillab.losses.cross_tokenizer import alm_sum, uld_sum
from distillab.losses.sampled import sampled_forward_kl


def parameter(default: float, ok: Callable[[float], bool], bounds: str):
    """A divergence parameter: its default and the values it may take (`bounds` says them)."""
    return field(default=default, metadata={"ok": ok, "bounds": bounds})


@dataclass(frozen=True)
class Params:
    """The divergences' parameters. Each is a `kd.<name>` config key (the objective inherits
    these fields); a divergence lists the ones it reads in its `DIVERGENCES` entry."""

    # jsd: the teacher's weight in the mixture m = beta p_T + (1 - beta) p_S
    beta: float = parameter(0.5, lambda v: 0 < v < 1, "in (0, 1)")
    # skew KL: the mixture weight lambda
    skew: float = parameter(0.1, lambda v: 0 <= v < 1, "in [0, 1)")


def _xlogy_diff(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q), 0 where p = 0 (no 0 * inf, and no NaN in its gradient either)."""
    return p * torch.where(p > 0, log_p - log_q, 0.0)


def _ratio(weight: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """weight * a / b, 0 where weight = 0."""
    return weight * torch.where(weight > 0, (log_a - log_b).exp(), 0.0)


def forward_kl(log_p, log_q, params: Params):
    p = log_p.exp()
    return _xlogy_diff(p, log_p, log_q).sum(-1), -p


def reverse_kl(log_p, log_q, params: Params):
    q = log_q.exp()
    ratio = _xlogy_diff(q, log_q, log_p)
    return ratio.sum(-1), ratio


def jsd(log_p, log_q, params: Params):
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, in log space."""
    beta = params.beta
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    p, q = log_p.exp(), log_q.exp()
    q_side = _xlogy_diff(q, log_q, log_m)
    value = beta * _xlogy_diff(p, log_p, log_m).sum(-1) + (1 - beta) * q_side.sum(-1)
    return value, (1 - beta) * q_side


def skew_forward_kl(log_p, log_q, params: Params):
    """KL(p || m), m = lambda p + (1 - lambda) q."""
    lam = params.skew
    log_m = torch.logaddexp(log_p + math.log(lam), log_q + math.log1p(-lam)) if lam > 0 else log_q
    p = log_p.exp()
    return _xlogy_diff(p, log_p, log_m).sum(-1), -(1 - lam) * _ratio(p, log_q, log_m)


def skew_reverse_kl(log_p, log_q, params: Params):
    """KL(q || m), m = lambda q + (1 - lambda) p."""
    lam = params.skew
    log_m = torch.logaddexp(log_q + math.log(lam), log_p + math.log1p(-lam)) if lam > 0 else log_p
    q = log_q.exp()
    q_side = _xlogy_diff(q, log_q, log_m)
    return q_side.sum(-1), q_side - lam * _ratio(q, log_q, log_m)


def tvd(log_p, log_q, params: Params):
    """Total variation 1/2 sum |p - q| (a subgradient where p = q)."""
    p, q = log_p.exp(), log_q.exp()
    return 0.5 * (p - q).abs().sum(-1), 0.5 * q * torch.sign(q - p)


Kernel = Callable[[torch.Tensor, torch.Tensor, Params], tuple[torch.Tensor, torch.Tensor | None]]


def value_only(kernel: Kernel) -> Kernel:
    """The same divergence without its closed-form u (forces the autograd fallback; for tests)."""
    return lambda log_p, log_q, params: (kernel(log_p, log_q, params)[0], None)


# ----------------------------------------------------------------------------- fused dense kernels
#
# The same divergences over the whole vocabulary, written in place into chunk-sized buffers so a
# training step allocates nothing per chunk: kernel(log_p, log_q, params, u, scratch, extra) fills
# `u` (= q dD/dq, up to a multiple of q) and returns (value per row, q, sum of u per row or None),
# q = exp(log_q) held in one of the buffers. `log_p` and `log_q` may be overwritten. Tested
# against the kernels above.


def fused_reverse_kl(log_p, log_q, params: Params, u, scratch, extra):
    q = torch.exp(log_q, out=scratch)
    torch.sub(log_q, log_p, out=u).mul_(q)  # q (log q - log p)
    value = u.sum(-1)
    return value, q, value


def fused_tvd(log_p, log_q, params: Params, u, scratch, extra):
    q = torch.exp(log_q, out=scratch)
    diff = torch.exp(log_p, out=u).neg_().add_(q)  # q - p
    value = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1)
    diff.sign_().mul_(q).mul_(0.5)
    return value, q, None


def mixture_log(log_a, log_b, weight: float, out, scratch):
    """log(weight a + (1 - weight) b) from log a and log b, into `out` (uses `scratch`)."""
    torch.exp(log_a, out=out).mul_(weight)
    out.add_(torch.exp(log_b, out=scratch).mul_(1.0 - weight))
    return out.log_()


def weighted_log_ratio_sum(weight, log_a, log_b, out):
    """sum of weight * (log a - log b) per row, with 0 where weight = 0 (into `out`, no temporaries)."""
    return torch.sub(log_a, log_b, out=out).mul_(weight).nan_to_num_(nan=0.0).sum(-1)


def fused_jsd(log_p, log_q, params: Params, u, scratch, extra):
    beta = params.beta
    log_m = mixture_log(log_p, log_q, beta, extra, scratch)
    value = beta * weighted_log_ratio_sum(torch.exp(log_p, out=scratch), log_p, log_m, u)
    q = torch.exp(log_q, out=scratch)
    torch.sub(log_q, log_m, out=u).mul_(q)  # q (log q - log m)
    q_side = u.sum(-1)
    u.mul_(1 - beta)
    return value + (1 - beta) * q_side, q, (1 - beta) * q_side


def fused_skew_forward_kl(log_p, log_q, params: Params, u, scratch, extra):
    lam = params.skew
    log_m = mixture_log(log_p, log_q, lam, extra, scratch) if lam > 0 else extra.copy_(log_q)
    p = torch.exp(log_p, out=scratch)
    value = weighted_log_ratio_sum(p, log_p, log_m, u)
    torch.sub(log_q, log_m, out=u).exp_().mul_(p).mul_(-(1 - lam))  # -(1 - lambda) p q / m
    return value, torch.exp(log_q, out=scratch), None


def fused_skew_reverse_kl(log_p, log_q, params: Params, u, scratch, extra):
    lam = params.skew
    log_m = mixture_log(log_q, log_p, lam, extra, scratch) if lam > 0 else extra.copy_(log_p)
    q = torch.exp(log_q, out=scratch)
    torch.sub(log_q, log_m, out=u).mul_(q)  # q (log q - log m)
    value = u.sum(-1)
    ratio = torch.sub(log_q, log_m, out=log_p).exp_().mul_(q)  # q^2 / m
    u.sub_(ratio, alpha=lam)
    return value, q, None


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Divergence:
    """One divergence as the objective and the loss see it.

    kernel: on categories, (log_p, log_q, params) -> (value per row, u or None); None for
        `argmax_teacher` (the chunk loop's own path) and for `aligned` divergences.
    label: how people read it; `{name}` fields are its parameters, e.g. "JSD β {beta:g}".
    parameters: the `Params` fields it reads.
    fused: an in-place kernel over the whole vocabulary (the same values, no allocations).
    whole_vocabulary_student: with a truncated teacher, the student's whole-vocabulary
        probabilities at the kept tokens (as the paper's code did for forward KL) instead of the
        student renormalised over them.
    argmax_teacher: the cross-entropy against the teacher's argmax: no temperature, no
        truncation (and no T^2 factor).
    t2_factor: whether the KD term is multiplied by T^2 (when kd.scale_by_t2 is on).
    sampled: (student logits [rows, V] at T = 1, `SampledRows`, out) -> (value per row, dD/dz
        written into `out`): an estimate from drawn teacher tokens whose expectation is the
        divergence and its gradient; only a divergence with one accepts kd.samples.
    aligned: for a teacher with another tokenizer, (student logits [N, V], labels [N],
        `AlignedTeacher`, T) -> D summed over the batch, differentiable in the logits; its only
        kernel (`kernel` is None). `alignment` names what it reads: "positions" (a student and a
        teacher position predicting a token at the same byte offset) or "chunks" (byte spans
        both tokenizations cut at).
    """

    kernel: Kernel | None
    label: str
    parameters: tuple[str, ...] = ()
    fused: Callable | None = None
    whole_vocabulary_student: bool = False
    argmax_teacher: bool = False
    t2_factor: bool = True
    sampled: Callable | None = None
    aligned: Callable | None = None
    alignment: str = ""

    def describe(self, params: Params) -> str:
        return self.label.format(**{name: getattr(params, name) for name in self.parameters})


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": Divergence(forward_kl, "forward KL", whole_vocabulary_student=True, sampled=sampled_forward_kl),
    "reverse_kl": Divergence(reverse_kl, "reverse KL", fused=fused_reverse_kl),
    "jsd": Divergence(jsd, "JSD β {beta:g}", ("beta",), fused=fused_jsd),
    "skew_forward_kl": Divergence(skew_forward_kl, "skew forward KL λ {skew:g}", ("skew",),
                                  fused=fused_skew_forward_kl),
    "skew_reverse_kl": Divergence(skew_reverse_kl, "skew reverse KL λ {skew:g}", ("skew",),
                                  fused=fused_skew_reverse_kl),
    "tvd": Divergence(tvd, "TVD", fused=fused_tvd),
    "hard": Divergence(None, "hard labels", argmax_teacher=True, t2_factor=False),
    "uld": Divergence(None, "ULD (cross-tokenizer)", aligned=uld_sum, alignment="positions"),
    # T divides the chunks' log-likelihoods, not logits: no T^2
    "alm": Divergence(None, "ALM (cross-tokenizer)", aligned=alm_sum, alignment="chunks", t2_factor=False),
}
