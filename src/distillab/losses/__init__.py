"""Training objectives: language-model cross-entropy mixed with a distillation divergence.

    total = w_ce * CE_eps(student, labels) + w_kd * c * D(p_T || p_S)

averaged over target tokens (labels other than `ignore_index`), with p_T and p_S the
teacher's and the student's distributions at temperature T, (w_ce, w_kd) = (1 - a, a) by
default, and c = T^2 (see `distillab.losses.objective` for the whole objective).

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
from distillab.losses.cross_tokenizer import AlignedTeacher
from distillab.losses.fused import Workspace, chunk_rows, chunk_terms
from distillab.losses.objective import KDObjective, StepObjective
from distillab.losses.sampled import SampledTeacher
from distillab.losses.teacher_rows import SparseRows

__all__ = ["LossOutput", "Head", "SparseTeacher", "SampledTeacher", "AlignedTeacher", "distillation_loss",
           "sparse_distillation_loss", "objective_loss", "run_fused", "reference_distillation_loss", "DIVERGENCES"]


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
        elif isinstance(source, SampledTeacher):
            self.sampled = source.flat()
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
        if isinstance(self.source, SampledTeacher):
            return self.sampled.chunk(start, end, dtype)
        return self.dense[start:end].to(dtype)


class FusedLoss(torch.autograd.Function):
    """Forward: loss values and the gradient w.r.t. the student (logits, or hidden + output layer).
    Backward: the stored gradient, scaled by the upstream gradient."""

    @staticmethod
    def forward(ctx, student_tensor, student_weight, labels, student, teacher, now: StepObjective, overwrite: bool):
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
            ce_sum, kd_sum = chunk_terms(s, rows_teacher(start, end, compute_dtype), flat_labels[start:end], now,
                                         grad_out, ws)
            grads.done(start, end, grad_out)
            ce_total += ce_sum
            kd_total += kd_sum
        ce = (ce_total * scale).to(compute_dtype)
        kd = (kd_total * scale * now.kd_scale).to(compute_dtype)
        total = now.ce_weight * ce + now.kd_weight * kd
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


def normalize_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels with every ignored position as -1 (so `>= 0` marks target tokens)."""
    if ignore_index >= 0:
        raise ValueError("ignore_index must be negative (token ids are >= 0)")
    return torch.where(labels == ignore_index, torch.full_like(labels, -1), labels)


def run_fused(student, teacher, labels: torch.Tensor, now: StepObjective, ignore_index: int = -100,
              overwrite_logits: bool = False) -> LossOutput:
    """Check shapes, then run the fused loss of the objective in force `now` (`KDObjective.at`).
    `student`: logits or Head; `teacher`: None, logits, Head, SparseTeacher, SampledTeacher, or
    AlignedTeacher (a teacher with another tokenizer: `aligned_loss`)."""
    if teacher is None and now.kd_weight != 0:
        raise ValueError("alpha > 0 needs a teacher (teacher_logits)")
    if isinstance(teacher, AlignedTeacher) or (teacher is not None and now.objective.entry.aligned is not None):
        return aligned_loss(student, teacher, labels, now, ignore_index)
    vocab = ctx_vocab(student, teacher)
    student_shape = student.shape(vocab) if isinstance(student, Head) else tuple(student.shape)
    if isinstance(teacher, torch.Tensor) and tuple(teacher.shape) != student_shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits {student_shape} differ; slice "
                         "both to the tokenizer's vocabulary first")
    top_k = now.objective.top_k
    if top_k is not None and top_k > vocab:
        raise ValueError(f"top_k must be in [1, vocabulary size {vocab}], got {top_k}")
    if tuple(labels.shape) != student_shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {student_shape}")
    if isinstance(teacher, SampledTeacher) and now.objective.samples is None:
        raise ValueError("a sampled teacher signal needs an objective with samples set (kd.samples), which "
                         "checks that its divergence has an unbiased estimate from draws")
    labels = normalize_labels(labels, ignore_index)
    if isinstance(student, Head):
        total, ce, kd = FusedLoss.apply(student.hidden, student.weight, labels, student, teacher, now, False)
    else:
        total, ce, kd = FusedLoss.apply(student, None, labels, student, teacher, now, bool(overwrite_logits))
    return LossOutput(total=total, ce=ce, kd=kd, n_tokens=int((labels >= 0).sum()))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, *,
                      alpha: float, temperature: float = 1.0, ignore_index: int = -100,
                      overwrite_logits: bool = False, **objective) -> LossOutput:
    """w_ce * CE + w_kd * c * D(p_T || p_S) over target tokens (defaults: (1 - alpha) CE + alpha T^2 KL).

    student_logits [..., V] (gradients flow into it); teacher_logits [..., V] or None (alpha = 0);
    labels [...] token ids, `ignore_index` where there is no target. overwrite_logits: reuse the
    student logits' memory for their gradient (the training loop does; they hold garbage after).
    Keywords: any other field of `KDObjective` (divergence, its parameters, scale_by_t2,
    label_smoothing, top_k, top_p, tail_bucket, top_k_student, loss_scale), checked by it (ConfigError, a
    ValueError).
    """
    now = KDObjective(alpha=alpha, temperature=temperature, **objective).at(0, 1)
    return run_fused(student_logits, teacher_logits, labels, now, ignore_index, overwrite_logits)


def sparse_distillation_loss(student_logits: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
                             log_tail: torch.Tensor, labels: torch.Tensor, *, alpha: float,
                             temperature: float = 1.0, ignore_index: int = -100, overwrite_logits: bool = False,
                             **objective) -> LossOutput:
    """As `distillation_loss`, with the teacher given as its top-K tokens per position: `indices`
    [..., K] (most likely first), their T = 1 log-probabilities [..., K] and the log of the
    remaining mass [...]. Without top_k / top_p all K are kept (renormalised)."""
    now = KDObjective(alpha=alpha, temperature=temperature, **objective).at(0, 1)
    teacher = SparseTeacher(indices.long(), logprobs, log_tail)
    return run_fused(student_logits, teacher, labels, now, ignore_index, overwrite_logits)


def objective_loss(student, teacher, labels: torch.Tensor, objective: KDObjective, step: int, steps: int,
                   overwrite_logits: bool = False) -> LossOutput:
    """The loss of a `KDObjective` at 0-based `step` of `steps`: what the training loop calls."""
    now = objective.at(step, steps)
    if teacher is None:
        now = now.without_teacher()
    return run_fused(student, teacher, labels, now, overwrite_logits=overwrite_logits)


def aligned_loss(student, teacher: AlignedTeacher, labels: torch.Tensor, now: StepObjective,
                 ignore_index: int = -100) -> LossOutput:
    """w_ce CE + w_kd c D for a teacher with another tokenizer, D the objective's `aligned` kernel
    (`distillab.losses.cross_tokenizer`) summed over the batch, per student target token.

    Not the chunk loop: the teacher's rows are not the student's (a student position pairs with
    at most one teacher position, and an ALM chunk sums the student's log-likelihood over several
    positions, across any chunk of rows), so D is differentiated with autograd over the whole
    logits, which must therefore be logits (not a `Head`) and are not overwritten. The CE term is
    the fused loss's (`run_fused` without a teacher).
    """
    kernel = now.objective.entry.aligned
    if kernel is None or not isinstance(teacher, AlignedTeacher):
        raise ValueError(f"kd.divergence={now.objective.divergence} and a {type(teacher).__name__} teacher signal "
                         "do not go together: a teacher with another tokenizer (AlignedTeacher) needs a cross-"
                         "tokenizer divergence, and such a divergence needs that teacher")
    if isinstance(student, Head):
        raise ValueError("a cross-tokenizer teacher needs the student's logits (not a fused output layer)")
    flat_labels = normalize_labels(labels, ignore_index).reshape(-1)
    n_tokens = max(int((flat_labels >= 0).sum()), 1)
    kd = now.kd_scale * kernel(student.reshape(-1, student.shape[-1]).float(), flat_labels, teacher,
                               now.temperature) / n_tokens
    ce = run_fused(student, None, labels, now.without_teacher(), ignore_index)
    total = now.ce_weight * ce.total + now.kd_weight * kd
    return LossOutput(total=total, ce=ce.ce, kd=kd.detach(), n_tokens=ce.n_tokens)


def reference_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                                labels: torch.Tensor, *, alpha: float, temperature: float = 1.0,
                                ignore_index: int = -100, top_k: int | None = None, divergence: str = "forward_kl",
                                top_k_student: str = "full", **parameters) -> LossOutput:
    """The same objective (mix weights, T^2, renormalised top-k) with plain autograd over the whole
    tensors: slower and memory-hungry; for tests, the GPU check, and reading. `parameters`: the
    divergence's (`Params` fields)."""
    objective = KDObjective(alpha=alpha, temperature=temperature, divergence=divergence, top_k=top_k,
                            top_k_student=top_k_student, **parameters)
    entry = objective.entry
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    y = labels.reshape(-1)
    valid = y != ignore_index
    n = valid.sum().clamp(min=1)
    ce = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="sum") / n
    if teacher_logits is None or alpha == 0:
        kd = torch.zeros((), dtype=s.dtype, device=s.device)
    elif entry.argmax_teacher:
        kd = F.cross_entropy(s, teacher_logits.reshape(-1, vocab).argmax(-1), reduction="none")[valid].sum() / n
    else:
        t = teacher_logits.reshape(-1, vocab).detach()
        if top_k is not None:  # keep the teacher's top k logits only
            kth = t.topk(top_k, dim=-1).values[:, -1:]
            t = t.masked_fill(t < kth, float("-inf"))
        log_p = F.log_softmax(t / temperature, dim=-1)
        log_q = F.log_softmax(s / temperature, dim=-1)
        if top_k is not None and not objective.whole_vocabulary_student:  # the student renormalised over the kept
            log_q = F.log_softmax((s / temperature).masked_fill(torch.isinf(t), float("-inf")), dim=-1)
        value, _ = entry.kernel(log_p, log_q, objective)
        kd = temperature**2 * (value * valid).sum() / n
    total = (1 - alpha) * ce + alpha * kd
    return LossOutput(total=total, ce=ce.detach(), kd=kd.detach(), n_tokens=int(valid.sum()))
