"""The model ladder: named sizes built as HF `LlamaForCausalLM` / `Qwen3ForCausalLM` configs.

No transformer is written here. A rung is a handful of shape numbers; `hf_config` turns it
into a transformers config (vocabulary from the tokenizer), so every checkpoint is a plain HF
model that any tool can load.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from distillab.checkpoint import is_sharded_checkpoint
from distillab.config import ModelConfig
from distillab.data.tokenizer import looks_like_hub_id
from distillab.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "llama" | "qwen3" (Qwen3 adds RMSNorm on queries and keys)
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rope_theta: float
    tie_embeddings: bool
    note: str = ""
    norm_eps: float = 1e-6
    # output rows of the embedding and head; None = the tokenizer's size. More rows than the
    # tokenizer has are padding that no token uses (the paper's Qwen3 ladder: 151,936 rows)
    vocab_rows: int | None = None

    def non_embedding_parameters(self) -> int:
        """Parameters outside the token embedding and the output head."""
        attention = self.d_model * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.d_model * self.ffn
        norms = 2 * self.d_model + (2 * self.head_dim if self.family == "qwen3" else 0)
        return self.layers * (attention + mlp + norms) + self.d_model  # + final norm

    def rows(self, vocab_size: int) -> int:
        """Embedding / output rows for a tokenizer of `vocab_size` tokens."""
        return max(vocab_size, self.vocab_rows or 0)

    def embedding_parameters(self, vocab_size: int) -> int:
        return self.rows(vocab_size) * self.d_model * (1 if self.tie_embeddings else 2)

    def total_parameters(self, vocab_size: int) -> int:
        return self.non_embedding_parameters() + self.embedding_parameters(vocab_size)

    def training_flops_per_token(self, vocab_size: int, seq_len: int) -> float:
        """6 x (matmul parameters incl. the output head) + 12 x layers x seq x heads x head_dim.

        The second term is attention scores and weighted values for a full (not causally
        halved) window, as in Kaplan et al. and the PaLM MFU convention.
        """
        matmul = self.layers * (
            self.d_model * self.head_dim * (2 * self.heads + 2 * self.kv_heads) + 3 * self.d_model * self.ffn
        ) + self.rows(vocab_size) * self.d_model
        attention = 12 * self.layers * seq_len * self.heads * self.head_dim
        return 6.0 * matmul + attention

    def forward_flops_per_token(self, vocab_size: int, seq_len: int) -> float:
        return self.training_flops_per_token(vocab_size, seq_len) / 3.0


def _cpu(name, layers, d_model, heads, ffn, note=""):
    return ModelSpec(name, "llama", layers, d_model, heads, heads, d_model // heads, ffn, 10_000.0, False, note)


def _llama(name, layers, d_model, ffn, note=""):
    return ModelSpec(name, "llama", layers, d_model, 32, 8, 128, ffn, 500_000.0, False, note, norm_eps=1e-5)


def _official(name, layers, d_model, heads, head_dim, ffn, tied, note):
    """A released Llama 3.x checkpoint's shape (for teachers loaded from the hub and their FLOPs)."""
    return ModelSpec(name, "llama", layers, d_model, heads, 8, head_dim, ffn, 500_000.0, tied, note, norm_eps=1e-5)


def _qwen3(name, layers, d_model, heads, kv_heads, head_dim, ffn, note=""):
    return ModelSpec(name, "qwen3", layers, d_model, heads, kv_heads, head_dim, ffn, 1_000_000.0, True, note,
                     norm_eps=1e-6, vocab_rows=151_936)


LADDER: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        _cpu("cpu-0.9k", 2, 6, 1, 16, "CPU rung (scale axis: teachers of its smallest student)"),
        _cpu("cpu-1.7k", 2, 8, 2, 24, "CPU rung (scale axis)"),
        _cpu("cpu-3.5k", 2, 12, 2, 32, "CPU rung (scale axis: its smallest student)"),
        _cpu("cpu-7k", 2, 16, 2, 48, "CPU rung (demo ladder)"),
        _cpu("cpu-14k", 2, 24, 2, 64, "CPU rung (demo ladder)"),
        _cpu("cpu-27k", 2, 32, 2, 96, "CPU rung (demo ladder)"),
        _cpu("cpu-55k", 2, 48, 4, 128, "CPU rung (demo ladder)"),
        _cpu("cpu-0.1m", 2, 64, 4, 192, "CPU rung"),
        _cpu("cpu-0.3m", 3, 96, 4, 256, "CPU rung"),
        _cpu("cpu-1m", 5, 128, 4, 352, "CPU rung"),
        _cpu("cpu-3m", 4, 256, 4, 688, "CPU rung"),
        _cpu("cpu-10m", 8, 320, 5, 864, "CPU rung"),
        _llama("llama-0.7b", 12, 1024, 8192, "paper, Llama-style"),
        _llama("llama-1.7b", 16, 2048, 8192, "paper, Llama-style"),
        _llama("llama-3.8b", 28, 3072, 8192, "paper, Llama-style"),
        _llama("llama-8b", 32, 4096, 14336, "paper, Llama-style"),
        _official("llama3.2-1b", 16, 2048, 32, 64, 8192, True, "shape of meta-llama/Llama-3.2-1B (official teacher)"),
        _official("llama3.2-3b", 28, 3072, 24, 128, 8192, True, "shape of meta-llama/Llama-3.2-3B (official teacher)"),
        _official("llama3.1-8b", 32, 4096, 32, 128, 14336, False, "shape of meta-llama/Llama-3.1-8B (official teacher)"),
        _qwen3("qwen3-0.15b", 20, 512, 8, 4, 64, 1536, "paper ablation, Qwen3-style"),
        _qwen3("qwen3-0.3b", 24, 768, 12, 4, 64, 2304, "paper ablation, Qwen3-style"),
        _qwen3("qwen3-0.6b", 28, 1024, 16, 8, 128, 3072, "paper ablation, Qwen3-style"),
        _qwen3("qwen3-1b", 28, 1536, 12, 4, 128, 4608, "paper ablation, Qwen3-style"),
    ]
}


def resolve_spec(model: ModelConfig) -> ModelSpec:
    """The named rung with any explicitly set fields of `model` overriding it."""
    if model.name not in LADDER:
        raise ConfigError("model.name", f"unknown model {model.name!r}; `distillab models` lists the ladder")
    spec = LADDER[model.name]
    renamed = {"vocab_size": "vocab_rows"}
    changes = {
        renamed.get(f.name, f.name): getattr(model, f.name)
        for f in dataclasses.fields(model)
        if f.name not in ("name", "parametrisation") and getattr(model, f.name) is not None
    }
    if not changes:
        return spec
    if "d_model" in changes and "head_dim" not in changes and spec.family == "llama" and spec.name.startswith("cpu"):
        changes["head_dim"] = changes["d_model"] // changes.get("heads", spec.heads)
    spec = dataclasses.replace(spec, name=f"{spec.name}+custom", **changes)
    if spec.heads % spec.kv_heads:
        raise ConfigError("model.kv_heads", f"must divide model.heads ({spec.heads}), got {spec.kv_heads}")
    return spec


def spec_from_hf_config(config, name: str, key: str = "sft.init_from") -> ModelSpec:
    """The ladder's description of an HF Llama or Qwen3 model built elsewhere (e.g. an official checkpoint)."""
    if config.model_type not in ("llama", "qwen3"):
        raise ConfigError(key, f"{name} is a {config.model_type!r} model; distillab trains Llama and Qwen3 models")
    heads = config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    return ModelSpec(name=name, family=config.model_type, layers=config.num_hidden_layers, d_model=config.hidden_size,
                     heads=heads, kv_heads=config.num_key_value_heads or heads,
                     head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                     ffn=config.intermediate_size, rope_theta=float(rope.get("rope_theta", 10000.0)),
                     tie_embeddings=bool(config.tie_word_embeddings), norm_eps=float(config.rms_norm_eps),
                     vocab_rows=config.vocab_size)


def hf_config(spec: ModelSpec, vocab_size: int, max_seq_len: int, eos_token_id: int | None = None):
    """The transformers config of a rung for a tokenizer of `vocab_size` tokens."""
    common = dict(
        vocab_size=spec.rows(vocab_size),
        hidden_size=spec.d_model,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=max_seq_len,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie_embeddings,
        rms_norm_eps=spec.norm_eps,
        initializer_range=0.02,
        attention_bias=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        use_cache=False,
    )
    if spec.family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(mlp_bias=False, **common)
    from transformers import Qwen3Config

    return Qwen3Config(use_sliding_window=False, **common)


def build_model(spec: ModelSpec, vocab_size: int, max_seq_len: int, seed: int, eos_token_id: int | None = None,
                device: torch.device | str = "cpu", parametrisation: str = "hf"):
    """A freshly initialised HF causal LM; the same seed always gives the same weights.

    Initialised on the CPU from its own generator state (the global RNG is left as it was), so
    every process and device starts from identical weights; then moved to `device`. Under
    `parametrisation` maxtext the weights are initialised as the paper authors' MaxText did and
    attention is scaled as it did (`maxtext_init`, `apply_parametrisation`).
    """
    from transformers import AutoModelForCausalLM

    config = hf_config(spec, vocab_size, max_seq_len, eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        if parametrisation == "maxtext":
            maxtext_init(model)
    apply_parametrisation(model, parametrisation)
    return model.to(device)


def empty_model(spec: ModelSpec, vocab_size: int, max_seq_len: int, eos_token_id: int | None = None):
    """The model `build_model` makes, on the meta device: shapes only, no memory, no random draws."""
    from transformers import AutoModelForCausalLM

    config = hf_config(spec, vocab_size, max_seq_len, eos_token_id)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


class InitialWeights:
    """`build_model`'s initial values of a meta-device model, produced one module at a time.

    `build_model` draws every tensor from one generator seeded with `seed`, in the order transformers
    runs its initialisation: a model's `__init__` builds its children in order (each `nn.Linear`
    and `nn.Embedding` drawing torch's default initialisation as it is built), and a `PreTrainedModel`
    ends its `__init__` by initialising every module of its subtree not yet initialised, children
    before parents (`_init_weights`: normal draws for linear and embedding weights, ones for norms,
    rotary frequencies). The outer causal LM's head is built, and initialised, after its inner model.

    This replays that sequence on a CPU copy of each module with parameters or buffers (copied
    from the meta model before it is sharded): the same calls on tensors of the same shapes draw
    the same numbers from the generator, so each copy holds exactly the values `build_model`
    gives that module; `write` hands each to `place(name, value)`, which keeps what it needs
    (a shard), and the copy is freed before the next module. Peak memory: one module's tensors
    (one matrix). A tied weight (the head of tied embeddings) draws as in `build_model` but is
    placed under its first name only, as tying keeps the embedding's values. Under the maxtext
    parametrisation `maxtext_plan`'s draws follow, from the same generator, each into a fresh
    full tensor placed over the one transformers drew. Tested bit for bit against `build_model`
    for the Llama and Qwen3 rungs on 1, 2 and 4 processes (maxtext on 1 and 2).
    """

    def __init__(self, model: torch.nn.Module, seed: int, parametrisation: str = "hf"):
        import copy

        self.seed = seed
        self.events = list(construction_events(model, ""))
        # meta copies of the modules that hold tensors, taken before sharding changes them
        self.copies = {prefix: copy.deepcopy(module) for _, prefix, module, _ in self.events}
        # MaxText's re-initialisation, drawn after transformers' from the same generator
        shapes = {name: param.shape for name, param in model.named_parameters()}
        self.maxtext = ([(name, shapes[name], initialise) for name, initialise in maxtext_plan(model)]
                        if parametrisation == "maxtext" else [])

    def write(self, place) -> set[str]:
        """Call `place(name, full tensor)` for every value in the order `build_model` draws them (a
        name can come twice: its last value is the one that stays); return the names placed."""
        placed = set()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self.seed)
            for kind, prefix, _, owner in self.events:
                module = copy_on_cpu(self.copies[prefix])
                if kind == "construct":
                    module.reset_parameters()
                else:
                    owner._init_weights(module)
                for name, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                    place(prefix + name, value)
                    placed.add(prefix + name)
                del module
            for name, shape, initialise in self.maxtext:
                value = torch.empty(shape, dtype=torch.float32)
                initialise(value)
                place(name, value)
        return placed


def holds_tensors(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def construction_events(module: torch.nn.Module, prefix: str, owner=None, done: set | None = None):
    """("construct" | "init", name prefix, module, the PreTrainedModel whose init applies) in the order
    `AutoModelForCausalLM.from_config` runs them (see `InitialWeights`)."""
    from transformers import PreTrainedModel

    done = set() if done is None else done
    owner = module if isinstance(module, PreTrainedModel) else owner
    for name, child in module.named_children():
        yield from construction_events(child, f"{prefix}{name}.", owner, done)
    if holds_tensors(module) and hasattr(module, "reset_parameters"):
        yield "construct", prefix, module, owner
    if isinstance(module, PreTrainedModel):  # its post_init: the subtree, children before parents
        for sub_prefix, sub, sub_owner in post_order(module, prefix, module):
            if id(sub) not in done:
                done.add(id(sub))
                if holds_tensors(sub):
                    yield "init", sub_prefix, sub, sub_owner


def post_order(module: torch.nn.Module, prefix: str, owner):
    from transformers import PreTrainedModel

    for name, child in module.named_children():
        yield from post_order(child, f"{prefix}{name}.", child if isinstance(child, PreTrainedModel) else owner)
    yield prefix, module, owner


def copy_on_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """A CPU copy of a meta module's own tensors (uninitialised memory)."""
    import copy

    return copy.deepcopy(module).to_empty(device="cpu", recurse=False)


# ----------------------------------------------------------------------------- the MaxText parametrisation
#
# The paper's authors trained with MaxText (their fork, github.com/TaiMingLu/maxtext-distillation).
# Read there: MaxText/layers/models.py (token embedding: truncated normal, stddev 0.02),
# attentions.py (q/k/v/out kernels: variance scaling 1.0, fan-in, normal; the query kernel's init
# divided by sqrt(head_dim) in `query_projection`; `AttentionOp.apply_attention` multiplies the
# query by 1/sqrt(head_dim) at run time), linears.py (MLP kernels and the untied output layer
# `logits_dense`: variance scaling 1.0, fan-in, truncated normal), normalizations.py (RMSNorm scale:
# ones) and qwen3.py (Qwen3 passes query_pre_attn_scalar = head_dim^-0.5, applied after qk-norm and
# RoPE, on top of the run-time 1/sqrt(head_dim): attention logits are scaled by 1/head_dim).
# Llama's forward pass is then HF's (1/sqrt(head_dim); MaxText's interleaved RoPE pairs differ from
# HF's half-split pairs by a fixed permutation of each head's query and key channels, which an
# i.i.d. init and Adam do not see); Qwen3's attention is scaled by 1/head_dim.

TRUNCATED_NORMAL_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2] (jax's constant)


def fan_in_normal_(weight: torch.Tensor, scale: float = 1.0) -> None:
    """jax variance_scaling(1.0, "fan_in", "normal") for an HF Linear weight [out, in], times `scale`."""
    with torch.no_grad():
        weight.normal_(0.0, scale / weight.shape[1] ** 0.5)


def fan_in_truncated_normal_(weight: torch.Tensor) -> None:
    """jax variance_scaling(1.0, "fan_in", "truncated_normal"): variance 1 / fan_in, cut at 2 std devs."""
    std = (1.0 / weight.shape[1]) ** 0.5 / TRUNCATED_NORMAL_STD
    torch.nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


def maxtext_plan(model) -> list[tuple[str, Callable[[torch.Tensor], None]]]:
    """(parameter name, in-place initializer) for every tensor MaxText initialises, in the order
    `maxtext_init` draws them from the generator: the embedding, each layer's attention then MLP
    kernels, an untied output layer, then ones for every 1-D parameter (norm scales, no draws).
    Names are `named_parameters`' (a tied output layer is the embedding and is not drawn again)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    names = {id(param): name for name, param in model.named_parameters()}
    embedding = model.get_input_embeddings().weight
    # flax truncated_normal(stddev=0.02)
    plan = [(names[id(embedding)], functools.partial(torch.nn.init.trunc_normal_, mean=0.0, std=0.02, a=-0.04,
                                                     b=0.04))]
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        plan.append((names[id(attention.q_proj.weight)], functools.partial(fan_in_normal_, scale=head_dim ** -0.5)))
        plan += [(names[id(p.weight)], fan_in_normal_) for p in (attention.k_proj, attention.v_proj, attention.o_proj)]
        plan += [(names[id(p.weight)], fan_in_truncated_normal_) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not embedding:
        plan.append((names[id(output.weight)], fan_in_truncated_normal_))
    plan += [(name, torch.nn.init.ones_) for name, param in model.named_parameters() if param.dim() == 1]
    return plan


def maxtext_init(model) -> None:
    """Re-initialise an HF Llama / Qwen3 model as MaxText initialises the same architecture."""
    parameters = dict(model.named_parameters())
    for name, initialise in maxtext_plan(model):
        initialise(parameters[name])


def attention_scale(model, parametrisation: str) -> float | None:
    """The softmax scale of the model's attention under `parametrisation` (None: transformers' own)."""
    if parametrisation != "maxtext" or model.config.model_type != "qwen3":
        return None
    config = model.config
    return 1.0 / (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def apply_parametrisation(model, parametrisation: str) -> None:
    """Set the run-time attention scale of `parametrisation` (MaxText Qwen3: 1/head_dim)."""
    scale = attention_scale(model, parametrisation)
    if scale is not None:
        for layer in model.model.layers:
            layer.self_attn.scaling = scale


def query_norm_factors(model, parametrisation: str) -> dict[str, float]:
    """{weight name: factor}: multiplying these weights by their factor gives a model whose forward
    pass under transformers' own attention scale equals this one's (empty when they agree). The
    query norm's weight scales the query linearly, and RoPE commutes with a scalar."""
    scale = attention_scale(model, parametrisation)
    if scale is None:
        return {}
    factor = scale / model.model.layers[0].self_attn.head_dim ** -0.5
    return {name: factor for name, _ in model.named_parameters() if name.endswith("self_attn.q_norm.weight")}


def model_directory(name: str, key: str = "kd.teacher", revision: str | None = None) -> Path:
    """The directory of a model: `name` itself when it exists, else the local snapshot of the hub id
    `name` in the HF cache ($HF_HUB_CACHE / $HF_HOME), downloaded beforehand, at `revision` (a branch
    such as a checkpoint suite's `step1000`, a tag or a commit; default main). Nothing is fetched."""
    path = Path(os.path.expanduser(name))
    if path.exists():
        if revision is not None:
            raise ConfigError("kd.teacher_revision", f"{name} is a directory; a revision applies to hub ids (name "
                                                     "the checkpoint's directory instead)")
        return path
    if not looks_like_hub_id(name):
        raise ConfigError(key, f"{name} does not exist; train the teacher first")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, local_files_only=True,
                                      cache_dir=os.environ.get("HF_HUB_CACHE")))
    except (ImportError, OSError, ValueError):
        at = f" at revision {revision}" if revision else ""
        raise ConfigError(key, f"{name}{at} is neither a directory nor a downloaded hub model; download it first "
                               f"(`huggingface-cli download {name}`, with an HF token for gated models such as "
                               "Llama) or give its directory") from None


def nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or an infinity (this process's shard), else None."""
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if not torch.isfinite(local).all():
            return name
    return None


def load_causal_lm(path: str | Path, device: torch.device | str, key: str = "kd.teacher",
                   dtype: torch.dtype = torch.float32):
    """An HF causal LM from a directory, in fp32 (or `dtype`), or a one-line error naming `key`."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(key, f"{path} is not an HF model directory (no config.json)")
    if is_sharded_checkpoint(path) and not any(path.glob("*.safetensors")):
        raise ConfigError(key, f"{path} is a sharded training checkpoint; write its HF model with `distillab export "
                               f"{path.parent.parent} --step {path.name.removeprefix('step_').lstrip('0') or 0}` "
                               "and use that")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: cannot load as a causal LM ({first})") from None
    return model.to(device)


def max_positions(model) -> int:
    """The longest sequence a model was built (and, for distillab runs, trained) for."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


def ladder_table(vocab_size: int, seq_len: int) -> list[dict]:
    rows = []
    for spec in LADDER.values():
        rows.append(
            {
                "name": spec.name,
                "family": spec.family,
                "layers": spec.layers,
                "d_model": spec.d_model,
                "heads": spec.heads,
                "kv_heads": spec.kv_heads,
                "head_dim": spec.head_dim,
                "ffn": spec.ffn,
                "rope_theta": spec.rope_theta,
                "tied_embeddings": spec.tie_embeddings,
                "non_embedding_parameters": spec.non_embedding_parameters(),
                "total_parameters": spec.total_parameters(vocab_size),
                "training_flops_per_token": spec.training_flops_per_token(vocab_size, seq_len),
                "note": spec.note,
            }
        )
    return rows


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"
