"""Where runs and sweeps keep their files: the one place their names are spelled.

    runs/NAME/                   a run directory (`run_dir`, else runs/<name>)
        config.yaml              the resolved config (written once the run's checks have passed)
        .lock                    held by the one process that trains the run (its pid inside)
        launch.yaml              the config a multi-process run was launched with (sweeps)
        metrics.jsonl            one line per logged step; tensorboard/ beside it
        checkpoints/step_NNNNNNNN/   resumable checkpoints (`distillab.checkpoint`)
        final/                   the trained model (an HF directory); final/eval.json its evaluation
        summary.json             says the run is done
        sft-HASH/                a sweep's SFT stage of the run (another run directory)
        status.json, worker.log  a sweep's record of the run and its worker's output

    SWEEP/                       a sweep directory
        plan.json                the grid and every planned run (`distillab sweep`)
        .lock                    held by the one sweep process working in it
        runs/ID/                 each run's directory (as above)
        results.csv (.parquet), summary.json, report.md, report.html, *.png   the report
        submitit/                the cluster executor's files
        demo_state.json, demo.json   a demo's rounds so far, and its result
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from distillab.files import stable_hash

RUNS = Path("runs")  # where a run without run_dir lives, and a sweep's runs
LOCK = ".lock"
SUMMARY = "summary.json"
EVAL = "eval.json"  # beside a model's files: its evaluation
STEP = re.compile(r"^step_(\d{8})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class RunLayout:
    """The files of one run directory."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def launch(self) -> Path:
        return self.path / "launch.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def step(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def evaluation(self) -> Path:
        return self.final / EVAL

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def status(self) -> Path:
        return self.path / "status.json"

    @property
    def worker_log(self) -> Path:
        return self.path / "worker.log"

    def sft(self, stage: dict) -> "RunLayout":
        """A sweep's SFT stage of this run (the grid's `sft` values): another stage is another run."""
        return RunLayout(self.path / f"sft-{stable_hash(stage)[:12]}")


@dataclass(frozen=True)
class SweepLayout:
    """The files of one sweep directory."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    def run(self, run_id: str) -> RunLayout:
        return RunLayout(self.path / RUNS / run_id)

    @property
    def results_csv(self) -> Path:
        return self.path / "results.csv"

    @property
    def results_parquet(self) -> Path:
        return self.path / "results.parquet"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    @property
    def submitit(self) -> Path:
        return self.path / "submitit"

    @property
    def demo_state(self) -> Path:
        return self.path / "demo_state.json"

    @property
    def demo_result(self) -> Path:
        return self.path / "demo.json"
