"""Training objectives: language-model cross-entropy mixed with a distillation divergence.

    total = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(p_T || p_S)

with p_T and p_S the teacher's and student's distributions at temperature T, each term
averaged over target tokens whose label is not `ignore_index`.

The loss is a fused autograd function: its forward pass computes the loss values and, in the
same sweep over the vocabulary, the gradient with respect to the student logits, processing
rows in chunks. Backward then only scales that stored gradient. This avoids the chain of
full-size intermediates (log-softmax, softmax, products, their gradients) that the plain
formula leaves for autograd, which on the CPU cost as much as a small model's forward pass.
The teacher logits never enter the autograd graph.

`reference_distillation_loss` is the plain formula, kept for tests and as documentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Rows per chunk: keeps the per-chunk temporaries (a few rows x vocab floats) in cache-sized
# pieces and bounds extra memory to O(chunk x vocab).
CHUNK_ROWS = 256


@dataclass
class LossOutput:
    """Scalar tensors. `total` carries the gradient; `ce` and `kd` are detached, for logging."""

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    n_tokens: int


def _fused_rows(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    grad_out: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of rows: (summed CE, summed KL) over target rows; d(total)/d(student) into `grad_out`.

    Rows with label < 0 are not targets. `scale` is 1 / (target tokens in the whole batch).
    The gradient of (1-a) CE + a T^2 KL(p_T || q_T) with respect to the student logits is
        T = 1:  q - a p - (1-a) onehot
        T != 1: (1-a) (q - onehot) + a T (q_T - p_T)
    """
    valid = labels >= 0
    safe_labels = labels.clamp(min=0).unsqueeze(1)
    log_q = torch.log_softmax(student, dim=-1)
    ce_sum = -(log_q.gather(1, safe_labels).squeeze(1) * valid).sum()
    torch.exp(log_q, out=grad_out)  # q
    kl_sum = torch.zeros((), dtype=student.dtype, device=student.device)
    if teacher is not None:
        if temperature == 1.0:
            log_p = torch.log_softmax(teacher, dim=-1)
            p = torch.exp(log_p)
            log_p.sub_(log_q)  # log p - log q
            grad_out.sub_(p, alpha=alpha)
        else:
            log_p = torch.log_softmax(teacher / temperature, dim=-1)
            p = torch.exp(log_p)
            log_q_t = torch.log_softmax(student / temperature, dim=-1)
            log_p.sub_(log_q_t)
            grad_out.mul_(1.0 - alpha)
            grad_out.add_(log_q_t.exp_().sub_(p), alpha=alpha * temperature)
        kl_rows = torch.linalg.vecdot(p, log_p)  # sum_v p (log p - log q)
        kl_sum = (kl_rows * valid).sum()
    grad_out.scatter_add_(1, safe_labels, torch.full(safe_labels.shape, alpha - 1.0, dtype=grad_out.dtype, device=grad_out.device))
    grad_out.mul_((valid * scale).unsqueeze(1).to(grad_out.dtype))
    return ce_sum, kl_sum


class _FusedDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, alpha, temperature):
        vocab = student_logits.shape[-1]
        student = student_logits.detach().reshape(-1, vocab)
        teacher = None if teacher_logits is None else teacher_logits.detach().reshape(-1, vocab)
        flat_labels = labels.reshape(-1)
        n_valid = int((flat_labels >= 0).sum())
        scale = 1.0 / max(n_valid, 1)
        compute_dtype = torch.float32 if student.dtype in (torch.float16, torch.bfloat16) else student.dtype
        grad = torch.empty(student.shape, dtype=compute_dtype, device=student.device)
        ce_total = torch.zeros((), dtype=torch.float64, device=student.device)
        kl_total = torch.zeros((), dtype=torch.float64, device=student.device)
        for start in range(0, student.shape[0], CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, student.shape[0])
            s = student[start:end].to(compute_dtype)
            t = None if teacher is None else teacher[start:end].to(compute_dtype)
            ce_sum, kl_sum = _fused_rows(s, t, flat_labels[start:end], alpha, temperature, grad[start:end], scale)
            ce_total += ce_sum
            kl_total += kl_sum
        ce = (ce_total * scale).to(compute_dtype)
        kd = (kl_total * scale * temperature**2).to(compute_dtype)
        total = (1.0 - alpha) * ce + alpha * kd
        ctx.save_for_backward(grad)
        ctx.logits_shape = student_logits.shape
        ctx.logits_dtype = student_logits.dtype
        ctx.backward_done = False
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        (grad,) = ctx.saved_tensors
        if ctx.backward_done:
            raise RuntimeError("distillation_loss supports one backward pass per forward")
        ctx.backward_done = True
        # the stored gradient is scaled in place: no second batch x sequence x vocabulary copy
        grad_logits = grad.mul_(grad_total).to(ctx.logits_dtype).reshape(ctx.logits_shape)
        return grad_logits, None, None, None, None


def _normalize_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels with every ignored position as -1 (so `>= 0` marks target tokens)."""
    if ignore_index >= 0:
        raise ValueError("ignore_index must be negative (token ids are >= 0)")
    return torch.where(labels == ignore_index, torch.full_like(labels, -1), labels)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> LossOutput:
    """(1 - alpha) * CE + alpha * T^2 * KL(p_T || p_S), averaged over target tokens.

    student_logits: [..., V] (gradients flow into it); teacher_logits: [..., V] or None
    (then alpha must be 0); labels: [...] token ids, `ignore_index` where there is no target.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_logits is None and alpha != 0:
        raise ValueError("alpha > 0 needs teacher_logits")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
            "differ; slice both to the tokenizer's vocabulary first"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(student_logits.shape)}")
    labels = _normalize_labels(labels, ignore_index)
    n_tokens = int((labels >= 0).sum())
    total, ce, kd = _FusedDistillation.apply(student_logits, teacher_logits, labels, float(alpha), float(temperature))
    return LossOutput(total=total, ce=ce, kd=kd, n_tokens=n_tokens)


def reference_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> LossOutput:
    """The same objective written directly with autograd (slower; for tests and reading)."""
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    y = labels.reshape(-1)
    valid = y != ignore_index
    n = valid.sum().clamp(min=1)
    ce = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="sum") / n
    if teacher_logits is None or alpha == 0:
        kd = torch.zeros((), dtype=s.dtype, device=s.device)
    else:
        t = teacher_logits.reshape(-1, vocab).detach()
        log_p = F.log_softmax(t / temperature, dim=-1)
        log_q = F.log_softmax(s / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        kd = temperature**2 * (kl * valid).sum() / n
    total = (1 - alpha) * ce + alpha * kd
    return LossOutput(total=total, ce=ce.detach(), kd=kd.detach(), n_tokens=int(valid.sum()))
