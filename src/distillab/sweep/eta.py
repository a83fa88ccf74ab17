"""How long a sweep will take: predicted seconds per run, n/N runs done and an ETA while it runs.

A run's predicted seconds come from its FLOPs (training, plus the teacher's forward passes for a
student) at a rate: the grid's `cpu_gflops` for a plain sweep, or a rate measured on this machine
(`measure_rate`: a few timed training steps, seconds) with the fixed per-run work of the time
model below (`run_seconds`). While the sweep runs, `Clock` corrects the prediction by what the
finished runs took: the predicted seconds of the runs still to come (and of the rest of those in
flight), times actual / predicted seconds of the runs finished so far, scheduled on the workers.

Nothing here enters a result: the clock only prints. (The study's stopping rule never reads it.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# The time model of one run of the demo's kind (model build, training, checkpoints, evaluation with
# lm-eval; one single-thread run beside another): seconds = FIXED_SECONDS + FLOPs / rate, with rate
# the FLOP/s of the student's training step measured in-process (`measure_rate`). Fitted on the
# project's 2-core machine over 21 runs of the default demo's shapes (13-55 s each): the fixed part
# 5.7 s, the FLOPs coefficient 0.99 of the measured rate, residual sd 2.5 s. The fixed part is the
# project machine's; the clock corrects both parts by the runs that finish.
FIXED_SECONDS = 5.7


def measure_rate(model: str, vocab_size: int, batch_size: int, seq_len: int, steps: int = 8) -> float:
    """FLOP/s of one training step (alpha = 0) of `model` at this shape, one thread, on this machine:
    the median of `steps` timed steps after 2 warm-up steps (`distillab bench`'s lm_step)."""
    from distillab.bench import run_bench

    result = run_bench(model, batch_size=batch_size, seq_len=seq_len, steps=steps, warmup=2, vocab_size=vocab_size,
                       device="cpu", threads=1, log=lambda *args: None)
    return result["lm_step"]["gflops"] * 1e9


def run_seconds(flops: float, rate: float) -> float:
    """Predicted wall seconds of one run of `flops` (training + teacher inference) at a measured `rate`."""
    return FIXED_SECONDS + flops / rate


def schedule_seconds(seconds: list[float], workers: int, busy: list[float] | None = None) -> float:
    """Wall seconds until runs started in the given order on `workers` workers have finished, each run
    on the first free worker (greedy list scheduling; dependencies are not modelled beyond the order).
    `busy`: seconds the workers still need for the runs they have now."""
    free = sorted((busy or []) + [0.0] * max(0, workers - len(busy or [])))
    for s in seconds:
        free.sort()
        free[0] += s
    return max(free, default=0.0)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


@dataclass
class Clock:
    """n/N runs done and the time left, for the runs of a sweep (or of a study's rounds).

    `predicted`: run id -> predicted seconds of every run counted (done ones included); `later`:
    predicted seconds of runs not planned yet (a study's later rounds, at most), counted in N."""

    predicted: dict[str, float]
    workers: int
    done: set = field(default_factory=set)
    later: list[float] = field(default_factory=list)
    started_at: dict = field(default_factory=dict)
    actual: dict = field(default_factory=dict)  # run id -> seconds it took (runs finished here)

    def add(self, predicted: dict[str, float], later: list[float] | None = None) -> None:
        """Count more runs (a study's next round) and replace the runs expected later."""
        self.predicted.update({k: v for k, v in predicted.items() if k not in self.predicted})
        if later is not None:
            self.later = list(later)

    def start(self, run_id: str, now: float | None = None) -> None:
        self.started_at[run_id] = time.monotonic() if now is None else now

    def finish(self, run_id: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if run_id in self.started_at:
            self.actual[run_id] = now - self.started_at.pop(run_id)
        self.done.add(run_id)

    def correction(self) -> float:
        """Actual over predicted seconds of the runs finished here (1 before any). The first run of each
        worker also paid for its imports, so once later runs have finished only those count."""
        finished = list(self.actual)
        counted = finished[self.workers:] or finished
        predicted = sum(self.predicted.get(k, 0.0) for k in counted)
        return sum(self.actual[k] for k in counted) / predicted if predicted > 0 else 1.0

    def seconds_left(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        factor = self.correction()
        waiting = [self.predicted[k] * factor for k in self.predicted
                   if k not in self.done and k not in self.started_at]
        running = [max(self.predicted.get(k, 0.0) * factor - (now - t), 0.0) for k, t in self.started_at.items()]
        later = [s * factor for s in self.later]
        return schedule_seconds(waiting + later, self.workers, running)

    def line(self, now: float | None = None) -> str:
        """"n/N runs done, about T left"; while later rounds may add runs, "n of at most N ..."."""
        total, left = len(self.predicted) + len(self.later), self.seconds_left(now)
        counted = f"{len(self.done)} of at most {total}" if self.later else f"{len(self.done)}/{total}"
        return f"{counted} runs done" + (f", {'at most ' if self.later else ''}about {minutes(left)} left"
                                          if left > 0 else "")
