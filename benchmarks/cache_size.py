"""Teacher cache size per token, and what the compact coding's rounding costs a student.

    python benchmarks/cache_size.py [--out benchmarks/results/cache_size.json] [--threads N]

Real text (the `english-mix` corpus: Shakespeare, State of the Union, Brown; npm), a byte-level
BPE of 32,768 trained on its training split, sequences of 128. A `cpu-0.3m` teacher with
32,768 output rows is trained on 262,144 tokens; its top-64 is captured with both codings over
the windows two students read, and the bytes per token are measured from the files. Two
identical `cpu-27k` students (same seeds, kd.top_k = 64, α = 0.5) then train from the compact and
from the float32 cache; their held-out losses are compared. A second teacher with 128,256
output rows over the same tokenizer (rows beyond 32,768 unused, as a model padded to the
Llama-3 vocabulary would have them) gives the size at that width.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from distillab.cache.capture import capture_teacher_cache
from distillab.cache.store import TeacherCache
from distillab.config import config_from_dict
from distillab.train import train

K = 64
STUDENT_TOKENS = 131_072
QUIET = {"log": lambda *a: None}


def run_config(root: Path, name: str, model: str, tokens: int, threads: int, **extra) -> dict:
    return {"name": name, "run_dir": str(root / name),
            "data": {"corpus": {"source": "packaged", "name": "english-mix"}, "tokenizer": {"vocab_size": 32768},
                     "validation_fraction": 0.04},
            "model": {"name": model, **extra.pop("model", {})},
            "train": {"token_budget": tokens, "batch_size": 32, "seq_len": 128, "lr": 3e-3, "threads": threads,
                      "eval_every": 10_000, "log_every": 10, "checkpoint_every": 10_000},
            "eval": {"max_windows": 64, "sets": ["validation"]}, **extra}


def bytes_per_token(path: Path) -> float:
    return TeacherCache.open(path).manifest["bytes_per_token"]


def measure(root: Path, threads: int) -> dict:
    result = {"top_k": K, "tokenizer_vocab": 32768}
    started = time.perf_counter()
    teacher = train(config_from_dict(run_config(root, "teacher", "cpu-0.3m", 262_144, threads,
                                                model={"vocab_size": 32768})), **QUIET)
    wide = train(config_from_dict(run_config(root, "teacher-128k", "cpu-0.3m", 131_072, threads,
                                             model={"vocab_size": 128256})), **QUIET)
    result["teacher_loss"] = teacher.eval["validation"]["loss"]
    student = config_from_dict(run_config(root, "probe", "cpu-27k", STUDENT_TOKENS, threads,
                                          kd={"teacher": str(teacher.final_dir), "alpha": 0.5, "top_k": K}))
    readers = [(student.train.data_seed, STUDENT_TOKENS // 128)]
    for rows, model in ((32768, teacher), (128256, wide)):
        for coding in ("compact", "float32"):
            out = root / f"cache-{rows}-{coding}"
            capture_teacher_cache(model.final_dir, student, K, out=out, coding=coding, readers=readers,
                                  threads=threads, **QUIET)
            result[f"bytes_per_token_{rows}_{coding}"] = bytes_per_token(out)
    for coding in ("compact", "float32"):
        run = train(config_from_dict(run_config(root, f"student-{coding}", "cpu-27k", STUDENT_TOKENS, threads,
                                                kd={"teacher": str(teacher.final_dir), "alpha": 0.5, "top_k": K,
                                                    "cache": str(root / f"cache-32768-{coding}")})), **QUIET)
        result[f"student_loss_{coding}"] = run.eval["validation"]["loss"]
    result["student_loss_difference"] = result["student_loss_compact"] - result["student_loss_float32"]
    result["seconds"] = time.perf_counter() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cache_size.json")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.threads)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for rows in (32768, 128256):
        print(f"top-{K} at {rows:,} rows: compact {result[f'bytes_per_token_{rows}_compact']:.1f} B/token, "
              f"float32 {result[f'bytes_per_token_{rows}_float32']:.1f} B/token")
    print(f"students from compact / float32: {result['student_loss_compact']:.4f} / "
          f"{result['student_loss_float32']:.4f} nats (difference {result['student_loss_difference']:+.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
