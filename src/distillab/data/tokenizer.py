"""Tokenizers: train a byte-level BPE on the training split, or load an HF tokenizer directory.

Teacher and student must share one tokenizer; `tokenizer_fingerprint` gives the identity that
is compared (vocabulary, merges, special tokens, pre-tokenization), independent of how the
directory was written.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Iterable

from distillab.errors import DataError

END_OF_TEXT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, out_dir: Path, length: int | None = None):
    """Train a byte-level BPE and save it as an HF tokenizer directory; return the loaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=None,
        model_max_length=NO_LENGTH_LIMIT,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


# Tokenizers parsed from local directories, keyed by the content of the directory's files: a run loads
# its tokenizer many times (data, teacher check, every checkpoint's copy, evaluation), and a 128k-token
# one takes ~0.2 s to parse (and ~0.4 s to fingerprint). Each caller gets its own shallow copy: its
# own Python-side settings (a chat template) over the one Rust tokenizer, which nothing here changes.
LOADED_TOKENIZERS: dict[str, object] = {}
# fingerprints by Rust tokenizer object (with its size, as a check): computing one takes ~0.4 s at 128k
FINGERPRINTS: dict[int, tuple] = {}


NO_LENGTH_LIMIT = 1_000_000_000  # a tokenizer's model_max_length inside distillab: none

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "added_tokens.json")


def directory_state(path: Path) -> str | None:
    """sha256 over the names and bytes of a local tokenizer directory's files (None: not a directory)."""
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        file = path / name
        if file.is_file():
            digest.update(name.encode() + b"\x00" + file.read_bytes() + b"\x01")
    return digest.hexdigest()


def load_tokenizer(path: str | Path):
    """The HF fast tokenizer in a directory (or a hub id, which needs hub access), checked."""
    state = directory_state(Path(path))
    if state is not None and state in LOADED_TOKENIZERS:
        return copy.copy(LOADED_TOKENIZERS[state])
    tokenizer = parse_tokenizer(path)
    if state is not None:
        LOADED_TOKENIZERS[state] = tokenizer
        return copy.copy(tokenizer)
    return tokenizer


def parse_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    local = Path(path)
    if not local.exists() and not looks_like_hub_id(str(path)):
        raise DataError(f"{path}: tokenizer directory not found")
    try:
        # a local directory, or a hub id such as meta-llama/Meta-Llama-3-8B (needs hub access)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many kinds for a missing or broken tokenizer
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: not a loadable HF tokenizer ({first})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{path}: distillab needs a fast (Rust) HF tokenizer (tokenizer.json)")
    if tokenizer.eos_token_id is None:
        raise DataError(f"{path}: the tokenizer defines no end-of-text (eos) token")
    # distillab tokenizes whole documents and cuts its own windows; a saved limit (a checkpoint's
    # positions, for users who generate) would only warn about every long document
    tokenizer.model_max_length = NO_LENGTH_LIMIT
    return tokenizer


def looks_like_hub_id(text: str) -> bool:
    """`owner/name`, as hub ids are spelled (not a relative path such as ./x or ~/x)."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over what decides token ids: model (vocab, merges), added tokens, pre-/normalization."""
    backend = tokenizer.backend_tokenizer
    key = (backend.get_vocab_size(with_added_tokens=True), tokenizer.eos_token_id)
    known = FINGERPRINTS.get(id(backend))
    if known is not None and known[0] is backend and known[1] == key:
        return known[2]
    fingerprint = compute_fingerprint(tokenizer)
    FINGERPRINTS[id(backend)] = (backend, key, fingerprint)
    return fingerprint


def compute_fingerprint(tokenizer) -> str:
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    identity = {
        "model": state.get("model"),
        "normalizer": state.get("normalizer"),
        "pre_tokenizer": state.get("pre_tokenizer"),
        "added_tokens": sorted(
            (t["id"], t["content"], bool(t.get("special"))) for t in state.get("added_tokens", [])
        ),
        "eos": tokenizer.eos_token_id,
    }
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65_536 else "uint32"
