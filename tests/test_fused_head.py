"""The LM head fused into the loss under FSDP: the output layer's weight is read while the root unit
holds it gathered, its gradient reduce-scattered by FSDP; logits are never materialised. Equal to the
plain single process (loss at every logged step, final weights) to 1e-4."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_run
from distillab.config import config_from_dict
from distillab.train import train
from distillab.train.step import HEAD_FUSION_ENV

BUDGET = 6 * 8 * 32


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one: Path, other: Path, rel: float = 1e-4) -> None:
    from safetensors.torch import load_file

    a, b = metrics(one), metrics(other)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 3
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=rel)
    wa, wb = load_file(one / "final" / "model.safetensors"), load_file(other / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() < 1e-4, name


def single(tmp_path, cache_dir, name, kd=None, fused=True, monkeypatch=None):
    monkeypatch.setenv(HEAD_FUSION_ENV, "0" if fused else str(1 << 62))
    logs = []
    result = train(config_from_dict(tiny_run(tmp_path, cache_dir, name, **({"kd": kd} if kd else {}),
                                             train={"batch_size": 8, "token_budget": BUDGET, "threads": 1})),
                   log=logs.append)
    return result, "\n".join(map(str, logs))


def test_fused_head_on_one_fsdp_process_matches_the_unfused_plain_process(tmp_path, cache_dir, tiny_teacher,
                                                                          monkeypatch):
    """FSDP's code path (a world of one) with the output layers of student and teacher fused into the
    loss = a plain process computing full logits."""
    kd = {"teacher": str(tiny_teacher), "alpha": 0.5}
    plain, plain_log = single(tmp_path, cache_dir, "plain", kd, fused=False, monkeypatch=monkeypatch)
    assert "LM head fused" not in plain_log
    monkeypatch.setenv(HEAD_FUSION_ENV, "0")
    logs = []
    sharded = train(config_from_dict(tiny_run(tmp_path, cache_dir, "fsdp1", kd=kd, train={
        "batch_size": 8, "token_budget": BUDGET, "threads": 1, "parallel": "fsdp"})), log=logs.append)
    assert "LM head fused" in "\n".join(map(str, logs))
    assert_same_run(plain.run_dir, sharded.run_dir, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("distil", [False, True], ids=["lm", "kd"])
def test_fused_head_under_fsdp_on_two_processes_matches_one_process(tmp_path, cache_dir, tiny_teacher, monkeypatch,
                                                                    distil):
    """FSDP on 2 gloo processes, student (and online teacher) output layers fused into the loss = the
    single process with the same global batch: the loss at every logged step and the final weights."""
    kd = {"teacher": str(tiny_teacher), "alpha": 0.5} if distil else None
    one, _ = single(tmp_path, cache_dir, "single", kd, fused=True, monkeypatch=monkeypatch)
    config = tiny_run(tmp_path, cache_dir, "fsdp", **({"kd": kd} if kd else {}), train={
        "batch_size": 4, "processes": 2, "parallel": "fsdp", "token_budget": BUDGET, "threads": 1,
        "checkpoint_every": 2})
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "DISTILLAB_CACHE": str(cache_dir), HEAD_FUSION_ENV: "0"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "distillab.cli", "train", str(path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "LM head fused" in result.stdout + result.stderr
    assert_same_run(one.run_dir, tmp_path / "fsdp")
