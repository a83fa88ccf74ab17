import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DISTILLAB_PROGRESS", "0")
torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache per test session (packaged corpora are downloaded once)."""
    path = tmp_path_factory.mktemp("distillab-cache")
    os.environ["DISTILLAB_CACHE"] = str(path)
    return path


def tiny_run(tmp_path: Path, cache_dir: Path, name: str = "run", **sections) -> dict:
    """A config dict for a seconds-long run on offline text (150 Python standard-library modules)."""
    config = {
        "name": name,
        "run_dir": str(tmp_path / name),
        "data": {
            "corpus": {"source": "packaged", "name": "python-stdlib", "limit": 150},
            "tokenizer": {"vocab_size": 512},
            "validation_fraction": 0.08,
            "cache_dir": str(cache_dir),
        },
        "model": {"name": "cpu-0.1m"},
        "train": {
            "token_budget": 8 * 4 * 32,
            "batch_size": 4,
            "seq_len": 32,
            "lr": 3e-3,
            "log_every": 2,
            "eval_every": 4,
            "checkpoint_every": 3,
            "threads": 2,
        },
        "eval": {"max_windows": 8, "batch_size": 4},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    return config


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, cache_dir) -> Path:
    """A trained tiny teacher (cpu-0.1m, 8 steps) shared by the session: its `final` directory."""
    from distillab.config import config_from_dict
    from distillab.train import train

    folder = tmp_path_factory.mktemp("teacher")
    return train(config_from_dict(tiny_run(folder, cache_dir, "teacher")), log=lambda *a: None).final_dir
