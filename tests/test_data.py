import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from distillab.config import CorpusConfig, DataConfig, TokenizerConfig
from distillab.data.loader import WindowStream
from distillab.data.shards import prepare_data
from distillab.data.sources import iter_documents
from distillab.errors import DataError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["abc.py", "bisect.py", "calendar.py", "colorsys.py", "fnmatch.py", "glob.py", "heapq.py",
           "keyword.py", "linecache.py", "opcode.py", "queue.py", "sched.py", "shlex.py", "string.py"]


@pytest.fixture
def text_corpus(tmp_path) -> Path:
    """Fourteen real documents: Python standard-library modules, copied as .txt files."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in MODULES:
        (folder / name.replace(".py", ".txt")).write_text((STDLIB / name).read_text())
    return folder


def data_config(corpus: Path, cache: Path, **kwargs) -> DataConfig:
    return DataConfig(
        corpus=CorpusConfig(source="files", name=None, paths=[str(corpus / "*.txt")]),
        tokenizer=TokenizerConfig(vocab_size=400),
        validation_fraction=0.2,
        cache_dir=str(cache),
        **kwargs,
    )


def split_on_eos(tokens: np.ndarray, eos: int) -> list[list[int]]:
    docs, current = [], []
    for token in tokens.tolist():
        if token == eos:
            docs.append(current)
            current = []
        else:
            current.append(token)
    assert current == [], "every document ends with end-of-text"
    return docs


def test_shards_round_trip_whole_documents(text_corpus, tmp_path):
    from transformers import AutoTokenizer

    data = prepare_data(data_config(text_corpus, tmp_path / "cache"), log=lambda *a: None)
    manifest = data.manifest
    assert manifest["dtype"] == "uint16"
    held_out = manifest["validation_documents"]
    all_ids = sorted(p.stem for p in text_corpus.glob("*.txt"))
    assert 1 <= len(held_out) < len(all_ids) and set(held_out) <= set(all_ids)
    held_chars = sum(len((text_corpus / f"{i}.txt").read_text()) for i in held_out)
    total_chars = sum(len((text_corpus / f"{i}.txt").read_text()) for i in all_ids)
    assert held_chars >= 0.2 * total_chars
    tokenizer = AutoTokenizer.from_pretrained(str(data.tokenizer_dir))
    assert len(tokenizer) == 400
    for split, ids in (("train", [i for i in all_ids if i not in held_out]), ("validation", held_out)):
        tokens = data.tokens(split)
        assert manifest["splits"][split]["tokens"] == len(tokens)
        decoded = [tokenizer.decode(doc) for doc in split_on_eos(np.asarray(tokens), tokenizer.eos_token_id)]
        assert decoded == [(text_corpus / f"{i}.txt").read_text() for i in ids]


def test_split_is_deterministic_and_seeded(text_corpus, tmp_path):
    first = prepare_data(data_config(text_corpus, tmp_path / "a"), log=lambda *a: None)
    again = prepare_data(data_config(text_corpus, tmp_path / "b"), log=lambda *a: None)
    other = prepare_data(data_config(text_corpus, tmp_path / "c", split_seed=7), log=lambda *a: None)
    assert first.manifest["validation_documents"] == again.manifest["validation_documents"]
    assert first.manifest["validation_documents"] != other.manifest["validation_documents"]
    named = prepare_data(data_config(text_corpus, tmp_path / "d", validation_documents=["heapq", "glob"]),
                         log=lambda *a: None)
    assert named.manifest["validation_documents"] == ["glob", "heapq"]
    with pytest.raises(DataError, match="no document with id 'nope'"):
        prepare_data(data_config(text_corpus, tmp_path / "e", validation_documents=["nope"]), log=lambda *a: None)


def test_reuse_rebuild_and_checksum(text_corpus, tmp_path):
    config = data_config(text_corpus, tmp_path / "cache")
    messages = []
    first = prepare_data(config, log=messages.append)
    shard = first.path / "train.bin"
    stamp = shard.stat().st_mtime_ns
    second = prepare_data(config, log=messages.append)
    assert second.path == first.path and shard.stat().st_mtime_ns == stamp
    assert any("reusing" in m for m in messages)

    # changed input: the same settings, other content -> rebuilt
    victim = next(p for p in sorted(text_corpus.glob("*.txt")) if p.stem not in first.manifest["validation_documents"])
    victim.write_text(victim.read_text() + "\n# one more line\n")
    third = prepare_data(config, log=messages.append)
    assert third.manifest["content_sha256"] != first.manifest["content_sha256"]
    assert third.manifest["splits"]["train"]["tokens"] > first.manifest["splits"]["train"]["tokens"]
    assert any("changed" in m for m in messages)

    # corrupted shard -> a one-line error naming the file
    shard = third.path / "train.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError) as info:
        prepare_data(config, log=lambda *a: None)
    assert str(shard) in str(info.value) and "checksum mismatch" in str(info.value)
    assert "\n" not in str(info.value)


def test_existing_tokenizer_is_reused(text_corpus, tmp_path):
    first = prepare_data(data_config(text_corpus, tmp_path / "a"), log=lambda *a: None)
    config = data_config(text_corpus, tmp_path / "b")
    config.tokenizer = TokenizerConfig(path=str(first.tokenizer_dir))
    second = prepare_data(config, log=lambda *a: None)
    assert second.fingerprint == first.fingerprint
    assert not second.manifest["tokenizer"]["trained_here"]
    np.testing.assert_array_equal(first.tokens("train"), second.tokens("train"))


def test_jsonl_parquet_and_hf_sources(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [(STDLIB / name).read_text() for name in MODULES[:6]]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"d{i}", "body": t}) + "\n" for i, t in enumerate(texts)))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": texts}), parquet)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(saved))

    cache = tmp_path / "cache"
    corpora = {
        "jsonl": CorpusConfig(source="files", name=None, paths=[str(jsonl)], text_field="body"),
        "parquet": CorpusConfig(source="files", name=None, paths=[str(parquet)], text_field="body"),
        "hf_disk": CorpusConfig(source="hf", name=None, path=str(saved)),
        "hf_json": CorpusConfig(source="hf", name=None, path="json", data_files=[str(jsonl)], text_field="body"),
        "hf_limit": CorpusConfig(source="hf", name=None, path=str(saved), limit=2, streaming=False),
    }
    for name, corpus in corpora.items():
        got = [d.text for d in iter_documents(corpus, cache)]
        expected = texts[:2] if name == "hf_limit" else texts
        assert got == expected, name
    ids = [d.id for d in iter_documents(corpora["jsonl"], cache)]
    assert ids == [f"d{i}" for i in range(6)]
    with pytest.raises(DataError, match="text field 'text'"):
        list(iter_documents(CorpusConfig(source="files", name=None, paths=[str(jsonl)]), cache))
    with pytest.raises(DataError, match="matches no file"):
        list(iter_documents(CorpusConfig(source="files", name=None, paths=[str(tmp_path / "none*.txt")]), cache))


def test_window_stream_is_a_function_of_seed_and_position():
    tokens = np.arange(1000, dtype=np.uint16)
    stream = WindowStream(tokens, seq_len=9, data_seed=5)
    batch = stream.batch(0, 4)
    inputs, labels = batch.inputs, batch.labels
    assert inputs.shape == (4, 9)
    np.testing.assert_array_equal(labels[:, :-1].numpy(), inputs[:, 1:].numpy())
    np.testing.assert_array_equal(inputs[:, 0].numpy() % 9, 0)  # windows start on the grid
    np.testing.assert_array_equal(inputs[:, 0].numpy() // 9, batch.window_ids.numpy())  # ids name the windows
    again = WindowStream(tokens, seq_len=9, data_seed=5)
    np.testing.assert_array_equal(again.batch(3, 5).inputs.numpy(), stream.batch(3, 5).inputs.numpy())
    epoch = stream.window_indices(0, stream.n_windows)
    assert sorted(epoch.tolist()) == list(range(stream.n_windows))
    other = WindowStream(tokens, seq_len=9, data_seed=6).window_indices(0, stream.n_windows)
    assert epoch.tolist() != other.tolist()
    with pytest.raises(DataError, match="train.seq_len"):
        WindowStream(tokens[:5], seq_len=9, data_seed=0)


def test_hf_configs_dotted_and_list_fields_and_record_limits(tmp_path):
    """A local multi-configuration dataset (the hub's layout: a README declaring configs), read config after
    config; nested fields by dotted names; a list of paragraphs as one text; `limit` counts records."""
    lines = [line for line in (STDLIB / "this.py").read_text().splitlines() if line.strip()] + \
            [line for line in (STDLIB / "keyword.py").read_text().splitlines() if line.strip()]
    root = tmp_path / "multi"
    records = {}
    for config, offset in (("a", 0), ("b", 6)):
        (root / config).mkdir(parents=True)
        records[config] = [{"context": lines[offset + i], "question": lines[offset + i + 1],
                            "answers": {"text": [lines[offset + i + 2]], "answer_start": [0]},
                            "facts": [lines[offset + i], lines[offset + i + 3]]} for i in range(3)]
        (root / config / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[config]))
    (root / "README.md").write_text("---\nconfigs:\n- config_name: a\n  data_files: a/train.jsonl\n"
                                    "- config_name: b\n  data_files: b/train.jsonl\n---\n")
    corpus = CorpusConfig(source="hf", name=None, path=str(root), hf_configs=["a", "b"], streaming=False,
                          text_fields=["context", "question", "answers.text"])
    documents = list(iter_documents(corpus, tmp_path / "cache"))
    expected = [f"{r['context']}\n\n{r['question']}\n\n{r['answers']['text'][0]}" for c in "ab" for r in records[c]]
    assert [d.text for d in documents] == expected
    assert [d.id for d in documents] == [f"{c}/{i}" for c in "ab" for i in range(3)]
    facts = CorpusConfig(source="hf", name=None, path=str(root), hf_config="b", streaming=False, text_field="facts")
    assert [d.text for d in iter_documents(facts, tmp_path / "cache")] == ["\n".join(r["facts"]) for r in records["b"]]

    from distillab.data.sources import corpus_identity

    assert "hf_configs" not in corpus_identity(facts)  # cache keys of corpora without it are unchanged
    assert corpus_identity(corpus)["hf_configs"] == ["a", "b"]

    jsonl = tmp_path / "sparse.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", lines[0], " ", lines[1], lines[2]]))
    limited = CorpusConfig(source="files", name=None, paths=[str(jsonl)], limit=3)
    assert [d.text for d in iter_documents(limited, tmp_path / "cache")] == [lines[0]]  # the first 3 records
