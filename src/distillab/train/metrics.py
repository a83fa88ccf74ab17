"""What a run logs while it trains: one sink, several writers.

    metrics.jsonl   one JSON object per logged step (always; the source of truth)
    tensorboard/    TensorBoard event files (`tensorboard --logdir runs/`), when train.tensorboard
    Weights & Biases  when train.wandb_project is set and `wandb` is installed

TensorBoard and W&B see the row's keys grouped: `train/<key>` for the training values (loss, ce,
kd, lr, ...), `eval/<set>/{loss,ppl}` as they are. TensorBoard also gets the run's results config
(flat keys, as hashed into its id) as hparams, once, when the run starts. A W&B run's id is a
uuid made once per run directory (`wandb_id`), so a resume continues it and two runs that share a
name never merge.

A logged row holds the averages over the steps since the previous row (loss, ce, kd, and for
an online teacher its entropy and the student-teacher top-1 agreement), the values in force
at that step (lr, alpha, temperature, grad_norm) and the throughput. On resume the log is cut
back to the checkpoint's step, and the partial averaging window is restored with the
checkpoint, so a resumed run logs exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import uuid
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
                 run_name: str = "", config: dict | None = None, log=print, eval_sets: tuple = ("validation",)):
        files = RunLayout(run_dir)
        self.path = files.metrics
        truncate_jsonl(self.path, resume_step)
        self.handle = open(self.path, "a")
        self.tensorboard = self.open_tensorboard(files.tensorboard, resume_step) if tensorboard else None
        if self.tensorboard is not None and resume_step == 0:
            write_hparams(self.tensorboard, config or {}, ["train/loss", *(f"eval/{s}/loss" for s in eval_sets)])
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
                          id=wandb_id(run_dir))

    def write(self, row: dict) -> None:
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()
        step = row["step"]
        scalars = {tag(key): value for key, value in row.items()
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


def tag(key: str) -> str:
    """A row key's TensorBoard / W&B tag: grouped keys (`eval/validation/loss`) as they are, the
    training values under `train/`."""
    return key if "/" in key else f"train/{key}"


def hparam_value(value):
    """A config value as TensorBoard's hparams take it: numbers, strings and bools as they are,
    anything else (lists, mappings) as its JSON text."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value, sort_keys=True)


def write_hparams(writer, config: dict, metric_tags: list[str]) -> None:
    """The run's flat config as hparams in the writer's own directory (beside its scalars, so the
    hparams dashboard shows `metric_tags` of this run as its metrics)."""
    from torch.utils.tensorboard.summary import hparams

    values = {key: hparam_value(value) for key, value in sorted(config.items()) if value is not None}
    for summary in hparams(values, {name: 0.0 for name in metric_tags}):
        writer.file_writer.add_summary(summary)
    writer.flush()


def wandb_id(run_dir: Path) -> str:
    """The run's W&B id: a uuid made the first time and kept in the run directory, so a resumed run
    continues its W&B run and another run, even under the same name, never joins it."""
    path = RunLayout(run_dir).wandb_id
    if not path.is_file():
        write_text_atomic(path, uuid.uuid4().hex + "\n")
    return path.read_text().strip()


class NoMetrics:
    """What processes other than the main one log: nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass
