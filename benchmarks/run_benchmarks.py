"""Run the `distillab bench` matrices recorded in benchmarks/README.md.

    python benchmarks/run_benchmarks.py [--out benchmarks/results/cpu.json] [--steps 10]
    python benchmarks/run_benchmarks.py --objectives [--out benchmarks/results/cpu_objectives.json]

The first matrix times the LM and forward-KL KD steps of five student/teacher pairs; the second
times one pair (cpu-3m student, cpu-1m teacher) with every fused divergence and with the
teacher's top-64 held in memory as a cache hands it to the loss. Each bench runs in its own
process (one at a time: they use every core), and a markdown table is printed for the README.
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
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "hard"]


def bench(args, student: str, teacher: str, *extra: str) -> dict:
    command = [sys.executable, "-m", "distillab.cli", "bench", "--model", student, "--teacher", teacher,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--vocab-size", str(args.vocab_size), "--json", *extra]
    print("running:", " ".join(command[3:]), file=sys.stderr)
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def pairs_table(results: list[dict]) -> None:
    print("| student | teacher | plain loop tok/s | lm_step tok/s | lm / plain | teacher fwd tok/s | kd_step tok/s "
          "| kd / (lm + teacher) | lm GFLOP/s | matmul ceiling |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['teacher']} | {r['plain_step']['tokens_per_s']:,.0f} | "
              f"{r['lm_step']['tokens_per_s']:,.0f} | {r['lm_vs_plain']:.2f}x | "
              f"{r['teacher_forward']['tokens_per_s']:,.0f} | {r['kd_step']['tokens_per_s']:,.0f} | "
              f"{r['kd_overhead']:.3f} | {r['lm_step']['gflops']:.0f} | {r['matmul_gflops']:.0f} |")


def objectives_table(results: list[dict]) -> None:
    print("| divergence | lm_step ms | teacher fwd ms | kd_step ms | kd / (lm + teacher) | cached kd_step ms "
          "(top-64) | cached / lm |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        cached = r.get("cached_kd_step")
        print(f"| {r['divergence']} | {r['lm_step']['seconds'] * 1e3:.1f} | {r['teacher_forward']['seconds'] * 1e3:.1f} "
              f"| {r['kd_step']['seconds'] * 1e3:.1f} | {r['kd_overhead']:.3f} | "
              f"{cached['seconds'] * 1e3 if cached else float('nan'):.1f} | {r.get('cached_overhead', float('nan')):.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--objectives", action="store_true", help="every divergence and the cached signal, one pair")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    if args.objectives:
        results = [bench(args, "cpu-3m", "cpu-1m", "--divergence", d, *(["--cached-k", "64"] if d != "hard" else []))
                   for d in DIVERGENCES]
        out = Path(args.out or "benchmarks/results/cpu_objectives.json")
    else:
        results = [bench(args, student, teacher) for student, teacher in PAIRS]
        out = Path(args.out or "benchmarks/results/cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    (objectives_table if args.objectives else pairs_table)(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
