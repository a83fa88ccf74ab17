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


@pytest.mark.slow
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


def test_bench_reports_throughput_that_matches_the_model_flops():
    from transformers import AutoConfig

    from distillab.bench import run_bench

    numbers = run_bench("cpu-0.1m", teacher="cpu-0.1m", batch_size=2, seq_len=32, steps=2, warmup=1, vocab_size=256,
                        threads=1, cached_k=8, log=lambda *a: None)
    # training FLOPs per token from the instantiated HF model: 6 x matmul weights (head included)
    # + 12 x layers x seq x attention width
    from distillab.models import LADDER, build_model

    model = build_model(LADDER["cpu-0.1m"], 256, 32, seed=0)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    config = model.config
    flops = 6 * matmul + 12 * config.num_hidden_layers * 32 * config.num_attention_heads * config.head_dim
    for key in ("plain_step", "lm_step", "kd_step", "cached_kd_step"):
        step = numbers[key]
        assert step["tokens_per_s"] == pytest.approx(2 * 32 / step["seconds"])
    assert numbers["lm_step"]["gflops"] == pytest.approx(flops * numbers["lm_step"]["tokens_per_s"] / 1e9, rel=1e-9)
    assert numbers["kd_step"]["gflops"] == pytest.approx(
        4 / 3 * flops * numbers["kd_step"]["tokens_per_s"] / 1e9, rel=1e-9)  # + the teacher's forward (1/3)
    assert numbers["kd_overhead"] > 0 and numbers["cached_overhead"] > 0


README_COMMANDS = {"CONFIG": "run.yaml", "DIR": "d", "OUT": "o", "GRID.yaml": "g.yaml", "SWEEP_DIR": "s", "N": "2"}


def test_every_readme_command_parses():
    """Each command line of the README's command list parses into its verb (placeholders filled in)."""
    import re
    import shlex

    from distillab.cli import build_parser

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("## Commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#")[0].strip() for line in block.splitlines() if line.strip().startswith("distillab ")]
    assert len(lines) >= 9
    for line in lines:
        line = re.sub(r"\[([^\]]*)\]", r"\1", line).replace("...", "").replace("local|slurm|submitit-local", "local")
        args = [README_COMMANDS.get(word, word) for word in shlex.split(line)[1:]]
        parsed = build_parser().parse_args(args)
        assert parsed.func.__name__.startswith(f"cmd_{args[0]}"), line


def test_help_of_every_verb_is_one_call():
    result = cli("train", "--help")
    assert result.returncode == 0 and "--set" in result.stdout and "--stop-after" in result.stdout
