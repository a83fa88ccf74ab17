"""A small sweep with the teacher cache and without: wall time and FLOPs side by side.

    python benchmarks/cache_sweep.py [--out benchmarks/results/cache_sweep.json]

One teacher (cpu-3m), students cpu-1m at top-64 forward KL, alpha x 3, two seeds: the same
grid run twice in fresh sweep directories, `kd.cache: auto` (one cache for the teacher,
captured by the first student, read by all six) and `kd.cache: off` (the teacher runs for every
student). One worker with every core; the teacher is trained in each sweep (identical work in
both), so the difference is the students' teacher passes against one capture. FLOPs are the
sweep's own estimate (`distillab sweep --dry-run`), counting the teacher's inference once for
the cached sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from distillab.sweep import compute_summary, load_grid, plan, run_sweep


def grid(cache: str) -> dict:
    return {
        "name": f"cache-{cache}",
        "base": {"data": {"corpus": {"source": "packaged", "name": "shakespeare"}, "tokenizer": {"vocab_size": 4096},
                          "validation_fraction": 0.08},
                 "train": {"batch_size": 16, "seq_len": 256, "lr": 3.0e-3, "eval_every": 1000, "log_every": 20,
                           "checkpoint_every": 1000}},
        "teachers": {"models": ["cpu-3m"], "tokens": [131_072], "seeds": [42]},
        "students": {"models": ["cpu-1m"], "tokens": [65_536], "seeds": [43, 44]},
        "kd": {"alpha": [0.2, 0.5, 0.8], "top_k": [64], "other": {"cache": [cache]}},
        "eval": {"sets": ["validation"], "tasks": [], "max_windows": 8},
    }


def run(cache: str, root: Path) -> dict:
    path = root / f"{cache}.yaml"
    path.write_text(yaml.safe_dump(grid(cache)))
    spec = load_grid(path)
    runs = plan(spec, root / cache)
    summary = compute_summary(runs, spec)
    started = time.perf_counter()
    status = run_sweep(spec, root / cache, workers=1, log=lambda *a: None)
    seconds = time.perf_counter() - started
    losses = {}
    for r in runs:
        if r.role == "student":
            result = json.loads((Path(r.config["run_dir"]) / "summary.json").read_text())
            losses[f"alpha={r.config['kd']['alpha']} seed={r.config['train']['init_seed']}"] = \
                result["eval"]["validation"]["loss"]
    return {"cache": cache, "wall_seconds": seconds, "status": sorted(set(status.values())),
            "flops": summary["flops"], "total_flops": summary["total_flops"], "student_losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cache_sweep.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(cache, Path(tmp)) for cache in ("off", "auto")]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("| kd.cache | wall | teacher inference PFLOP | total PFLOP |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['cache']} | {r['wall_seconds']:.0f} s | {r['flops']['teacher_inference'] / 1e15:.4f} | "
              f"{r['total_flops'] / 1e15:.4f} |")
    off, auto = results
    worst = max(abs(off["student_losses"][k] - auto["student_losses"][k]) for k in off["student_losses"])
    print(f"largest student held-out loss difference, cached vs online: {worst:.5f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
