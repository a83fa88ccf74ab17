"""Every paper preset's plan, held against the authors' runs as PAPER.md lists them.

The expected values below are copied from PAPER.md's tables (shared recipe, ladders, grids,
evaluation), not computed by the code under test. Budgets: nominal "N B" = N x 500 steps.
Plans are made in-process; planning loads no data and needs no hub.
"""

from collections import Counter
from pathlib import Path

import pytest

from distillab.config import config_from_dict
from distillab.evaluate.downstream import PAPER_TASKS
from distillab.evaluate.sets import PAPER_OOD, PRESETS
from distillab.models import LADDER
from distillab.sweep import load_grid, plan
from distillab.train.schedule import make_plan

PRESETS_DIR = Path(__file__).parent.parent / "configs" / "paper"
STEPS = {n: n * 500 for n in (2, 5, 10, 30, 50, 80, 100, 300, 500)}  # "N B" = N x 500 steps
A6 = (0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
L3 = ("llama-0.7b", "llama-1.7b", "llama-3.8b")
L4 = (*L3, "llama-8b")
QWEN = ("qwen3-0.15b", "qwen3-0.3b", "qwen3-0.6b", "qwen3-1b")
HARD = "hard"
FKL = "forward_kl"


def student(teacher, teacher_b, alpha, *, model="llama-1.7b", b=50, seed=43, t=1.0, k=None, divergence=FKL,
            loss_scale="mix", k_student="full"):
    """One student as (model, steps, seed, teacher, teacher steps, alpha, T, k, divergence, loss scale, the
    student's side of top-k)."""
    return (model, STEPS[b], seed, teacher, STEPS[teacher_b] if teacher_b else None, alpha, t, k, divergence,
            loss_scale, k_student)


def crossed(teachers, budgets, alphas, **kw):
    return [student(m, b, a, **kw) for m in teachers for b in budgets for a in alphas]


# family: trained teachers {(model, steps)}, students [settings], baselines {(model, steps, seed, eps)}
EXPECTED = {
    "exp1": ({(m, 25_000) for m in L4}, crossed(L4, [50], A6), {("llama-1.7b", 25_000, 43, 0.0)}),
    "exp1_expand": ({(m, 25_000) for m in L4},
                    [s for m in ("llama-0.7b", "llama-3.8b", "llama-8b") for s in crossed(L4, [50], A6, model=m)],
                    {(m, 25_000, 43, 0.0) for m in ("llama-0.7b", "llama-3.8b", "llama-8b")}),
    "exp1_100b": ({(m, 50_000) for m in L4}, crossed(L4, [100], A6, b=100), {("llama-1.7b", 50_000, 43, 0.0)}),
    "exp2": ({(m, STEPS[b]) for m in L4 for b in (5, 10, 30, 50, 80, 100, 300)},
             crossed(L4, [5, 10, 30, 50, 80, 100, 300], (0.5, 1.0)), {("llama-1.7b", 25_000, 43, 0.0)}),
    "exp2_expand": ({(m, STEPS[b]) for m in L4 for b in (10, 30, 50, 80, 100, 300)},
                    crossed(L4, [10, 30, 50, 80, 100, 300], (0.2, 0.4, 0.6, 0.8)), {("llama-1.7b", 25_000, 43, 0.0)}),
    "ablate1": ({(m, 150_000) for m in L4}, crossed(L4, [300], A6, b=300),
                {("llama-1.7b", 150_000, 43, 0.0), ("llama-1.7b", 250_000, 42, 0.0)}),
    # the authors' scripts: the 0.3B student with the 50B teachers, and for 5,000 steps (10B) with the
    # 10B teachers; 0.6B and 1B with the 0.15B @ 50B teacher; seed-43 baselines for every student
    # setting (seed 42 ones are the teachers themselves)
    "ablate2": ({(m, STEPS[b]) for m in QWEN for b in (10, 50)},
                crossed(QWEN, [50], A6, model="qwen3-0.3b")
                + crossed(QWEN, [10], A6, model="qwen3-0.3b", b=10)
                + crossed(["qwen3-0.15b"], [50], A6, model="qwen3-0.6b")
                + crossed(["qwen3-0.15b"], [50], A6, model="qwen3-1b"),
                {("qwen3-0.3b", 25_000, 43, 0.0), ("qwen3-0.3b", 5_000, 43, 0.0), ("qwen3-0.6b", 25_000, 43, 0.0),
                 ("qwen3-1b", 25_000, 43, 0.0)}),
    "ablate3": ({(m, 25_000) for m in L4},
                [s for t in (0.5, 1.0, 2.0, 4.0) for s in crossed(L4, [50], (0.2, 1.0), t=t)]
                + crossed(L4, [50], (0.2, 1.0), divergence=HARD), {("llama-1.7b", 25_000, 43, 0.0)}),
    # top-k: the student renormalised over the teacher's top k too (the authors' efficient KL)
    "ablate4": ({(m, 25_000) for m in L4},
                [s for k in (1283, 6413, 25651, 64128, None)
                 for s in crossed(L4, [50], (0.2, 1.0), k=k, k_student="renormalised" if k else "full")],
                {("llama-1.7b", 25_000, 43, 0.0)}),
    # k = 1 is hard labels (the renormalised top-1 KL is 0)
    "topk_absolute": ({(m, 25_000) for m in L3},
                      [s for k in (2, 10, 100, 1000, 10000)
                       for s in crossed(L3, [50], (0.5, 1.0), k=k, k_student="renormalised")]
                      + crossed(L3, [50], (0.5, 1.0), divergence=HARD),
                      {("llama-1.7b", 25_000, 43, 0.0)}),
    "hard_vs_soft": ({(m, 25_000) for m in L3},
                     crossed(L3, [50], A6) + crossed(["llama-1.7b"], [50], A6, divergence=HARD),
                     {("llama-1.7b", 25_000, 43, 0.0)}),
    "loss_scale": ({("llama-1.7b", 25_000)},
                   [s for scale in ("ce_fixed", "kd_fixed")
                    for s in crossed(["llama-1.7b"], [50], (0.2, 0.8, 1.0), loss_scale=scale)],
                   {("llama-1.7b", 25_000, 43, 0.0)}),
    "seeds": ({(m, 25_000) for m in L3},
              [student(m, 50, a, b=10, seed=s) for m, a in zip(L3, (0.2, 0.4, 0.6)) for s in range(43, 48)],
              {("llama-1.7b", 5_000, s, 0.0) for s in range(43, 48)}),
    "cross_corpus": ({(m, 25_000) for m in L4},
                     [student(m, 50, a) for m, a in zip(L4, (0.2, 0.4, 0.6, 0.6))], {("llama-1.7b", 25_000, 43, 0.0)}),
    "official_teachers": (set(),
                          [student(t, None, 1.0) for t in
                           ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B")],
                          {("llama-1.7b", 25_000, 43, 0.0)}),
    "label_smoothing": (set(), [], {("llama-1.7b", 1_000, 43, eps) for eps in (0.0, 0.1, 0.3)}),
}

# PAPER.md's run counts where its table gives them (students; seeds and cross_corpus count baselines too)
RUN_COUNTS = {"exp1": 24, "exp1_expand": 72, "exp1_100b": 24, "exp2": 56, "exp2_expand": 96, "ablate1": 24,
              "ablate3": 40, "topk_absolute": 36, "official_teachers": 3, "label_smoothing": 3}


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    out = tmp_path_factory.mktemp("plans")
    return {name: (load_grid(PRESETS_DIR / f"{name}.yaml"), plan(load_grid(PRESETS_DIR / f"{name}.yaml"), out / name))
            for name in EXPECTED}


def steps(run) -> int:
    return make_plan(config_from_dict(run.config).train).steps


def test_one_preset_per_family():
    assert sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_plans_the_authors_runs(name, plans):
    spec, runs = plans[name]
    teachers, students, baselines = EXPECTED[name]
    by_id = {r.id: r for r in runs}
    got_teachers = {(r.info["model"], steps(r)) for r in runs if r.role == "teacher"}
    assert got_teachers == teachers
    assert sum(r.role == "teacher" for r in runs) == len(teachers)
    got_students = []
    for run in (r for r in runs if r.role == "student"):
        kd = config_from_dict(run.config).kd
        teacher = by_id[run.depends_on[0]] if run.depends_on else None
        got_students.append((run.info["model"], steps(run), config_from_dict(run.config).train.init_seed,
                             teacher.info["model"] if teacher else kd.teacher, steps(teacher) if teacher else None,
                             kd.alpha, kd.temperature, kd.top_k, kd.divergence, kd.loss_scale, kd.top_k_student))
    assert Counter(got_students) == Counter(students)
    assert sum(r.role == "student" for r in runs) == len(students)
    got_baselines = {(r.info["model"], steps(r), config_from_dict(r.config).train.init_seed,
                      config_from_dict(r.config).kd.label_smoothing) for r in runs if r.role == "baseline"}
    assert got_baselines == baselines and sum(r.role == "baseline" for r in runs) == len(baselines)
    if name in RUN_COUNTS:
        assert len(students) + (len(baselines) if name == "label_smoothing" else 0) == RUN_COUNTS[name]
    if name in ("seeds", "cross_corpus"):  # "+ baseline per seed" / "+ DCLM baseline"
        assert len(students) + len(baselines) == {"seeds": 20, "cross_corpus": 5}[name]
    assert spec.notes, "every preset says where it differs from the authors' runs"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_follows_the_shared_recipe(name, plans):
    spec, runs = plans[name]
    qwen = name == "ablate2"
    for run in runs:
        cfg = config_from_dict(run.config)
        t = cfg.train
        plan_ = make_plan(t)
        assert plan_.tokens_per_step == 256 * 8192 == 2_097_152
        assert t.seq_len == 8192 and t.batch_size * t.grad_accum * t.processes == 256
        assert t.lr == (5e-4 if qwen else 3e-4)
        assert (t.beta1, t.beta2, t.eps, t.weight_decay, t.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
        assert t.weight_decay_params == "all"  # optax.adamw without a mask
        assert cfg.model.parametrisation == "maxtext"
        assert t.schedule == "cosine" and t.warmup_fraction == 0.05 and t.min_lr_ratio == 0.1
        assert plan_.warmup_steps == plan_.steps // 20
        assert t.checkpoint_every == 2500 and t.precision == "bfloat16"
        role_seed = 42 if run.role == "teacher" else t.init_seed
        assert t.init_seed == t.data_seed == role_seed
        if run.role == "teacher":
            assert t.init_seed == 42
        assert cfg.data.packing == "documents"
        tokenizer = "meta-llama/Llama-3.1-8B" if name == "official_teachers" else "meta-llama/Meta-Llama-3-8B"
        assert cfg.data.tokenizer.path == tokenizer and cfg.data.tokenizer.vocab_size == 128_256
        corpus = cfg.data.corpus
        dclm = name == "cross_corpus" and run.role != "teacher"
        assert (corpus.path, corpus.hf_config) == (("mlfoundations/dclm-baseline-1.0", None) if dclm else
                                                   ("HuggingFaceFW/fineweb-edu", "sample-350BT"))
        assert (cfg.eval.seq_len, cfg.eval.max_windows) == (4096, 256)
        assert cfg.model.name.startswith("qwen3-" if qwen else "llama-")
    assert set(spec.eval.sets) == {"in-domain", "paper-ood"} and spec.eval.tasks == ["paper"]
    assert (spec.eval.seq_len, spec.eval.max_windows) == (4096, 256)


def test_ladders_have_the_authors_shapes():
    # (layers, d_model, heads, kv heads, head dim, MLP, theta, tied, eps, embedding rows)
    expected = {
        "llama-0.7b": (12, 1024, 32, 8, 128, 8192, 500_000, False, 1e-5, None),
        "llama-1.7b": (16, 2048, 32, 8, 128, 8192, 500_000, False, 1e-5, None),
        "llama-3.8b": (28, 3072, 32, 8, 128, 8192, 500_000, False, 1e-5, None),
        "llama-8b": (32, 4096, 32, 8, 128, 14336, 500_000, False, 1e-5, None),
        "qwen3-0.15b": (20, 512, 8, 4, 64, 1536, 1_000_000, True, 1e-6, 151_936),
        "qwen3-0.3b": (24, 768, 12, 4, 64, 2304, 1_000_000, True, 1e-6, 151_936),
        "qwen3-0.6b": (28, 1024, 16, 8, 128, 3072, 1_000_000, True, 1e-6, 151_936),
        "qwen3-1b": (28, 1536, 12, 4, 128, 4608, 1_000_000, True, 1e-6, 151_936),
    }
    for name, shape in expected.items():
        s = LADDER[name]
        assert (s.layers, s.d_model, s.heads, s.kv_heads, s.head_dim, s.ffn, s.rope_theta, s.tie_embeddings,
                s.norm_eps, s.vocab_rows) == shape, name
        assert s.family == ("qwen3" if name.startswith("qwen3") else "llama")
    # trained on Llama-3 tokens, the Qwen3 rungs keep 151,936 rows; the rows beyond 128,256 stay unused
    assert LADDER["qwen3-0.6b"].rows(128_256) == 151_936


def test_evaluation_sets_and_tasks_are_the_authors():
    def corpus(name):
        c = PAPER_OOD[name].corpus
        return c.path, c.hf_config, c.hf_configs, c.split, c.text_fields or [c.text_field], c.limit, c.data_files

    assert set(PRESETS["paper-ood"]) == {"c4", "wikitext103", "cnn_dailymail", "dm_mathematics", "gsm8k", "arxiv",
                                         "humaneval", "codesearchnet", "pubmedqa", "echr", "xquad"}
    assert corpus("c4") == ("allenai/c4", None, [], "train", ["text"], 8192, ["en/c4-train.00000-of-01024.json.gz"])
    assert corpus("wikitext103")[1:6] == ("wikitext-103-v1", [], "train", ["text"], 32768)
    assert corpus("cnn_dailymail")[1:6] == ("3.0.0", [], "train", ["article"], 16384)
    assert corpus("gsm8k")[1:6] == ("main", [], "train", ["question", "answer"], None)
    assert corpus("arxiv")[0] == "ccdv/arxiv-summarization" and corpus("arxiv")[4] == ["abstract"]
    assert corpus("humaneval")[3:6] == ("test", ["prompt", "canonical_solution"], None)  # all 164
    assert corpus("codesearchnet")[1:6] == ("all", [], "train", ["func_documentation_string", "func_code_string"],
                                            8192)
    assert corpus("pubmedqa")[1:6] == ("pqa_labeled", [], "train", ["question", "long_answer"], None)  # all 1,000
    assert corpus("echr")[5] == 4096
    languages = ["ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh"]
    assert corpus("xquad")[1:5] == (None, [f"xquad.{x}" for x in languages], "validation",
                                    ["context", "question", "answers.text"])
    assert PAPER_TASKS == {
        "hellaswag": (0, "acc_norm"), "winogrande": (5, "acc"), "arc_easy": (0, "acc_norm"), "piqa": (0, "acc_norm"),
        "boolq": (5, "acc"), "sciq": (0, "acc"), "mmlu": (5, "acc"), "mathqa": (5, "acc"),
        "openbookqa": (5, "acc_norm"), "social_iqa": (0, "acc"), "commonsense_qa": (10, "acc"),
        "truthfulqa_mc1": (0, "acc"), "logiqa2": (10, "acc"), "race": (0, "acc"), "medmcqa": (10, "acc"),
        "anli_r1": (10, "acc")}
