"""One optimizer step: micro-batches -> teacher signal -> student -> objective -> backward -> update.

Each micro-batch's loss is weighted by its share of the step's target tokens (over all
processes), so accumulation and data parallelism give the gradient of the global batch's mean
loss. The teacher runs before the student: its transient activations are freed before the
student's forward allocates the ones it keeps for backward (measured faster on the CPU).

When batch x sequence x vocabulary is large (`HEAD_FUSION_ELEMENTS`), the student's and an
online teacher's logits are never materialised: the loss takes their final hidden states and
output layers and projects chunk by chunk (`distillab.losses.Head`). Under FSDP the output
layer's weight is taken after the forward pass, while the root unit holds it gathered (it stays
gathered until backward, `distillab.train.fsdp`); its gradient then goes through FSDP's own
reduce-scatter like every other parameter's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from distillab.data.loader import Batch, model_inputs
from distillab.losses import Head, SparseTeacher, objective_loss
from distillab.losses.objective import KDObjective
from distillab.runtime import autocast, is_sharded
from distillab.train.guard import NonFiniteGuard

# Above this many logits per micro-batch (1 GiB of fp32) the LM head is fused into the loss.
HEAD_FUSION_ELEMENTS = 1 << 28
# Another threshold for this process (tests, and rehearsals of runs whose full-size logits are fused).
HEAD_FUSION_ENV = "DISTILLAB_HEAD_FUSION_ELEMENTS"
PLAIN_HEAD_MODELS = {"llama", "qwen2", "qwen3", "mistral"}


@dataclass
class StepResult:
    loss: float
    ce: float
    kd: float
    grad_norm: float
    targets: int
    updated: bool
    teacher_entropy: float | None = None
    top1_agreement: float | None = None

    def terms(self) -> dict:
        return {"loss": self.loss, "ce": self.ce, "kd": self.kd, "grad_norm": self.grad_norm}


def fuse_head(model, batch: Batch) -> bool:
    """Whether the student's logits would be large enough to fuse its output layer into the loss."""
    config, output = model.config, model.get_output_embeddings()
    plain = config.model_type in PLAIN_HEAD_MODELS and output is not None
    threshold = int(os.environ.get(HEAD_FUSION_ENV, HEAD_FUSION_ELEMENTS))
    return plain and batch.inputs.numel() * config.vocab_size >= threshold


def student_output(stepper, model, batch: Batch, head: bool):
    """The student's logits, or its final hidden states with its output layer (`head`). The output
    layer's weight is read after the forward pass: under FSDP it is then the gathered weight."""
    if not head:
        return stepper(**model_inputs(batch)).logits
    out = stepper(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
    weight = model.get_output_embeddings().weight
    if is_sharded(weight):
        raise RuntimeError("the output layer is still sharded after the forward pass; its FSDP root unit must keep "
                           "its parameters gathered until backward (distillab.train.fsdp)")
    return Head(out.hidden_states[-1], weight)


def train_step(stepper, optimizer: torch.optim.Optimizer, batches: list[Batch], objective: KDObjective, teacher,
               parallel, *, step: int, steps: int, grad_clip: float, precision: str = "float32",
               guard: NonFiniteGuard | None = None, diagnostics: bool = False) -> StepResult:
    """One optimizer step at 0-based `step` of `steps`; returns the step's (process-reduced) numbers."""
    device = parallel.device
    model = parallel.unwrap(stepper)
    local_targets = sum(b.targets for b in batches)
    step_targets = int(parallel.all_reduce_sum([float(local_targets)])[0])
    sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    diag = None
    for index, batch in enumerate(batches):
        batch = batch.to(device)
        head = fuse_head(model, batch)
        teacher_out = teacher.signal(batch, head=head) if teacher is not None else None
        with parallel.micro_batch(stepper, last=index == len(batches) - 1):
            with autocast(device, precision):
                student = student_output(stepper, model, batch, head)
            if diagnostics and index == 0 and isinstance(teacher_out, (torch.Tensor, SparseTeacher)) and not head:
                diag = distribution_diagnostics(student.detach(), teacher_out, batch.labels)
            out = objective_loss(student, teacher_out, batch.labels, objective, step, steps, overwrite_logits=True)
            share = out.n_tokens / max(step_targets, 1)
            (out.total * (share * parallel.loss_scale)).backward()
        for key, value in (("loss", out.total.detach()), ("ce", out.ce), ("kd", out.kd)):
            sums[key] += float(value) * share
        del student, teacher_out, out
    loss, ce, kd = parallel.all_reduce_sum([sums["loss"], sums["ce"], sums["kd"]])
    grad_norm = parallel.grad_norm(stepper, grad_clip)
    result = StepResult(loss, ce, kd, grad_norm, step_targets, True, *(diag or (None, None)))
    result.updated = guard.check_step(step + 1, result.terms()) if guard is not None else True
    if result.updated:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result


@torch.no_grad()
def distribution_diagnostics(student: torch.Tensor, teacher, labels: torch.Tensor, chunk: int = 256):
    """(teacher entropy in nats, top-1 agreement of student and teacher), over target positions,
    computed in chunks of rows so no second batch x seq x vocab tensor is made."""
    valid = (labels.reshape(-1) >= 0)
    s = student.reshape(-1, student.shape[-1])
    entropy = agree = 0.0
    for start in range(0, s.shape[0], chunk):
        rows = slice(start, start + chunk)
        mask = valid[rows]
        if isinstance(teacher, SparseTeacher):
            log_p = teacher.logprobs.reshape(-1, teacher.logprobs.shape[-1])[rows].float()
            top1 = teacher.indices.reshape(-1, teacher.indices.shape[-1])[rows, 0]
        else:
            log_p = torch.log_softmax(teacher.reshape(-1, teacher.shape[-1])[rows].float(), dim=-1)
            top1 = log_p.argmax(-1)
        row_entropy = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)
        entropy += float((row_entropy * mask).sum())
        agree += float(((s[rows].argmax(-1) == top1) & mask).sum())
    n = max(int(valid.sum()), 1)
    return entropy / n, agree / n
