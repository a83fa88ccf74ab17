import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_run
from distillab.config import config_from_dict
from distillab.evaluate.perplexity import window_starts
from distillab.train import train


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "distillab.cli", *args], capture_output=True, text=True, cwd=cwd)


def independent_loss(model_dir: Path, tokens: np.ndarray, seq_len: int, max_windows: int) -> float:
    """Mean next-token loss over evenly spaced windows, with transformers and float64 log-softmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    n = (len(tokens) - 1) // seq_len
    chosen = sorted(set(np.linspace(0, n - 1, min(n, max_windows)).round().astype(int).tolist()))
    nll = 0.0
    with torch.no_grad():
        for w in chosen:
            ids = torch.tensor(np.asarray(tokens[w * seq_len : w * seq_len + seq_len + 1], dtype=np.int64))
            logp = torch.log_softmax(model(ids[None, :-1]).logits[0].double(), dim=-1)
            nll -= float(logp[torch.arange(seq_len), ids[1:]].sum())
    return nll / (len(chosen) * seq_len)


def test_window_starts_cover_and_cap():
    assert window_starts(101, 10, None).tolist() == list(range(0, 100, 10))
    capped = window_starts(10_001, 10, 7)
    assert len(capped) == 7 and capped[0] == 0 and capped[-1] == 9990


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("eval")
    return train(config_from_dict(tiny_run(tmp, cache_dir, "lm")), log=lambda *a: None)


def test_eval_cli_writes_eval_json(trained, tmp_path):
    extra = tmp_path / "other.txt"
    extra.write_text((Path(json.__file__)).read_text() * 3)
    out = tmp_path / "eval.json"
    result = cli("eval", "--checkpoint", str(trained.final_dir), "--sets", "validation", "train", "packaged:milton",
                 f"files:{extra}", "--seq-len", "32", "--max-windows", "6", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["sets"]) == {"validation", "train", "packaged:milton", f"files:{extra}"}
    for name, r in report["sets"].items():
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
        assert r["windows"] == 6 and r["tokens"] == 6 * 32
    data_dir = Path(json.loads((trained.final_dir / "distillab.json").read_text())["data_dir"])
    dtype = json.loads((data_dir / "manifest.json").read_text())["dtype"]
    tokens = np.memmap(data_dir / "validation.bin", dtype=dtype, mode="r")
    assert report["sets"]["validation"]["loss"] == pytest.approx(independent_loss(trained.final_dir, tokens, 32, 6), rel=1e-5)
    assert report["tokenizer_fingerprint"] and report["data_content_sha256"]


def test_eval_errors_are_one_line(trained, tmp_path):
    missing = cli("eval", "--checkpoint", str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr
    bad_set = cli("eval", "--checkpoint", str(trained.final_dir), "--sets", "encyclopedia")
    assert bad_set.returncode == 2 and "unknown set 'encyclopedia'" in bad_set.stderr

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained.final_dir, broken)
    with open(broken / "model.safetensors", "r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\x00" * 8)
    corrupt = cli("eval", "--checkpoint", str(broken))
    assert corrupt.returncode == 2 and "model.safetensors" in corrupt.stderr and "checksum" in corrupt.stderr
    assert "Traceback" not in corrupt.stderr


def test_bench_json_runs():
    result = cli("bench", "--model", "cpu-0.1m", "--teacher", "cpu-0.1m", "--batch-size", "2", "--seq-len", "32",
                 "--steps", "2", "--warmup", "1", "--vocab-size", "256", "--json")
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout)
    for key in ("plain_step", "lm_step", "teacher_forward", "kd_step"):
        assert numbers[key]["tokens_per_s"] > 0
    assert numbers["kd_overhead"] > 0 and numbers["matmul_gflops"] > 0


@pytest.mark.parametrize("command", [[], ["data"], ["data", "prepare"], ["train"], ["eval"], ["models"], ["bench"], ["demo"]])
def test_help(command):
    result = cli(*command, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout
