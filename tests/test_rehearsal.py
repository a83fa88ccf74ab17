"""`distillab sweep PRESET --rehearse`: every run of a paper preset end to end on 2 CPU processes, with
tiny twins of its models and shrunk budgets, through the sweep's own code.

The fast suite rehearses one Llama preset whole (label_smoothing: 3 runs) and a slice of the Qwen3 one
(ablate2 at alpha 1.0: the 0.6B student with the 0.15B teacher at 50B, and its baseline); `make test-all`
rehearses every preset whole.
"""

import json
from pathlib import Path

import pytest
import yaml

from distillab.config import config_from_dict, read_yaml_mapping
from distillab.errors import DistillabError
from distillab.models import LADDER
from distillab.sweep import load_grid, plan
from distillab.sweep.plan import cache_plan
from conftest import tiny_run
from distillab.sweep.rehearse import Gang, grid_models, rehearsal_tokenizer, rehearse, twin_model

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "paper"


def check_rehearsal(result: dict, grid: Path, out: Path) -> None:
    """Every run done through the whole sweep: trained on 2 processes as planned, evaluated, fine-tuned
    (SFT stage), analysed; the report written; the full-size plan's cache decisions repeated."""
    status = result["status"]
    assert status and all(s == "done" for s in status.values()), {k: v for k, v in status.items() if v != "done"}
    planned = json.loads((out / "plan.json").read_text())
    full = plan(load_grid(grid), out / "full-size-check")
    assert cache_plan(full) == [r["info"].get("teacher_cache", {}).get("top_k") for r in planned["runs"]
                                if r["role"] == "student"]
    assert [r.role for r in full] == [r["role"] for r in planned["runs"]]
    values = read_yaml_mapping(grid)
    for run in planned["runs"]:
        run_dir = Path(run["config"]["run_dir"])
        config = config_from_dict(run["config"])
        assert (run_dir / "final" / "eval.json").exists(), run["id"]
        assert config.train.processes == min(2, values["base"]["train"].get("processes", 1))
        if config.train.processes > 1:
            assert (run_dir / "launch.yaml").exists()
        rows = json.loads((run_dir / "final" / "config.json").read_text())["vocab_size"]
        assert rows == LADDER[run["info"]["model"]].rows(128_256)  # 151,936 for Qwen3 rungs
        if values.get("sft"):  # fine-tuned on the run's own processes, as the full-size stage would be
            assert list(run_dir.glob("sft-*/final/eval.json")), run["id"]
            sft_run = config_from_dict(read_yaml_mapping(next(run_dir.glob("sft-*/config.yaml"))))
            assert (sft_run.train.processes, sft_run.train.parallel) == (config.train.processes, config.train.parallel)
        if values.get("eval", {}).get("analysis") and run["role"] == "student":
            assert (out / "runs" / run["id"] / "analysis" / "analysis.json").exists()
    assert (out / "report.md").exists()


def test_twins_keep_family_rows_tying_and_order():
    values = read_yaml_mapping(PRESETS / "ablate2.yaml")
    names = grid_models(values)
    widths = [twin_model(name, rank)["d_model"] for rank, name in enumerate(names)]
    assert widths == sorted(widths) and len(set(widths)) == len(widths)
    assert [LADDER[n].non_embedding_parameters() for n in names] == sorted(LADDER[n].non_embedding_parameters()
                                                                          for n in names)
    for rank, name in enumerate(names):
        twin = twin_model(name, rank)
        assert (twin["kv_heads"] < twin["heads"]) == (LADDER[name].kv_heads < LADDER[name].heads)


def test_rehearsal_tokenizer_has_the_presets_vocabulary(cache_dir):
    from distillab.config import CorpusConfig
    from distillab.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(rehearsal_tokenizer(128_256, CorpusConfig(source="packaged", name="python-stdlib",
                                                                         limit=20), cache_dir))
    assert len(tokenizer) == 128_256 and tokenizer.eos_token == "<|end_of_text|>"
    for special in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert tokenizer.convert_tokens_to_ids(special) >= 128_000
    ids = tokenizer("def rehearse(x):\n    return x + 1")["input_ids"]
    assert max(ids) < 1024 and tokenizer.decode(ids) == "def rehearse(x):\n    return x + 1"


@pytest.mark.slow
def test_the_gang_outlasts_its_timeout_between_runs(tmp_path, cache_dir):
    """Rank 0 works alone between runs (evaluation, the SFT stage, a machine asleep) for longer than
    the group's collective timeout: the other rank still trains the next run with it, and each run
    equals the same run on one process."""
    import time

    from distillab.train import train

    gang = Gang(2, timeout_s=8)  # the members join once started: the timeout bounds training's collectives only
    try:
        finals = []
        for name in ("first", "second"):
            time.sleep(10 * len(finals))  # the second run starts after the group's timeout
            finals.append(gang.train(tiny_run(tmp_path, cache_dir, name, train={
                "processes": 2, "parallel": "ddp", "batch_size": 2, "threads": 1, "token_budget": 4 * 4 * 32})))
        # a member gone: the next run stops at once with one line (not after the group's timeout)
        gang.members[0].kill()
        gang.members[0].join()
        with pytest.raises(DistillabError, match="rank 1 exited .*run the rehearsal again"):
            gang.train(tiny_run(tmp_path, cache_dir, "third", train={"processes": 2, "parallel": "ddp"}))
    finally:
        gang.close()
    alone = train(config_from_dict(tiny_run(tmp_path, cache_dir, "alone", train={
        "batch_size": 4, "threads": 1, "token_budget": 4 * 4 * 32})), log=lambda *a: None).final_dir
    losses = [[json.loads(line)["loss"] for line in (f.parent / "metrics.jsonl").read_text().splitlines()]
              for f in (*finals, alone)]
    assert losses[0] == losses[1] and losses[0] == pytest.approx(losses[2], rel=1e-4)


def test_rehearse_a_llama_preset(tmp_path, cache_dir):
    grid = PRESETS / "label_smoothing.yaml"
    check_rehearsal(rehearse(grid, tmp_path / "rehearsal", log=lambda *a: None), grid, tmp_path / "rehearsal")


def test_rehearse_a_slice_of_the_qwen3_preset(tmp_path, cache_dir):
    """ablate2 cut to alpha 1.0 and its 0.6B student with the 0.15B teacher at 50B (and its baseline):
    Qwen3 twins with 151,936 rows, tied, qk-norm, the MaxText parametrisation, FSDP with the fused head
    on 2 processes, the SFT stage and the analysis."""
    values = read_yaml_mapping(PRESETS / "ablate2.yaml")
    values["kd"]["alpha"] = [1.0]
    values["students"]["members"] = [m for m in values["students"]["members"] if m["model"] == "qwen3-0.6b"]
    values["teachers"] = {"members": [{"model": "qwen3-0.15b", "tokens": 52_428_800_000, "seed": 42}]}
    grid = tmp_path / "ablate2-slice.yaml"
    grid.write_text(yaml.safe_dump(values))
    result = rehearse(grid, tmp_path / "rehearsal", log=lambda *a: None)
    check_rehearsal(result, grid, tmp_path / "rehearsal")


@pytest.mark.slow
@pytest.mark.presets
@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_rehearse_every_paper_preset(name, tmp_path, cache_dir):
    import shutil

    grid = PRESETS / f"{name}.yaml"
    check_rehearsal(rehearse(grid, tmp_path / "rehearsal", log=lambda *a: None), grid, tmp_path / "rehearsal")
    shutil.rmtree(tmp_path / "rehearsal")  # passed: its checkpoints (ablate2's: 11 GB) need not wait for the session
