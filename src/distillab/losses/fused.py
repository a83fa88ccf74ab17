"""The fused loss: loss values and the gradient w.r.t. the student logits in one sweep over rows.

Rows (target positions) are processed in chunks. For each chunk the KD term's gradient is
formed first (while the student logits are intact), then the student softmax is written into
the gradient buffer, which may be the student logits' own memory (`overwrite_logits`), and the
two terms are combined:

    d total / d s = w_ce (q - (1 - eps) onehot(y) - eps / V) + w_kd c / T * dD/dz,   z = s / T

with q = softmax(s), c = T^2 (or 1), and dD/dz from `distillab.losses.divergences` (forward KL
at T = 1 reduces to q - p and takes a shorter path). Backward only scales the stored gradient.
Extra memory is a few named chunk x vocabulary workspaces, reused from chunk to chunk.

With an output layer (`lm_head_loss`) the student's logits are never materialised: each chunk
of hidden states is projected, its gradient formed as above, and pushed back through the
projection at once (dH = dS W, dW += dS^T H).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillab.losses.objective import StepObjective
from distillab.losses.sampled import SampledRows
from distillab.losses.teacher_rows import NEG_INF, SparseRows, select, tempered_categories, truncate_dense

# A student category outside the kept tokens gets this log-probability instead of -inf: exp()
# of it is exactly 0, and differences with it stay finite (no NaN in gradients).
LOG_FLOOR = -1e30

# Rows per chunk on the CPU: workspaces (rows x vocabulary floats each) stay cache-sized and
# are reused, so no large buffer is freshly allocated (page faults on a new 64 MB buffer cost as
# much as a softmax over it here).
CHUNK_ROWS = 128
# On a GPU the cost is kernel launches, not cache misses: chunks of about this many elements
# (256 MB of fp32 per workspace) keep launches few and workspaces bounded.
GPU_CHUNK_ELEMENTS = 1 << 26


def chunk_rows(device: torch.device, vocab: int) -> int:
    if device.type == "cuda":
        return max(CHUNK_ROWS, GPU_CHUNK_ELEMENTS // vocab)
    return CHUNK_ROWS


class Workspace:
    """Chunk-sized scratch buffers, allocated on first use and reused for every chunk."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (rows, vocab), dtype, device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        """Buffer `name` ('p', 'diff', 'q_t', 'kd', 'masked'), first `rows` rows."""
        if name not in self.buffers:
            self.buffers[name] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.buffers[name][:rows]


@dataclass
class KDGradient:
    """The KD term of a chunk: its values per row and how it enters the gradient w.r.t. s.

    Exactly one of: `grad` (c/T dD/dz, dense), `minus_p` (T = 1 forward KL: dD/ds = q - p),
    `minus_index` (hard labels: dD/ds = q - onehot(index)). The two T = 1 forms leave the
    student's log-normalizer out of `value` (`plus_student_lse`): the chunk's softmax gives it.
    """

    value: torch.Tensor
    grad: torch.Tensor | None = None
    minus_p: torch.Tensor | None = None
    minus_index: torch.Tensor | None = None
    plus_student_lse: bool = False
    grad_scale: float = 1.0  # `grad` still to be multiplied by this
    student_probs: torch.Tensor | None = None  # softmax(s), when the KD term computed it (T = 1)


# ----------------------------------------------------------------------------- the KD term


def kd_term(student: torch.Tensor, teacher, now: StepObjective, ws: Workspace) -> KDGradient:
    """The KD term of one chunk; `teacher` is a dense [rows, V] tensor, SparseRows or SampledRows
    (the divergence's `sampled` kernel). Forward KL has faster paths of its own (tested against
    the general ones)."""
    objective = now.objective
    if isinstance(teacher, SampledRows):
        value, grad = objective.entry.sampled(student, teacher, ws.get("kd", student.shape[0]))
        return KDGradient(value, grad=grad)
    if objective.entry.argmax_teacher:
        index = teacher.indices[:, :1] if isinstance(teacher, SparseRows) else teacher.argmax(-1, keepdim=True)
        return KDGradient(-student.gather(1, index).squeeze(1), minus_index=index, plus_student_lse=True)
    forward_kl = objective.divergence == "forward_kl"
    if isinstance(teacher, torch.Tensor) and not objective.truncated:
        if forward_kl:
            return dense_forward_kl(student, teacher, now, ws)
        return dense_divergence(student, teacher, now, ws)
    rows = select(teacher, objective.top_k, objective.top_p) if isinstance(teacher, SparseRows) else \
        truncate_dense(teacher, objective.top_k, objective.top_p)
    if objective.whole_vocabulary_student and not objective.tail_bucket:
        if forward_kl:
            return sparse_forward_kl(student, rows, now, ws)
        return sparse_divergence(student, rows, now, ws, full_student=True)
    return sparse_divergence(student, rows, now, ws)


def dense_forward_kl(student, teacher, now: StepObjective, ws: Workspace) -> KDGradient:
    """KL(p_T || q_T) over the whole vocabulary; dD/ds = (c/T) (q_T - p_T), or q - p at T = 1.

    KL = sum p (t - s) / T - lse(t / T) + lse(s / T), each lse from the row maximum and the
    largest probability (lse = max - log max(softmax): exact, the largest probability is >= 1/V).
    """
    rows = student.shape[0]
    inv_t = 1.0 / now.temperature
    p = ws.get("p", rows)
    diff = torch.sub(teacher, student, out=ws.get("diff", rows))  # t - s
    if now.temperature == 1.0:
        softmax_into(teacher, p)
    else:
        softmax_into(torch.mul(teacher, inv_t, out=p), p)
    lse_teacher = log_normalizer(teacher.amax(dim=-1) * inv_t, p)
    cross = diff.mul_(p).sum(dim=-1) * inv_t
    if now.temperature == 1.0:
        return KDGradient(cross - lse_teacher, minus_p=p, plus_student_lse=True)
    q_t = softmax_into(torch.mul(student, inv_t, out=ws.get("q_t", rows)), ws.get("q_t", rows))
    lse_student_t = log_normalizer(student.amax(dim=-1) * inv_t, q_t)
    grad = q_t.sub_(p).mul_(now.kd_scale * inv_t)
    return KDGradient(cross - lse_teacher + lse_student_t, grad=grad)


def dense_divergence(student, teacher, now: StepObjective, ws: Workspace) -> KDGradient:
    """Any divergence over the whole vocabulary at temperature T: its fused in-place kernel
    (the entry's `fused`), else the category kernel (closed form or autograd). At T = 1 the student's
    softmax it computes is handed on, so the CE term need not compute it again."""
    rows, inv_t = student.shape[0], 1.0 / now.temperature
    out = ws.get("kd", rows)
    fused = now.objective.entry.fused
    if fused is None:
        log_p = torch.log_softmax(teacher * inv_t, dim=-1)
        value, grad_z = divergence_and_gradient(log_p, student * inv_t, now, lambda z_: torch.log_softmax(z_, dim=-1))
        return KDGradient(value, grad=torch.mul(grad_z, now.kd_scale * inv_t, out=out))
    scaled = (lambda x, name: x) if now.temperature == 1.0 else \
        (lambda x, name: torch.mul(x, inv_t, out=ws.get(name, rows)))
    log_p = torch.log_softmax(scaled(teacher, "p"), dim=-1, out=ws.get("p", rows))
    log_q = torch.log_softmax(scaled(student, "q_t"), dim=-1, out=ws.get("q_t", rows))
    value, q, total = fused(log_p, log_q, now.objective, out, ws.get("diff", rows), ws.get("masked", rows))
    total = out.sum(-1) if total is None else total
    out.addcmul_(q, total[:, None], value=-1.0)  # dD/dz = u - q sum(u)
    return KDGradient(value, grad=out, grad_scale=now.kd_scale * inv_t,
                      student_probs=q if now.temperature == 1.0 else None)


def sparse_forward_kl(student, rows: SparseRows, now: StepObjective, ws: Workspace) -> KDGradient:
    """KL(p_S || q_T): the teacher renormalised over its kept tokens, the student over the whole
    vocabulary (as the paper's code did); dD/ds = (c/T) (q_T - p), p zero outside S."""
    inv_t = 1.0 / now.temperature
    log_p = tempered_categories(rows, now.temperature, tail_bucket=False)
    p = log_p.exp()
    z = torch.mul(student, inv_t, out=ws.get("kd", student.shape[0]))
    lse_z = torch.logsumexp(z, dim=-1, keepdim=True)
    log_q = z.gather(1, rows.indices) - lse_z
    value = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    grad = softmax_into(z, z).scatter_add_(1, rows.indices, -p).mul_(now.kd_scale * inv_t)
    return KDGradient(value, grad=grad)


def sparse_divergence(student, rows: SparseRows, now: StepObjective, ws: Workspace,
                      full_student: bool = False) -> KDGradient:
    """Any divergence over the kept tokens, the student either with a tail category, or
    renormalised over the kept tokens too (so every divergence is finite), or (`full_student`,
    forward KL's convention) its whole-vocabulary log-probabilities at the kept tokens."""
    inv_t = 1.0 / now.temperature
    log_p = tempered_categories(rows, now.temperature, now.objective.tail_bucket)
    kept = torch.isfinite(rows.logprobs)
    index = torch.where(kept, rows.indices, rows.indices[:, :1])  # dropped columns point at a kept token
    z = student * inv_t
    if now.objective.tail_bucket:
        def student_side(z_):
            lse = torch.logsumexp(z_, dim=-1, keepdim=True)
            log_tail = torch.logsumexp(z_.scatter(1, index, NEG_INF), dim=-1, keepdim=True) - lse
            return torch.cat([(z_.gather(1, index) - lse).masked_fill(~kept, LOG_FLOOR), log_tail], dim=-1)
        to_vocab = tail_bucket_to_vocab(z, index)
    elif full_student:
        def student_side(z_):
            return (z_.gather(1, index) - torch.logsumexp(z_, dim=-1, keepdim=True)).masked_fill(~kept, LOG_FLOOR)

        def to_vocab(u, log_q):
            return torch.softmax(z, dim=-1).mul_(-u.sum(-1, keepdim=True)).scatter_add_(1, index, u)
    else:
        def student_side(z_):
            return torch.log_softmax(z_.gather(1, index).masked_fill(~kept, LOG_FLOOR), dim=-1)

        def to_vocab(u, log_q):
            return torch.zeros_like(z).scatter_add_(1, index, u - log_q.exp() * u.sum(-1, keepdim=True))
    value, grad_z = divergence_and_gradient(log_p, z, now, student_side, to_vocab)
    out = ws.get("kd", student.shape[0])
    torch.mul(grad_z, now.kd_scale * inv_t, out=out)
    return KDGradient(value, grad=out)


def tail_bucket_to_vocab(z, index):
    """dD/dz from u = q dD/dq over (kept tokens, tail): u_j - q_j sum(u) on kept tokens and
    q_j (u_tail / q_tail - sum(u)) on every other token (each is part of the tail)."""
    def to_vocab(u, log_q):
        total = u.sum(-1, keepdim=True)
        q_tail = log_q[:, -1:].exp()
        d_tail = torch.where(q_tail > 0, u[:, -1:] / q_tail.clamp(min=torch.finfo(q_tail.dtype).tiny), 0.0)
        grad = torch.softmax(z, dim=-1).mul_(d_tail - total)
        return grad.scatter_add_(1, index, u[:, :-1] - log_q[:, :-1].exp() * d_tail)
    return to_vocab


def vocabulary_categories(u, log_q):
    """dD/dz = u - q sum(u) when the categories are the vocabulary itself."""
    return u - log_q.exp() * u.sum(-1, keepdim=True)


def divergence_and_gradient(log_p, z, now: StepObjective, student_side, to_vocab=vocabulary_categories):
    """(value per row, dD/dz) for student log-probs `student_side(z)` over the categories of log_p.

    The closed form where the divergence has one (`to_vocab` maps u = q dD/dq back to the
    vocabulary through the softmax Jacobian); otherwise autograd through `student_side`.
    """
    kernel, params = now.objective.entry.kernel, now.objective
    with torch.no_grad():
        log_q = student_side(z)
        value, u = kernel(log_p, log_q, params)
    if u is not None:
        return value, to_vocab(u, log_q)
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        value, _ = kernel(log_p, student_side(leaf), params)
        (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


# ----------------------------------------------------------------------------- one chunk


def softmax_into(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """softmax(source) written into `target` (which may alias `source` on the CPU)."""
    if target.data_ptr() == source.data_ptr() and source.device.type != "cpu":
        target.copy_(torch.softmax(source, dim=-1))  # aliasing is verified for the CPU kernel only
    else:
        torch.softmax(source, dim=-1, out=target)
    return target


def log_normalizer(row_max: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row from its max and its softmax: lse = max - log(max prob)."""
    return row_max - torch.log(probs.amax(dim=-1))


def chunk_terms(student, teacher, labels, now: StepObjective, grad_out, ws: Workspace):
    """(summed CE, summed KD divergence) over valid rows; d(total)/d(student) (unscaled) into grad_out.

    `grad_out` may alias `student`, which is then consumed. Rows with label < 0 get no gradient.
    """
    eps = now.objective.label_smoothing
    safe_labels = labels.clamp(min=0).unsqueeze(1)
    student_at_label = student.gather(1, safe_labels).squeeze(1)
    student_mean = student.mean(dim=-1) if eps > 0 else None
    kd = kd_term(student, teacher, now, ws) if teacher is not None else None
    student_max = student.amax(dim=-1)
    if kd is not None and kd.student_probs is not None:
        q = grad_out.copy_(kd.student_probs)  # consumes `student` when grad_out aliases it
    else:
        q = softmax_into(student, grad_out)
    lse = log_normalizer(student_max, q)
    ce_rows = lse - student_at_label
    if kd is not None and kd.plus_student_lse:
        kd.value = kd.value + lse
    if eps > 0:
        ce_rows = (1 - eps) * ce_rows + eps * (lse - student_mean)
    combine_gradient(grad_out, kd, safe_labels, now)
    valid = labels >= 0
    if grad_out.is_cuda:  # no host sync: mask every row
        grad_out.mul_(valid.unsqueeze(1))
    elif not bool(valid.all()):
        grad_out[~valid] = 0
    ce_sum = (ce_rows * valid).sum()
    kd_sum = (kd.value * valid).sum() if kd is not None else ce_sum.new_zeros(())
    return ce_sum, kd_sum


def combine_gradient(q: torch.Tensor, kd: KDGradient | None, safe_labels, now: StepObjective) -> None:
    """In place: q (the student softmax) -> w_ce (q - (1-eps) onehot - eps/V) + w_kd dKD/ds."""
    w_ce, w_kd, eps = now.ce_weight, now.kd_weight, now.objective.label_smoothing
    if kd is not None and kd.minus_p is not None:
        q.mul_(w_ce + w_kd).sub_(kd.minus_p, alpha=w_kd)
    elif kd is not None and kd.minus_index is not None:
        q.mul_(w_ce + w_kd).scatter_add_(1, kd.minus_index, torch.full(kd.minus_index.shape, -w_kd, dtype=q.dtype,
                                                                        device=q.device))
    else:
        q.mul_(w_ce)
        if kd is not None:
            q.add_(kd.grad, alpha=w_kd * kd.grad_scale)
    if eps > 0:
        q.sub_(w_ce * eps / q.shape[-1])
    q.scatter_add_(1, safe_labels, torch.full(safe_labels.shape, -w_ce * (1 - eps), dtype=q.dtype, device=q.device))
