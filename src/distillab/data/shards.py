"""Tokenize a corpus once into memory-mapped token shards with a manifest.

A prepared data directory holds `tokenizer/` (an HF tokenizer directory), one flat array per
split (`train.bin`, `validation.bin`: uint16 when the vocabulary fits, else uint32, with the
end-of-text token after every document) and `manifest.json` (sources, content hash, the
split, the tokenizer fingerprint, token counts and the sha256 of each shard).

The directory is content-addressed by the preparation settings and rebuilt when the corpus
content changes. It is built in a temporary directory and renamed into place, and the
manifest is written last, so a half-built directory is never taken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from distillab.config import CorpusConfig, DataConfig
from distillab.data.documents import Document
from distillab.data.sources import corpus_identity, describe, iter_documents
from distillab.data.tokenizer import load_tokenizer, token_dtype, tokenizer_fingerprint, train_bpe
from distillab.artefact import MANIFEST, AtomicDirectory, entry_lock, file_problem, read_json_manifest
from distillab.errors import DataError
from distillab.files import default_cache_dir, sha256_file, stable_hash, write_json_atomic
from distillab.progress import progress

FORMAT_VERSION = 1
# documents longer than this are encoded in pieces cut at a newline, so peak memory stays flat
ENCODE_PIECE_CHARS = 1 << 20
ENCODE_BATCH_CHARS = 4 << 20


@dataclass
class PreparedData:
    """A verified prepared data directory."""

    path: Path
    manifest: dict
    _tokenizer: object = field(default=None, repr=False)

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    def tokens(self, split: str) -> np.ndarray:
        info = self.manifest["splits"].get(split)
        if info is None:
            raise DataError(f"{self.path / MANIFEST}: no split {split!r} (have {', '.join(self.manifest['splits'])})")
        return np.memmap(self.path / info["file"], dtype=self.manifest["dtype"], mode="r")

    def array(self, split: str, name: str) -> np.ndarray:
        """A split's side array (chat data: `targets`, `starts`, `first_targets`; see `distillab.data.chat`)."""
        self.tokens(split)  # the split exists
        info = self.manifest["splits"][split].get("arrays", {}).get(name)
        if info is None:
            raise DataError(f"{self.path / MANIFEST}: split {split!r} has no {name!r} array (it is not chat data)")
        return np.memmap(self.path / info["file"], dtype=info["dtype"], mode="r")


# ----------------------------------------------------------------------------- verification


def load_prepared(path: Path, verify: bool = True) -> PreparedData:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.exists():
        raise DataError(f"{manifest_path}: missing; run `distillab data prepare` again")
    manifest = read_json_manifest(manifest_path)
    if manifest is None:
        raise DataError(f"{manifest_path}: not valid JSON; delete {path} and prepare again")
    if verify:
        files = [info for split in manifest["splits"].values() for info in (split, *split.get("arrays", {}).values())]
        for info in files:
            problem = file_problem(Path(path) / info["file"], info["sha256"])
            if problem is not None:
                raise DataError(f"{problem}: delete {path} and prepare again")
    return PreparedData(Path(path), manifest)


# ----------------------------------------------------------------------------- building


def _content_survey(documents: Iterable[Document]) -> tuple[list[tuple[str, int]], str]:
    """One pass over the corpus: (id, characters) per document and a hash of all content."""
    digest = hashlib.sha256()
    index: list[tuple[str, int]] = []
    for document in progress(documents, desc="reading corpus", unit="doc"):
        digest.update(document.id.encode())
        digest.update(b"\x00")
        digest.update(document.text.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\x01")
        index.append((document.id, len(document.text)))
    return index, digest.hexdigest()


def choose_validation(index: list[tuple[str, int]], fraction: float, seed: int, named: list[str]) -> set[int]:
    """Positions of held-out documents: whole documents, deterministic from the seed.

    Documents are ranked by a seeded hash of their id and taken in that order until they hold
    `fraction` of all characters (at least one document, never all of them).
    """
    if named:
        ids = {doc_id: i for i, (doc_id, _) in enumerate(index)}
        missing = [name for name in named if name not in ids]
        if missing:
            raise DataError(
                f"data.validation_documents: no document with id {missing[0]!r} in the corpus "
                f"(ids look like {index[0][0]!r})"
            )
        chosen = {ids[name] for name in named}
        if len(chosen) >= len(index):
            raise DataError("data.validation_documents: would hold out every document; leave some for training")
        return chosen
    if len(index) < 2:
        raise DataError("data.corpus: the corpus has fewer than 2 documents; a whole-document split needs more")
    total = sum(chars for _, chars in index)

    def rank(position: int) -> str:
        return hashlib.sha256(f"{seed}:{index[position][0]}:{position}".encode()).hexdigest()

    chosen: set[int] = set()
    held = 0
    for position in sorted(range(len(index)), key=rank):
        if held >= fraction * total or len(chosen) == len(index) - 1:
            break
        chosen.add(position)
        held += index[position][1]
    return chosen


def _pieces(text: str) -> Iterator[str]:
    while len(text) > ENCODE_PIECE_CHARS:
        cut = text.rfind("\n", 0, ENCODE_PIECE_CHARS)
        cut = ENCODE_PIECE_CHARS if cut <= 0 else cut + 1
        yield text[:cut]
        text = text[cut:]
    yield text


def encode_documents(documents: Iterable[Document], tokenizer, out_file, dtype: str) -> tuple[int, int]:
    """Append each document's tokens and then end-of-text to `out_file`; return (tokens, documents)."""
    eos = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer
    n_tokens = n_docs = 0
    batch: list[str] = []
    ends: list[bool] = []
    batch_chars = 0

    def flush():
        nonlocal n_tokens, batch, ends, batch_chars
        if not batch:
            return
        encodings = backend.encode_batch(batch, add_special_tokens=False)
        for encoding, is_end in zip(encodings, ends):
            ids = encoding.ids + ([eos] if is_end else [])
            out_file.write(np.asarray(ids, dtype=dtype).tobytes())
            n_tokens += len(ids)
        batch, ends, batch_chars = [], [], 0

    for document in documents:
        pieces = list(_pieces(document.text))
        for i, piece in enumerate(pieces):
            batch.append(piece)
            ends.append(i == len(pieces) - 1)
            batch_chars += len(piece)
            if batch_chars >= ENCODE_BATCH_CHARS:
                flush()
        n_docs += 1
    flush()
    return n_tokens, n_docs


# Content surveys of packaged corpora, by corpus identity: their content is fixed (sha256-pinned
# archives, or the running interpreter's own library), so one survey a process serves every prepare.
PACKAGED_SURVEYS: dict[str, tuple[list, str]] = {}


def content_survey(corpus: CorpusConfig | None, documents: Callable[[], Iterator[Document]]) -> tuple[list, str]:
    """`_content_survey` of a corpus' documents, read once a process for a packaged corpus."""
    if corpus is None or corpus.source != "packaged":
        return _content_survey(documents())
    key = stable_hash(corpus_identity(corpus))
    if key not in PACKAGED_SURVEYS:
        PACKAGED_SURVEYS[key] = _content_survey(documents())
    return PACKAGED_SURVEYS[key]


def cached_build(out_dir: Path, documents: Callable[[], Iterator[Document]], build: Callable, log,
                 what: str, corpus: CorpusConfig | None = None) -> tuple[PreparedData, bool]:
    """The prepared directory `out_dir`, reused when its manifest records the corpus' current content,
    else built by `build(index, content_hash, tmp)` into a temporary directory renamed into place
    (a full disk or read-only cache ends in one line, the temporary directory removed).

    Runs under a per-entry file lock, so concurrent runs build one entry once; leftovers of an
    interrupted build of this entry (a killed process) are removed first. Returns (data, built).
    """
    with entry_lock(out_dir):
        index, content_hash = content_survey(corpus, documents)
        if not index:
            raise DataError(f"{what}: yielded no documents")
        if (out_dir / MANIFEST).exists():
            existing = load_prepared(out_dir, verify=True)
            if existing.manifest.get("content_sha256") == content_hash:
                return existing, False
            log(f"data: corpus content changed since {out_dir} was built; rebuilding")
        with AtomicDirectory(out_dir, "prepared data") as tmp:
            build(index, content_hash, tmp)
    return load_prepared(out_dir, verify=False), True


def preparation_key(data: DataConfig) -> dict:
    tokenizer_key: dict = {"vocab_size": data.tokenizer.vocab_size, "min_frequency": data.tokenizer.min_frequency}
    if data.tokenizer.path:
        tokenizer_key = {"fingerprint": tokenizer_fingerprint(load_tokenizer(data.tokenizer.path))}
    return {
        "format": FORMAT_VERSION,
        "corpus": corpus_identity(data.corpus),
        "split": {
            "validation_fraction": data.validation_fraction,
            "validation_documents": sorted(data.validation_documents),
            "seed": data.split_seed,
        },
        "tokenizer": tokenizer_key,
    }


def prepare_data(data: DataConfig, log=print) -> PreparedData:
    """Prepared, verified data for `data`: reused when the inputs match, else (re)built."""
    cache_dir = Path(os.path.expanduser(data.cache_dir)) if data.cache_dir else default_cache_dir()
    key = preparation_key(data)
    out_dir = cache_dir / "prepared" / stable_hash(key)

    def documents():
        return iter_documents(data.corpus, cache_dir)

    def build(index, content_hash, tmp):
        validation = choose_validation(index, data.validation_fraction, data.split_seed, data.validation_documents)
        build_training_data(data, documents, index, validation, content_hash, key, tmp, log)

    prepared, built = cached_build(out_dir, documents, build, log, f"data.corpus: {describe(data.corpus)}",
                                   data.corpus)
    splits = prepared.manifest["splits"]
    log(f"data: {'prepared' if built else 'reusing'} {out_dir} — train {splits['train']['tokens']:,} tokens, "
        f"validation {splits['validation']['tokens']:,} tokens")
    return prepared


def build_training_data(data, documents, index, validation, content_hash, key, tmp: Path, log) -> dict:
    def split_docs(want_validation: bool) -> Iterator[Document]:
        for position, document in enumerate(documents()):
            if (position in validation) == want_validation:
                yield document

    if data.tokenizer.path:
        tokenizer = load_tokenizer(data.tokenizer.path)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        tokenizer = load_tokenizer(tmp / "tokenizer")
        trained = False
    else:
        started = time.perf_counter()
        texts = (d.text for d in split_docs(False))
        tokenizer = train_bpe(
            progress(texts, desc="training tokenizer", unit="doc", total=len(index) - len(validation)),
            data.tokenizer.vocab_size,
            data.tokenizer.min_frequency,
            tmp / "tokenizer",
            length=len(index) - len(validation),
        )
        log(f"data: trained a {len(tokenizer):,}-token byte-level BPE in {time.perf_counter() - started:.1f}s")
        trained = True
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    splits = {}
    for split, want_validation in (("train", False), ("validation", True)):
        file_name = f"{split}.bin"
        n_split_docs = len(validation) if want_validation else len(index) - len(validation)
        with open(tmp / file_name, "wb") as handle:
            n_tokens, n_docs = encode_documents(
                progress(split_docs(want_validation), desc=f"tokenizing {split}", unit="doc", total=n_split_docs),
                tokenizer,
                handle,
                dtype,
            )
            handle.flush()
            os.fsync(handle.fileno())
        splits[split] = {
            "file": file_name,
            "tokens": n_tokens,
            "documents": n_docs,
            "sha256": sha256_file(tmp / file_name),
        }
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": describe(data.corpus),
        "content_sha256": content_hash,
        "documents": len(index),
        "validation_documents": [index[p][0] for p in sorted(validation)],
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "trained_here": trained,
        },
        "dtype": dtype,
        "splits": splits,
    }
    write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


def prepare_corpus_tokens(corpus: CorpusConfig, tokenizer, cache_dir: Path | None = None, log=print) -> PreparedData:
    """Every document of another corpus, tokenized with `tokenizer` (for evaluation sets): split "all"."""
    cache_dir = cache_dir or default_cache_dir()
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = {"format": FORMAT_VERSION, "corpus": corpus_identity(corpus), "tokenizer": fingerprint}
    out_dir = cache_dir / "eval_sets" / stable_hash(key)

    def documents():
        return iter_documents(corpus, cache_dir)

    def build(index, content_hash, tmp):
        dtype = token_dtype(len(tokenizer))
        with open(tmp / "all.bin", "wb") as handle:
            n_tokens, n_docs = encode_documents(progress(documents(), desc=f"tokenizing {describe(corpus)}",
                                                         unit="doc", total=len(index)), tokenizer, handle, dtype)
        write_json_atomic(tmp / MANIFEST, {
            "format": FORMAT_VERSION, "key": key, "source": describe(corpus), "content_sha256": content_hash,
            "documents": n_docs, "tokenizer": {"fingerprint": fingerprint, "vocab_size": len(tokenizer)},
            "dtype": dtype, "splits": {"all": {"file": "all.bin", "tokens": n_tokens, "documents": n_docs,
                                               "sha256": sha256_file(tmp / "all.bin")}}})
        log(f"data: tokenized {describe(corpus)} for evaluation: {n_tokens:,} tokens")

    prepared, _ = cached_build(out_dir, documents, build, log, describe(corpus), corpus)
    return prepared
