"""Teachers with another tokenizer: byte-span alignment, ULD and ALM (zero loss for the student as its
own teacher, gradients against float64 formulas), and the config's refusals."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from distillab.config import ModelConfig, config_from_dict
from distillab.data.tokenizer import END_OF_TEXT, train_bpe
from distillab.errors import ConfigError
from distillab.losses import objective_loss
from distillab.losses.divergences import DIVERGENCES
from distillab.models import build_model, resolve_spec
from distillab.losses.objective import KDObjective
from distillab.signals.cross_tokenizer import CrossTokenizerTeacher, align_window, token_bytes

SEQ = 48


def corpus() -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    return [f.read_text(encoding="utf-8", errors="ignore") for f in files]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two byte-level BPEs of different vocabularies trained on the same text."""
    folder = tmp_path_factory.mktemp("tokenizers")
    texts = corpus()
    return train_bpe(texts, 300, 2, folder / "small"), train_bpe(texts, 700, 2, folder / "large")


def windows(tokenizer, count: int, seed: int = 0) -> torch.Tensor:
    """`count` windows of SEQ + 1 student tokens cut anywhere in documents joined by end-of-text."""
    text = END_OF_TEXT.join(corpus()[40:50]) + "é ü — ∑ naïve"  # some multi-byte characters too
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    starts = np.random.default_rng(seed).integers(0, len(ids) - SEQ - 1, count)
    return torch.tensor([ids[s : s + SEQ + 1] for s in starts])


def model(vocab: int, seed: int):
    return build_model(resolve_spec(ModelConfig(name="cpu-7k")), vocab, 4 * SEQ, seed, 0, torch.device("cpu"))


def window_bytes(ids, table, eos) -> bytes:
    return b"".join(b"\x00" if t == eos else table[t] for t in ids)


def test_chunks_and_pairs_cover_the_same_bytes_after_the_same_prefix(tokenizers):
    student, teacher = tokenizers
    s_bytes, t_bytes = token_bytes(student, "s"), token_bytes(teacher, "t")
    checked = 0
    for window in windows(student, 20).tolist():
        a = align_window(window, s_bytes, student.eos_token_id, teacher, t_bytes)
        for s_pos, t_pos in a.pairs:  # both predict a token after the same bytes
            assert window_bytes(window[: s_pos + 1], s_bytes, student.eos_token_id).endswith(
                window_bytes(a.teacher_ids[: t_pos + 1], t_bytes, teacher.eos_token_id))
        for s_positions, t_positions in a.chunks:  # both predict the same bytes
            s_text = window_bytes([window[i + 1] for i in s_positions], s_bytes, student.eos_token_id)
            t_text = window_bytes([a.teacher_ids[k + 1] for k in t_positions], t_bytes, teacher.eos_token_id)
            assert s_text == t_text and s_text
            assert s_positions == list(range(s_positions[0], s_positions[-1] + 1))
            checked += 1
        covered = sum(len(s) for s, _ in a.chunks)
        assert covered >= 0.5 * SEQ  # most of the window is aligned
    assert checked > 100


def signal_for(teacher_model, teacher_tok, student_tok, batch_ids: torch.Tensor):
    from distillab.data.loader import Batch

    teacher = CrossTokenizerTeacher(teacher_model, teacher_tok, student_tok, torch.device("cpu"), "test")
    positions = torch.arange(SEQ).expand(len(batch_ids), SEQ)
    return teacher.signal(Batch(batch_ids[:, :-1], batch_ids[:, 1:], torch.arange(len(batch_ids)), positions))


@pytest.mark.parametrize("divergence", ["uld", "alm"])
def test_the_student_as_its_own_teacher_gives_zero_loss(tokenizers, divergence):
    student_tok, _ = tokenizers
    net = model(len(student_tok), 1)
    ids = windows(student_tok, 4, seed=1)
    signal = signal_for(net, student_tok, student_tok, ids)
    assert len(signal.pair_rows) == 4 * SEQ and int((signal.row_chunk >= 0).sum()) == 4 * SEQ
    with torch.no_grad():
        logits = net(input_ids=ids[:, :-1]).logits
    out = objective_loss(logits, signal, ids[:, 1:], KDObjective(alpha=1.0, divergence=divergence), 0, 1)
    assert abs(float(out.kd)) < 1e-5


def uld_float64(logits, labels, aligned, temperature):
    total = 0.0
    flat = logits.reshape(-1, logits.shape[-1])
    for row, sorted_logp in zip(aligned.pair_rows.tolist(), aligned.pair_sorted.double()):
        q = sorted(torch.softmax(flat[row] / temperature, -1), key=lambda x: -x.item())
        p = list(torch.softmax(sorted_logp / temperature, -1))
        n = max(len(q), len(p))
        q, p = q + [0.0] * (n - len(q)), p + [0.0] * (n - len(p))
        total = total + sum(abs(a - b) for a, b in zip(q, p))
    return temperature**2 * total / labels.numel()


def alm_float64(logits, labels, aligned, temperature):
    flat, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    total = 0.0
    for chunk, teacher_logp in enumerate(aligned.chunk_logp.double().tolist()):
        rows = (aligned.row_chunk == chunk).nonzero().squeeze(1).tolist()
        student_logp = sum(torch.log_softmax(flat[r], -1)[y[r]] for r in rows)
        a, b = torch.tensor(teacher_logp / temperature, dtype=torch.float64).exp(), (student_logp / temperature).exp()
        total = total + a * torch.log(a / b) + (1 - a) * torch.log((1 - a) / (1 - b))
    return total / labels.numel()


@pytest.mark.parametrize("divergence, temperature", [("uld", 1.0), ("uld", 2.0), ("alm", 1.0), ("alm", 1.5)])
def test_gradients_against_float64(tokenizers, divergence, temperature):
    student_tok, teacher_tok = tokenizers
    ids = windows(student_tok, 3, seed=2)
    signal = signal_for(model(len(teacher_tok), 2), teacher_tok, student_tok, ids)
    logits = torch.randn(3, SEQ, len(student_tok), generator=torch.Generator().manual_seed(0)) * 2
    labels = ids[:, 1:]
    leaf = logits.clone().requires_grad_(True)
    out = objective_loss(leaf, signal, labels, KDObjective(alpha=1.0, divergence=divergence, temperature=temperature),
                         0, 1)
    out.total.backward()
    reference_leaf = logits.double().requires_grad_(True)
    formula = uld_float64 if divergence == "uld" else alm_float64
    value = formula(reference_leaf, labels, signal, temperature)
    value.backward()
    value = value.detach()
    assert abs(float(out.kd) - float(value)) < 1e-4 * max(1.0, abs(float(value)))
    assert torch.allclose(leaf.grad.double(), reference_leaf.grad, atol=2e-6, rtol=1e-3)
    assert float(value) > 0


def test_every_cross_tokenizer_divergence_is_tested_here():
    assert {name for name, entry in DIVERGENCES.items() if entry.aligned is not None} == {"uld", "alm"}
    assert {DIVERGENCES[name].alignment for name in ("uld", "alm")} == {"positions", "chunks"}


def test_cross_tokenizer_settings_are_refused_in_one_line():
    for kd, key in (({"divergence": "uld", "top_k": 5}, "kd.top_k"),
                    ({"divergence": "alm", "samples": 4}, "kd.divergence"),
                    ({"divergence": "uld", "teachers": ["b"]}, "kd.teachers"),
                    ({"divergence": "alm", "cache": "some/dir"}, "kd.cache")):
        with pytest.raises(ConfigError) as info:
            config_from_dict({"kd": {"teacher": "a", "alpha": 0.5, **kd}})
        assert info.value.key == key


def test_a_tokenizer_that_is_not_byte_level_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(corpus()[:5], trainers.WordLevelTrainer(special_tokens=["[UNK]", END_OF_TEXT]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=END_OF_TEXT, unk_token="[UNK]")
    with pytest.raises(ConfigError, match="byte-level"):
        token_bytes(tokenizer, "kd.teacher")


def test_chunk_likelihoods_are_the_teachers_own(tokenizers):
    """chunk_logp equals the teacher's log-probabilities of the chunk's tokens, summed one by one."""
    student_tok, teacher_tok = tokenizers
    net = model(len(teacher_tok), 3)
    ids = windows(student_tok, 2, seed=3)
    signal = signal_for(net, teacher_tok, student_tok, ids)
    teacher = CrossTokenizerTeacher(net, teacher_tok, student_tok, torch.device("cpu"), "test")
    chunk = 0
    for window in ids.tolist():
        a = align_window(window, teacher.student_bytes, teacher.student_eos, teacher_tok, teacher.teacher_bytes)
        with torch.no_grad():
            log_p = torch.log_softmax(net(input_ids=torch.tensor([a.teacher_ids[:-1]])).logits[0].double(), -1)
        for _, positions in a.chunks:
            expected = sum(float(log_p[k, a.teacher_ids[k + 1]]) for k in positions)
            assert abs(float(signal.chunk_logp[chunk]) - expected) < 1e-4
            chunk += 1
    assert chunk == len(signal.chunk_logp)
