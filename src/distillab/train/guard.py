"""No silently wrong model: non-finite values stop a run before they are saved.

Every step's loss terms and gradient norm are checked, and the weights before every
checkpoint and before the final model. A non-finite value under `train.nonfinite: stop` ends
the run with a one-line error naming the step and the term, keeping the last good checkpoint
and writing neither `final` nor a done summary. Under `skip:N` the step's update is dropped
(its batch is consumed, the schedule moves on) at most N times in the run; the next one stops it.
"""

from __future__ import annotations

import math

import torch

from distillab.errors import DistillabError
from distillab.models import nonfinite_parameter


class NonFiniteError(DistillabError):
    """A run produced a non-finite loss, gradient or weight."""


def first_nonfinite(values: dict) -> str | None:
    """The first key of `values` whose value is NaN or infinite."""
    for key, value in values.items():
        if value is not None and not math.isfinite(value):
            return key
    return None


class NonFiniteGuard:
    def __init__(self, policy: str, skipped: int = 0):
        self.limit = 0 if policy == "stop" else int(policy.split(":", 1)[1])
        self.skipped = skipped

    def check_step(self, step: int, terms: dict) -> bool:
        """True when the step may update the weights; False to skip it; raises when the run must stop.

        `step` is 1-based (the step being completed). `terms`: ce, kd, loss, grad_norm (already
        reduced over processes, so every process decides alike).
        """
        bad = first_nonfinite(terms)
        if bad is None:
            return True
        what = {"grad_norm": "the gradient norm", "ce": "the CE term", "kd": "the KD term",
                "loss": "the loss"}.get(bad, bad)
        if self.skipped < self.limit:
            self.skipped += 1
            return False
        advice = "lower train.lr or check the teacher and the data; the last good checkpoint is kept, and a rerun " \
                 "resumes from it"
        skipped = f" after skipping {self.skipped} step(s) (train.nonfinite=skip:{self.limit})" if self.limit else ""
        raise NonFiniteError(f"training diverged at step {step}: {what} is {terms[bad]}{skipped}; {advice}")

    @staticmethod
    def check_weights(step: int, model: torch.nn.Module, when: str) -> None:
        name = nonfinite_parameter(model)
        if name is not None:
            raise NonFiniteError(f"training diverged by step {step}: weight {name} holds non-finite values, so the "
                                 f"{when} is not written; lower train.lr (the last good checkpoint is kept)")
