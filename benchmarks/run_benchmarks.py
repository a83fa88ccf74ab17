"""Run the `distillab bench` matrix recorded in benchmarks/README.md.

    python benchmarks/run_benchmarks.py [--out benchmarks/results/cpu.json] [--steps 10]

Each pair runs in its own process (one at a time: they use every core), and a markdown table
of the results is printed for the README.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PAIRS = [
    ("cpu-1m", "cpu-1m"),
    ("cpu-1m", "cpu-3m"),
    ("cpu-3m", "cpu-1m"),
    ("cpu-3m", "cpu-3m"),
    ("cpu-10m", "cpu-3m"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cpu.json")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    results = []
    for student, teacher in PAIRS:
        command = [
            sys.executable, "-m", "distillab.cli", "bench", "--model", student, "--teacher", teacher,
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
            "--vocab-size", str(args.vocab_size), "--json",
        ]
        print("running:", " ".join(command[3:]), file=sys.stderr)
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("| student | teacher | plain loop tok/s | lm_step tok/s | lm / plain | teacher fwd tok/s | kd_step tok/s "
          "| kd / (lm + teacher) | lm GFLOP/s | matmul ceiling |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['model']} | {r['teacher']} | {r['plain_step']['tokens_per_s']:,.0f} | "
            f"{r['lm_step']['tokens_per_s']:,.0f} | {r['lm_vs_plain']:.2f}x | "
            f"{r['teacher_forward']['tokens_per_s']:,.0f} | {r['kd_step']['tokens_per_s']:,.0f} | "
            f"{r['kd_overhead']:.3f} | {r['lm_step']['gflops']:.0f} | {r['matmul_gflops']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
