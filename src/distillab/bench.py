"""`distillab bench`: training throughput of the ladder on this machine.

Measures, on random tokens of the given shape:
  - the fp32 matmul ceiling (GFLOP/s of a large square GEMM),
  - `lm_step`: distillab's training step with alpha = 0 (forward, fused CE, backward, clip, AdamW),
  - `plain_step`: the same HF model in a plain PyTorch loop (logits -> F.cross_entropy), the yardstick,
  - `teacher_forward`: the teacher alone under inference mode,
  - `kd_step`: distillab's training step with the teacher signal (alpha = 0.5),
and reports tokens/s, achieved GFLOP/s (model FLOPs per token x tokens/s) and
kd_step / (lm_step + teacher_forward), the overhead of distillation beyond its two passes.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
import torch.nn.functional as F

from distillab.config import ModelConfig, TrainConfig
from distillab.models import build_model, resolve_spec
from distillab.runtime import resolve_device, setup_runtime
from distillab.teacher import OnlineTeacher
from distillab.train import make_optimizer, train_step


def matmul_ceiling(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_bench(
    model: str,
    teacher: str | None = None,
    batch_size: int = 16,
    seq_len: int = 256,
    steps: int = 10,
    warmup: int = 3,
    vocab_size: int = 4096,
    device: str = "auto",
    threads: int | None = None,
    precision: str = "float32",
    log=print,
) -> dict:
    setup_runtime(threads)
    torch_device = resolve_device(device)
    train_cfg = TrainConfig(batch_size=batch_size, seq_len=seq_len, lr=1e-3)
    student_spec = resolve_spec(ModelConfig(name=model))
    tokens_per_step = batch_size * seq_len
    generator = torch.Generator().manual_seed(0)
    window = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
    inputs, labels = window[:, :-1].to(torch_device), window[:, 1:].to(torch_device)
    flops_student = student_spec.training_flops_per_token(vocab_size, seq_len)

    result: dict = {
        "device": str(torch_device),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": model,
        "teacher": teacher,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "steps": steps,
        "precision": precision,
    }
    result["matmul_gflops"] = matmul_ceiling(torch_device)
    log(f"bench: fp32 matmul ceiling {result['matmul_gflops']:.0f} GFLOP/s")

    def measure(name: str, seconds: float, flops_per_token: float) -> None:
        tok_s = tokens_per_step / seconds
        gflops = flops_per_token * tok_s / 1e9
        result[name] = {"seconds": seconds, "tokens_per_s": tok_s, "gflops": gflops,
                        "mfu_vs_matmul": gflops / result["matmul_gflops"]}
        log(f"bench: {name:16s} {seconds * 1000:8.1f} ms/step  {tok_s:10,.0f} tok/s  {gflops:7.1f} GFLOP/s")

    student = build_model(student_spec, vocab_size, seq_len, seed=0).to(torch_device)
    optimizer = make_optimizer(student, train_cfg)

    from distillab.runtime import autocast

    def plain_step():
        with autocast(torch_device, precision):
            logits = student(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def lm_step():
        train_step(student, optimizer, [(inputs, labels)], None, 0.0, 1.0, 1.0, torch_device, precision)

    steps_by_name = {"plain_step": plain_step, "lm_step": lm_step}
    flops_by_name = {"plain_step": flops_student, "lm_step": flops_student}
    if teacher is not None:
        teacher_spec = resolve_spec(ModelConfig(name=teacher))
        teacher_model = build_model(teacher_spec, vocab_size, seq_len, seed=1)
        signal = OnlineTeacher.from_model(teacher_model, vocab_size, torch_device, precision)

        def teacher_forward():
            signal.logits(inputs)

        def kd_step():
            train_step(student, optimizer, [(inputs, labels)], signal, 0.5, 1.0, 1.0, torch_device, precision)

        steps_by_name["teacher_forward"] = teacher_forward
        steps_by_name["kd_step"] = kd_step
        flops_by_name["teacher_forward"] = teacher_spec.forward_flops_per_token(vocab_size, seq_len)
        flops_by_name["kd_step"] = flops_student + flops_by_name["teacher_forward"]

    # Rounds of one call each, interleaved, so that drift in the machine's speed (shared or
    # throttled CPUs) touches every measurement alike; the median round is reported.
    for fn in steps_by_name.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, fn in steps_by_name.items():
            _sync(torch_device)
            started = time.perf_counter()
            fn()
            _sync(torch_device)
            times[name].append(time.perf_counter() - started)
    for name in steps_by_name:
        measure(name, statistics.median(times[name]), flops_by_name[name])
    result["lm_vs_plain"] = result["plain_step"]["seconds"] / result["lm_step"]["seconds"]
    if teacher is not None:
        ratios = [k / (l + t) for k, l, t in zip(times["kd_step"], times["lm_step"], times["teacher_forward"])]
        result["kd_overhead"] = statistics.median(ratios)
        log(f"bench: kd_step / (lm_step + teacher_forward) = {result['kd_overhead']:.3f} (median of {steps} rounds)")
    log(f"bench: lm_step is {result['lm_vs_plain']:.3f}x the speed of the plain loop")
    return result
