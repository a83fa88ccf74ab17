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

# Rows per chunk: the per-chunk workspaces (rows x vocabulary floats each) stay cache-sized and
# are reused from chunk to chunk, so extra memory is O(chunk x vocabulary), not O(batch x
# sequence x vocabulary), and no large buffer is freshly allocated (page faults on a new
# 64 MB buffer cost as much as a softmax over it on the CPU).
CHUNK_ROWS = 128
# On a GPU the loop's cost is kernel launches, not cache misses: chunks of about this many
# elements (256 MB of fp32 per workspace) keep the launches few and the workspaces bounded.
GPU_CHUNK_ELEMENTS = 1 << 26


def chunk_rows(device: torch.device, vocab: int) -> int:
    if device.type == "cuda":
        return max(CHUNK_ROWS, GPU_CHUNK_ELEMENTS // vocab)
    return CHUNK_ROWS


@dataclass
class LossOutput:
    """Scalar tensors. `total` carries the gradient; `ce` and `kd` are detached, for logging."""

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    n_tokens: int


def _softmax_into(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """softmax(source) written into `target` (which may alias `source` on the CPU)."""
    if target.data_ptr() == source.data_ptr() and source.device.type != "cpu":
        # aliasing is verified for the CPU kernel only; elsewhere go through a temporary
        target.copy_(torch.softmax(source, dim=-1))
    else:
        torch.softmax(source, dim=-1, out=target)
    return target


def _log_normalizer(row_max: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row from its max and its softmax: lse = max - log(max prob).

    The largest probability is >= 1 / vocabulary, so its log is always accurate.
    """
    return row_max - torch.log(probs.amax(dim=-1))


def _fused_rows(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    grad_out: torch.Tensor,
    work: dict,
    top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of rows: (summed CE, summed KL) over all rows; unscaled d(total)/d(student) into `grad_out`.

    `grad_out` may alias `student` (then the student logits are consumed). With q = softmax(s),
    p = softmax(t / T), q_T = softmax(s / T), the gradient of (1-a) CE + a T^2 KL(p || q_T) is
        T = 1:  q - a p - (1-a) onehot
        T != 1: (1-a) (q - onehot) + a T (q_T - p)
    and KL(p || q_T) = sum p (t - s) / T - lse(t / T) + lse(s / T). With `top_k`, p is the
    teacher's distribution renormalised over its k most likely tokens and lse(t / T) is taken
    over those k. Rows with label < 0 are masked by the caller.
    """
    rows = student.shape[0]
    safe_labels = labels.clamp(min=0).unsqueeze(1)
    student_at_label = student.gather(1, safe_labels).squeeze(1)
    student_max = student.amax(dim=-1)
    kl_rows = None
    if teacher is not None:
        p = work["p"][:rows]
        inv_t = 1.0 / temperature
        if top_k is not None:
            # the teacher's distribution renormalised over its top k tokens (zero elsewhere)
            values, index = teacher.topk(top_k, dim=-1)
            scaled = values * inv_t
            lse_teacher = torch.logsumexp(scaled, dim=-1)
            probs = torch.exp(scaled - lse_teacher[:, None])
            p.zero_().scatter_(1, index, probs)
            cross = (probs * (values - student.gather(1, index))).sum(dim=-1) * inv_t
        else:
            diff = work["diff"][:rows]
            torch.sub(teacher, student, out=diff)  # t - s
            if temperature == 1.0:
                _softmax_into(teacher, p)
            else:
                _softmax_into(torch.mul(teacher, inv_t, out=p), p)
            lse_teacher = _log_normalizer(teacher.amax(dim=-1) * inv_t, p)
            cross = diff.mul_(p).sum(dim=-1) * inv_t  # sum p (t - s) / T
        if temperature != 1.0:
            q_t = work["q_t"][:rows]
            _softmax_into(torch.mul(student, inv_t, out=q_t), q_t)
            lse_student_t = _log_normalizer(student_max * inv_t, q_t)
            q_t.sub_(p)  # q_T - p, before the student logits may be overwritten below
        else:
            lse_student_t = None
    q = _softmax_into(student, grad_out)  # consumes `student` when grad_out aliases it
    lse_student = _log_normalizer(student_max, q)
    ce_rows = lse_student - student_at_label
    if teacher is not None:
        if temperature == 1.0:
            kl_rows = cross - lse_teacher + lse_student
            grad_out.sub_(p, alpha=alpha)
        else:
            kl_rows = cross - lse_teacher + lse_student_t
            grad_out.mul_(1.0 - alpha).add_(q_t, alpha=alpha * temperature)
    grad_out.scatter_add_(
        1, safe_labels, torch.full(safe_labels.shape, alpha - 1.0, dtype=grad_out.dtype, device=grad_out.device)
    )
    valid = labels >= 0
    if grad_out.is_cuda:  # no host sync: mask every row
        grad_out.mul_(valid.unsqueeze(1))
    elif not bool(valid.all()):
        grad_out[~valid] = 0
    ce_sum = (ce_rows * valid).sum()
    kl_sum = (kl_rows * valid).sum() if kl_rows is not None else ce_sum.new_zeros(())
    return ce_sum, kl_sum


class _FusedDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, alpha, temperature, overwrite, top_k):
        vocab = student_logits.shape[-1]
        student = student_logits.detach().reshape(-1, vocab)
        teacher = None if teacher_logits is None else teacher_logits.detach().reshape(-1, vocab)
        flat_labels = labels.reshape(-1)
        n_valid = int((flat_labels >= 0).sum())
        scale = 1.0 / max(n_valid, 1)
        low_precision = student.dtype in (torch.float16, torch.bfloat16)
        compute_dtype = torch.float32 if low_precision else student.dtype
        aliasable = overwrite and not low_precision and student.data_ptr() == student_logits.data_ptr()
        grad = student if aliasable else torch.empty(student.shape, dtype=compute_dtype, device=student.device)
        chunk = min(chunk_rows(student.device, vocab), student.shape[0])
        work = {}
        if teacher is not None:
            names = ("diff", "p", "q_t") if temperature != 1.0 else ("diff", "p")
            work = {name: torch.empty((chunk, vocab), dtype=compute_dtype, device=student.device) for name in names}
        ce_total = torch.zeros((), dtype=torch.float64, device=student.device)
        kl_total = torch.zeros((), dtype=torch.float64, device=student.device)
        for start in range(0, student.shape[0], chunk):
            end = min(start + chunk, student.shape[0])
            s = student[start:end].to(compute_dtype)
            t = None if teacher is None else teacher[start:end].to(compute_dtype)
            ce_sum, kl_sum = _fused_rows(s, t, flat_labels[start:end], alpha, temperature, grad[start:end], work,
                                         top_k)
            ce_total += ce_sum
            kl_total += kl_sum
        ce = (ce_total * scale).to(compute_dtype)
        kd = (kl_total * scale * temperature**2).to(compute_dtype)
        total = (1.0 - alpha) * ce + alpha * kd
        ctx.save_for_backward(grad)
        ctx.scale = scale
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
        # scaled in place: no second batch x sequence x vocabulary buffer
        grad_logits = grad.mul_(grad_total * ctx.scale).to(ctx.logits_dtype).reshape(ctx.logits_shape)
        return grad_logits, None, None, None, None, None, None


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
    overwrite_logits: bool = False,
    top_k: int | None = None,
    hard_labels: bool = False,
) -> LossOutput:
    """(1 - alpha) * CE + alpha * T^2 * KL(p_T || p_S), averaged over target tokens.

    student_logits: [..., V] (gradients flow into it); teacher_logits: [..., V] or None
    (then alpha must be 0); labels: [...] token ids, `ignore_index` where there is no target.
    overwrite_logits: reuse the student logits' memory for their gradient (the training loop
    does; the logits hold garbage afterwards). Saves one batch x sequence x vocabulary buffer.
    top_k: p_T is the teacher's distribution renormalised over its k most likely tokens.
    hard_labels: the KD term is the cross-entropy against the teacher's most likely token
    (the same as top_k=1 at T = 1; temperature must then be 1).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_logits is None and alpha != 0:
        raise ValueError("alpha > 0 needs teacher_logits")
    if hard_labels:
        if temperature != 1.0:
            raise ValueError("hard_labels uses the teacher's argmax; leave temperature at 1")
        top_k = 1
    if top_k is not None and not 1 <= top_k <= student_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, vocabulary size {student_logits.shape[-1]}], got {top_k}")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
            "differ; slice both to the tokenizer's vocabulary first"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(student_logits.shape)}")
    labels = _normalize_labels(labels, ignore_index)
    n_tokens = int((labels >= 0).sum())
    total, ce, kd = _FusedDistillation.apply(
        student_logits, teacher_logits, labels, float(alpha), float(temperature), bool(overwrite_logits),
        None if top_k is None else int(top_k),
    )
    return LossOutput(total=total, ce=ce, kd=kd, n_tokens=n_tokens)


def reference_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    ignore_index: int = -100,
    top_k: int | None = None,
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
        if top_k is not None:  # keep the teacher's top k logits only
            kth = t.topk(top_k, dim=-1).values[:, -1:]
            t = t.masked_fill(t < kth, float("-inf"))
        log_p = F.log_softmax(t / temperature, dim=-1)
        log_q = F.log_softmax(s / temperature, dim=-1)
        kl = torch.where(log_p.isinf(), torch.zeros_like(log_p), log_p.exp() * (log_p - log_q)).sum(-1)
        kd = temperature**2 * (kl * valid).sum() / n
    total = (1 - alpha) * ce + alpha * kd
    return LossOutput(total=total, ce=ce.detach(), kd=kd.detach(), n_tokens=int(valid.sum()))
