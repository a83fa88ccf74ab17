"""The GPU check: every figure of the GPU targets measured in one process and written to one JSON.

    python benchmarks/gpu_check.py --out gpu_check.json            (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_check.py --out /tmp/x.json --smoke       (tiny models on the CPU: checks the
                                                                    script itself, its figures mean nothing)

Figures (each with its target and whether it was met):

    bench         `distillab bench` of the 0.7B student (llama-0.7b) with the online 1.7B teacher
                  (llama-1.7b) in bf16 at sequence 4,096, vocabulary 128,256, batch 4: MFU of the KD
                  step (student training + teacher forward FLOPs over the GPU's dense bf16 peak,
                  target >= 0.40), LM step vs a plain loop over the same model (>= 1.0x), KD step /
                  (LM step + teacher forward) (<= 1.05), the memory plan of that layout vs the
                  measured peak (within +-15 %)
    checkpoint    the 0.7B student built on the meta device and materialised on the GPU (FSDP2 on a
                  world of one), one AdamW step, then the sharded (DCP) checkpoint: save seconds (all
                  of it: shards, trainer state, sha256 manifest), the blocking part of an async save,
                  load seconds (verify + read + re-lay), the streamed HF export seconds, bytes
    gpu tests     `pytest -m gpu tests/test_gpu.py` (fused loss vs float64 on the GPU, FSDP2's bf16
                  policy, compiled blocks, the memory plan of a smaller pair): passed / failed
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGETS = {"mfu_kd": (">=", 0.40), "lm_vs_plain": (">=", 1.0), "kd_overhead": ("<=", 1.05),
           "memory_plan_over_peak": ("within", 0.15)}


def judged(name: str, value: float | None) -> dict:
    kind, bound = TARGETS[name]
    if value is None:
        return {"value": None, "target": f"{kind} {bound}", "met": None}
    met = value >= bound if kind == ">=" else value <= bound if kind == "<=" else abs(value - 1) <= bound
    return {"value": value, "target": f"{kind} {bound}" if kind != "within" else f"1 +- {bound}", "met": bool(met)}


def bench_figures(smoke: bool) -> dict:
    from distillab.bench import run_bench

    if smoke:
        shape = dict(model="cpu-1m", teacher="cpu-3m", batch_size=2, seq_len=64, steps=2, warmup=1, vocab_size=512,
                     device="cpu", precision="float32")
    else:
        shape = dict(model="llama-0.7b", teacher="llama-1.7b", batch_size=4, seq_len=4096, steps=8, warmup=3,
                     vocab_size=128_256, device="cuda", precision="bfloat16")
    result = run_bench(**shape, log=lambda *a: print(*a, file=sys.stderr))
    plan, peak = result.get("memory_plan_gib"), result.get("peak_memory_gib")
    return {"shape": shape, "raw": result,
            "mfu_kd": judged("mfu_kd", result["kd_step"].get("mfu")),
            "mfu_lm": result["lm_step"].get("mfu"),
            "lm_vs_plain": judged("lm_vs_plain", result["lm_vs_plain"]),
            "kd_overhead": judged("kd_overhead", result["kd_overhead"]),
            "memory_plan_gib": plan, "peak_memory_gib": peak,
            "memory_plan_over_peak": judged("memory_plan_over_peak", plan / peak if plan and peak else None)}


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def checkpoint_figures(smoke: bool, work: Path) -> dict:
    """Save, async-save, load and export seconds of the student's sharded checkpoint."""
    from distillab.checkpoint import load_trainer_state
    from distillab.data.loader import Batch
    from distillab.models import resolve_spec
    from distillab.config import ModelConfig, TrainConfig
    from distillab.losses.objective import KDObjective
    from distillab.train.checkpointer import Checkpointer
    from distillab.train.fsdp import FullySharded
    from distillab.train.schedule import make_optimizer
    from distillab.train.step import train_step
    from distillab.train.world import start_process_group

    device = torch.device("cpu" if smoke else "cuda")
    name, vocab, seq = ("cpu-1m", 512, 64) if smoke else ("llama-0.7b", 128_256, 512)
    start_process_group(device)
    parallel = FullySharded(device, 0, 1, precision="float32" if smoke else "bfloat16")
    built = time.perf_counter()
    stepper = parallel.build_model(resolve_spec(ModelConfig(name=name)), vocab, seq, 42, 0)
    build_seconds = time.perf_counter() - built
    optimizer = make_optimizer(stepper, TrainConfig(lr=1e-4))
    window = torch.randint(0, vocab, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    train_step(stepper, optimizer, [Batch(window[:, :-1], window[:, 1:], torch.arange(1))], KDObjective(), None,
               parallel, step=0, steps=1, grad_clip=1.0)
    state = {"step": 1, "tokens": seq, "sequences": 1, "log_window": {}, "skipped_steps": 0}
    sync, background = Checkpointer(parallel), Checkpointer(parallel, async_save=True)
    figures = {"model": name, "parameters": sum(p.numel() for p in stepper.parameters()),
               "meta_init_seconds": build_seconds}
    figures["save_seconds"] = timed(lambda: sync.save(work / "step_1", stepper, optimizer, state, stepper, None, {}))
    figures["checkpoint_bytes"] = sum(p.stat().st_size for p in (work / "step_1").rglob("*") if p.is_file())
    figures["async_save_blocking_seconds"] = timed(lambda: background.save(work / "step_2", stepper, optimizer, state,
                                                                           stepper, None, {}))
    figures["async_save_finish_seconds"] = timed(background.wait)
    figures["load_seconds"] = timed(lambda: (sync.verify(work / "step_1"), sync.load(
        work / "step_1", stepper, optimizer, load_trainer_state(work / "step_1"))))
    figures["export_seconds"] = timed(lambda: sync.write_final(work / "final", stepper, None, {}))
    figures["save_gb_per_s"] = figures["checkpoint_bytes"] / figures["save_seconds"] / 1e9
    parallel.close()
    return figures


def gpu_tests(smoke: bool) -> dict:
    if smoke:
        return {"skipped": "smoke run on the CPU"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           "tests/test_gpu.py"], capture_output=True, text=True, timeout=240)
    return {"returncode": done.returncode, "summary": (done.stdout.strip().splitlines() or [""])[-1],
            "seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default=None, help="scratch directory for checkpoints (removed afterwards)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (checks the script only)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="distillab-gpu-check-"))
    started = time.perf_counter()
    report = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "torch": torch.__version__, "smoke": args.smoke}
    for part, run in (("bench", lambda: bench_figures(args.smoke)),
                      ("checkpoint", lambda: checkpoint_figures(args.smoke, work)),
                      ("gpu_tests", lambda: gpu_tests(args.smoke))):
        part_started = time.perf_counter()
        try:
            report[part] = run()
        except Exception as exc:  # one failing part still leaves the others' figures
            report[part] = {"error": f"{type(exc).__name__}: {str(exc).strip()[:500]}"}
        report[part]["part_seconds"] = time.perf_counter() - part_started
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"gpu_check: {part} done ({report[part]['part_seconds']:.0f} s)", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    report["wall_seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
