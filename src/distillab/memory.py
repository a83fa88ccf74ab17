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
                 or, when the output layer is fused into the loss (at least 2^28 logits, any
                 parallelism), chunk scratch 3 x 4 bytes x rows x V, the output layer's fp32
                 gradient 4 V d and the hidden states' 4 t d
    teacher      stored as loaded, fp32: 4 Pt (ddp) or 4 Pt / S plus its gathered root and two
                 blocks at width w (sharded); its logits t x V x 4 bytes unless fused (then its
                 final hidden states, w t d_t); one block's forward working set
    cache        a teacher read from a cache instead: its top-K rows of a micro-batch,
                 t x K x (8 + 4) + 4 t bytes (ids, log-probs, tail), and the truncation's
                 chunk scratch 3 x 4 x rows x K
    overhead     CUDA context, NCCL buffers and allocator slack: 2 GiB + 5 % of the rest

Beside the training step, the phases that run at other times, each checked on its own:

    evaluation   during training (every eval_every steps): weights, optimizer state and the
                 teacher as above (gradients freed), plus the forward of eval.batch_size x
                 eval.seq_len tokens E: logits E x V x w, their fp32 copy and cross-entropy's
                 log-softmax (4 + 4 bytes each) and one block's working set
    final eval   `distillab eval` of the final model (a sweep evaluates every run): one process,
                 the model in fp32 (4 P) and the same forward in fp32 at the sweep's
                 eval.batch_size
    analysis     a sweep's mechanism analysis: student, teacher and baseline on one GPU in
                 eval.analysis.dtype (4 or 2 bytes a value), three logits tensors of a batch
                 (eval.analysis.batch_size x its seq_len x V, same width) and the float64 chunks
                 of the metrics (6 x 256 MiB)

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
    return layout.batch_size * layout.seq_len * vocab >= HEAD_FUSION_ELEMENTS


def chunk_rows(vocab: int) -> int:
    return max(128, GPU_CHUNK_ROWS_ELEMENTS // vocab)


def logit_bytes(layout: Layout, vocab: int, d_model: int) -> float:
    """The student's logits and their gradient, or the fused loss's scratch and gradients."""
    tokens = layout.batch_size * layout.seq_len
    if fuses_head(layout, vocab):
        return 3 * 4 * chunk_rows(vocab) * vocab + 4 * vocab * d_model + 4 * tokens * d_model
    return tokens * vocab * 8


def cache_reader_bytes(layout: Layout, top_k: int) -> float:
    """A micro-batch's top-K rows read from a teacher cache, and the truncation's chunk scratch."""
    tokens = layout.batch_size * layout.seq_len
    return tokens * top_k * (8 + 4) + 4 * tokens + 3 * 4 * 128 * top_k


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
            "activations": activation_bytes(spec, layout), "logits": logit_bytes(layout, vocab, spec.d_model)}


def teacher_bytes(spec: ModelSpec, vocab: int, layout: Layout) -> float:
    tokens = layout.batch_size * layout.seq_len
    working = layout.width * tokens * (4 * spec.d_model + 3 * spec.ffn)
    output = layout.width * tokens * spec.d_model if fuses_head(layout, vocab) else tokens * vocab * 4
    return weight_bytes(spec, vocab, layout, 4) + output + working


def with_overhead(base: float) -> float:
    return base + OVERHEAD_BYTES + OVERHEAD_FRACTION * base


@dataclass(frozen=True)
class Phase:
    """A part of a run that peaks at another time than the training step: its peak bytes per GPU
    and the key (with a value) that would lower it below the GPU's memory, if any does."""
    name: str
    total: float
    fix: str = ""


@dataclass
class MemoryPlan:
    components: dict[str, float]
    layout: Layout
    gpu: GPU | None
    phases: tuple[Phase, ...] = ()

    @property
    def total(self) -> float:
        return with_overhead(sum(self.components.values()))

    @property
    def step_fits(self) -> bool:
        return self.gpu is None or self.total <= self.gpu.memory_bytes

    @property
    def fits(self) -> bool:
        return self.step_fits and all(self.gpu is None or p.total <= self.gpu.memory_bytes for p in self.phases)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in self.components.items())
        where = f" of {self.gpu.memory_gib:g} on {self.gpu.name}" if self.gpu else ""
        verdict = "" if self.gpu is None else (": fits" if self.fits else ": DOES NOT FIT")
        phases = "".join(f"; {p.name} {p.total / GIB:.1f}" for p in self.phases)
        return f"{self.total / GIB:.1f} GiB per GPU{where} ({self.layout.describe()}; GiB: {parts}, overhead " \
               f"{(self.total - sum(self.components.values())) / GIB:.1f}{phases}){verdict}"


def memory_plan(student: ModelSpec, vocab: int, layout: Layout, teacher: ModelSpec | None = None,
                gpu: GPU | None = None, cache_k: int | None = None) -> MemoryPlan:
    """The training step's peak; a teacher read from a cache of top `cache_k` counts its rows instead."""
    components = student_components(student, vocab, layout)
    if teacher is not None:
        components["teacher"] = teacher_bytes(teacher, vocab, layout)
    elif cache_k is not None:
        components["cache"] = cache_reader_bytes(layout, cache_k)
    return MemoryPlan(components, layout, gpu)


def forward_bytes(spec: ModelSpec, vocab: int, tokens: int, width: int) -> float:
    """An evaluation forward of `tokens` tokens: logits at `width`, their fp32 copy (none when already
    fp32), cross-entropy's log-softmax, one block's working set."""
    logits = tokens * vocab * (width + (4 if width != 4 else 0) + 4)
    return logits + width * tokens * (4 * spec.d_model + 3 * spec.ffn)


def evaluation_phase(plan: MemoryPlan, student: ModelSpec, vocab: int, batch: int, seq_len: int) -> Phase:
    """Evaluation during training: the step's resident state (no gradients, activations or logits) plus a
    forward of eval.batch_size x eval.seq_len tokens."""
    resident = sum(v for k, v in plan.components.items() if k in ("weights", "optimizer", "teacher", "cache"))

    def total(b: int) -> float:
        return with_overhead(resident + forward_bytes(student, vocab, b * seq_len, plan.layout.width))
    return Phase("evaluation", total(batch), smaller_batch("eval.batch_size", batch, total, plan.gpu))


def final_evaluation_phase(student: ModelSpec, vocab: int, batch: int, seq_len: int, gpu: GPU | None,
                           key: str = "eval.batch_size") -> Phase:
    """`distillab eval` of the final model: fp32 weights and an fp32 forward."""
    def total(b: int) -> float:
        return with_overhead(4 * student.total_parameters(vocab) + forward_bytes(student, vocab, b * seq_len, 4))
    return Phase("final eval", total(batch), smaller_batch(key, batch, total, gpu))


def analysis_phase(models: list[ModelSpec], vocab: int, batch: int, seq_len: int, gpu: GPU | None,
                   width: int = 4) -> Phase:
    """The mechanism analysis of a student with its teacher and baseline (one GPU, weights and logits
    `width` bytes a value)."""
    weights = sum(width * spec.total_parameters(vocab) for spec in models)

    def total(b: int) -> float:
        return with_overhead(weights + len(models) * b * seq_len * vocab * width + 6 * (1 << 28))
    return Phase("analysis", total(batch), smaller_batch("eval.analysis.batch_size", batch, total, gpu))


def smaller_batch(key: str, batch: int, total, gpu: GPU | None) -> str:
    """`key=b` for the largest b < batch (halving) whose peak fits; "" when `batch` fits or none does."""
    if gpu is None or total(batch) <= gpu.memory_bytes:
        return ""
    b = batch
    while b > 1:
        b //= 2
        if total(b) <= gpu.memory_bytes:
            return f"{key}={b} would ({total(b) / GIB:.1f} GiB)"
    return f"even {key}=1 does not fit ({total(1) / GIB:.1f} GiB); use a larger GPU"


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


def run_memory_plan(config: RunConfig, teacher: ModelSpec | None, gpu: GPU | None, cache_k: int | None = None,
                    final_eval: tuple[int, int] | None = None,
                    analysis: tuple | None = None) -> MemoryPlan:
    """A run's plan: the training step, evaluation during training, and (in a sweep) the final
    evaluation at (batch, seq_len) and the analysis of (models, batch, seq_len[, bytes per value])."""
    student = resolve_spec(config.model)
    vocab = student.rows(config.data.tokenizer.vocab_size)
    plan = memory_plan(student, vocab, Layout.of(config), teacher, gpu, cache_k)
    e = config.eval
    phases = [evaluation_phase(plan, student, vocab, e.batch_size, e.seq_len or config.train.seq_len)]
    if final_eval is not None:
        phases.append(final_evaluation_phase(student, vocab, *final_eval, gpu))
    if analysis is not None:
        models, batch, seq_len, *width = analysis
        phases.append(analysis_phase(models, vocab, batch, seq_len, gpu, *width))
    plan.phases = tuple(phases)
    return plan


def refuse_unless_fits(plan: MemoryPlan, config: RunConfig, teacher: ModelSpec | None, what: str) -> None:
    """A one-line ConfigError when `plan` does not fit its GPU, saying what would."""
    if plan.fits:
        return
    student = resolve_spec(config.model)
    vocab = student.rows(config.data.tokenizer.vocab_size)
    if not plan.step_fits:
        raise ConfigError("memory plan", f"{what} needs {plan.total / GIB:.1f} GiB per GPU on {plan.gpu.name} "
                                         f"({plan.gpu.memory_gib:g} GiB) with {plan.layout.describe()}; "
                                         f"{what_would_fit(student, vocab, plan.layout, teacher, plan.gpu)}")
    phase = next(p for p in plan.phases if p.total > plan.gpu.memory_bytes)
    raise ConfigError("memory plan", f"{what}: its {phase.name} needs {phase.total / GIB:.1f} GiB on {plan.gpu.name} "
                                     f"({plan.gpu.memory_gib:g} GiB); {phase.fix}")
