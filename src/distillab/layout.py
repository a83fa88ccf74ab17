"""Where runs and sweeps keep their files: the one place their names are spelled.

    runs/NAME/                   a run directory (`run_dir`, else runs/<name>)
        config.yaml              the resolved config (written once the run's checks have passed)
        .lock                    held by the one process that trains the run (its pid inside)
        launch.yaml              the config a multi-process run was launched with (sweeps)
        metrics.jsonl            one line per logged step; tensorboard/ beside it
        wandb_id                 the run's Weights & Biases id (a uuid, made once: a resume keeps it)
        checkpoints/step_NNNNNNNN/   resumable checkpoints (`distillab.checkpoint`)
        final/                   the trained model (an HF directory); final/eval.json its evaluation
        export/step_NNNNNNNN/    HF models of step checkpoints (`distillab export`)
        summary.json             says the run is done
        sft-HASH/                a sweep's SFT stage of the run (another run directory)
        analysis/                a sweep's analysis of a student (eval.analysis): analysis.json, .md
        status.json, worker.log  a sweep's record of the run and its worker's output

    SWEEP/                       a sweep directory
        plan.json                the grid and every planned run (`distillab sweep`)
        .lock                    held by the one sweep process working in it
        runs/ID/                 each run's directory (as above)
        results.csv (.parquet), summary.json, report.md, report.html, *.png   the report
        submitit/                the cluster executor's files
        demo_state.json, demo.json   a demo's rounds so far, and its result
        scaling.json             one size of `distillab demo --scaling`: its wall time and rounds
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
ANALYSIS = "analysis.json"  # in an analysis directory (`distillab analyze`): its result
STEP = re.compile(r"^step_(\d{8})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def entry(*names: str) -> property:
    """A path inside the directory: `path / names...`."""
    return property(lambda self: self.path.joinpath(*names))


@dataclass(frozen=True)
class Directory:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))


class RunLayout(Directory):
    """The files of one run directory."""

    config = entry("config.yaml")
    lock = entry(LOCK)
    launch = entry("launch.yaml")
    metrics = entry("metrics.jsonl")
    tensorboard = entry("tensorboard")
    wandb_id = entry("wandb_id")
    checkpoints = entry("checkpoints")
    final = entry("final")
    evaluation = entry("final", EVAL)
    summary = entry(SUMMARY)
    status = entry("status.json")
    worker_log = entry("worker.log")
    analysis = entry("analysis")
    analysis_result = entry("analysis", ANALYSIS)

    def step(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def exported(self, step: int) -> Path:
        """The HF model of a step checkpoint (`distillab export`)."""
        return self.path / "export" / step_name(step)

    def sft(self, stage: dict) -> "RunLayout":
        """A sweep's SFT stage of this run (the grid's `sft` values): another stage is another run."""
        return RunLayout(self.path / f"sft-{stable_hash(stage)[:12]}")


class SweepLayout(Directory):
    """The files of one sweep directory."""

    plan = entry("plan.json")
    summary = entry(SUMMARY)
    lock = entry(LOCK)
    results_csv = entry("results.csv")
    results_parquet = entry("results.parquet")
    report = entry("report.md")
    report_html = entry("report.html")
    submitit = entry("submitit")
    demo_state = entry("demo_state.json")
    demo_result = entry("demo.json")
    scaling_result = entry("scaling.json")
    runs = entry(RUNS)

    def run(self, run_id: str) -> RunLayout:
        return RunLayout(self.path / RUNS / run_id)
