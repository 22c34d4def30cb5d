"""Evaluation dataset loaders on the small fixture files (tests/fixtures/), in every format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factedit.evaluation import DatasetError, EvalRecord, load_records, select_records
from factedit.paths import PACKAGE_DIR

FIXTURES = Path(__file__).parent / "fixtures"
DATA = PACKAGE_DIR / "data"


def test_counterfact_flat_format():
    data = load_records(FIXTURES / "counterfact_small.json")
    assert data.format == "counterfact" and data.total == 3 and data.skipped == 0
    first = data.records[0]
    assert first == EvalRecord(
        index=0,
        prompt="The capital of France is",
        target_new="Rome",
        target_true="Paris",
        subject="France",
        case_id=1,
        paraphrases=("The capital city of France is",),
        paraphrase_kinds=("paraphrase",),
        neighborhood=(("The Eiffel Tower is in", "Paris"),),
    )
    # the neighbour's own true answer is used (here it differs from the edited fact's)
    assert data.records[1].neighborhood == (("The official language of Italy is", "Italian"),)
    assert len(data.sha256) == 64


def test_rome_format_fills_the_template_and_reads_both_neighbour_styles():
    data = load_records(FIXTURES / "rome_small.json")
    assert data.format == "rome"
    first, second = data.records
    assert first.prompt == "The mother tongue of Danielle Darrieux is"
    assert (first.target_new, first.target_true, first.subject) == ("English", "French", "Danielle Darrieux")
    assert len(first.paraphrases) == 2 and len(first.generation_prompts) == 2
    assert first.neighborhood[0] == ("The mother tongue of Léon Blum is", "French")
    assert second.neighborhood == (("LeBron James plays the sport of", "basketball"),)


def test_zsre_mend_format():
    data = load_records(FIXTURES / "zsre_small.jsonl")
    assert data.format == "zsre"
    rec = data.records[0]
    assert (rec.prompt, rec.target_new, rec.target_true) == (
        "What is the product made by UniFirst?",
        "unmanned aircraft",
        "uniform",
    )
    assert rec.paraphrases == ("What will be the product of UniFirst?",)
    assert rec.locality == (("nq question: john goodman's character in the big lebowski", "Walter Sobchak"),)
    assert rec.neighborhood == ()


def test_mapped_format_with_dotted_fields():
    fields = {
        "prompt": "q",
        "target_new": "a_new",
        "target_true": "a_old",
        "subject": "meta.who",
        "paraphrases": "meta.alts",
        "locality": "unrelated",
        "locality_answers": "unrelated_ans",
    }
    data = load_records(FIXTURES / "mapped_small.jsonl", fields=fields)
    assert data.format == "mapped"
    first, second = data.records
    assert first.subject == "Apple" and first.paraphrases == ("Apple was founded by",)
    assert first.locality == (("The Danube flows through", "Vienna"),)
    assert second.paraphrases == ()


def test_shipped_files_load():
    cf = load_records(DATA / "counterfact" / "val.json")
    assert cf.total == 1919 and cf.skipped == 0
    with pytest.raises(DatasetError, match="record 534: field 'alt': empty"):
        load_records(DATA / "zsre" / "train-1k.json")
    zsre = load_records(DATA / "zsre" / "train-1k.json", skip_invalid=True)  # as conf/data/zsre.yaml does
    assert zsre.format == "zsre" and zsre.total == 1000 and zsre.skipped == 2


@pytest.mark.parametrize(
    "name, index, field",
    [
        ("counterfact_malformed.json", 1, "target_new"),
        ("rome_malformed.json", 1, "requested_rewrite.prompt"),
        ("zsre_malformed.jsonl", 1, "<json>"),
    ],
)
def test_malformed_record_is_named_then_skippable(name, index, field):
    path = FIXTURES / name
    with pytest.raises(DatasetError) as info:
        load_records(path)
    message = str(info.value)
    assert name in message and f"record {index}" in message and repr(field) in message
    assert "skip_invalid" in message
    data = load_records(path, skip_invalid=True)
    assert data.skipped == data.total - len(data.records) >= 1
    assert index not in [r.index for r in data.records]


def test_skip_counts_every_bad_record():
    data = load_records(FIXTURES / "counterfact_malformed.json", skip_invalid=True)
    assert [r.index for r in data.records] == [0] and data.skipped == 2
    assert "rephrase_prompt" in data.errors[1]


def test_unknown_layout_and_bad_mapping_are_clear(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps([{"question": "Q?", "answer": "A"}]))
    with pytest.raises(DatasetError, match="data.format"):
        load_records(path)
    with pytest.raises(DatasetError, match="missing \\['target_new'\\]"):
        load_records(path, fields={"prompt": "question"})
    with pytest.raises(DatasetError, match="does not exist"):
        load_records(tmp_path / "nope.json")


def test_selection_is_file_order_or_seeded_shuffle():
    records = load_records(FIXTURES / "counterfact_small.json").records
    assert [r.index for r in select_records(records, 2)] == [0, 1]
    shuffled = [r.index for r in select_records(records, None, shuffle=True, seed=3)]
    assert sorted(shuffled) == [0, 1, 2]
    assert shuffled == [r.index for r in select_records(records, None, shuffle=True, seed=3)]
