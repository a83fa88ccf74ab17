"""What a run logs while it trains: one sink, several writers.

    metrics.jsonl   one JSON object per logged step (always; the source of truth)
    tensorboard/    TensorBoard event files (`tensorboard --logdir runs/`), when train.tensorboard
    Weights & Biases  when train.wandb_project is set and `wandb` is installed

A logged row holds the averages over the steps since the previous row (loss, ce, kd, and for
an online teacher its entropy and the student-teacher top-1 agreement), the values in force
at that step (lr, alpha, temperature, grad_norm) and the throughput. On resume the log is cut
back to the checkpoint's step, and the partial averaging window is restored with the
checkpoint, so a resumed run logs exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
from pathlib import Path

from distillab.files import write_text_atomic
from distillab.layout import RunLayout

AVERAGED = ("loss", "ce", "kd", "teacher_entropy", "top1_agreement")


class LogWindow:
    """Sums over the steps since the last logged row."""

    def __init__(self, state: dict | None = None):
        self.sums = {key: 0.0 for key in AVERAGED}
        self.counts = {key: 0 for key in AVERAGED}
        self.steps = self.tokens = 0
        self.seconds = 0.0
        if state:
            self.load_state_dict(state)

    def add(self, values: dict, tokens: int, seconds: float) -> None:
        for key in AVERAGED:
            if values.get(key) is not None:
                self.sums[key] += values[key]
                self.counts[key] += 1
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds

    def row(self) -> dict:
        """The averages, then reset."""
        out = {key: self.sums[key] / self.counts[key] for key in AVERAGED if self.counts[key]}
        out["tokens_per_s"] = self.tokens / self.seconds if self.seconds > 0 else 0.0
        self.__init__()
        return out

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "steps": self.steps, "tokens": self.tokens,
                "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        if "sums" not in state:  # checkpoints written before teacher metrics were logged
            state = {"sums": {k: state.get(k, 0.0) for k in ("loss", "ce", "kd")},
                     "counts": {k: state.get("steps", 0) for k in ("loss", "ce", "kd")}, **state}
        self.sums.update(state["sums"])
        self.counts.update(state["counts"])
        self.steps, self.tokens, self.seconds = state["steps"], state["tokens"], state["seconds"]


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop rows past `last_step` (and a row cut short by a crash, with all after it)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            break
    write_text_atomic(path, "".join(line + "\n" for line in kept))


class MetricsSink:
    """Writes each logged row to metrics.jsonl, TensorBoard and (if asked) Weights & Biases."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool = True, wandb_project: str | None = None,
                 run_name: str = "", config: dict | None = None, log=print):
        files = RunLayout(run_dir)
        self.path = files.metrics
        truncate_jsonl(self.path, resume_step)
        self.handle = open(self.path, "a")
        self.tensorboard = self.open_tensorboard(files.tensorboard, resume_step) if tensorboard else None
        self.wandb = self.open_wandb(wandb_project, run_name, config, Path(run_dir), log) if wandb_project else None

    @staticmethod
    def open_tensorboard(folder: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step > 0 else None)
        return writer

    @staticmethod
    def open_wandb(project: str, name: str, config: dict | None, run_dir: Path, log):
        try:
            import wandb
        except ImportError:
            log("warning: train.wandb_project is set but wandb is not installed (pip install wandb); logging to "
                "metrics.jsonl and TensorBoard only")
            return None
        return wandb.init(project=project, name=name, config=config, dir=str(run_dir), resume="allow",
                          id=name.replace("/", "-"))

    def write(self, row: dict) -> None:
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()
        step = row["step"]
        scalars = {key: value for key, value in row.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class NoMetrics:
    """What processes other than the main one log: nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass
