import subprocess
import sys
from pathlib import Path

import pytest

from distillab.config import load_config
from distillab.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "name: t\ntrain:\n  lr: 3e-3\n  token_budget: 1_000\nkd:\n  alpha: 0\n")
    config = load_config(path, ["train.batch_size=4", "model.name=cpu-3m", "eval.sets=[validation, train]"])
    assert config.train.lr == pytest.approx(3e-3)
    assert config.train.token_budget == 1000
    assert config.train.batch_size == 4
    assert config.model.name == "cpu-3m"
    assert config.eval.sets == ["validation", "train"]


@pytest.mark.parametrize(
    "text, overrides, key",
    [
        ("train:\n  lrr: 1\n", [], "train.lrr"),
        ("name: t\n", ["train.lr=fast"], "train.lr"),
        ("name: t\n", ["train.batch_size=2.5"], "train.batch_size"),
        ("name: t\n", ["kd.alpha=1.5", "kd.teacher=x"], "kd.alpha"),
        ("name: t\n", ["kd.alpha=-0.1", "kd.teacher=x"], "kd.alpha"),
        ("name: t\n", ["kd.temperature=0"], "kd.temperature"),
        ("name: t\n", ["kd.temperature=-1"], "kd.temperature"),
        ("name: t\n", ["train.token_budget=0"], "train.token_budget"),
        ("name: t\n", ["kd.alpha=0.5"], "kd.alpha"),
        ("name: t\n", ["train.schedule=linear"], "train.schedule"),
        ("name: t\n", ["data.corpus.source=web"], "data.corpus.source"),
        ("name: t\n", ["train.precision=fp8"], "train.precision"),
        ("name: t\n", ["data.packing=bins"], "data.packing"),
        ("data:\n  corpus: {source: hf, path: x, hf_config: a, hf_configs: [a, b]}\n", [], "data.corpus.hf_configs"),
        ("model: cpu-1m\n", [], "model"),
        ("name: t\n", ["nonsense.key=1"], "nonsense"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    assert info.value.key == key
    assert "\n" not in str(info.value)


def test_cli_prints_one_line_without_traceback(tmp_path):
    path = write(tmp_path, "kd:\n  alpha: 0.5\n")
    result = subprocess.run(
        [sys.executable, "-m", "distillab.cli", "train", str(path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("distillab: error: config error: kd.alpha:")
    assert "Traceback" not in result.stderr


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1,\n"))
