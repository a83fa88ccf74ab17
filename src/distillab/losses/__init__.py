"""Training objectives: language-model cross-entropy mixed with a distillation divergence.

    total = w_ce * CE_eps(student, labels) + w_kd * c * D(p_T || p_S)

averaged over target tokens (labels other than `ignore_index`), with p_T and p_S the
teacher's and the student's distributions at temperature T, (w_ce, w_kd) = (1 - a, a) by
default, and c = T^2 (see `distillab.objective` for the whole objective).

Entry points (all return `LossOutput`):
    distillation_loss         dense student and teacher logits (the paper's setting)
    sparse_distillation_loss  dense student logits; the teacher as top-K (indices, log-probs, tail)
    objective_loss            what the training loop calls: any student source (logits, or hidden
                              states + output layer), any teacher signal, a KDObjective at a step

Every path is fused and chunked (`distillab.losses.fused`): no more than one chunk of rows
times the vocabulary is held in float32 for the loss, beyond the logits themselves (and with
`Head` inputs, not even those). `reference_distillation_loss` is the plain autograd formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distillab.losses.divergences import DIVERGENCES, Params
from distillab.losses.fused import LossSpec, Workspace, chunk_rows, chunk_terms
from distillab.losses.teacher_rows import SparseRows

__all__ = ["LossOutput", "Head", "SparseTeacher", "LossSpec", "distillation_loss", "sparse_distillation_loss",
           "objective_loss", "reference_distillation_loss", "DIVERGENCES"]


@dataclass
class LossOutput:
    """Scalar tensors. `total` carries the gradient; `ce` and `kd` are detached, for logging.

    `kd` is c * D (c = T^2 unless disabled), so total = w_ce * ce + w_kd * kd.
    """

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    n_tokens: int


@dataclass
class Head:
    """Logits given as final hidden states [..., d] and an output layer [V', d] (V' >= V rows)."""

    hidden: torch.Tensor
    weight: torch.Tensor

    def shape(self, vocab: int) -> tuple:
        return (*self.hidden.shape[:-1], vocab)


@dataclass
class SparseTeacher:
    """A teacher's top-K per position: ids [..., K] (most likely first), log-probs at T = 1 [..., K],
    and the log of the probability mass outside them [...]."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    log_tail: torch.Tensor


# ----------------------------------------------------------------------------- the autograd function


class Rows:
    """Row access to one side's input, whatever its form (flattened over all but the last dim)."""

    def __init__(self, source, vocab: int):
        self.source, self.vocab = source, vocab
        if isinstance(source, Head):
            self.hidden = source.hidden.detach().reshape(-1, source.hidden.shape[-1])
            self.weight = source.weight.detach()[:vocab]
        elif isinstance(source, SparseTeacher):
            k = source.indices.shape[-1]
            self.sparse = SparseRows(source.indices.reshape(-1, k), source.logprobs.reshape(-1, k),
                                     source.log_tail.reshape(-1))
        elif source is not None:
            self.dense = source.detach().reshape(-1, source.shape[-1])

    def __call__(self, start: int, end: int, dtype: torch.dtype):
        if self.source is None:
            return None
        if isinstance(self.source, Head):
            h = self.hidden[start:end]
            return (h @ self.weight.to(h.dtype).T).to(dtype)
        if isinstance(self.source, SparseTeacher):
            s = self.sparse
            return SparseRows(s.indices[start:end].long(), s.logprobs[start:end].to(dtype), s.log_tail[start:end].to(dtype))
        return self.dense[start:end].to(dtype)


class FusedLoss(torch.autograd.Function):
    """Forward: loss values and the gradient w.r.t. the student (logits, or hidden + output layer).
    Backward: the stored gradient, scaled by the upstream gradient."""

    @staticmethod
    def forward(ctx, student_tensor, student_weight, labels, student, teacher, spec: LossSpec, overwrite: bool):
        rows_student = Rows(student, ctx_vocab(student, teacher))
        rows_teacher = Rows(teacher, rows_student.vocab)
        flat_labels = labels.reshape(-1)
        n_rows, vocab = flat_labels.shape[0], rows_student.vocab
        scale = 1.0 / max(int((flat_labels >= 0).sum()), 1)
        device = flat_labels.device
        compute_dtype = torch.float32 if student_tensor.dtype in (torch.float16, torch.bfloat16) else \
            student_tensor.dtype
        chunk = min(chunk_rows(device, vocab), max(n_rows, 1))
        ws = Workspace(chunk, vocab, compute_dtype, device)
        grads = GradientSink(student, rows_student, overwrite, compute_dtype, chunk, vocab)
        ce_total = torch.zeros((), dtype=torch.float64, device=device)
        kd_total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            s = rows_student(start, end, compute_dtype)
            grad_out = grads.chunk(start, end, s)
            ce_sum, kd_sum = chunk_terms(s, rows_teacher(start, end, compute_dtype), flat_labels[start:end], spec,
                                         grad_out, ws)
            grads.done(start, end, grad_out)
            ce_total += ce_sum
            kd_total += kd_sum
        ce = (ce_total * scale).to(compute_dtype)
        kd = (kd_total * scale * spec.kd_scale).to(compute_dtype)
        total = spec.ce_weight * ce + spec.kd_weight * kd
        ctx.save_for_backward(*grads.tensors())
        ctx.sink, ctx.scale, ctx.backward_done = grads, scale, False
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        if ctx.backward_done:
            raise RuntimeError("distillation_loss supports one backward pass per forward")
        ctx.backward_done = True
        return (*ctx.sink.scaled(ctx.saved_tensors, grad_total * ctx.scale), None, None, None, None, None)


def ctx_vocab(student, teacher) -> int:
    """The vocabulary the loss runs over: the student logits' width, or the teacher's for Head inputs."""
    if not isinstance(student, Head):
        return student.shape[-1]
    if isinstance(teacher, Head):
        return min(student.weight.shape[0], teacher.weight.shape[0])
    if isinstance(teacher, torch.Tensor):
        return teacher.shape[-1]
    return student.weight.shape[0]


class GradientSink:
    """Where the gradient w.r.t. the student goes: the logits' shape (possibly their own memory),
    or, for Head inputs, pushed through the output layer chunk by chunk."""

    def __init__(self, student, rows: Rows, overwrite: bool, dtype, chunk: int, vocab: int):
        self.head = isinstance(student, Head)
        if self.head:
            self.rows = rows
            self.grad_hidden = torch.zeros(rows.hidden.shape, dtype=dtype, device=rows.hidden.device)
            self.grad_weight = torch.zeros(student.weight.shape, dtype=dtype, device=student.weight.device)
            self.buffer = torch.empty((chunk, vocab), dtype=dtype, device=rows.hidden.device)
            self.shapes = (student.hidden.shape, student.hidden.dtype, student.weight.dtype)
            return
        flat = student.detach().reshape(-1, student.shape[-1])
        low_precision = student.dtype in (torch.float16, torch.bfloat16)
        aliasable = overwrite and not low_precision and flat.data_ptr() == student.data_ptr()
        self.grad = flat if aliasable else torch.empty(flat.shape, dtype=dtype, device=flat.device)
        self.shapes = (student.shape, student.dtype)

    def chunk(self, start: int, end: int, student_rows: torch.Tensor) -> torch.Tensor:
        return self.buffer[: end - start] if self.head else self.grad[start:end]

    def done(self, start: int, end: int, grad_rows: torch.Tensor) -> None:
        if self.head:
            h = self.rows.hidden[start:end].to(grad_rows.dtype)
            self.grad_hidden[start:end] = grad_rows @ self.rows.weight.to(grad_rows.dtype)
            self.grad_weight[: grad_rows.shape[1]].addmm_(grad_rows.T, h)

    def tensors(self) -> tuple:
        return (self.grad_hidden, self.grad_weight) if self.head else (self.grad,)

    def scaled(self, saved: tuple, factor: torch.Tensor) -> tuple:
        """(grad for student_tensor, grad for student_weight), scaled in place."""
        if self.head:
            hidden_shape, hidden_dtype, weight_dtype = self.shapes
            grad_hidden, grad_weight = saved
            return (grad_hidden.mul_(factor).to(hidden_dtype).reshape(hidden_shape),
                    grad_weight.mul_(factor).to(weight_dtype))
        shape, dtype = self.shapes
        (grad,) = saved
        return grad.mul_(factor).to(dtype).reshape(shape), None


# ----------------------------------------------------------------------------- entry points


def make_spec(*, alpha: float, temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
              skew: float = 0.1, scale_by_t2: bool = True, label_smoothing: float = 0.0, top_k: int | None = None,
              top_p: float | None = None, tail_bucket: bool = False, loss_scale: str = "mix",
              top_k_student: str = "full", autograd_fallback: bool = False) -> LossSpec:
    """A LossSpec from keyword arguments, each checked (ValueError naming the argument)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence != "hard" and divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join([*DIVERGENCES, 'hard'])}, got {divergence!r}")
    if divergence == "hard" and (temperature != 1.0 or top_k is not None or top_p is not None or tail_bucket):
        raise ValueError("divergence='hard' uses the teacher's argmax; leave temperature at 1 and top_k, top_p, "
                         "tail_bucket unset")
    if top_k is not None and top_p is not None:
        raise ValueError("top_k and top_p together are ambiguous; give one")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if tail_bucket and top_k is None and top_p is None:
        raise ValueError("tail_bucket needs top_k or top_p")
    if top_k_student not in ("full", "renormalised"):
        raise ValueError(f"top_k_student must be full or renormalised, got {top_k_student!r}")
    renormalise = top_k_student == "renormalised"
    if renormalise and tail_bucket:
        raise ValueError("top_k_student='renormalised' and tail_bucket together are ambiguous; give one")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    weights = {"mix": (1.0 - alpha, alpha), "ce_fixed": (1.0, alpha), "kd_fixed": (1.0 - alpha, 1.0)}
    if loss_scale not in weights:
        raise ValueError(f"loss_scale must be mix, ce_fixed or kd_fixed, got {loss_scale!r}")
    ce_weight, kd_weight = weights[loss_scale]
    return LossSpec(ce_weight=ce_weight, kd_weight=kd_weight, temperature=temperature, divergence=divergence,
                    params=Params(beta=beta, skew=skew), scale_by_t2=scale_by_t2, top_k=top_k, top_p=top_p,
                    tail_bucket=tail_bucket, renormalise_student=renormalise, label_smoothing=label_smoothing,
                    autograd_fallback=autograd_fallback)


def normalize_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels with every ignored position as -1 (so `>= 0` marks target tokens)."""
    if ignore_index >= 0:
        raise ValueError("ignore_index must be negative (token ids are >= 0)")
    return torch.where(labels == ignore_index, torch.full_like(labels, -1), labels)


def run_fused(student, teacher, labels: torch.Tensor, spec: LossSpec, ignore_index: int = -100,
              overwrite_logits: bool = False) -> LossOutput:
    """Check shapes, then run the fused loss. `student`: logits or Head; `teacher`: None, logits,
    Head or SparseTeacher."""
    if teacher is None and spec.kd_weight != 0:
        raise ValueError("alpha > 0 needs a teacher (teacher_logits)")
    vocab = ctx_vocab(student, teacher)
    student_shape = student.shape(vocab) if isinstance(student, Head) else tuple(student.shape)
    if isinstance(teacher, torch.Tensor) and tuple(teacher.shape) != student_shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits {student_shape} differ; slice "
                         "both to the tokenizer's vocabulary first")
    if spec.top_k is not None and spec.top_k > vocab:
        raise ValueError(f"top_k must be in [1, vocabulary size {vocab}], got {spec.top_k}")
    if tuple(labels.shape) != student_shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {student_shape}")
    labels = normalize_labels(labels, ignore_index)
    if isinstance(student, Head):
        total, ce, kd = FusedLoss.apply(student.hidden, student.weight, labels, student, teacher, spec, False)
    else:
        total, ce, kd = FusedLoss.apply(student, None, labels, student, teacher, spec, bool(overwrite_logits))
    return LossOutput(total=total, ce=ce, kd=kd, n_tokens=int((labels >= 0).sum()))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, *,
                      alpha: float, temperature: float = 1.0, ignore_index: int = -100,
                      overwrite_logits: bool = False, **objective) -> LossOutput:
    """w_ce * CE + w_kd * c * D(p_T || p_S) over target tokens (defaults: (1 - alpha) CE + alpha T^2 KL).

    student_logits [..., V] (gradients flow into it); teacher_logits [..., V] or None (alpha = 0);
    labels [...] token ids, `ignore_index` where there is no target. overwrite_logits: reuse the
    student logits' memory for their gradient (the training loop does; they hold garbage after).
    Keywords (see `make_spec`): divergence = forward_kl | reverse_kl | jsd | skew_forward_kl |
    skew_reverse_kl | tvd | hard; beta (JSD), skew (lambda); scale_by_t2; label_smoothing; top_k,
    top_p, tail_bucket, top_k_student = full | renormalised; loss_scale = mix | ce_fixed | kd_fixed.
    """
    spec = make_spec(alpha=alpha, temperature=temperature, **objective)
    return run_fused(student_logits, teacher_logits, labels, spec, ignore_index, overwrite_logits)


def sparse_distillation_loss(student_logits: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
                             log_tail: torch.Tensor, labels: torch.Tensor, *, alpha: float,
                             temperature: float = 1.0, ignore_index: int = -100, overwrite_logits: bool = False,
                             **objective) -> LossOutput:
    """As `distillation_loss`, with the teacher given as its top-K tokens per position: `indices`
    [..., K] (most likely first), their T = 1 log-probabilities [..., K] and the log of the
    remaining mass [...]. Without top_k / top_p all K are kept (renormalised)."""
    spec = make_spec(alpha=alpha, temperature=temperature, **objective)
    teacher = SparseTeacher(indices.long(), logprobs, log_tail)
    return run_fused(student_logits, teacher, labels, spec, ignore_index, overwrite_logits)


def objective_loss(student, teacher, labels: torch.Tensor, objective, step: int, steps: int,
                   overwrite_logits: bool = False) -> LossOutput:
    """The loss of a `KDObjective` at 0-based `step` of `steps`: what the training loop calls."""
    now = objective.at(step, steps)
    spec = make_spec(alpha=now.alpha, temperature=now.temperature, divergence=objective.divergence,
                     beta=objective.beta, skew=objective.skew, scale_by_t2=objective.scale_by_t2,
                     label_smoothing=objective.label_smoothing, top_k=objective.top_k, top_p=objective.top_p,
                     tail_bucket=objective.tail_bucket, loss_scale=objective.loss_scale,
                     top_k_student=objective.top_k_student)
    if teacher is None:
        spec = LossSpec(label_smoothing=objective.label_smoothing)
    return run_fused(student, teacher, labels, spec, overwrite_logits=overwrite_logits)


def reference_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                                labels: torch.Tensor, *, alpha: float, temperature: float = 1.0,
                                ignore_index: int = -100, top_k: int | None = None, divergence: str = "forward_kl",
                                beta: float = 0.5, skew: float = 0.1, top_k_student: str = "full") -> LossOutput:
    """The same objective (mix weights, T^2, renormalised top-k) with plain autograd over the whole
    tensors: slower and memory-hungry; for tests, the GPU check, and reading."""
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    y = labels.reshape(-1)
    valid = y != ignore_index
    n = valid.sum().clamp(min=1)
    ce = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="sum") / n
    if teacher_logits is None or alpha == 0:
        kd = torch.zeros((), dtype=s.dtype, device=s.device)
    elif divergence == "hard":
        kd = F.cross_entropy(s, teacher_logits.reshape(-1, vocab).argmax(-1), reduction="none")[valid].sum() / n
    else:
        t = teacher_logits.reshape(-1, vocab).detach()
        if top_k is not None:  # keep the teacher's top k logits only
            kth = t.topk(top_k, dim=-1).values[:, -1:]
            t = t.masked_fill(t < kth, float("-inf"))
        log_p = F.log_softmax(t / temperature, dim=-1)
        log_q = F.log_softmax(s / temperature, dim=-1)
        if top_k is not None and (divergence != "forward_kl" or top_k_student == "renormalised"):
            # the student renormalised over the kept tokens
            log_q = F.log_softmax((s / temperature).masked_fill(torch.isinf(t), float("-inf")), dim=-1)
        value, _ = DIVERGENCES[divergence](log_p, log_q, Params(beta=beta, skew=skew))
        kd = temperature**2 * (value * valid).sum() / n
    total = (1 - alpha) * ce + alpha * kd
    return LossOutput(total=total, ce=ce.detach(), kd=kd.detach(), n_tokens=int(valid.sum()))
