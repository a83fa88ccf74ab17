"""Chat records for supervised fine-tuning, prepared once like training data.

A chat record holds a conversation in the HF `messages` format: a list of {role, content}
with roles system, user and assistant, and at least one assistant turn. Records come from any
structured source (`files`: JSON lines or Parquet; `hf`; `packaged` chat sets); a record that
breaks these rules stops preparation with one line naming its file and line.

Each conversation is rendered with a chat template (`chat_template`: `sft.chat_template`, else
the tokenizer's own, else distillab's default `templates/chat.jinja`) and tokenized in one
call of the tokenizer's `apply_chat_template(..., return_assistant_tokens_mask=True)`: the
template wraps what the model is trained to say in `{% generation %}` ... `{% endgeneration %}`,
and the tokens overlapping those spans are the conversation's targets. Nothing else (system
and user text, role headers) is ever a target.

Prepared chat data is a `PreparedData` directory (content-addressed, built in a temporary
directory, verified by sha256, as `distillab.data.shards` builds training data): per split the
conversations' tokens back to back (`{split}.bin`), a 0/1 target flag per token
(`{split}.targets.bin`), the first token of each conversation (`{split}.starts.bin`) and its
first target token (`{split}.first_targets.bin`); and the tokenizer with the template set,
which every checkpoint of the run carries. Conversations are held out whole, as documents are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from distillab.config import DataConfig, SFTConfig
from distillab.data.documents import Document, Record, normalize_text
from distillab.data.shards import MANIFEST, PreparedData, cached_build, choose_validation
from distillab.data.sources import corpus_identity, describe, iter_records
from distillab.data.tokenizer import load_tokenizer, token_dtype, tokenizer_fingerprint
from distillab.errors import ConfigError, DataError
from distillab.files import default_cache_dir, sha256_file, stable_hash, write_json_atomic
from distillab.progress import progress

ROLES = ("system", "user", "assistant")
DEFAULT_TEMPLATE = Path(__file__).parent / "templates" / "chat.jinja"
GENERATION_MARK = re.compile(r"{%-?\s*generation\s*-?%}")
CHAT_FORMAT = 1
RENDER_BATCH = 256


@dataclass(frozen=True)
class Chat:
    id: str
    where: str
    messages: list[dict]


def chat_of(record: Record, field: str) -> Chat:
    """The checked conversation of a record, or a one-line DataError naming where the record is."""
    where, messages = record.where, record.fields.get(field)
    if messages is None:
        raise DataError(f"{where}: no {field!r} field (a list of {{role, content}} messages; set sft.messages_field)")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{role, content}} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} must be a mapping with a text 'content'")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} has role {message.get('role')!r}; roles are system, user and "
                            "assistant")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant message, so nothing to train on; leave the record out")
    return Chat(record.id, where, [{"role": m["role"], "content": normalize_text(m["content"])} for m in messages])


def iter_chats(corpus, field: str, cache_dir: Path) -> Iterator[Chat]:
    for record in iter_records(corpus, cache_dir):
        yield chat_of(record, field)


def chat_template(tokenizer, path: str | None) -> tuple[str, str]:
    """(template, where it comes from): the file `path` (sft.chat_template), else the tokenizer's own
    template, else distillab's default. It must mark the assistant's text with generation tags."""
    own = tokenizer.chat_template
    own = own.get("default") if isinstance(own, dict) else own
    if path:
        file = Path(os.path.expanduser(path))
        if not file.is_file():
            raise ConfigError("sft.chat_template", f"{path}: file not found")
        template, origin = file.read_text(), str(file)
    elif own:
        template, origin = own, "the tokenizer's own template"
    else:
        template, origin = DEFAULT_TEMPLATE.read_text(), "distillab's default template"
    check_template_syntax(template, origin)
    if not GENERATION_MARK.search(template):
        raise ConfigError("sft.chat_template", f"{origin} does not mark the assistant's text; wrap it in "
                                               "{% generation %} ... {% endgeneration %} (see " f"{DEFAULT_TEMPLATE})")
    return template, origin


def check_template_syntax(template: str, origin: str) -> None:
    """A one-line ConfigError naming the line of a Jinja syntax error (before any record is rendered)."""
    import jinja2
    import jinja2.ext

    class GenerationTags(jinja2.ext.Extension):
        """`{% generation %}` ... `{% endgeneration %}`, parsed only (the tokenizer renders them)."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    try:
        jinja2.Environment(extensions=[GenerationTags, jinja2.ext.loopcontrols]).parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError("sft.chat_template", f"{origin}: not a valid Jinja template (line {exc.lineno}: "
                                               f"{exc.message})") from None


def render(tokenizer, template: str, chats: list[Chat]) -> list[tuple[list[int], list[int]]]:
    """(token ids, target flags) of each conversation: flags 1 on tokens of the assistant's text."""
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template([c.messages for c in chats], chat_template=template, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
    except TemplateError as exc:
        if len(chats) > 1:  # find the record the template refused
            return [pair for chat in chats for pair in render(tokenizer, template, [chat])]
        raise DataError(f"{chats[0].where}: the chat template refused it ({exc})") from None
    rendered = list(zip(out["input_ids"], out["assistant_masks"]))
    for chat, (ids, flags) in zip(chats, rendered):
        if not any(flags):
            raise DataError(f"{chat.where}: the chat template marks none of its assistant text as generated")
    return rendered


def chat_key(data: DataConfig, sft: SFTConfig, tokenizer, template: str) -> dict:
    """What decides prepared chat data: the records, the split, the tokenizer and the template."""
    return {"format": CHAT_FORMAT, "kind": "chat", "corpus": corpus_identity(data.corpus),
            "messages_field": sft.messages_field,
            "split": {"validation_fraction": data.validation_fraction,
                      "validation_documents": sorted(data.validation_documents), "seed": data.split_seed},
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "template_sha256": hashlib.sha256(template.encode()).hexdigest()}


def prepare_chat_data(data: DataConfig, sft: SFTConfig, tokenizer_dir: Path, template: str, origin: str,
                      log=print) -> PreparedData:
    """Prepared, verified chat data: reused when the inputs match, else (re)built."""
    cache_dir = Path(os.path.expanduser(data.cache_dir)) if data.cache_dir else default_cache_dir()
    tokenizer = load_tokenizer(tokenizer_dir)
    key = chat_key(data, sft, tokenizer, template)
    out_dir = cache_dir / "prepared" / stable_hash(key)

    def chats():
        return iter_chats(data.corpus, sft.messages_field, cache_dir)

    def documents():  # a conversation's content, for the content hash and the whole-conversation split
        return (Document(c.id, json.dumps(c.messages, ensure_ascii=False, sort_keys=True)) for c in chats())

    def build(index, content_hash, tmp):
        validation = choose_validation(index, data.validation_fraction, data.split_seed, data.validation_documents)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        splits = {split: write_split(tmp, split, (c for i, c in enumerate(chats()) if (i in validation) == held),
                                     tokenizer, template, len(validation) if held else len(index) - len(validation))
                  for split, held in (("train", False), ("validation", True))}
        write_json_atomic(tmp / MANIFEST, {
            "format": CHAT_FORMAT, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": describe(data.corpus), "content_sha256": content_hash, "documents": len(index),
            "validation_documents": [index[p][0] for p in sorted(validation)],
            "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
                          "eos_token_id": tokenizer.eos_token_id, "trained_here": False},
            "chat": {"template_sha256": key["template_sha256"], "template": origin,
                     "messages_field": sft.messages_field},
            "dtype": token_dtype(len(tokenizer)), "splits": splits})

    prepared, built = cached_build(out_dir, documents, build, log, f"data.corpus: {describe(data.corpus)}")
    splits = prepared.manifest["splits"]
    log(f"data: {'prepared' if built else 'reusing'} chat data {out_dir} ({origin}) — train "
        f"{splits['train']['documents']:,} conversations, {splits['train']['targets']:,} assistant tokens of "
        f"{splits['train']['tokens']:,}; validation {splits['validation']['documents']:,} conversations")
    return prepared


def write_split(tmp: Path, split: str, chats: Iterator[Chat], tokenizer, template: str, total: int) -> dict:
    """One split rendered in batches and written; its manifest entry."""
    writer = SplitWriter(tmp, split, token_dtype(len(tokenizer)))
    with writer:
        batch: list[Chat] = []
        for chat in progress(chats, desc=f"rendering {split}", unit="conversation", total=total):
            batch.append(chat)
            if len(batch) == RENDER_BATCH:
                writer.add(render(tokenizer, template, batch))
                batch = []
        if batch:
            writer.add(render(tokenizer, template, batch))
    return writer.entry()


class SplitWriter:
    """A split's files, appended conversation by conversation: tokens (`{split}.bin`), target flags
    (uint8), and per conversation the index of its first token and of its first target (int64)."""

    ARRAYS = {"targets": "uint8", "starts": "int64", "first_targets": "int64"}

    def __init__(self, folder: Path, split: str, dtype: str):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.tokens = self.targets = self.conversations = 0

    def path(self, name: str | None = None) -> Path:
        return self.folder / (f"{self.split}.{name}.bin" if name else f"{self.split}.bin")

    def __enter__(self):
        self.files = {name: open(self.path(name), "wb") for name in (None, *self.ARRAYS)}
        return self

    def __exit__(self, *exc):
        for handle in self.files.values():
            handle.close()

    def add(self, rendered: list[tuple[list[int], list[int]]]) -> None:
        for ids, flags in rendered:
            self.files[None].write(np.asarray(ids, dtype=self.dtype).tobytes())
            self.files["targets"].write(np.asarray(flags, dtype=np.uint8).tobytes())
            self.files["starts"].write(np.int64(self.tokens).tobytes())
            self.files["first_targets"].write(np.int64(self.tokens + flags.index(1)).tobytes())
            self.tokens, self.targets, self.conversations = (self.tokens + len(ids), self.targets + sum(flags),
                                                             self.conversations + 1)

    def entry(self) -> dict:
        arrays = {name: {"file": self.path(name).name, "dtype": dtype, "sha256": sha256_file(self.path(name))}
                  for name, dtype in self.ARRAYS.items()}
        return {"file": self.path().name, "tokens": self.tokens, "documents": self.conversations,
                "targets": self.targets, "sha256": sha256_file(self.path()), "arrays": arrays}
