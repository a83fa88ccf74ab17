"""A teacher with another tokenizer: each student window re-tokenized for the teacher and the two
tokenizations aligned by byte spans, for the `uld` and `alm` divergences (`distillab.losses.cross_tokenizer`).

A student window of L + 1 tokens is a byte string (end-of-text tokens count as one unit each and
split it into segments). The teacher tokenizes each segment itself (its own end-of-text between
them) and runs on that. Offsets are in these byte units on both sides, so:

    aligned position  a student position and a teacher position that both predict a token starting
                      at the same offset a: both have read exactly the bytes before a (ULD)
    chunk             the bytes between two consecutive offsets where both tokenizations have a
                      token boundary: both predict exactly those bytes, after the same prefix (ALM)

Only offsets after both sides' first predicted token count (a window's first token is input only).
Both tokenizers must be byte-level BPE (GPT-2 style byte alphabet: distillab's own, GPT-2,
Llama-3, Qwen, Pythia / GPT-NeoX), whose tokens are exact byte strings. A window that starts or
ends inside a multi-byte character gives the teacher the whole characters only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from distillab.data.loader import Batch
from distillab.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from distillab.errors import ConfigError
from distillab.losses import AlignedTeacher


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the other 68 bytes for the
    characters 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer, key: str) -> list[bytes]:
    """Each token id's bytes (the end-of-text token: b""), or a ConfigError naming `key` when the
    tokenizer is not byte-level BPE."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if "ByteLevel" not in json.dumps(state.get("decoder")):
        raise ConfigError(key, "its tokenizer does not decode byte-level BPE tokens; cross-tokenizer distillation "
                               "aligns byte spans and needs byte-level BPE tokenizers")
    decoder, out = byte_decoder(), []
    special = set(tokenizer.all_special_ids)
    for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        out.append(b"")
        if token is None:
            continue
        try:
            out[-1] = bytes(decoder[ch] for ch in token)
        except KeyError:
            if tokenizer.convert_tokens_to_ids(token) not in special:
                raise ConfigError(key, f"the tokenizer's token {token!r} is not byte-level BPE; cross-tokenizer "
                                       "distillation aligns byte spans and needs byte-level BPE tokenizers") from None
    return out


def valid_utf8(data: bytes) -> tuple[int, int]:
    """(start, end) of the longest stretch of `data` that decodes as UTF-8 with its edges trimmed."""
    start = 0
    while start < min(len(data), 3) and 0x80 <= data[start] < 0xC0:
        start += 1
    for end in range(len(data), max(start, len(data) - 4), -1):
        try:
            data[start:end].decode("utf-8")
            return start, end
        except UnicodeDecodeError:
            continue
    return start, start


@dataclass
class Alignment:
    """One window: the teacher's ids, ULD pairs (student position, teacher position) and ALM chunks
    (the student positions and teacher positions predicting each chunk's tokens)."""

    teacher_ids: list[int]
    pairs: list[tuple[int, int]]
    chunks: list[tuple[list[int], list[int]]]


def align_window(student_ids: list[int], student_bytes: list[bytes], student_eos: int, teacher_tokenizer,
                 teacher_bytes: list[bytes]) -> Alignment:
    """Re-tokenize a student window for the teacher (segment by segment) and align the two by offsets."""
    teacher_ids, teacher_starts, teacher_ends = [], [], []

    def flush(text: bytes, at: int) -> int:
        start, end = valid_utf8(text)
        if end > start:
            cursor = at + start
            for token in teacher_tokenizer(text[start:end].decode("utf-8"), add_special_tokens=False)["input_ids"]:
                teacher_ids.append(token)
                teacher_starts.append(cursor)
                cursor += len(teacher_bytes[token])
                teacher_ends.append(cursor)
            if cursor != at + end:
                raise ConfigError("kd.teacher", "the teacher's tokenizer changes the text it encodes (a normalizer); "
                                                "cross-tokenizer alignment needs exact byte spans")
        return at + len(text)

    position, segment = 0, []
    for token in student_ids:
        if token != student_eos:
            segment.append(student_bytes[token])
            continue
        position = flush(b"".join(segment), position)
        segment = []
        teacher_ids.append(teacher_tokenizer.eos_token_id)
        teacher_starts.append(position)
        teacher_ends.append(position + 1)
        position += 1
    flush(b"".join(segment), position)
    lengths = np.asarray([1 if t == student_eos else len(student_bytes[t]) for t in student_ids])
    student_ends = np.cumsum(lengths)
    return Alignment(teacher_ids, *match(student_ends - lengths, student_ends, np.asarray(teacher_starts),
                                         np.asarray(teacher_ends)))


def identity_alignment(student_ids: list[int]) -> Alignment:
    """The teacher shares the student's tokenizer: its ids are the student's, every position aligned
    and every token its own chunk (re-tokenizing a window cut mid-word could change its first tokens)."""
    positions = range(len(student_ids) - 1)
    return Alignment(list(student_ids), [(i, i) for i in positions], [([i], [i]) for i in positions])


def match(s_start: np.ndarray, s_end: np.ndarray, t_start: np.ndarray, t_end: np.ndarray):
    """(pairs, chunks) from both sides' token offsets (ascending; the teacher's may skip unreadable bytes).

    Token j >= 1 is predicted at position j - 1 on either side. Boundaries count from the later of
    the two sides' first predicted token; a chunk counts when both sides' tokens tile it exactly."""
    if len(s_start) < 2 or len(t_start) < 2:
        return [], []
    first = max(s_start[1], t_start[1])
    s_index = {int(a): j for j, a in enumerate(s_start) if j >= 1 and a >= first}
    t_index = {int(a): k for k, a in enumerate(t_start) if k >= 1 and a >= first}
    pairs = [(s_index[a] - 1, t_index[a] - 1) for a in sorted(set(s_index) & set(t_index))]
    boundaries = sorted((set(s_index) | {int(s_end[-1])}) & (set(t_index) | {int(t_end[-1])}))
    chunks = []
    for a, b in zip(boundaries, boundaries[1:]):
        js = range(int(np.searchsorted(s_start, a)), int(np.searchsorted(s_start, b)))
        ks = range(int(np.searchsorted(t_start, a)), int(np.searchsorted(t_start, b)))
        tiled = (len(js) and len(ks) and s_end[js[-1]] == b and t_end[ks[-1]] == b
                 and (t_end[ks.start:ks.stop - 1] == t_start[ks.start + 1:ks.stop]).all())
        if tiled:
            chunks.append(([j - 1 for j in js], [k - 1 for k in ks]))
    return pairs, chunks


class CrossTokenizerTeacher:
    """A frozen HF causal LM with its own tokenizer, run on each student window re-tokenized."""

    def __init__(self, model, teacher_tokenizer, student_tokenizer, device: torch.device, description: str,
                 alignment: str | None = None):
        self.model = model.to(device).eval().requires_grad_(False)
        self.teacher_tokenizer, self.device, self.description = teacher_tokenizer, device, description
        # what the divergence's kernel reads (`Divergence.alignment`): "positions" (the pairs) or
        # "chunks"; None: both
        self.alignment = alignment
        self.teacher_bytes = token_bytes(teacher_tokenizer, "kd.teacher")
        self.student_bytes = token_bytes(student_tokenizer, "data.tokenizer")
        self.student_eos = student_tokenizer.eos_token_id
        self.vocab = len(teacher_tokenizer)
        self.same_tokenizer = tokenizer_fingerprint(teacher_tokenizer) == tokenizer_fingerprint(student_tokenizer)
        self.positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)

    @classmethod
    def load(cls, path: Path, student_tokenizer, device: torch.device, alignment: str | None = None
             ) -> "CrossTokenizerTeacher":
        from distillab.models import load_causal_lm

        try:
            teacher_tokenizer = load_tokenizer(path)
        except Exception:
            raise ConfigError("kd.teacher", f"{path} holds no loadable tokenizer; a cross-tokenizer teacher ships "
                                            "its own") from None
        return cls(load_causal_lm(path, device), teacher_tokenizer, student_tokenizer, device,
                   f"online:{path} (own tokenizer, {len(teacher_tokenizer):,} tokens)", alignment)

    def inference_flops_per_token(self) -> float:
        config = self.model.config
        matmul = sum(p.numel() for name, p in self.model.named_parameters()
                     if p.dim() >= 2 and "embed_tokens" not in name and "lm_head" not in name)
        return 2.0 * (matmul + self.vocab * config.hidden_size)

    def signal(self, batch: Batch, head: bool = False) -> AlignedTeacher:
        if bool((batch.labels < 0).any()):
            raise ConfigError("data.packing", "a cross-tokenizer teacher needs concat windows (every label a token)")
        windows = torch.cat([batch.inputs, batch.labels[:, -1:]], dim=1).tolist()
        alignments = [identity_alignment(w) if self.same_tokenizer else
                      align_window(w, self.student_bytes, self.student_eos, self.teacher_tokenizer, self.teacher_bytes)
                      for w in windows]
        return self.aligned(alignments, batch.inputs.shape[1])

    def aligned(self, alignments: list[Alignment], seq: int) -> AlignedTeacher:
        """Run the teacher on every window's ids and gather what the loss needs."""
        length = max(len(a.teacher_ids) for a in alignments)
        if self.positions:
            length = min(length, self.positions + 1)
        ids = torch.full((len(alignments), length), self.teacher_tokenizer.eos_token_id, dtype=torch.long)
        for b, a in enumerate(alignments):
            ids[b, : min(length, len(a.teacher_ids))] = torch.tensor(a.teacher_ids[:length])
        with torch.inference_mode():
            logits = self.model(input_ids=ids[:, :-1].to(self.device), use_cache=False).logits
            logits = logits.float()[..., : self.vocab]
            log_p = torch.log_softmax(logits, dim=-1)
        usable = length - 1  # teacher positions with a prediction
        next_logp = log_p.gather(2, ids[:, 1:].to(log_p.device)[..., None]).squeeze(-1)  # [B, usable]
        pair_rows, pair_at, chunk_rows, chunk_positions, row_chunk_ids, position_chunk_ids = [], [], [], [], [], []
        chunks = 0
        for b, a in enumerate(alignments):
            for i, k in a.pairs if self.alignment != "chunks" else ():
                if k < usable:
                    pair_rows.append(b * seq + i)
                    pair_at.append(b * usable + k)
            for student, teacher in a.chunks if self.alignment != "positions" else ():
                if teacher[-1] >= usable:
                    continue
                chunk_rows.extend(b * seq + i for i in student)
                row_chunk_ids.extend([chunks] * len(student))
                chunk_positions.extend(b * usable + k for k in teacher)
                position_chunk_ids.extend([chunks] * len(teacher))
                chunks += 1
        row_chunk = torch.full((len(alignments) * seq,), -1, dtype=torch.long)
        row_chunk[chunk_rows] = torch.tensor(row_chunk_ids, dtype=torch.long)
        chunk_logp = torch.zeros(chunks, dtype=torch.float64).index_add_(
            0, torch.tensor(position_chunk_ids, dtype=torch.long),
            next_logp.reshape(-1)[torch.tensor(chunk_positions, dtype=torch.long)].double().cpu())
        flat = log_p.reshape(-1, log_p.shape[-1])
        sorted_logp = flat[torch.tensor(pair_at, dtype=torch.long)].sort(dim=-1, descending=True).values \
            if pair_at else flat[:0]
        device = self.device
        return AlignedTeacher(torch.tensor(pair_rows, dtype=torch.long, device=device), sorted_logp.clone(),
                              row_chunk.to(device), chunk_logp.float().to(device))
