"""Sampled teacher signals: per position, m token ids drawn from the teacher, kept as the distinct
ids with their counts (Anshumann et al., ACL 2025, "Sparse Logit Sampling").

The draws come from the proposal r = softmax(log p / tau) (tau = `kd.proposal_temperature`,
r = p at tau = 1), m of them with replacement; with counts c(x) the estimate

    p_hat(x) = c(x) / m * p(x) / r(x),    log r(x) = log p(x) / tau - log Z,  Z = sum_x p(x)^(1/tau)

is unbiased for p(x) at every token (`distillab.losses.sampled` turns it into the forward-KL
gradient). tau > 1 spreads the draws over more of the tail, tau < 1 concentrates them; either
way the weights keep the estimate unbiased, only its variance changes.

The draws of a window come from a generator seeded by its window id (`window_generator`), so a
window gets the same draws whenever it is read: online, in a capture (the `sampled` cache
coding), in every epoch and after a resume.
"""

from __future__ import annotations

import numpy as np
import torch

from distillab.cache.coding import DrawnRows
from distillab.data.loader import Batch
from distillab.losses import SampledTeacher

# Mixed into every window's generator seed (a fixed constant: draws depend on the window only).
DRAW_SEED = 0x5A3D_11C7


def window_generator(window_id: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one window's draws: a pure function of its id."""
    mixed = (int(window_id) * 0x9E3779B97F4A7C15 + DRAW_SEED) % (1 << 63)
    return torch.Generator(device=device).manual_seed(mixed)


def draw(logits: torch.Tensor, window_ids, samples: int, proposal_temperature: float = 1.0) -> DrawnRows:
    """Logits [windows * seq, V] (the windows' rows back to back) -> the distinct drawn ids per row,
    their counts, the teacher's T = 1 log-probs at them and log Z of the proposal (0 at tau = 1)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    seq = logits.shape[0] // len(window_ids)
    if proposal_temperature == 1.0:
        proposal, log_z = log_p.exp(), torch.zeros(log_p.shape[0])
    else:
        log_z = torch.logsumexp(log_p / proposal_temperature, dim=-1)
        proposal = torch.softmax(log_p / proposal_temperature, dim=-1)
    drawn = torch.cat([torch.multinomial(proposal[i * seq:(i + 1) * seq], samples, replacement=True,
                                         generator=window_generator(w, "cpu" if proposal.device.type == "cpu"
                                                                    else proposal.device))
                       for i, w in enumerate(window_ids)])
    ids, counts = distinct_with_counts(drawn)
    logprobs = log_p.gather(1, ids).masked_fill(counts == 0, 0.0)
    return DrawnRows(ids.cpu().numpy(), counts.cpu().numpy(), logprobs.cpu().numpy(), log_z.float().cpu().numpy())


def distinct_with_counts(drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws [rows, m] -> (distinct ids [rows, S] ascending, counts [rows, S]); padding: id 0, count 0."""
    values, _ = drawn.sort(dim=-1)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    slot = starts.long().cumsum(-1) - 1
    width = int(slot.max()) + 1
    ids = torch.zeros((values.shape[0], width), dtype=torch.long, device=values.device)
    counts = torch.zeros_like(ids)
    ids.scatter_(1, slot, values)
    counts.scatter_add_(1, slot, torch.ones_like(values))
    return ids, counts


def estimate(rows: DrawnRows, samples: int, proposal_temperature: float) -> np.ndarray:
    """p_hat per stored id [n, S] (0 on padding) from counts, log p and log Z."""
    weights = rows.counts.astype(np.float64) / samples
    if proposal_temperature != 1.0:
        log_ratio = rows.logprobs * (1.0 - 1.0 / proposal_temperature) + rows.log_z[:, None]
        weights = weights * np.exp(log_ratio)
    return weights.astype(np.float32)


def to_teacher(rows: DrawnRows, shape: tuple, samples: int, proposal_temperature: float,
               device: torch.device) -> SampledTeacher:
    """Drawn rows of a batch [batch * seq rows] as the loss's `SampledTeacher` [batch, seq, S]."""
    width = rows.ids.shape[1]
    weights = estimate(rows, samples, proposal_temperature)
    return SampledTeacher(torch.from_numpy(rows.ids).view(*shape, width).to(device),
                          torch.from_numpy(weights).view(*shape, width).to(device),
                          torch.from_numpy(rows.logprobs).view(*shape, width).to(device))


class SampledOnlineTeacher:
    """An online teacher whose distribution reaches the loss as m draws per position."""

    def __init__(self, teacher, samples: int, proposal_temperature: float = 1.0):
        self.teacher, self.samples, self.proposal_temperature = teacher, samples, proposal_temperature
        self.model = teacher.model
        self.description = f"{teacher.description} sampled {samples}" + (
            f" at tau {proposal_temperature:g}" if proposal_temperature != 1.0 else "")

    def inference_flops_per_token(self) -> float:
        return self.teacher.inference_flops_per_token()

    def signal(self, batch: Batch, head: bool = False) -> SampledTeacher:
        logits = self.teacher.signal(batch)
        size, seq = batch.inputs.shape
        rows = draw(logits.reshape(size * seq, -1), batch.window_ids.tolist(), self.samples,
                    self.proposal_temperature)
        return to_teacher(rows, (size, seq), self.samples, self.proposal_temperature, batch.inputs.device)
