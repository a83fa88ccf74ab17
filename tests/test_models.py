import json
import subprocess
import sys

import pytest
import torch

from distillab.config import ModelConfig
from distillab.errors import ConfigError
from distillab.models import LADDER, hf_config, resolve_spec


def meta_model(spec, vocab=1000, seq=128):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config(spec, vocab, seq))


@pytest.mark.parametrize("name", list(LADDER))
def test_parameter_counts_match_the_instantiated_model(name):
    spec = LADDER[name]
    model = meta_model(spec)
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings().weight.numel()
    head = 0 if spec.tie_embeddings else model.get_output_embeddings().weight.numel()
    assert spec.total_parameters(1000) == total
    assert spec.non_embedding_parameters() == total - embeddings - head
    # training FLOPs: 6 x every matmul weight (linear layers incl. the head) + the attention term
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * spec.layers * 128 * spec.heads * spec.head_dim
    assert spec.training_flops_per_token(1000, 128) == pytest.approx(6 * linear + attention)


def test_paper_rungs_have_the_published_shapes():
    rung = LADDER["llama-8b"]
    assert (rung.layers, rung.d_model, rung.heads, rung.kv_heads, rung.head_dim, rung.ffn) == (32, 4096, 32, 8, 128, 14336)
    assert rung.rope_theta == 500_000 and not rung.tie_embeddings
    qwen = LADDER["qwen3-0.6b"]
    model = meta_model(qwen)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.tie_word_embeddings and model.config.rope_parameters["rope_theta"] == 1e6
    assert any("q_norm" in n for n, _ in model.named_parameters())
    # the paper's ladder with the Llama-3 vocabulary lands on its names
    assert LADDER["llama-0.7b"].total_parameters(128_256) == pytest.approx(0.7e9, rel=0.03)
    assert LADDER["llama-1.7b"].total_parameters(128_256) == pytest.approx(1.7e9, rel=0.03)


def test_cpu_rungs_are_roughly_their_names():
    for name, target in [("cpu-0.9k", 0.9e3), ("cpu-1.7k", 1.7e3), ("cpu-3.5k", 3.5e3), ("cpu-7k", 7e3), ("cpu-14k", 14e3), ("cpu-27k", 27e3), ("cpu-55k", 55e3), ("cpu-0.1m", 0.1e6),
                         ("cpu-0.3m", 0.3e6), ("cpu-1m", 1e6), ("cpu-3m", 3e6), ("cpu-10m", 10e6)]:
        assert LADDER[name].non_embedding_parameters() == pytest.approx(target, rel=0.15)


def test_overrides_and_unknown_names():
    spec = resolve_spec(ModelConfig(name="cpu-1m", layers=2))
    assert spec.layers == 2 and spec.d_model == 128
    with pytest.raises(ConfigError, match="model.name"):
        resolve_spec(ModelConfig(name="gpt-5"))


def test_models_cli_json():
    out = subprocess.run([sys.executable, "-m", "distillab.cli", "models", "--json"], capture_output=True, text=True)
    assert out.returncode == 0
    rows = json.loads(out.stdout)
    assert {r["name"] for r in rows} == set(LADDER)
    text = subprocess.run([sys.executable, "-m", "distillab.cli", "models"], capture_output=True, text=True).stdout
    assert "llama-8b" in text and "non-emb" in text


def test_model_directory_resolves_downloaded_hub_ids_only(tmp_path, monkeypatch):
    """A hub id names its snapshot in the local HF cache (the layout huggingface_hub writes); nothing is fetched."""
    from distillab.models import model_directory

    cache = tmp_path / "hub"
    repo = cache / "models--some-org--tiny-teacher"
    snapshot = repo / "snapshots" / ("ab" * 20)
    meta_model(LADDER["cpu-0.1m"]).config.save_pretrained(str(snapshot))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert model_directory("some-org/tiny-teacher") == snapshot
    assert model_directory(str(snapshot)) == snapshot  # a directory is itself
    with pytest.raises(ConfigError) as info:
        model_directory("some-org/not-downloaded")
    assert info.value.key == "kd.teacher" and "huggingface-cli download some-org/not-downloaded" in str(info.value)
    with pytest.raises(ConfigError, match="train the teacher first"):
        model_directory(str(tmp_path / "sweep" / "runs" / "abc" / "final"))
