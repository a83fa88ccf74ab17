"""Per-GPU memory plan of a run, before launch: what it needs, whether it fits, what would.

With P the student's parameters, Pt the teacher's, N processes, S the slices one copy of the
state is split into (the shard dimension of the parallelism's mesh, `distillab.parallelism`:
N under fsdp, N / nodes under hsdp, 1 under ddp), w the compute width (2 bytes under
`train.precision: bfloat16` on a GPU, else 4), t = batch_size x seq_len tokens per
micro-batch, d / f / L the student's width, MLP width and layers, V the output rows:

    weights      fp32 master weights: 4P under ddp, 4P/S when sharded, where each process also
                 holds the gathered compute copies in flight: the root unit (embeddings, output
                 layer) and two blocks (the current one and the prefetched next), w bytes each;
                 ddp with bf16 autocast keeps a w-byte cast of the weights (+wP)
    gradients    fp32: 4P, plus 4P of DDP's communication buckets when N > 1; 4P/S when sharded
    optimizer    AdamW's two fp32 moments: 8P (ddp) or 8P/S (sharded)
    activations  what backward keeps, per token per block: w x (6d + 2 kv + 4f) (norm inputs,
                 q/k/v, attention output, projections, the SwiGLU's gate, up, product and
                 input; kv = kv_heads x head_dim; SDPA / flash attention keeps no t x t scores);
                 with activation checkpointing each block keeps only its input (w x d per
                 token) and one block's full set is live during its recomputation
    logits       the student's output: t x V x (4 + 4) bytes (fp32 logits and their gradient),
                 or, when the output layer is fused into the loss (ddp / single process, at
                 least 2^28 logits), chunk scratch only: 3 x 4 bytes x rows x V
    teacher      stored as loaded, fp32: 4 Pt (ddp) or 4 Pt / S plus its gathered root and two
                 blocks at width w (sharded); its logits t x V x 4 bytes unless fused (ddp); one
                 block's forward working set
    overhead     CUDA context, NCCL buffers and allocator slack: 2 GiB + 5 % of the rest

These are estimates of the peak, within ~10-15 % for the Llama-shaped models of the ladder
(checked against measured peaks where a GPU was available: benchmarks/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from distillab.config import CACHE_MODES, RunConfig
from distillab.errors import ConfigError
from distillab.gpus import GIB, GPU
from distillab.models import ModelSpec, model_directory, resolve_spec, spec_from_hf_config
from distillab.parallelism import Mesh, mesh_of, parallelism

HEAD_FUSION_ELEMENTS = 1 << 28  # as distillab.train.step
GPU_CHUNK_ROWS_ELEMENTS = 1 << 26  # as distillab.losses.fused (GPU chunk of rows x vocab)
OVERHEAD_BYTES = 2 * GIB
OVERHEAD_FRACTION = 0.05


@dataclass(frozen=True)
class Layout:
    """How a run is spread: parallelism, processes, micro-batch, checkpointing, compute width."""
    parallel: str
    processes: int
    batch_size: int
    seq_len: int
    activation_checkpointing: bool
    width: int  # bytes per compute value
    nodes: int = 1

    @classmethod
    def of(cls, config: RunConfig, gpu: bool = True) -> "Layout":
        t = config.train
        width = 2 if t.precision == "bfloat16" and gpu else 4
        return cls(t.parallel, t.processes, t.batch_size, t.seq_len, t.activation_checkpointing, width, t.nodes)

    @property
    def mesh(self) -> Mesh:
        return mesh_of(self.parallel, self.processes, self.nodes)

    @property
    def sharded(self) -> bool:
        return parallelism(self.parallel).sharded

    @property
    def split(self) -> int:
        """Into how many slices each process's copy of the state is split (1: whole copies)."""
        return self.mesh.state_split if self.sharded else 1

    def describe(self) -> str:
        checkpointing = ", activation checkpointing" if self.activation_checkpointing else ""
        nodes = f" on {self.nodes} nodes" if self.nodes > 1 else ""
        return f"{self.parallel} x {self.processes}{nodes}, micro-batch {self.batch_size} x {self.seq_len}" \
               f"{checkpointing}"


def block_parameters(spec: ModelSpec) -> int:
    return (spec.non_embedding_parameters() - spec.d_model) // spec.layers


def activation_bytes(spec: ModelSpec, layout: Layout) -> float:
    tokens = layout.batch_size * layout.seq_len
    per_block = layout.width * tokens * (6 * spec.d_model + 2 * spec.kv_heads * spec.head_dim + 4 * spec.ffn)
    if layout.activation_checkpointing:
        return spec.layers * layout.width * tokens * spec.d_model + per_block
    return spec.layers * per_block


def fuses_head(layout: Layout, vocab: int) -> bool:
    return not layout.sharded and layout.batch_size * layout.seq_len * vocab >= HEAD_FUSION_ELEMENTS


def logit_bytes(layout: Layout, vocab: int, per_value: int) -> float:
    if fuses_head(layout, vocab):
        return 3 * 4 * max(128, GPU_CHUNK_ROWS_ELEMENTS // vocab) * vocab
    return layout.batch_size * layout.seq_len * vocab * per_value


def weight_bytes(spec: ModelSpec, vocab: int, layout: Layout, master: int) -> float:
    """Weights held between steps (`master` bytes each) plus gathered compute copies under fsdp."""
    total = spec.total_parameters(vocab)
    if not layout.sharded:
        return master * total
    gathered = layout.width * (spec.embedding_parameters(vocab) + spec.d_model + 2 * block_parameters(spec))
    return master * total / layout.split + gathered


def student_components(spec: ModelSpec, vocab: int, layout: Layout) -> dict[str, float]:
    total, split = spec.total_parameters(vocab), layout.split
    weights = weight_bytes(spec, vocab, layout, 4)
    if not layout.sharded and layout.width == 2:
        weights += 2 * total  # autocast's cast of the weights
    gradients = 4 * total / split if layout.sharded else (8 if layout.processes > 1 else 4) * total
    optimizer = 8 * total / split
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer,
            "activations": activation_bytes(spec, layout), "logits": logit_bytes(layout, vocab, 8)}


def teacher_bytes(spec: ModelSpec, vocab: int, layout: Layout) -> float:
    tokens = layout.batch_size * layout.seq_len
    working = layout.width * tokens * (4 * spec.d_model + 3 * spec.ffn)
    return weight_bytes(spec, vocab, layout, 4) + logit_bytes(layout, vocab, 4) + working


@dataclass
class MemoryPlan:
    components: dict[str, float]
    layout: Layout
    gpu: GPU | None

    @property
    def total(self) -> float:
        base = sum(self.components.values())
        return base + OVERHEAD_BYTES + OVERHEAD_FRACTION * base

    @property
    def fits(self) -> bool:
        return self.gpu is None or self.total <= self.gpu.memory_bytes

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in self.components.items())
        where = f" of {self.gpu.memory_gib:g} on {self.gpu.name}" if self.gpu else ""
        verdict = "" if self.gpu is None else (": fits" if self.fits else ": DOES NOT FIT")
        return f"{self.total / GIB:.1f} GiB per GPU{where} ({self.layout.describe()}; GiB: {parts}, overhead " \
               f"{(self.total - sum(self.components.values())) / GIB:.1f}){verdict}"


def memory_plan(student: ModelSpec, vocab: int, layout: Layout, teacher: ModelSpec | None = None,
                gpu: GPU | None = None) -> MemoryPlan:
    components = student_components(student, vocab, layout)
    if teacher is not None:
        components["teacher"] = teacher_bytes(teacher, vocab, layout)
    return MemoryPlan(components, layout, gpu)


def alternatives(layout: Layout) -> list[tuple[str, Layout]]:
    """Changes that lower the peak, in the order a user would try them (same global batch where
    the micro-batch shrinks: grad_accum grows to match)."""
    options = []
    if not layout.sharded:
        options.append(("train.parallel=fsdp", replace(layout, parallel="fsdp")))
    if not layout.activation_checkpointing:
        options.append(("train.activation_checkpointing=true", replace(layout, activation_checkpointing=True)))
    sharded = replace(layout, parallel="fsdp", activation_checkpointing=True)
    batch = layout.batch_size
    while batch > 1:
        batch //= 2
        options.append((f"train.parallel=fsdp, activation checkpointing and train.batch_size={batch} (grad_accum x "
                        f"{layout.batch_size // batch})", replace(sharded, batch_size=batch)))
    for processes in (2, 4, 8, 16, 32, 64, 128, 256):
        if processes > layout.processes:
            options.append((f"fsdp on {processes} GPUs with activation checkpointing and micro-batch {batch}",
                            replace(sharded, batch_size=batch, processes=processes,
                                    nodes=layout.nodes if processes % layout.nodes == 0 else 1)))
    return options


def what_would_fit(student: ModelSpec, vocab: int, layout: Layout, teacher: ModelSpec | None, gpu: GPU) -> str:
    """The first alternative that fits, as a sentence (or that none of them does)."""
    for change, candidate in alternatives(layout):
        plan = memory_plan(student, vocab, candidate, teacher, gpu)
        if plan.fits:
            return f"{change} would ({plan.total / GIB:.1f} GiB)"
    return "nothing tried fits (fsdp, activation checkpointing, micro-batch 1, up to 256 GPUs); use a larger GPU"


def teacher_of_config(config: RunConfig) -> tuple[ModelSpec | None, str]:
    """A run's teacher shape from its directory's config.json, with a note when it is not counted."""
    if config.kd.teacher is None or (config.kd.alpha == 0 and config.kd.alpha_schedule.shape == "constant"):
        return None, ""
    if config.kd.cache not in CACHE_MODES:
        return None, " (teacher read from its cache: no teacher model in memory)"
    try:
        from transformers import AutoConfig

        directory = model_directory(config.kd.teacher)
        return spec_from_hf_config(AutoConfig.from_pretrained(str(directory)), "teacher", key="kd.teacher"), ""
    except (OSError, ValueError, KeyError, ConfigError):
        return None, f" (teacher {config.kd.teacher} not found: not counted)"


def run_memory_plan(config: RunConfig, teacher: ModelSpec | None, gpu: GPU | None) -> MemoryPlan:
    student = resolve_spec(config.model)
    vocab = student.rows(config.data.tokenizer.vocab_size)
    return memory_plan(student, vocab, Layout.of(config), teacher, gpu)


def refuse_unless_fits(plan: MemoryPlan, config: RunConfig, teacher: ModelSpec | None, what: str) -> None:
    """A one-line ConfigError when `plan` does not fit its GPU, saying what would."""
    if plan.fits:
        return
    student = resolve_spec(config.model)
    vocab = student.rows(config.data.tokenizer.vocab_size)
    raise ConfigError("memory plan", f"{what} needs {plan.total / GIB:.1f} GiB per GPU on {plan.gpu.name} "
                                     f"({plan.gpu.memory_gib:g} GiB) with {plan.layout.describe()}; "
                                     f"{what_would_fit(student, vocab, plan.layout, teacher, plan.gpu)}")
