"""The memory plan before launch: its arithmetic, its refusals, and the paper presets."""

from pathlib import Path

import pytest
import yaml

from distillab.cli import main
from distillab.gpus import GIB, GPUS, gpu_from_device_name
from distillab.memory import Layout, memory_plan
from distillab.models import LADDER

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
V = 128_256


def llama_8b_parameters() -> int:
    """PAPER.md's 8B: 32 layers x 4096, MLP 14336, 32 q / 8 kv heads of 128, untied, vocab 128,256."""
    d, f, layers, hd = 4096, 14336, 32, 128
    block = d * hd * 32 + 2 * d * hd * 8 + d * hd * 32 + 3 * d * f + 2 * d  # q, k+v, o, SwiGLU, two norms
    return layers * block + d + 2 * V * d


def test_components_follow_the_stated_formulas():
    p = llama_8b_parameters()
    assert LADDER["llama-8b"].total_parameters(V) == p
    ddp = memory_plan(LADDER["llama-8b"], V, Layout("ddp", 8, 2, 8192, False, 2)).components
    assert ddp["weights"] == 4 * p + 2 * p and ddp["gradients"] == 8 * p and ddp["optimizer"] == 8 * p
    tokens, per_block = 2 * 8192, 2 * (6 * 4096 + 2 * 8 * 128 + 4 * 14336)
    assert ddp["activations"] == 32 * per_block * tokens
    fsdp = memory_plan(LADDER["llama-8b"], V, Layout("fsdp", 8, 2, 8192, True, 2)).components
    block = (p - 2 * V * 4096 - 4096) // 32
    assert fsdp["weights"] == pytest.approx(4 * p / 8 + 2 * (2 * V * 4096 + 4096 + 2 * block))
    assert fsdp["optimizer"] == pytest.approx(8 * p / 8) and fsdp["gradients"] == pytest.approx(4 * p / 8)
    assert fsdp["activations"] == 32 * 2 * tokens * 4096 + per_block * tokens
    chunk = max(128, (1 << 26) // V)  # the fused loss's GPU chunk of rows
    fused = 3 * 4 * chunk * V + 4 * V * 4096 + 4 * tokens * 4096  # scratch, output layer's and hidden's gradients
    assert fsdp["logits"] == fused and ddp["logits"] == fused  # the output layer is fused under fsdp too
    small = memory_plan(LADDER["llama-8b"], V, Layout("fsdp", 8, 1, 1024, True, 2)).components
    assert small["logits"] == 1024 * V * 8  # below 2^28 logits: materialised, with their gradient


def config_file(tmp_path: Path, **train) -> Path:
    config = {"name": "big", "run_dir": str(tmp_path / "big"), "model": {"name": "llama-8b"},
              "data": {"corpus": {"source": "packaged", "name": "python-stdlib"}, "tokenizer": {"vocab_size": V}},
              "train": {"seq_len": 8192, "batch_size": 2, "grad_accum": 16, "processes": 8, "precision": "bfloat16",
                        "device": "cuda", **train},
              "eval": {"batch_size": 2}}  # 8 windows of 8,192 would not fit (tests/test_plan_limits.py)
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_paper_8b_student_under_ddp_on_80gb_is_refused_with_what_would_fit(tmp_path, capsys):
    assert main(["train", str(config_file(tmp_path, parallel="ddp")), "--dry-run", "--gpu", "h100-80gb"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "memory plan" in error and "h100-80gb" in error
    assert "train.parallel=fsdp" in error and "would" in error
    assert not (tmp_path / "big").exists()  # a dry run writes nothing
    assert main(["train", str(config_file(tmp_path, parallel="fsdp", activation_checkpointing=True)), "--dry-run",
                 "--gpu", "h100-80gb"]) == 0
    assert ": fits" in capsys.readouterr().out


@pytest.mark.slow
def test_every_paper_preset_fits_80gb_gpus_at_its_layout(capsys):
    for preset in sorted(PAPER.glob("*.yaml")):
        assert main(["sweep", str(preset), "--dry-run", "--gpu", "h100-80gb"]) == 0, preset.name
        out = capsys.readouterr().out
        assert "memory plan per GPU" in out and "DOES NOT FIT" not in out, preset.name


def test_gpu_names():
    assert gpu_from_device_name("NVIDIA H200") is GPUS["h200-141gb"]
    assert gpu_from_device_name("NVIDIA A100-SXM4-80GB") is GPUS["a100-80gb"]
    assert gpu_from_device_name("NVIDIA A10") is GPUS["a10-24gb"]
    assert gpu_from_device_name("Quadro RTX 6000") is None
    assert GPUS["h100-80gb"].memory_bytes == 79.1 * GIB
