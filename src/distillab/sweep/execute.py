"""Executing a planned sweep: runs in dependency order on local workers or through submitit.

Each run lives in SWEEP/runs/<id>/ with a status.json (pending, running, done, failed with
its error, blocked, attempts). Rerunning a sweep skips done runs, resumes interrupted ones from
their checkpoints, leaves failed ones alone unless asked to retry them, and marks the students
of a failed teacher blocked without stopping unrelated runs. One process drives a sweep
directory at a time (an exclusive lock). Local workers (and the torchrun they start) die with
the process that started them (`die_with_parent`), so a killed driver leaves no run training on
unseen and holding its lock.

With an SFT stage (`sft:` in the grid) a run is done once its final model has also been
fine-tuned (SWEEP/runs/<id>/sft-<stage hash>/) and evaluated, downstream tasks in the chat template; a done
run whose stage changed since is taken up again (its pretraining and evaluations are reused).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

import yaml

from distillab.config import config_from_dict, merge
from distillab.errors import DataError, DistillabError
from distillab.files import exclusive_lock, stable_hash, write_json_atomic
from distillab.layout import RunLayout, SweepLayout
from distillab.sweep.eta import Clock, minutes
from distillab.sweep.grid import GridSpec, sft_stage_values
from distillab.sweep.plan import Run, compute_summary, plan


def read_status(sweep_dir: Path, run_id: str) -> dict:
    path = SweepLayout(sweep_dir).run(run_id).status
    if not path.exists():
        return {"status": "pending"}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"status": "pending"}


def write_status(sweep_dir: Path, run_id: str, **fields) -> None:
    path = SweepLayout(sweep_dir).run(run_id).status
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = read_status(sweep_dir, run_id)
    write_json_atomic(path, {**previous, **fields, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def first_line(exc: BaseException) -> str:
    message = str(exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


def execute_run(sweep_dir: str | Path, run_id: str, threads: int | None = None, launcher=None) -> dict:
    """Train (or resume) one run of a planned sweep, then evaluate it. Runs in a worker process (on
    every node of a multi-node run: the other nodes only start their share of the processes).
    A run on several processes is launched with torchrun, or with `launcher(config values) -> final
    directory` when given (a rehearsal's processes, started once: `distillab.sweep.rehearse`)."""
    from distillab.capture import capture_for_run

    sweep_dir = Path(sweep_dir)
    planned = read_plan(sweep_dir)
    run = next(r for r in planned["runs"] if r["id"] == run_id)
    settings = planned["eval"]
    nodes = run["config"].get("train", {}).get("nodes", 1)
    if nodes > 1 and node_placement(nodes)[0] != 0:
        train_with_torchrun(run["config"], run["config"]["train"]["processes"], nodes, run_id)
        if planned.get("sft"):  # the stage's processes on this node, if it spans nodes too
            values = sft_stage_values(planned["sft"], run["config"])
            if values["train"].get("nodes", 1) > 1:
                train_with_torchrun(values, values["train"]["processes"], values["train"]["nodes"], f"{run_id}-sft",
                                    verb="sft")
        return {"id": run_id, "status": "node"}
    attempts = read_status(sweep_dir, run_id).get("attempts", 0) + 1
    write_status(sweep_dir, run_id, status="running", attempts=attempts, pid=os.getpid(), error=None)
    try:
        config_values = merge(run["config"], {"train": {"threads": threads}} if threads else {})
        if run["info"].get("teacher_cache"):
            capture_for_run(config_from_dict(config_values), run["info"]["teacher_cache"])
        final_dir = launch(config_values, run_id, launcher)
        sft_final = fine_tune(config_values, planned["sft"], run_id, threads, launcher) if planned.get("sft") else None
        evaluate_stages(final_dir, sft_final, settings, threads)
    except BaseException as exc:  # recorded, then re-raised for the executor
        write_status(sweep_dir, run_id, status="failed", error=f"{type(exc).__name__}: {first_line(exc)}",
                     traceback=traceback.format_exc()[-4000:])
        raise
    write_status(sweep_dir, run_id, status="done", error=None, sft_stage=stage_key(planned.get("sft")))
    return {"id": run_id, "status": "done"}


def stage_key(stage: dict | None) -> str | None:
    """What a done run's SFT stage was (None without one)."""
    return stable_hash(stage) if stage else None


def launch(config_values: dict, run_id: str, launcher=None, verb: str = "train") -> Path:
    """Train one config (`verb`: train, or sft for an SFT run's values) and return its final directory:
    on its processes with `launcher` (a rehearsal's gang) or torchrun, or in this process when it
    has one (or is itself one of a launched run's processes)."""
    from distillab.train import train

    config = config_from_dict(config_values)
    if config.train.processes > 1 and launcher is not None:
        return launcher(config_values)
    if config.train.processes > 1 and "WORLD_SIZE" not in os.environ:
        return train_with_torchrun(config_values, config.train.processes, config.train.nodes, run_id, verb=verb)
    return train(config).final_dir


def fine_tune(run_config: dict, stage: dict, run_id: str, threads: int | None = None, launcher=None) -> Path:
    """The SFT stage of one run: `distillab sft` from its final model into its `RunLayout.sft` directory,
    on the run's own processes (`sft_stage_values`); returns the fine-tuned model's directory."""
    values = merge(sft_stage_values(stage, run_config), {"train": {"threads": threads}} if threads else {})
    return launch(values, f"{run_id}-sft", launcher, verb="sft")


def evaluate_stages(final_dir: Path, sft_final: Path | None, settings: dict, threads: int | None) -> None:
    """Evaluate a run's final model and its fine-tuned one (downstream tasks in the chat template) once
    every stage has trained: the other nodes of a run over several go on to the SFT stage at once and
    wait for no evaluation on this one."""
    from distillab.evaluate.run import evaluate_checkpoint

    common = dict(tasks=settings["tasks"], limit=settings["limit"], max_windows=settings["max_windows"],
                  threads=threads, batch_size=settings.get("batch_size", 8))
    evaluate_checkpoint(final_dir, settings["sets"], seq_len=settings["seq_len"], **common)
    if sft_final is not None:
        evaluate_checkpoint(sft_final, settings["sets"], chat_template=bool(settings["tasks"]), **common)


def torchrun_command(launch: Path, processes: int, nodes: int = 1, node_rank: int = 0, endpoint: str | None = None,
                     run_id: str = "distillab", verb: str = "train") -> list[str]:
    """The torchrun command of one node of a run: `--standalone` on one node; on several, this node's
    share of the processes joining the others through a c10d rendezvous at `endpoint`."""
    if nodes == 1:
        where = ["--standalone", "--nproc_per_node", str(processes)]
    else:
        where = ["--nnodes", str(nodes), "--node_rank", str(node_rank), "--nproc_per_node", str(processes // nodes),
                 "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", run_id]
    return [sys.executable, "-m", "torch.distributed.run", *where, "-m", "distillab.cli", verb, str(launch)]


RENDEZVOUS_PORT = 29400


def node_placement(nodes: int) -> tuple[int, str]:
    """(this node's rank, the rendezvous host:port) of a run over `nodes` nodes: under Slurm from the
    job (SLURM_NODEID, the first host of SLURM_JOB_NODELIST), else from DISTILLAB_NODE_RANK and
    DISTILLAB_RDZV_ENDPOINT set on each node."""
    port = int(os.environ.get("DISTILLAB_RDZV_PORT", RENDEZVOUS_PORT))
    if "DISTILLAB_NODE_RANK" in os.environ and "DISTILLAB_RDZV_ENDPOINT" in os.environ:
        return int(os.environ["DISTILLAB_NODE_RANK"]), os.environ["DISTILLAB_RDZV_ENDPOINT"]
    if "SLURM_NODEID" in os.environ and "SLURM_JOB_NODELIST" in os.environ:
        if int(os.environ.get("SLURM_JOB_NUM_NODES", nodes)) != nodes:
            raise DistillabError(f"train.nodes is {nodes} but the Slurm job has {os.environ['SLURM_JOB_NUM_NODES']} "
                                 f"nodes; submit it with nodes={nodes}")
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        return int(os.environ["SLURM_NODEID"]), f"{hosts[0]}:{port}"
    raise DistillabError(f"train.nodes is {nodes}: a run over several nodes is started on each of them: sweep with "
                         "--executor slurm (one task per node), or set DISTILLAB_NODE_RANK and DISTILLAB_RDZV_ENDPOINT "
                         "(host:port of node 0) on every node")


def train_with_torchrun(config_values: dict, processes: int, nodes: int = 1, run_id: str = "distillab",
                        verb: str = "train") -> Path:
    """Train one run (`distillab VERB` on its launch file: train, or sft) on `processes` data-parallel
    workers: of this machine (GPUs, or CPU processes), or this node's share of them when the run
    spans `nodes` nodes."""
    files = RunLayout(config_values["run_dir"])
    files.path.mkdir(parents=True, exist_ok=True)
    launch = files.launch
    node_rank, endpoint = node_placement(nodes) if nodes > 1 else (0, None)
    if node_rank == 0:
        launch.write_text(yaml.safe_dump(config_values, sort_keys=False))
    elif not launch.is_file():  # node 0 writes it (a shared file system): wait for it
        deadline = time.time() + 600
        while not launch.is_file() and time.time() < deadline:
            time.sleep(1)
    command = torchrun_command(launch, processes, nodes, node_rank, endpoint, run_id, verb)
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=die_with_parent)
    sys.stdout.write(done.stdout[-20000:])
    if done.returncode != 0:
        raise DistillabError(f"torchrun ({processes} processes) failed: {cause_line(done.stderr)}")
    return files.final


def read_plan(sweep_dir: Path) -> dict:
    """A planned sweep's plan.json: its grid, evaluation and SFT settings, and every run."""
    path = SweepLayout(sweep_dir).plan
    if not path.exists():
        raise DataError(f"{path}: not found; run `distillab sweep GRID --out {sweep_dir}` first")
    return json.loads(path.read_text())


def cause_line(stderr: str) -> str:
    """The line of a failed command's stderr that says why: distillab's own one-line error when there
    is one (torchrun and interpreter shutdown print their reports and warnings after it), else the
    last line that is not a warning."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("distillab: error:")]
    if ours:
        return ours[0].removeprefix("distillab: error:").strip()
    plain = [line for line in lines if "warning" not in line.lower() and "warnings.warn" not in line]
    return (plain or lines or ["no output"])[-1]


# prctl(2) option: the signal this process gets when its parent dies (Linux).
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere nothing). A run
    killed this way resumes from its last checkpoint; its lock goes with it. Called first thing in a
    worker (`parent`: the pid that started it, to catch a parent that died before the call)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def write_plan(spec: GridSpec, runs: list[Run], sweep_dir: Path) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(SweepLayout(sweep_dir).plan, {
        "name": spec.name,
        "spec": dataclasses.asdict(spec),
        "eval": dataclasses.asdict(spec.eval),
        "sft": spec.sft,
        "runs": [{"id": r.id, "role": r.role, "depends_on": r.depends_on, "info": r.info, "config": r.config}
                 for r in runs],
    })


def check_requirements(spec: GridSpec) -> None:
    """Optional dependencies the grid needs, checked before any run starts."""
    if spec.eval.tasks and importlib.util.find_spec("lm_eval") is None:
        raise DistillabError("eval.tasks: downstream tasks need lm-evaluation-harness, which is not installed; "
                             "pip install 'distillab[eval]' (or drop eval.tasks)")


def initial_status(runs: list[Run], sweep_dir: Path, retry_failed: bool, stage: dict | None = None) -> dict:
    """Each run's status at the start: running (a dead sweep's) and blocked (decided again) -> pending;
    failed -> pending on retry; done with another SFT stage than the grid's `stage` -> pending (only
    the stage is redone)."""
    status = {}
    for run in runs:
        recorded = read_status(sweep_dir, run.id)
        state = recorded.get("status", "pending")
        if state in ("running", "blocked") or (state == "failed" and retry_failed):
            state = "pending"
        if state == "done" and stage and recorded.get("sft_stage") != stage_key(stage):
            state = "pending"
        status[run.id] = state
    return status


def run_sweep(spec: GridSpec, sweep_dir: str | Path, workers: int = 1, executor: str = "local",
              retry_failed: bool = False, slurm: dict | None = None, log=print,
              pool: "LocalWorkers | None" = None, cache_decisions: list | None = None,
              clock: Clock | None = None) -> dict:
    """Execute every unfinished run in dependency order, then the analysis stage; return {run id:
    final status}. After each finished run it logs n/N runs done and the time left (`clock`; by
    default predicted from the grid's `cpu_gflops` and corrected by the runs that finished).

    `pool`: local workers to use (and leave running) instead of starting new ones, e.g. across the
    rounds of a study that extends its grid; `clock`: a study's clock over all its rounds.
    `cache_decisions`: see `distillab.sweep.plan.plan`.
    """
    if workers < 1:
        raise DistillabError(f"--workers: must be >= 1, got {workers}")
    check_requirements(spec)
    sweep_dir = Path(sweep_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(SweepLayout(sweep_dir).lock, f"sweep directory {sweep_dir}"):
        runs = plan(spec, sweep_dir, cache_decisions)
        write_plan(spec, runs, sweep_dir)
        status = initial_status(runs, sweep_dir, retry_failed, spec.sft)
        done_before = sum(s == "done" for s in status.values())
        if done_before:
            log(f"sweep: {done_before} of {len(runs)} runs already done; skipping them")
        if clock is None:
            clock = grid_clock(spec, runs, status, workers)
            if done_before < len(runs):
                log(f"sweep: {len(runs) - done_before} runs to do, about {minutes(clock.seconds_left())} on "
                    f"{workers} worker(s) at the grid's cpu_gflops = {spec.cpu_gflops:g} (corrected as runs finish)")
        threads = max(1, (os.cpu_count() or 1) // workers)
        if pool is not None:
            submit = pool
        elif executor == "local":
            submit = LocalWorkers(sweep_dir, threads, workers)
        else:
            submit = submitit_submitter(sweep_dir, executor, threads, slurm or {})
        try:
            drive(runs, status, submit, workers, sweep_dir, log, clock)
        finally:
            if submit is not pool and hasattr(submit, "close"):
                submit.close()
        analyse_students(spec, runs, status, sweep_dir, log)
    counts = {s: sum(v == s for v in status.values()) for s in ("done", "failed", "blocked", "pending")}
    log("sweep: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return status


def matched_baseline(student: Run, runs: list[Run]) -> Run | None:
    """The student's matched baseline: the same model, budget and seed, no teacher (added by the planner)."""
    key = (student.info["model"], student.info["tokens"], student.info["seed"])
    return next((r for r in runs if r.role == "baseline" and "baseline_kind" not in r.info
                 and (r.info["model"], r.info["tokens"], r.info["seed"]) == key), None)


def analyse_students(spec: GridSpec, runs: list[Run], status: dict, sweep_dir: Path, log) -> None:
    """The grid's analysis stage (`eval.analysis`): each done student beside its teacher and its matched
    baseline (`distillab analyze`), into SWEEP/runs/<id>/analysis/ (analysis.json and .md; the plots
    are `distillab analyze`'s); done ones are kept."""
    from distillab.evaluate.analysis import analyze_checkpoints

    stage = spec.eval.analysis
    if stage is None:
        return
    for run in runs:
        layout = SweepLayout(sweep_dir).run(run.id)
        baseline = matched_baseline(run, runs) if run.role == "student" else None
        if run.role != "student" or status[run.id] != "done" or layout.analysis_result.exists():
            continue
        models = [f"student={RunLayout(run.config['run_dir']).final}", f"teacher={run.config['kd']['teacher']}"]
        if baseline is not None and status[baseline.id] == "done":
            models.append(f"baseline={RunLayout(baseline.config['run_dir']).final}")
        try:
            analyze_checkpoints(models, None, None, stage.set, stage.seq_len, stage.max_windows, str(layout.analysis),
                                stage.batch_size, "auto", plots=False, log=log, dtype=stage.dtype)
        except DistillabError as exc:
            log(f"sweep: analysis of {run.id} failed: {first_line(exc)}")
            status[run.id] = "failed"
            write_status(sweep_dir, run.id, status="failed", error=f"analysis: {first_line(exc)}")


def grid_clock(spec: GridSpec, runs: list[Run], status: dict, workers: int) -> Clock:
    """A clock over the grid's runs, predicted at the grid's `cpu_gflops` (FLOPs / rate); runs this
    invocation will not start (done, or failed without --retry-failed) count as finished."""
    per_run = compute_summary(runs, spec)["per_run"]
    return Clock({r.id: per_run[r.id]["hours"] * 3600 for r in runs}, workers,
                 done={r.id for r in runs if status[r.id] != "pending"})


def drive(runs: list[Run], status: dict, submit, workers: int, sweep_dir: Path, log, clock: Clock) -> None:
    """Start runs whose dependencies are done, up to `workers` at once, until none can start."""
    in_flight: dict[str, object] = {}
    while True:
        for run in runs:
            if status[run.id] != "pending" or run.id in in_flight:
                continue
            dependencies = [status[d] for d in run.depends_on]
            if any(d in ("failed", "blocked") for d in dependencies):
                status[run.id] = "blocked"
                write_status(sweep_dir, run.id, status="blocked", error="its teacher failed")
                clock.finish(run.id)
                log(f"sweep: {run.name} blocked: its teacher failed")
            elif all(d == "done" for d in dependencies) and len(in_flight) < workers:
                log(f"sweep: starting {run.name} ({run.id})")
                clock.start(run.id)
                in_flight[run.id] = submit(run.id)
        if not in_flight:
            return
        for run_id in wait_any(in_flight):
            ok = in_flight.pop(run_id).succeeded()
            status[run_id] = "done" if ok else "failed"
            clock.finish(run_id)
            if ok:
                log(f"sweep: {run_id} done; {clock.line()}")
                continue
            error = read_status(sweep_dir, run_id).get("error") or "worker exited with an error"
            write_status(sweep_dir, run_id, status="failed", error=error)
            log(f"sweep: {run_id} failed: {error}; {clock.line()}")


def run_logged(sweep_dir: str, run_id: str, threads: int, launcher=None) -> None:
    """execute_run in a pool worker, its output appended to the run's worker.log."""
    import contextlib
    import logging

    log_path = SweepLayout(sweep_dir).run(run_id).worker_log
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        handler = logging.StreamHandler(handle)
        logging.getLogger().addHandler(handler)
        try:
            execute_run(sweep_dir, run_id, threads, launcher)
        finally:
            logging.getLogger().removeHandler(handler)


class LocalWorkers:
    """A pool of long-lived worker processes, each training and evaluating runs one after another.

    Workers import torch, transformers and lm-eval once, not once per run (measured ~9 s a run
    here). A worker that dies (killed, out of memory) fails the runs it had and the pool is
    started afresh for the rest.
    """

    def __init__(self, sweep_dir: Path, threads: int, workers: int):
        self.sweep_dir, self.threads, self.workers = Path(sweep_dir).resolve(), threads, workers
        self.pool = self.start()

    @classmethod
    def for_workers(cls, sweep_dir: Path, workers: int) -> "LocalWorkers":
        """`workers` processes sharing the machine's cores evenly."""
        return cls(sweep_dir, max(1, (os.cpu_count() or 1) // workers), workers)

    def start(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        os.environ.setdefault("DISTILLAB_PROGRESS", "0")
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=die_with_parent, initargs=(os.getpid(),))

    def __call__(self, run_id: str) -> Job:
        from concurrent.futures.process import BrokenProcessPool

        try:
            future = self.pool.submit(run_logged, str(self.sweep_dir), run_id, self.threads)
        except BrokenProcessPool:
            self.pool = self.start()
            future = self.pool.submit(run_logged, str(self.sweep_dir), run_id, self.threads)
        return Job(future)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Job:
    """A submitted run: a concurrent.futures Future (local workers) or a submitit Job."""

    def __init__(self, handle):
        self.handle = handle

    def done(self) -> bool:
        return self.handle.done()

    def succeeded(self) -> bool:
        try:
            self.handle.result()
            return True
        except Exception:  # the worker recorded its error in status.json
            return False


def submitit_submitter(sweep_dir: Path, executor: str, threads: int, slurm: dict):
    try:
        import submitit
    except ImportError:
        raise DistillabError("--executor slurm needs submitit: pip install 'distillab[cluster]'") from None
    folder = SweepLayout(sweep_dir).submitit
    if executor == "submitit-local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=int(slurm.get("timeout_min", 24 * 60)))
    else:
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        ex.update_parameters(**{"timeout_min": 24 * 60, "cpus_per_task": threads, **slurm})

    def submit(run_id: str) -> Job:
        run = next(r for r in read_plan(sweep_dir)["runs"] if r["id"] == run_id)
        if executor != "submitit-local":  # a run over N nodes: one task per node, each starting torchrun
            ex.update_parameters(nodes=run["config"].get("train", {}).get("nodes", 1), tasks_per_node=1)
        return Job(ex.submit(execute_run, str(sweep_dir), run_id, threads))
    return submit


# submitit's jobs offer no wait-for-any: they are polled this often
SUBMITIT_POLL_SECONDS = 0.5


def wait_any(in_flight: dict) -> list[str]:
    """The ids of the jobs that have finished, once at least one has: local workers' futures
    through `concurrent.futures.wait`, submitit's jobs by polling."""
    futures = [job.handle for job in in_flight.values() if isinstance(job.handle, Future)]
    while True:
        finished = [run_id for run_id, job in in_flight.items() if job.done()]
        if finished:
            return finished
        if len(futures) == len(in_flight):
            wait(futures, return_when=FIRST_COMPLETED)
        else:
            time.sleep(SUBMITIT_POLL_SECONDS)
