"""`distillab bench`: training throughput of the ladder on this machine.

Measures, on random tokens of the given shape:
  - the fp32 matmul ceiling (GFLOP/s of a large square GEMM),
  - `lm_step`: distillab's training step with alpha = 0 (forward, fused CE, backward, clip, AdamW),
  - `plain_step`: the same HF model in a plain PyTorch loop (logits -> F.cross_entropy), the yardstick,
  - `teacher_forward`: the teacher alone under inference mode,
  - `kd_step`: distillab's training step with the online teacher (alpha = 0.5, the chosen divergence
    over the whole vocabulary),
  - `cached_kd_step` (with --cached-k K): the step with the teacher's top-K held in memory, as a cache
    hands it to the loss (the same divergence over the top K, renormalised),
and reports tokens/s, achieved GFLOP/s (model FLOPs per token x tokens/s), MFU against the
device's bf16 dense peak on GPUs, kd_step / (lm_step + teacher_forward) (the overhead of
distillation beyond its two passes) and cached_kd_step / lm_step.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from distillab.config import ModelConfig, TrainConfig
from distillab.data.loader import Batch
from distillab.gpus import GIB, gpu_from_device_name
from distillab.memory import Layout, memory_plan
from distillab.losses import SparseTeacher
from distillab.losses.teacher_rows import truncate_dense
from distillab.models import build_model, resolve_spec
from distillab.losses.objective import KDObjective
from distillab.runtime import autocast, resolve_device, setup_runtime
from distillab.teacher import OnlineTeacher
from distillab.train.parallel import SingleProcess
from distillab.train.schedule import make_optimizer
from distillab.train.step import train_step



def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def device_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    known = gpu_from_device_name(torch.cuda.get_device_name(device))
    return known.bf16_peak_flops if known else None


class StepTimer:
    """Rounds of one call of every step in turn, so drift in the machine's speed touches all alike."""

    def __init__(self, device: torch.device):
        self.device, self.steps, self.flops = device, {}, {}

    def add(self, name: str, fn, flops_per_token: float) -> None:
        self.steps[name], self.flops[name] = fn, flops_per_token

    def run(self, rounds: int, warmup: int) -> dict[str, list[float]]:
        for fn in self.steps.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in self.steps}
        for _ in range(rounds):
            for name, fn in self.steps.items():
                sync(self.device)
                started = time.perf_counter()
                fn()
                sync(self.device)
                times[name].append(time.perf_counter() - started)
        return times


def add_steps(timer: StepTimer, student, optimizer, batch: Batch, teacher, objective: KDObjective, precision: str,
              cached_k: int | None, flops_student: float, flops_teacher: float) -> None:
    device, parallel = batch.inputs.device, SingleProcess(batch.inputs.device)

    def plain_step():
        with autocast(device, precision):
            logits = student(input_ids=batch.inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step_with(signal, kd: KDObjective):
        return lambda: train_step(student, optimizer, [batch], kd, signal, parallel, step=0, steps=1, grad_clip=1.0,
                                  precision=precision)

    timer.add("plain_step", plain_step, flops_student)
    timer.add("lm_step", step_with(None, KDObjective()), flops_student)
    if teacher is None:
        return
    timer.add("teacher_forward", lambda: teacher.signal(batch), flops_teacher)
    timer.add("kd_step", step_with(teacher, objective), flops_student + flops_teacher)
    if cached_k:
        truncated = dataclasses.replace(objective, top_k=cached_k)
        timer.add("cached_kd_step", step_with(MemoryCache(teacher, batch, cached_k), truncated), flops_student)


class MemoryCache:
    """The teacher's top-K of one batch held in memory: what a cached teacher hands the loss."""

    def __init__(self, teacher: OnlineTeacher, batch: Batch, k: int):
        logits = teacher.signal(batch)
        rows = truncate_dense(logits.reshape(-1, logits.shape[-1]).float(), k, None)
        shape = batch.inputs.shape
        self.sparse = SparseTeacher(rows.indices.reshape(*shape, k), rows.logprobs.reshape(*shape, k).half(),
                                    rows.log_tail.reshape(shape))

    def signal(self, batch: Batch, head: bool = False) -> SparseTeacher:
        return self.sparse


def run_bench(model: str, teacher: str | None = None, batch_size: int = 16, seq_len: int = 256, steps: int = 10,
              warmup: int = 3, vocab_size: int = 4096, device: str = "auto", threads: int | None = None,
              precision: str = "float32", divergence: str = "forward_kl", cached_k: int | None = None,
              compile_blocks: bool = False, log=print) -> dict:
    setup_runtime(threads)
    torch_device = resolve_device(device, key="--device")
    student_spec = resolve_spec(ModelConfig(name=model))
    window = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = Batch(window[:, :-1], window[:, 1:], torch.arange(batch_size)).to(torch_device)
    result: dict = {"device": str(torch_device), "machine": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else None,
                    "threads": torch.get_num_threads(), "torch": torch.__version__, "model": model, "teacher": teacher,
                    "batch_size": batch_size, "seq_len": seq_len, "vocab_size": vocab_size, "steps": steps,
                    "precision": precision, "divergence": divergence, "cached_k": cached_k, "compile": compile_blocks,
                    "matmul_gflops": matmul_ceiling(torch_device), "peak_flops": device_peak(torch_device)}
    log(f"bench: fp32 matmul ceiling {result['matmul_gflops']:.0f} GFLOP/s")
    student = build_model(student_spec, vocab_size, seq_len, seed=0, device=torch_device)
    if compile_blocks:
        SingleProcess(torch_device).prepare_model(student, compile_blocks=True)
    optimizer = make_optimizer(student, TrainConfig(batch_size=batch_size, seq_len=seq_len, lr=1e-3))
    signal, flops_teacher = None, 0.0
    if teacher is not None:
        teacher_spec = resolve_spec(ModelConfig(name=teacher))
        signal = OnlineTeacher(build_model(teacher_spec, vocab_size, seq_len, seed=1), vocab_size, torch_device,
                               precision)
        flops_teacher = teacher_spec.forward_flops_per_token(vocab_size, seq_len)
    timer = StepTimer(torch_device)
    objective = KDObjective(alpha=0.5, divergence=divergence)
    add_steps(timer, student, optimizer, batch, signal, objective, precision, cached_k,
              student_spec.training_flops_per_token(vocab_size, seq_len), flops_teacher)
    started = time.perf_counter()
    times = timer.run(steps, warmup)
    result["wall_seconds"] = time.perf_counter() - started
    report(result, timer, times, batch_size * seq_len, log)
    if torch_device.type == "cuda":
        record_memory(result, student_spec, teacher_spec if teacher else None, vocab_size, precision, log)
    return result


def record_memory(result: dict, student, teacher, vocab_size: int, precision: str, log) -> None:
    """Measured peak CUDA memory of the benchmark against the memory plan of the same layout."""
    layout = Layout("ddp", 1, result["batch_size"], result["seq_len"], False, 2 if precision == "bfloat16" else 4)
    plan = memory_plan(student, vocab_size, layout, teacher)
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / GIB
    result["memory_plan_gib"] = plan.total / GIB
    log(f"bench: peak CUDA memory {result['peak_memory_gib']:.1f} GiB; the memory plan says "
        f"{result['memory_plan_gib']:.1f} GiB ({plan.describe()})")


def report(result: dict, timer: StepTimer, times: dict[str, list[float]], tokens: int, log) -> None:
    """Medians per step type and the ratios, into `result` (and the log)."""
    for name, seconds in times.items():
        median = statistics.median(seconds)
        gflops = timer.flops[name] * tokens / median / 1e9
        result[name] = {"seconds": median, "tokens_per_s": tokens / median, "gflops": gflops,
                        "mfu_vs_matmul": gflops / result["matmul_gflops"]}
        if result["peak_flops"]:
            result[name]["mfu"] = gflops * 1e9 / result["peak_flops"]
        log(f"bench: {name:16s} {median * 1000:8.1f} ms/step  {tokens / median:10,.0f} tok/s  {gflops:7.1f} GFLOP/s")
    result["lm_vs_plain"] = result["plain_step"]["seconds"] / result["lm_step"]["seconds"]
    log(f"bench: lm_step is {result['lm_vs_plain']:.3f}x the speed of the plain loop")
    if "kd_step" in times:
        ratios = [k / (l + t) for k, l, t in zip(times["kd_step"], times["lm_step"], times["teacher_forward"])]
        result["kd_overhead"] = statistics.median(ratios)
        log(f"bench: kd_step / (lm_step + teacher_forward) = {result['kd_overhead']:.3f} (median of {len(ratios)})")
    if "cached_kd_step" in times:
        ratios = [c / l for c, l in zip(times["cached_kd_step"], times["lm_step"])]
        result["cached_overhead"] = statistics.median(ratios)
        log(f"bench: cached_kd_step / lm_step = {result['cached_overhead']:.3f} (median of {len(ratios)})")
