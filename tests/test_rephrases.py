"""Paraphrases told from CounterFact's generation prompts, and the paraphrase rates over the former."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from factedit.core.rephrases import GENERATION_TEMPLATES, rephrase_kind
from factedit.evaluation import EvalRecord
from factedit.evaluation.loaders import load_records, select_records
from factedit.paths import PACKAGE_DIR
from factedit.scoring.metrics import CaseScores, compute_metrics
from factedit.scoring.said import SaidScores

SPLITS = [PACKAGE_DIR / f"data/counterfact/{name}.json" for name in ("train", "val")]


def test_a_generation_template_is_told_from_a_paraphrase():
    subject = "Park Seo-joon"
    assert rephrase_kind("Where Park Seo-joon is from, people speak the language of", subject) == "generation"
    assert rephrase_kind("Park Seo-joon's surroundings include", subject) == "generation"
    # a paraphrase prompt: the same question after a sentence of its own
    assert rephrase_kind("It rained all week. Park Seo-joon is originally from", subject) == "paraphrase"
    # a template's words around another subject than the fact's, or no subject: not a template match
    assert rephrase_kind("Where Seoul is from, people speak the language of", subject) == "paraphrase"
    assert rephrase_kind("Where X is from, people speak the language of", None) == "paraphrase"


def test_the_templates_are_those_the_shipped_counterfact_repeats():
    """Every template recurs in the data (each at least 10 times) and no other rephrase prompt recurs:
    the list and the data agree, and would stop agreeing if either changed."""
    records = [r for path in SPLITS for r in json.loads(path.read_text())]
    filled = Counter(r["rephrase_prompt"].replace(r["subject"], "{}") for r in records)
    assert {t for t, n in filled.items() if n > 1} == GENERATION_TEMPLATES
    assert min(filled[t] for t in GENERATION_TEMPLATES) >= 10
    generation = sum(rephrase_kind(r["rephrase_prompt"], r["subject"]) == "generation" for r in records)
    assert generation / len(records) == pytest.approx(0.83, abs=0.01)


def test_the_counterfact_loader_labels_each_rephrase_prompt():
    records = load_records(SPLITS[1], format="counterfact").records
    kinds = Counter(k for r in records for k in r.paraphrase_kinds)
    assert all(len(r.paraphrase_kinds) == len(r.paraphrases) == 1 for r in records)
    assert set(kinds) == {"paraphrase", "generation"}
    record = records[0]
    assert EvalRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_records_are_chosen_by_the_kind_of_their_rephrase_prompt():
    records = load_records(SPLITS[1], format="counterfact").records
    paraphrased = select_records(records, n=5, start=100, rephrase="paraphrase")
    assert paraphrased[0].index == 101 and len(paraphrased) == 5  # val[101]: the first from 100
    assert all(r.index >= 100 and r.paraphrase_kinds == ("paraphrase",) for r in paraphrased)
    generation = select_records(records, n=5, start=100, rephrase="generation")
    assert all(r.paraphrase_kinds == ("generation",) for r in generation) and generation[0].index == 100
    assert select_records(records, n=5, start=100) == records[100:105]
    unlabelled = EvalRecord(index=0, prompt="p", target_new="t", paraphrases=("q",))  # paraphrases only
    assert select_records([unlabelled], rephrase="paraphrase") == [unlabelled]
    assert select_records([unlabelled], rephrase="generation") == []
    with pytest.raises(ValueError, match="rephrase must be one of"):
        select_records(records, rephrase="both")


def _case(para_same: list[bool], said_para: list[bool], chat_para: list[bool], kinds: list[str]) -> CaseScores:
    """Post-edit scores: paraphrase i succeeds teacher-forced when para_same[i]."""
    said = SaidScores(prompt_text="x", prompt_ok=True, para_texts=["p"] * len(said_para), para_ok=said_para,
                      neigh_texts=[], chat_replies=["r"] * (1 + len(chat_para)), chat_ok=[True, *chat_para])
    ln2 = math.log(2)
    return CaseScores(new_nll=ln2, true_nll=2 * ln2, new_acc=1.0,
                      para_new_nll=[ln2 if ok else 2 * ln2 for ok in para_same],
                      para_true_nll=[2 * ln2 if ok else ln2 for ok in para_same],
                      para_new_acc=[1.0] * len(para_same), said=said, para_kinds=kinds)


def test_paraphrase_rates_are_also_given_over_the_same_question_alone():
    mixed = _case([True, False], [False, True], [True, False], ["paraphrase", "generation"])
    generation_only = _case([False], [True], [True], ["generation"])
    unlabelled = _case([True], [True], [True], [])  # a dataset of paraphrases only: no split keys
    metrics = compute_metrics([mixed, generation_only], [mixed, generation_only])
    assert metrics["cf/ps"] == pytest.approx((0.5 + 0.0) / 2)
    assert metrics["gen/paraphrase"] == pytest.approx((0.5 + 1.0) / 2)
    # over the one case that has a paraphrase prompt, its first rephrase only
    assert metrics["cf/ps_paraphrase_prompts"] == 1.0
    assert metrics["gen/paraphrase_prompts"] == 0.0
    assert metrics["gen/chat_paraphrase_prompts"] == 1.0
    plain = compute_metrics([unlabelled], [unlabelled])
    assert "gen/paraphrase" in plain and not any(k.endswith("_paraphrase_prompts") or k == "gen/paraphrase_prompts"
                                                 for k in plain)
    only_generation = compute_metrics([generation_only], [generation_only])
    assert "cf/ps_paraphrase_prompts" not in only_generation and "gen/paraphrase_prompts" not in only_generation
