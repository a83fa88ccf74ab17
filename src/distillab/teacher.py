"""Teacher signals: what the loss sees of the teacher for a batch.

`OnlineTeacher` runs a frozen HF causal LM on the student's batch. A later offline cache of
top-k teacher logits implements the same `TeacherSignal` protocol, so the training loop and
the loss do not change when the signal does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch

from distillab.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from distillab.errors import CheckpointError, ConfigError

log = logging.getLogger("distillab")

# Architectures whose logits are exactly the last hidden state times the output embedding.
_PLAIN_HEAD_MODELS = {"llama", "qwen2", "qwen3", "mistral"}


class TeacherSignal(Protocol):
    """Produces teacher logits aligned with the student's, for one batch of input ids."""

    description: str

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq, vocab] logits over the shared tokenizer's vocabulary; never needs grad.

        The returned tensor may be reused by the next call: consume it before asking again.
        """
        ...


def load_causal_lm(path: str | Path, device: torch.device, key: str = "kd.teacher"):
    """An HF causal LM from a directory, in fp32, or a one-line error naming `key`."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(key, f"{path} is not an HF model directory (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: cannot load as a causal LM ({first})") from None
    return model.to(device)


class OnlineTeacher:
    """A frozen HF model run under inference mode on each student batch."""

    def __init__(self, path: str | Path, tokenizer, device: torch.device, precision: str = "float32"):
        path = Path(path)
        try:
            teacher_tokenizer = load_tokenizer(path)
        except Exception:
            raise ConfigError(
                "kd.teacher", f"{path} holds no loadable tokenizer; a teacher must ship the run's tokenizer"
            ) from None
        if tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(tokenizer):
            raise ConfigError(
                "kd.teacher",
                f"the tokenizer in {path} differs from the run's tokenizer; teacher and student must share one "
                "(prepare the student's data with data.tokenizer.path set to the teacher's directory)",
            )
        self.model = load_causal_lm(path, device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.vocab_size = len(tokenizer)
        model_vocab = self.model.config.vocab_size
        if model_vocab < self.vocab_size:
            raise ConfigError(
                "kd.teacher", f"{path} has {model_vocab} output rows, fewer than the tokenizer's {self.vocab_size}"
            )
        if model_vocab > self.vocab_size:
            log.info("teacher %s has %d output rows (padding); slicing logits to the tokenizer's %d",
                     path, model_vocab, self.vocab_size)
        self.device = device
        self.precision = precision
        self.path = path
        self.description = f"online:{path}"
        self._buffer: torch.Tensor | None = None

    @classmethod
    def from_model(cls, model, vocab_size: int, device: torch.device, precision: str = "float32") -> "OnlineTeacher":
        """A teacher signal over an already loaded model (benchmarks, notebooks)."""
        teacher = cls.__new__(cls)
        teacher.model = model.to(device).eval().requires_grad_(False)
        teacher.vocab_size = vocab_size
        teacher.device = device
        teacher.precision = precision
        teacher.path = None
        teacher.description = "online:<in-memory model>"
        teacher._buffer = None
        return teacher

    def _projects_plainly(self) -> bool:
        """True when logits are exactly hidden @ W_out^T (no soft-capping or scaling)."""
        return (
            self.model.config.model_type in _PLAIN_HEAD_MODELS
            and self.precision == "float32"
            and self.model.get_output_embeddings() is not None
        )

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        from distillab.runtime import autocast

        with torch.inference_mode(), autocast(self.device, self.precision):
            if not self._projects_plainly():
                return self.model(input_ids=input_ids, use_cache=False).logits[..., : self.vocab_size]
            # Run the backbone, then project into a buffer kept across calls: only the tokenizer's
            # rows of the output layer are computed, and no batch x seq x vocab tensor is
            # allocated afresh each step (on the CPU that costs page faults on ~64 MB).
            backbone = getattr(self.model, self.model.base_model_prefix)
            hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state
            weight = self.model.get_output_embeddings().weight[: self.vocab_size]
            shape = (*hidden.shape[:-1], self.vocab_size)
            if self._buffer is None or self._buffer.shape != shape or self._buffer.dtype != hidden.dtype:
                self._buffer = torch.empty(shape, dtype=hidden.dtype, device=hidden.device)
            torch.matmul(hidden, weight.T, out=self._buffer)
            return self._buffer
