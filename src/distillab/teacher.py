"""Teacher signals: what the loss sees of the teacher for a batch.

A teacher signal turns a `Batch` (inputs, and the ids of its windows) into what the loss
consumes: dense logits [batch, seq, vocab], the teacher's final hidden states with its output
layer (`Head`, for the fused LM-head path), or its top-K per position (`SparseTeacher`).

    OnlineTeacher   a frozen HF causal LM run on the student's batch
    CachedTeacher   top-K outputs captured once (`distillab teacher cache`), read by window id

`build_teacher_signal` makes the right one from a run's config; the training loop only ever
calls `signal(batch)`. Each signal also states what it costs per student token (the FLOPs of
the teacher's forward pass, 0 for a cache), which sweeps and reports count.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from distillab.cache.store import TeacherCache, data_identity, first_mismatch, teacher_identity
from distillab.config import CACHE_MODES, KDConfig
from distillab.data.loader import Batch, model_inputs
from distillab.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from distillab.checkpoint import verify_model_directory
from distillab.errors import CheckpointError, ConfigError, DataError
from distillab.losses import Head, SparseTeacher
from distillab.models import load_causal_lm, max_positions, model_directory
from distillab.runtime import autocast, is_sharded

log = logging.getLogger("distillab")

# Logits within this of one another at every position: a teacher whose outputs are uniform.
UNIFORM_LOGITS = 1e-4

# Architectures whose logits are exactly the last hidden state times the output embedding.
PLAIN_HEAD_MODELS = {"llama", "qwen2", "qwen3", "mistral"}


class TeacherSignal(Protocol):
    """The teacher's distribution for the student's batch, aligned with the student's logits."""

    description: str

    def signal(self, batch: Batch, head: bool = False) -> torch.Tensor | Head | SparseTeacher:
        """Dense logits over the shared tokenizer's vocabulary [batch, seq, vocab] (or, with
        `head`, a Head when the signal can give one); never needs grad. The returned tensors
        may be reused by the next call: consume them before asking again."""
        ...

    def inference_flops_per_token(self) -> float:
        """FLOPs the signal spends per student token (a forward pass; 0 when read from a cache)."""
        ...


class OnlineTeacher:
    """A frozen HF model run under inference mode on each student batch.

    `vocab_size` is the number of output rows the loss runs over: the student's (its tokenizer's
    size, or more: the paper's Qwen3 rungs have 151,936 rows for a 128,256-token tokenizer, and the
    authors' loss, like their baselines', runs over all of them). A teacher with more rows gives its
    first `vocab_size` (rows no token uses), one with fewer is refused.
    """

    def __init__(self, model, vocab_size: int, device: torch.device, precision: str = "float32",
                 description: str = "online:<in-memory model>"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.vocab_size = vocab_size
        self.device = device
        self.precision = precision
        self.description = description
        self.buffer: torch.Tensor | None = None
        rows = self.model.config.vocab_size
        if rows < vocab_size:
            raise ConfigError("kd.teacher", f"the teacher has {rows:,} output rows, the student {vocab_size:,}; give "
                                            f"the student model.vocab_size={rows} or a teacher with as many rows")
        if rows > vocab_size:
            log.info("teacher has %d output rows; the student's loss runs over its %d", rows, vocab_size)

    @classmethod
    def load(cls, path: str | Path, tokenizer, device: torch.device, precision: str = "float32",
             rows: int | None = None) -> "OnlineTeacher":
        """The teacher in `path`, after checking it shares the run's tokenizer (else a ConfigError);
        its outputs over `rows` rows (default: the tokenizer's size)."""
        path = Path(path)
        check_same_tokenizer(path, tokenizer)
        return cls(load_causal_lm(path, device), rows or len(tokenizer), device, precision,
                   description=f"online:{path}")

    def positions(self) -> int:
        return max_positions(self.model)

    def inference_flops_per_token(self) -> float:
        """2 x matmul parameters (incl. the used output rows) + attention, per token (a forward pass)."""
        config = self.model.config
        matmul = sum(p.numel() for name, p in self.model.named_parameters()
                     if p.dim() >= 2 and "embed_tokens" not in name and "lm_head" not in name)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        attention = 4 * config.num_hidden_layers * self.positions() * heads * head_dim
        return 2.0 * (matmul + self.vocab_size * config.hidden_size) + attention

    def projects_plainly(self) -> bool:
        """True when logits are exactly hidden @ W_out^T (no soft-capping or scaling)."""
        output = self.model.get_output_embeddings()
        return self.model.config.model_type in PLAIN_HEAD_MODELS and output is not None

    @property
    def sharded(self) -> bool:
        """Whether the teacher is sharded by FSDP (`distillab.train.fsdp`)."""
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.model, FSDPModule)

    def signal(self, batch: Batch, head: bool = False) -> torch.Tensor | Head:
        # FSDP gathers weights into buffers it reuses across forwards: inference tensors cannot be those
        no_grad = torch.no_grad() if self.sharded else torch.inference_mode()
        with no_grad, autocast(self.device, self.precision):
            if not self.projects_plainly():
                return forward_logits(self.model, batch)[..., : self.vocab_size]
            hidden, weight = self.final_hidden(batch)
            if head:
                return Head(hidden, weight)
            if self.precision != "float32" or hidden.dtype != torch.float32:
                return (hidden @ weight.T).float()
            # project into a buffer kept across calls: only the student's rows, and no
            # batch x seq x vocab tensor allocated afresh each step (page faults on the CPU)
            shape = (*hidden.shape[:-1], self.vocab_size)
            if self.buffer is None or self.buffer.shape != shape or self.buffer.dtype != hidden.dtype:
                self.buffer = torch.empty(shape, dtype=hidden.dtype, device=hidden.device)
            return torch.matmul(hidden, weight.T, out=self.buffer)

    def final_hidden(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the final hidden states, the output layer's first `vocab_size` rows). A sharded teacher
        (FSDP) runs its root module, whose forward gathers the output layer (and keeps it gathered:
        `distillab.train.fsdp`), and only its last position through the output layer; the final norm's
        output is caught on its way."""
        if not self.sharded:
            backbone = getattr(self.model, self.model.base_model_prefix)
            weight = self.model.get_output_embeddings().weight
            return backbone(**model_inputs(batch)).last_hidden_state, weight[: self.vocab_size]
        caught = []
        norm = getattr(self.model, self.model.base_model_prefix).norm
        hook = norm.register_forward_hook(lambda module, args, out: caught.append(out))
        try:
            self.model(**model_inputs(batch), logits_to_keep=1)
        finally:
            hook.remove()
        weight = self.model.get_output_embeddings().weight
        if is_sharded(weight):
            raise RuntimeError("the teacher's output layer is still sharded after its forward pass")
        return caught[-1], weight[: self.vocab_size]


class CachedTeacher:
    """A teacher's top-K per position read from a cache by window id: no forward pass.

    Serves `SparseTeacher` rows; the loss truncates them further (top_k <= K, top_p) and
    tempers them (see `distillab.losses.teacher_rows` for which variants are exact).
    """

    def __init__(self, cache: TeacherCache):
        self.cache = cache
        self.top_k = cache.top_k
        self.description = f"cache:{cache.path} (top-{cache.top_k}, {cache.manifest['coding']['name']} coding)"

    @classmethod
    def open(cls, path: str | Path, teacher_dir: str | Path, data, seq_len: int, top_k: int | None,
             packing: str = "concat", rows: int | None = None) -> "CachedTeacher":
        """The cache in `path`, after checking it was captured from the teacher in `teacher_dir` over
        this run's tokenizer and training data at `seq_len`, with at least `top_k` tokens per position,
        its probabilities normalised over the student's `rows` output rows (default: the tokenizer's)."""
        cache = TeacherCache.open(path)
        if rows is not None and cache.output_rows != rows:
            raise ConfigError("kd.cache", f"{path} was captured over {cache.output_rows:,} output rows, the student has "
                                          f"{rows:,}; capture it again for this student")
        mismatch = first_mismatch(cache.manifest, teacher_identity(Path(teacher_dir)), data.fingerprint,
                                  data_identity(data))
        if mismatch is not None:
            raise ConfigError("kd.cache", f"{path} {mismatch}")
        if cache.seq_len != seq_len:
            raise ConfigError("train.seq_len", f"is {seq_len} but the teacher cache {path} was captured at seq_len "
                                               f"{cache.seq_len}; use that, or capture the cache again at {seq_len}")
        if cache.manifest.get("packing", "concat") != packing:
            raise ConfigError("data.packing", f"is {packing} but the teacher cache {path} was captured over "
                                              f"{cache.manifest['packing']} windows; capture it again")
        if top_k is not None and top_k > cache.top_k:
            raise ConfigError("kd.top_k", f"is {top_k} but the teacher cache {path} holds only the top {cache.top_k} "
                                          f"tokens per position; use kd.top_k <= {cache.top_k} or capture with "
                                          f"--top-k {top_k}")
        return cls(cache)

    def inference_flops_per_token(self) -> float:
        return 0.0

    def check_covers(self, stream, sequences: int) -> None:
        """Refuse, before training, a run that would read windows the cache did not capture."""
        missing = self.cache.missing(stream.windows_read(sequences))
        if len(missing):
            raise ConfigError("kd.cache", f"{self.cache.path} holds {len(self.cache.window_ids):,} of the "
                                                  f"training split's {stream.n_windows:,} windows, but this run also "
                                                  f"reads {len(missing):,} others (e.g. window {missing[0]}); capture "
                                                  "them (without --windows, a capture takes every window)")

    def signal(self, batch: Batch, head: bool = False) -> SparseTeacher:
        """The cached rows of the batch's windows as [batch, seq, K] (`head` is ignored: no logits)."""
        size, seq = batch.inputs.shape
        if seq != self.cache.seq_len:
            raise DataError(f"kd.cache: a batch of {seq} positions, but the cache holds windows of "
                            f"{self.cache.seq_len}")
        rows = self.cache.rows(np.asarray(batch.window_ids.cpu()))
        device, k = batch.inputs.device, self.top_k
        return SparseTeacher(torch.from_numpy(rows.ids).view(size, seq, k).to(device),
                             torch.from_numpy(rows.logprobs).view(size, seq, k).to(device),
                             torch.from_numpy(rows.log_tail).view(size, seq).to(device))


def forward_logits(model, batch: Batch) -> torch.Tensor:
    return model(**model_inputs(batch)).logits


def check_same_tokenizer(path: Path, tokenizer, key: str = "kd.teacher") -> None:
    try:
        teacher_tokenizer = load_tokenizer(path)
    except Exception:
        raise ConfigError(key, f"{path} holds no loadable tokenizer; a teacher must ship the run's tokenizer") from None
    if tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(tokenizer):
        raise ConfigError(key, f"the tokenizer in {path} differs from the run's tokenizer; teacher and student must "
                               "share one (prepare the student's data with data.tokenizer.path set to the teacher's "
                               "directory)")


def build_teacher_signal(kd: KDConfig, data, device: torch.device, precision: str, seq_len: int,
                         distills: bool, packing: str = "concat", rows: int | None = None) -> TeacherSignal | None:
    """The teacher signal a run's config asks for (None for teachers and baselines).

    Checks, before any training: the teacher exists (a directory, or a hub id already in the local
    HF cache), shares the run's tokenizer, was built for at least `seq_len` positions, and gives
    finite outputs. With `kd.cache` a directory: the cache was captured from that teacher's weights
    over this run's tokenizer, training split and seq_len, with K >= kd.top_k (a mismatch is a
    one-line ConfigError naming what differs). `rows`: the student's output rows (default: the
    tokenizer's size), which the teacher's distribution covers.
    """
    if not distills:
        return None
    directory = model_directory(kd.teacher or "", revision=kd.teacher_revision)
    try:
        verify_model_directory(directory)
    except CheckpointError as exc:
        raise ConfigError("kd.teacher", f"{exc}; retrain or restore the teacher") from None
    if kd.cache not in CACHE_MODES:
        return CachedTeacher.open(kd.cache, str(directory), data, seq_len, kd.top_k, packing, rows)
    teacher = OnlineTeacher.load(directory, data.tokenizer, device, precision, rows)
    if 0 < teacher.positions() < seq_len:
        raise ConfigError("train.seq_len", f"is {seq_len} but the teacher {kd.teacher} was built for "
                                           f"{teacher.positions()} positions; its outputs beyond them are untrained "
                                           "(use train.seq_len <= that, or a teacher trained on longer sequences)")
    check_finite_outputs(teacher, data, seq_len, device)
    return teacher


def check_finite_outputs(teacher: OnlineTeacher, data, seq_len: int, device: torch.device) -> None:
    """Refuse a teacher whose weights or outputs on the run's first validation window are not finite."""
    for name, param in teacher.model.named_parameters():
        if not torch.isfinite(param).all():
            raise ConfigError("kd.teacher", f"the teacher's weight {name} holds non-finite values; it diverged or is "
                                            "corrupt: retrain it")
    from distillab.data.loader import WindowStream

    tokens = data.tokens("validation")
    length = min(seq_len, max(1, len(tokens) - 1))
    probe = WindowStream(tokens, length, 0).window([0]).to(device)
    output = teacher.signal(probe)
    if not torch.isfinite(output).all():
        raise ConfigError("kd.teacher", "the teacher's outputs are not finite on the validation data; it diverged "
                                        "or is corrupt: retrain it")
    if float((output.amax(-1) - output.amin(-1)).max()) < UNIFORM_LOGITS:
        log.warning("warning: kd.teacher: the teacher's outputs are exactly uniform over the vocabulary on the "
                    "validation data (a collapsed or untrained model): distilling from it teaches nothing beyond "
                    "label smoothing")
