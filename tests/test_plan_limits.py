"""No plan that cannot run: teacher caches within a disk budget and a share of the vocabulary, and a
memory plan that covers the 151,936-row logits, a cache reader, evaluation and the analysis, each
refused in one line naming the key that would fix it."""

from pathlib import Path

import pytest
import yaml

from distillab.cli import main
from distillab.config import config_from_dict
from distillab.errors import ConfigError
from distillab.gpus import GIB, GPUS
from distillab.memory import Layout, memory_plan, run_memory_plan
from distillab.models import LADDER
from distillab.sweep import load_grid, plan
from distillab.sweep.caches import MAX_CACHED_FRACTION, cache_bytes, parse_bytes
from distillab.sweep.grid import grid_from_dict

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
V = 128_256


def students(runs):
    return [r for r in runs if r.role == "student"]


@pytest.mark.parametrize("name", ["ablate4", "topk_absolute"])
def test_no_cache_beyond_the_disk_budget(name, tmp_path, monkeypatch):
    """At 52B tokens a top-1 cache is ~0.5 TB, top-10 ~2.8 TB, top-1,283 ~340 TB: within a 400 GB budget
    (a key), or 400 GB of free space (the default), every top-k and hard-label student of ablate4 /
    topk_absolute runs its teacher online, and says why."""
    assert cache_bytes(52_428_800_000, 1, V) == 52_428_800_000 * (1 * (3 + 2) + 4)  # ~472 GB
    assert cache_bytes(52_428_800_000, 1283, V) > 300e12
    values = yaml.safe_load((PAPER / f"{name}.yaml").read_text())
    monkeypatch.setattr("distillab.sweep.caches.free_space", lambda path: 400 * 10**9)
    for spec in (grid_from_dict({**values, "cache_disk_budget": "400GB"}), grid_from_dict(values)):
        runs = plan(spec, tmp_path / "sweep")
        assert not [r for r in runs if r.info.get("teacher_cache")]
        truncated = [r for r in students(runs) if r.config["kd"].get("top_k") or r.config["kd"].get("divergence") == "hard"]
        assert truncated and all(r.info.get("online_because") for r in truncated)


def test_a_budget_caches_what_fits(tmp_path):
    """topk_absolute with 1.5 TB: the hard-label and top-2 students of each teacher share a top-2 cache
    (~730 GB) while two teachers' fit; every other student runs online."""
    values = yaml.safe_load((PAPER / "topk_absolute.yaml").read_text())
    runs = plan(grid_from_dict({**values, "cache_disk_budget": "1.5TB"}), tmp_path / "sweep")
    cached = [r for r in students(runs) if r.info.get("teacher_cache")]
    assert {r.info["teacher_cache"]["top_k"] for r in cached} == {2}
    assert len({r.info["teacher"] for r in cached}) == 2  # 2 x 734 GB fit 1.5 TB, a third does not
    for run in cached:
        assert run.config["kd"].get("divergence") == "hard" or run.config["kd"]["top_k"] == 2


def test_a_large_budget_caches_only_a_small_share_of_the_vocabulary(tmp_path):
    """With disk to spare, topk_absolute's teachers get a top-1,000 cache serving k <= 1,000 and hard
    labels; k = 10,000 (7.8 % of the rows) stays online."""
    values = yaml.safe_load((PAPER / "topk_absolute.yaml").read_text())
    values["cache_disk_budget"] = "1000000PB"
    runs = plan(grid_from_dict(values), tmp_path / "sweep")
    for run in students(runs):
        k = run.config["kd"].get("top_k")
        cache = run.info.get("teacher_cache")
        if k == 10_000:
            assert cache is None and "over 5%" in run.info["online_because"]
            assert k > MAX_CACHED_FRACTION * V
        else:
            assert cache is not None and cache["top_k"] == 1000, (k, run.config["kd"])


def test_cache_budgets_are_sizes_or_refused_naming_the_key(tmp_path, capsys):
    assert parse_bytes("2TB") == 2 * 10**12 and parse_bytes("1.5 GB") == 1_500_000_000 and parse_bytes(10) == 10
    values = yaml.safe_load((PAPER / "loss_scale.yaml").read_text())
    with pytest.raises(ConfigError) as info:
        grid_from_dict({**values, "cache_disk_budget": "lots"})
    assert info.value.key == "cache_disk_budget"
    assert main(["sweep", str(PAPER / "topk_absolute.yaml"), "--dry-run", "--cache-budget", "1000000PB",
                 "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "top-1000" in out and "students a teacher cache could serve that run their teacher online" in out
    assert main(["sweep", str(PAPER / "topk_absolute.yaml"), "--dry-run", "--cache-budget", "a lot",
                 "--out", str(tmp_path / "s")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--cache-budget" in error


def test_the_memory_plan_counts_151936_rows_a_cache_reader_and_the_phases():
    qwen = LADDER["qwen3-0.3b"]
    rows = qwen.rows(V)
    assert rows == 151_936
    layout = Layout("fsdp", 8, 2, 8192, True, 2)
    tokens, chunk = 2 * 8192, max(128, (1 << 26) // rows)
    plan = memory_plan(qwen, rows, layout, cache_k=64)
    assert plan.components["logits"] == 3 * 4 * chunk * rows + 4 * rows * 768 + 4 * tokens * 768
    assert plan.components["cache"] == tokens * 64 * 12 + 4 * tokens + 3 * 4 * 128 * 64
    config = config_from_dict({"model": {"name": "qwen3-0.3b"}, "data": {"tokenizer": {"vocab_size": V}},
                               "train": {"seq_len": 8192, "batch_size": 2, "processes": 8, "parallel": "fsdp",
                                         "precision": "bfloat16", "activation_checkpointing": True},
                               "eval": {"batch_size": 4, "seq_len": 4096}})
    full = run_memory_plan(config, LADDER["qwen3-1b"], GPUS["h100-80gb"], final_eval=(2, 4096),
                           analysis=([qwen, LADDER["qwen3-1b"], qwen], 1, 2048))
    phases = {p.name: p.total for p in full.phases}
    e = 4 * 4096
    resident = sum(full.components[k] for k in ("weights", "optimizer", "teacher"))
    forward = e * rows * (2 + 4 + 4) + 2 * e * (4 * 768 + 3 * 2304)
    assert phases["evaluation"] == pytest.approx(resident + forward + 2 * GIB + 0.05 * (resident + forward))
    f = 2 * 4096
    final = 4 * qwen.total_parameters(rows) + f * rows * 8 + 4 * f * (4 * 768 + 3 * 2304)
    assert phases["final eval"] == pytest.approx(final + 2 * GIB + 0.05 * final)
    analysis = 4 * (2 * qwen.total_parameters(rows) + LADDER["qwen3-1b"].total_parameters(rows)) + \
        3 * 2048 * rows * 4 + 6 * (1 << 28)
    assert phases["analysis"] == pytest.approx(analysis + 2 * GIB + 0.05 * analysis)


def test_an_evaluation_that_does_not_fit_is_refused_naming_its_key(tmp_path, capsys):
    config = {"name": "big", "run_dir": str(tmp_path / "big"), "model": {"name": "llama-1.7b"},
              "data": {"corpus": {"source": "packaged", "name": "python-stdlib"}, "tokenizer": {"vocab_size": V}},
              "train": {"seq_len": 8192, "batch_size": 2, "grad_accum": 16, "processes": 8, "precision": "bfloat16",
                        "device": "cuda", "parallel": "fsdp", "activation_checkpointing": True},
              "eval": {"batch_size": 32, "seq_len": 8192}}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--dry-run", "--gpu", "h100-80gb"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "evaluation" in error and "eval.batch_size=" in error and "would" in error
