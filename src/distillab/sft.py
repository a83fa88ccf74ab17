"""Supervised fine-tuning (`distillab sft`): any checkpoint, chat records, loss on assistant tokens only.

An SFT run is a training run of the one loop (`distillab.train.Trainer`) whose model and
tokenizer come from `sft.init_from` (a distillab `final` directory, or an HF Llama / Qwen3
directory) instead of the ladder, whose data are chat records (`distillab.data.chat`) packed
conversation by conversation (`distillab.data.packing.conversation_stream`: positions and
attention restart per conversation, labels on the assistant's tokens only), and whose length
is a fixed number of steps (`sft.steps`). Optimizer, schedule, logging, evaluation (the loss
on held-out conversations' assistant tokens), checkpoints and resume are the loop's own.

`distillab sft` reads a config over the authors' schedule (`SFT_DEFAULTS`: lr 1e-5, 1 % linear
warmup, cosine to 10 %). Its checkpoints are HF directories whose tokenizer carries the chat
template, so `AutoModelForCausalLM` loads them and the harness applies the template
(`distillab eval --chat-template`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distillab.checkpoint import read_meta, verify_model_directory
from distillab.config import RunConfig, apply_overrides, config_from_dict, merge, read_yaml_mapping
from distillab.errors import require
from distillab.data.chat import chat_template, prepare_chat_data
from distillab.data.packing import PackedStream, conversation_stream
from distillab.data.shards import PreparedData
from distillab.data.tokenizer import load_tokenizer
from distillab.errors import CheckpointError, ConfigError
from distillab.models import (ModelSpec, load_causal_lm, max_positions, model_directory, nonfinite_parameter,
                              spec_from_hf_config)

# The authors' SFT schedule; a config's own values win.
SFT_DEFAULTS = {"train": {"lr": 1e-5, "warmup_fraction": 0.01, "min_lr_ratio": 0.1, "schedule": "cosine"}}


def sft_config(values: dict, overrides: list[str] | None = None) -> RunConfig:
    """An SFT run's config: `values` (and `--set` overrides) over `SFT_DEFAULTS`; `sft.init_from` required."""
    config = config_from_dict(apply_overrides(merge(SFT_DEFAULTS, values), overrides or []))
    require(config.sft.init_from is not None, "sft.init_from",
            "name the checkpoint to fine-tune (a distillab final directory or an HF model directory)")
    return config


def load_sft_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    return sft_config(read_yaml_mapping(path), overrides)


@dataclass
class SFTStart:
    """What an SFT run starts from: the model to fine-tune, its description, the chat data and stream."""

    model: object
    spec: ModelSpec
    data: PreparedData
    stream: PackedStream


def init_directory(name: str) -> Path:
    """The directory of `sft.init_from`, verified against its manifest when it has one."""
    source = model_directory(name, key="sft.init_from")
    try:
        verify_model_directory(source)
    except CheckpointError as exc:
        raise ConfigError("sft.init_from", str(exc)) from None
    return source


def prepare_sft_data(config: RunConfig, log=print) -> tuple[PreparedData, Path]:
    """(the run's chat data rendered with its template, the directory of the checkpoint to fine-tune)."""
    source = init_directory(config.sft.init_from)
    template, origin = chat_template(load_tokenizer(source), config.sft.chat_template)
    return prepare_chat_data(config.data, config.sft, source, template, origin, log), source


def start_sft(config: RunConfig, device, log=print) -> SFTStart:
    """Load the checkpoint to fine-tune and prepare its chat data (rendered with its template)."""
    t = config.train
    data, source = prepare_sft_data(config, log)
    model = load_causal_lm(source, device, key="sft.init_from")
    bad = nonfinite_parameter(model)
    if bad is not None:
        raise ConfigError("sft.init_from", f"{source}: weight {bad} holds non-finite values (the run that made it "
                                           "diverged, or the file is corrupt); fine-tune another checkpoint")
    if model.config.vocab_size < data.vocab_size:
        raise ConfigError("sft.init_from", f"{source} has {model.config.vocab_size} output rows but its tokenizer "
                                           f"{data.vocab_size} tokens")
    if t.seq_len > max_positions(model):
        raise ConfigError("train.seq_len", f"is {t.seq_len} but {source} was built for {max_positions(model)} "
                                           "positions; fine-tune at that length or less")
    meta = read_meta(source)
    spec = ModelSpec(**meta["model"]) if meta.get("model") else spec_from_hf_config(model.config, source.name)
    stream = conversation_stream(data, "train", t.seq_len, t.data_seed)
    return SFTStart(model, spec, data, stream)
