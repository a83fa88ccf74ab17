"""Document packing: the plan, the stream, attention within documents, and training with it."""

import dataclasses
import json
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import tiny_run
from distillab.config import config_from_dict
from distillab.data.loader import WindowStream, model_inputs
from distillab.data.packing import PackedStream, first_fit, pack_documents
from distillab.losses import objective_loss, reference_distillation_loss
from distillab.models import LADDER, hf_config
from distillab.losses.objective import KDObjective
from distillab.teacher import OnlineTeacher
from distillab.train import train

EOS = 0
quiet = lambda *a: None  # noqa: E731


def stream_of(lengths: list[int], start: int = 1) -> np.ndarray:
    """Documents of the given token counts, each closed by EOS; every other token unique (>= start)."""
    out, value = [], start
    for n in lengths:
        out += list(range(value, value + n)) + [EOS]
        value += n
    return np.asarray(out, dtype=np.int64)


def segments(positions: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of positions 0, 1, 2, ... in a row."""
    starts = [i for i in range(len(positions)) if positions[i] == 0] + [len(positions)]
    return list(zip(starts[:-1], starts[1:]))


def test_first_fit_packs_as_worked_out_by_hand():
    # capacity 8, two bins: 5 -> w0, 3 -> w0 (full), 6 -> w1, 2 -> w1 (full); 4 fits no bin of the
    # group, so the group closes and 4 opens w2
    order, offsets = first_fit(np.array([5, 3, 6, 2, 4]), 8, 2)
    assert order.tolist() == [0, 1, 2, 3, 4] and offsets.tolist() == [0, 2, 4, 5]
    # with room in an earlier window, a later piece goes back to it: 6 -> w0, 6 -> w1, 2 -> w0
    order, offsets = first_fit(np.array([6, 6, 2]), 8, 30)
    assert order.tolist() == [0, 2, 1] and offsets.tolist() == [0, 2, 3]
    # the group closes only when no window has room: 7, 7 (two bins) then 1 -> w0, then 2 -> new group
    order, offsets = first_fit(np.array([7, 7, 1, 2]), 8, 2)
    assert order.tolist() == [0, 2, 1, 3] and offsets.tolist() == [0, 2, 3, 4]


def test_packed_windows_hold_whole_documents_and_predict_every_token_once():
    lengths = [3, 10, 1, 25, 7, 13, 5, 2, 30, 4, 11]  # 11 + its EOS fills a window exactly
    tokens, size = stream_of(lengths), 12
    stream = PackedStream(tokens, size, data_seed=5, eos_id=EOS)
    batch = stream.window(np.arange(stream.n_windows))
    inputs, labels, positions = batch.inputs.numpy(), batch.labels.numpy(), batch.position_ids.numpy()
    # every next-token prediction of the stream appears exactly once, none invented
    packed = Counter((int(i), int(y)) for i, y in zip(inputs.ravel(), labels.ravel()) if y != -100)
    assert packed == Counter(zip(tokens[:-1].tolist(), tokens[1:].tolist()))
    # a document is its preceding EOS (the first has none) and its tokens as inputs, its tokens and its EOS as
    # labels; one no longer than a window sits in one window, in one segment with positions 0 .. n-1
    where = {int(y): (r, c) for r, row in enumerate(labels) for c, y in enumerate(row) if y > 0}
    value, n_segments = 1, 0
    for doc, n in enumerate(lengths):
        run = n + (doc > 0)  # positions of its run
        places = [where[v] for v in range(value + (doc == 0), value + n)]  # the first token of the stream is no label
        rows = {r for r, _ in places}
        if run <= size:
            assert len(rows) == 1
            row, begin = places[0]
            assert positions[row, begin : begin + run].tolist() == list(range(run))
            assert labels[row, begin + run - 1] == EOS  # the document's own end-of-text is its last target
            if doc > 0:
                assert inputs[row, begin] == EOS
        else:  # split into window-sized pieces, each a segment of its own
            assert len(rows) == -(-run // size)
        value += n
    # padding: no target, its own segment; some window holds several documents and some padding
    for r in range(len(labels)):
        spans = segments(positions[r])
        n_segments += sum(1 for s, e in spans if (labels[r, s:e] != -100).any())
        filled = int((labels[r] != -100).sum())
        assert (labels[r, filled:] == -100).all() and (labels[r, :filled] != -100).all()
        assert filled == size or positions[r, filled] == 0
    assert max(len(segments(p)) for p in positions) >= 3 and (labels == -100).any()
    assert n_segments == sum(-(-(n + (d > 0)) // size) for d, n in enumerate(lengths))


def test_packed_stream_is_a_function_of_seed_and_position():
    tokens = stream_of([5, 40, 3, 17, 9, 2, 26, 8, 14, 1, 33, 6] * 4)
    a, b = PackedStream(tokens, 16, 5, EOS), PackedStream(tokens, 16, 5, EOS)
    for start, count in ((0, 4), (3, 5), (a.n_windows - 2, 6)):  # the last one crosses an epoch
        x, y = a.batch(start, count), b.batch(start, count)
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("inputs", "labels", "position_ids", "window_ids"))
    epoch = a.window_indices(0, a.n_windows)
    assert sorted(epoch.tolist()) == list(range(a.n_windows))
    other = PackedStream(tokens, 16, 6, EOS)
    assert other.window_indices(0, a.n_windows).tolist() != epoch.tolist()
    ids = np.array([2, 0, 5])  # a window id names the same tokens under every data seed
    assert torch.equal(a.window(ids).inputs, other.window(ids).inputs)
    assert a.epochs(a.n_windows * 3) == 3


def tiny(family: str, seed: int, attention: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    spec = LADDER["cpu-0.1m"] if family == "llama" else dataclasses.replace(
        LADDER["qwen3-0.15b"], layers=2, d_model=64, heads=4, kv_heads=2, head_dim=16, ffn=96, vocab_rows=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(spec, 64, 64, EOS), dtype=torch.float64,
                                             attn_implementation=attention)
    return model.eval()


def packed_batch():
    rng = np.random.default_rng(3)
    lengths = [int(n) for n in rng.integers(1, 14, size=9)]
    tokens = np.concatenate([np.append(rng.integers(1, 64, size=n), EOS) for n in lengths])
    stream = PackedStream(tokens, 24, 1, EOS)
    return stream.window(np.arange(stream.n_windows))


def test_packed_loss_equals_the_sum_of_each_document_alone():
    """Student (Llama) and teacher (Qwen3), float64: the loss of a packed batch, with the teacher run on the
    same packing, equals the per-token mean over the documents, each run alone through fresh forward passes."""
    student, teacher_model = tiny("llama", 0), tiny("qwen3", 1)
    teacher = OnlineTeacher(teacher_model, 64, torch.device("cpu"))
    batch = packed_batch()
    objective = KDObjective(alpha=0.4, temperature=2.0)
    packed = objective_loss(student(**model_inputs(batch)).logits, teacher.signal(batch), batch.labels, objective,
                            0, 1)
    totals, ces, n_all = 0.0, 0.0, 0
    for row in range(batch.inputs.shape[0]):
        for start, end in segments(batch.position_ids[row].numpy()):
            labels = batch.labels[row, start:end]
            if (labels == -100).all():
                continue  # padding
            ids = batch.inputs[row : row + 1, start:end]
            with torch.no_grad():
                alone = reference_distillation_loss(student(input_ids=ids).logits, teacher_model(input_ids=ids).logits,
                                                    labels[None], alpha=0.4, temperature=2.0)
            totals += float(alone.total) * alone.n_tokens
            ces += float(alone.ce) * alone.n_tokens
            n_all += alone.n_tokens
    assert packed.n_tokens == n_all == batch.targets
    assert float(packed.total.detach()) == pytest.approx(totals / n_all, rel=1e-10)
    assert float(packed.ce) == pytest.approx(ces / n_all, rel=1e-10)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_no_attention_crosses_a_document(family):
    batch = packed_batch()
    model = tiny(family, 0, attention="eager")
    out = model(**model_inputs(batch), output_attentions=True)
    crossings = 0
    for row in range(batch.inputs.shape[0]):
        segment = torch.zeros(batch.inputs.shape[1], dtype=torch.long)
        for index, (start, end) in enumerate(segments(batch.position_ids[row].numpy())):
            segment[start:end] = index
        other = segment[:, None] != segment[None, :]
        crossings += int(other.sum())
        for layer in out.attentions:
            weights = layer[row]  # [heads, query, key]
            assert (weights[:, other] == 0).all()
            torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    assert crossings > 0
    # sdpa: changing one document leaves every other document's logits exactly as they were; without
    # position ids (a plain causal window) it does not
    model = tiny(family, 0)
    row, (start, end) = 0, segments(batch.position_ids[0].numpy())[0]
    changed = dataclasses.replace(batch, inputs=batch.inputs.clone())
    changed.inputs[row, start:end] = (changed.inputs[row, start:end] + 7) % 63 + 1
    keep = torch.ones(batch.inputs.shape[1], dtype=torch.bool)
    keep[start:end] = False
    with torch.no_grad():
        a, b = model(**model_inputs(batch)).logits, model(**model_inputs(changed)).logits
        assert torch.equal(a[row, keep], b[row, keep]) and torch.equal(a[1:], b[1:])
        plain_a = model(input_ids=batch.inputs).logits
        plain_b = model(input_ids=changed.inputs).logits
    assert not torch.equal(plain_a[row, keep], plain_b[row, keep])


STDLIB = Path(sysconfig.get_paths()["stdlib"])
# short documents: the standard library's small modules (300 B - 1.5 KB of source)
SMALL_MODULES = sorted(str(p) for p in STDLIB.rglob("*.py") if "site-packages" not in p.parts and "test" not in
                       p.parts and 300 <= p.stat().st_size <= 1500)[:160]


def packed_run(tmp_path, cache_dir, name):
    """A tiny run on short documents (and some longer than a window), packed."""
    return tiny_run(tmp_path, cache_dir, name,
                    data={"corpus": {"source": "files", "name": None, "paths": SMALL_MODULES}, "packing": "documents"},
                    train={"token_budget": 8 * 4 * 128, "seq_len": 128, "threads": 1},
                    eval={"max_windows": 32, "batch_size": 8, "sets": ["validation", "train"]})


def test_packed_training_resumes_bit_identically_and_replays_its_windows(tmp_path, cache_dir):
    straight = train(config_from_dict(packed_run(tmp_path, cache_dir, "straight")), log=quiet)
    config = config_from_dict(packed_run(tmp_path, cache_dir, "interrupted"))
    assert not train(config, stop_after_steps=5, log=quiet).completed
    resumed = train(config, log=quiet)
    assert resumed.completed and resumed.steps == 8
    a = load_file(str(straight.run_dir / "final" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the run counted target tokens (padding excluded), and packed several documents into some windows
    meta = json.loads((resumed.final_dir / "distillab.json").read_text())
    assert meta["train_stream"] == {"seq_len": 128, "data_seed": 42, "sequences": 32, "packing": "documents"}
    from distillab.data.shards import load_prepared
    from distillab.data.packing import training_stream

    data = load_prepared(Path(meta["data_dir"]))
    stream = training_stream(data, 128, 42, "documents", log=quiet)
    seen = stream.batch(0, 32)
    assert resumed.tokens == seen.targets < 32 * 128
    # the `train` set replays windows the run trained on; its loss, recomputed document by document with
    # each document run alone, is the one the run reported
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(resumed.final_dir)).eval()
    ids = stream.window_indices(0, 32)  # max_windows 32: every sequence trained on
    replay = stream.window(ids)
    documents = [sum(1 for s, e in segments(p) if (y[s:e] != -100).any())
                 for p, y in zip(replay.position_ids.numpy(), replay.labels.numpy())]
    assert max(documents) >= 2  # some window packs several documents
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in range(len(ids)):
            for start, end in segments(replay.position_ids[row].numpy()):
                labels = replay.labels[row, start:end]
                if (labels == -100).all():
                    continue
                logits = model(input_ids=replay.inputs[row : row + 1, start:end]).logits[0].double()
                nll += float(F.cross_entropy(logits, labels, reduction="sum"))
                count += int(labels.numel())
    assert resumed.eval["train"]["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert resumed.eval["train"]["tokens"] == count


def test_concat_stream_is_unchanged():
    tokens = stream_of([5, 40, 3, 17])
    batch = WindowStream(tokens, 9, 5).window(np.array([0, 2]))
    assert batch.position_ids is None
    np.testing.assert_array_equal(batch.inputs[1].numpy(), tokens[18:27])


def test_pack_documents_refuses_a_stream_too_short():
    from distillab.errors import DataError

    with pytest.raises(DataError, match="at least 2"):
        pack_documents(np.array([EOS]), EOS, 8)


def test_the_plan_is_cached_beside_the_data_and_read_back_memory_mapped(tmp_path):
    from distillab.data.packing import cached_plan

    tokens = stream_of([5, 40, 3, 17, 9, 2, 26, 8, 14, 1, 33, 6] * 3)
    fresh = pack_documents(tokens, EOS, 16)
    logged = []
    first = cached_plan(tokens, EOS, 16, tmp_path / "packing", log=logged.append)
    again = cached_plan(tokens, EOS, 16, tmp_path / "packing", log=logged.append)
    assert len(logged) == 1 and "plan cached in" in logged[0]  # computed once
    assert isinstance(again.starts, np.memmap)
    for plan in (first, again):
        for name in ("starts", "lengths", "offsets"):
            np.testing.assert_array_equal(getattr(plan, name), getattr(fresh, name))
    longer = np.concatenate([tokens, stream_of([4, 4], start=1000)])
    other = cached_plan(longer, EOS, 16, tmp_path / "packing", log=logged.append)  # another stream: recomputed
    assert len(logged) == 2 and other.n_windows >= fresh.n_windows
    np.testing.assert_array_equal(other.offsets, pack_documents(longer, EOS, 16).offsets)
