"""Checks that need a CUDA device (marked `gpu`; skipped without one). benchmarks/gpu_check.sh
runs them on a lent GPU: the fused loss in bf16-era kernels against float64, FSDP2's
mixed-precision path, compiled blocks, and the memory plan against the measured peak."""

import json

import pytest
import torch

from conftest import tiny_run
from distillab.config import config_from_dict
from distillab.losses import distillation_loss, reference_distillation_loss
from distillab.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("vocab,temperature,alpha,top_k", [(32768, 1.0, 0.5, None), (32768, 2.0, 0.2, None),
                                                           (4096, 1.0, 0.7, 20)])
def test_fused_loss_on_the_gpu_equals_float64(vocab, temperature, alpha, top_k):
    generator = torch.Generator(device="cuda").manual_seed(0)
    s = (torch.randn(4, 512, vocab, device="cuda", generator=generator) * 3).requires_grad_(True)
    t = torch.randn(4, 512, vocab, device="cuda", generator=generator) * 3
    y = torch.randint(0, vocab, (4, 512), device="cuda", generator=generator)
    y[0, :17] = -100
    out = distillation_loss(s, t, y, alpha=alpha, temperature=temperature, top_k=top_k)
    out.total.backward()
    s64 = s.detach().double().requires_grad_(True)
    ref = reference_distillation_loss(s64, t.double(), y, alpha=alpha, temperature=temperature, top_k=top_k)
    ref.total.backward()
    assert abs(out.total.item() - ref.total.item()) < 1e-4
    assert (s.grad.double() - s64.grad).abs().max().item() < 1e-6


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def gpu_run(tmp_path, cache_dir, name, **train_keys):
    return train(config_from_dict(tiny_run(tmp_path, cache_dir, name, model={"name": "cpu-1m"},
                                           train={"device": "cuda", "precision": "bfloat16", "batch_size": 8,
                                                  "token_budget": 12 * 8 * 32, **train_keys})), log=lambda *a: None)


def test_fsdp_bf16_policy_tracks_autocast_on_one_gpu(tmp_path, cache_dir):
    """FSDP2 on a world of one (bf16 compute, fp32 master weights and reductions) follows the
    single-process bf16 autocast run within bf16 rounding."""
    plain = gpu_run(tmp_path, cache_dir, "plain")
    sharded = gpu_run(tmp_path, cache_dir, "fsdp", parallel="fsdp")
    a, b = losses(plain.run_dir), losses(sharded.run_dir)
    assert len(a) == len(b) >= 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05
    assert sharded.eval["validation"]["loss"] == pytest.approx(plain.eval["validation"]["loss"], abs=0.05)


def test_compiled_blocks_train_like_eager_ones(tmp_path, cache_dir):
    eager = gpu_run(tmp_path, cache_dir, "eager")
    compiled = gpu_run(tmp_path, cache_dir, "compiled", compile=True)
    assert max(abs(x - y) for x, y in zip(losses(eager.run_dir), losses(compiled.run_dir))) < 0.05


def test_memory_plan_bounds_the_measured_peak(tmp_path):
    """A 0.15B student with a 0.6B teacher at 8 x 1,024 in bf16: the plan is within 35 % of the
    measured peak and not below 85 % of it (the plan must not promise a fit that fails)."""
    from distillab.bench import run_bench

    torch.cuda.reset_peak_memory_stats()
    result = run_bench("qwen3-0.15b", "qwen3-0.6b", batch_size=8, seq_len=1024, steps=2, warmup=1,
                       vocab_size=32768, device="cuda", precision="bfloat16", log=lambda *a: None)
    ratio = result["memory_plan_gib"] / result["peak_memory_gib"]
    assert 0.85 <= ratio <= 1.35, result
