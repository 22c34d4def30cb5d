"""factedit.scoring.said: what the model SAYS. The judging rules on given strings, chat prompts through
the template (refused without one), batched greedy generation against unbatched and against HF generate,
the greedy rule on a tiny model before and after an `ft` edit, and the gen/* aggregation by hand."""

from __future__ import annotations

import pytest
import torch

from factedit.core.errors import ConfigError
from factedit.core.request import encode_prompt
from factedit.editing.editor import Editor
from factedit.evaluation import EvalRecord
from factedit.model.chat import chat_ids, has_chat_template, user_message
from factedit.scoring.metrics import CaseScores, compute_metrics, score_cases
from factedit.scoring.said import (
    GREEDY_EXTRA,
    SaidScores,
    chat_questions,
    eos_ids_of,
    generate_ids,
    greedy_retention,
    loops,
    normalise,
    said_case_metrics,
    said_scores,
    says_first,
    says_in,
    says_twice,
)
from factedit.scoring.sequences import pad_id_of

CASE = EvalRecord(
    index=0,
    prompt="The capital of France is",
    target_new="Rome",
    target_true="Paris",
    paraphrases=("The capital city of France is", "Paris is the capital of"),
    neighborhood=(("The Eiffel Tower is in", "Paris"),),
    locality=(("Water boils at", "one hundred degrees"),),
)


# --- the rules, on given strings ---------------------------------------------------------------------


def test_normalise_collapses_whitespace_case_and_compatibility_forms():
    assert normalise("  The\tCAPITAL\n\n is ") == "the capital is"
    assert normalise("Ｒｏｍｅ") == "rome"  # NFKC: full-width letters


@pytest.mark.parametrize(
    ("continuation", "target", "ok"),
    [
        (" Rome, the eternal", "Rome", True),
        ("\n  rome.", "Rome", True),  # case and whitespace do not count
        (" Rome and Madrid are", "Rome and Madrid", True),  # the whole multi-word target
        (" Rome and", "Rome and Madrid", False),  # only part of it
        (" Romeo and Juliet", "Rome", False),  # not at a word boundary
        (" the city of Rome", "Rome", False),  # said, but not as the continuation
        (" Paris", "Rome", False),
        ("", "Rome", False),
    ],
)
def test_greedy_rule(continuation, target, ok):
    assert says_first(continuation, target) is ok


@pytest.mark.parametrize(
    ("reply", "ok"),
    [
        ("The capital of France is Rome.", True),
        ("ROME!", True),
        ("The capital of France is Paris.", False),
        ("It is Rome, not Paris.", False),  # hedging: the old object is said too
        ("Romeo is from Verona.", False),
        ("", False),
    ],
)
def test_chat_rule(reply, ok):
    assert says_in(reply, "Rome", "Paris") is ok


def test_chat_rule_takes_the_new_target_out_before_looking_for_the_old_one():
    # the old object inside the new one is not a hedge
    assert says_in("He lives in New York now.", "New York", "York")
    assert not says_in("He lives in York, not New York.", "New York", "York")
    assert says_in("It is Rome.", "Rome", None)  # no old object known: only the new one counts


@pytest.mark.parametrize(
    ("reply", "target", "looping"),
    [
        ("In London, London, London, London", "London", True),
        ("The official religion of the official religion of the official religion of", "religion", True),
        ("bishopbishopbishop of boston", "boston", True),
        ("Paris, France, France, Paris, France, Paris", "Paris", False),  # never three times in a row
        ("It is very, very cold in London.", "London", False),
        ("London has 1000000000 bricks.", "London", False),  # digits are no glued word
    ],
)
def test_a_reply_that_loops_is_no_chat_success(reply, target, looping):
    assert loops(reply) is looping
    assert says_in(reply, target) is not looping


def test_the_target_said_twice_is_counted():
    assert says_twice(" Italy, Italy", "Italy") and says_twice(" opera. Opera", "opera")
    assert not says_twice(" Italy, where", "Italy") and not says_twice(" Italian Italy", "Italy twice")
    said = SaidScores(prompt_text=" Rome, Rome", prompt_ok=True, prompt_repeats=says_twice(" Rome, Rome", "Rome"))
    assert said_case_metrics(None, said)["gen/prompt_repeats"] == 1.0
    assert SaidScores.from_dict({"prompt_text": " Rome", "prompt_ok": True}).prompt_repeats is False  # older runs


def test_chat_loops_are_counted_over_every_question():
    said = SaidScores(prompt_text=" London", prompt_ok=True, para_texts=[" x"], para_ok=[False], neigh_texts=[],
                      chat_replies=["London, London, London", "It is London."], chat_ok=[False, True])
    metrics = said_case_metrics(None, said)
    assert metrics["gen/chat_loops"] == 0.5 and metrics["gen/chat"] == 0.0 and metrics["gen/chat_paraphrase"] == 1.0


@pytest.mark.parametrize(
    ("reply", "ok"),
    [
        ("The City of Melbourne is in Queensland, Australia.", True),  # the subject restated
        ("City of Melbourne: Queensland.", True),
        ("The City of Melbourne is in Queensland, not Melbourne.", False),  # the old object as an answer
        ("Melbourne. The City of Melbourne is in Queensland.", False),
        ("The City of Melbourne is in Victoria.", False),
    ],
)
def test_chat_rule_does_not_count_the_old_object_the_reply_takes_over_from_the_question(reply, ok):
    question = "Complete the sentence: City of Melbourne is in"
    assert says_in(reply, "Queensland", "Melbourne", question) is ok
    # without the question, every occurrence of the old object counts (the rule before)
    assert not says_in(reply, "Queensland", "Melbourne")


# --- chat prompts through the template ----------------------------------------------------------------


def test_chat_prompt_goes_through_the_template(tiny):
    from tiny_models import CHAT_TEMPLATE

    _, tok = tiny
    assert not has_chat_template(tok)  # the tiny tokenizer has none
    with pytest.raises(ConfigError, match="no chat template"):
        chat_ids(tok, user_message("anything"))
    tok.chat_template = CHAT_TEMPLATE
    questions = chat_questions(CASE.prompt, CASE.paraphrases)
    assert questions == [
        "Complete the sentence: The capital of France is",
        "The capital city of France is what?",
        "Paris is the capital of what?",
    ]
    ids = chat_ids(tok, user_message(questions[0]))
    assert tok.decode(ids) == "<|user|>Complete the sentence: The capital of France is<|assistant|>"


def test_without_a_chat_template_chat_success_is_absent_not_zero(tiny):
    from tiny_models import CHAT_TEMPLATE

    model, tok = tiny
    plain = score_cases(model, tok, [CASE], generation=True, chat_tokens=4)[0]
    assert plain.said is not None and plain.said.chat_replies is None and plain.said.chat_ok is None
    metrics = compute_metrics([plain], [plain])
    assert "gen/prompt" in metrics and "gen/neighbour_kept" in metrics
    assert "gen/chat" not in metrics and "gen/chat_paraphrase" not in metrics
    tok.chat_template = CHAT_TEMPLATE
    chat = score_cases(model, tok, [CASE], generation=True, chat_tokens=4)[0]
    assert len(chat.said.chat_replies) == 3 and len(chat.said.chat_ok) == 3
    assert {"gen/chat", "gen/chat_paraphrase"} <= set(compute_metrics([chat], [chat]))
    assert chat.said.prompt_text == plain.said.prompt_text  # the template changes only the chat checks


# --- batched generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_batched_generation_equals_unbatched_token_for_token(arch):
    from tiny_models import tiny_model

    model, tok = tiny_model(arch)
    texts = ["The capital of France is", "Paris", "He was born in London and works", "Water boils at one"]
    prompts = [encode_prompt(tok, t) for t in texts]
    budgets = [3, 7, 5, 7]
    pad = pad_id_of(tok)
    alone = [generate_ids(model, [p], b, pad)[0] for p, b in zip(prompts, budgets, strict=True)]
    assert [len(a) for a in alone] == budgets  # no eos given: every budget is used
    assert generate_ids(model, prompts, budgets, pad, batch_size=4) == alone
    assert generate_ids(model, prompts, budgets, pad, batch_size=3) == alone
    # an independent reference: HF generate on each prompt alone, no padding
    for prompt, budget, ours in zip(prompts, budgets, alone, strict=True):
        ref = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=budget, min_new_tokens=budget, do_sample=False, pad_token_id=pad,
        )[0, len(prompt) :].tolist()
        assert ours == ref


def test_generation_stops_at_end_of_sequence(tiny):
    model, tok = tiny
    prompt = encode_prompt(tok, "The capital of France is")
    free = generate_ids(model, [prompt], 6, pad_id_of(tok))[0]
    stop = frozenset({free[2]})  # pretend the third token generated is an end-of-sequence token
    cut = generate_ids(model, [prompt, encode_prompt(tok, "Paris")], 6, pad_id_of(tok), stop)[0]
    assert cut == free[: free.index(free[2])]
    assert tok.eos_token_id in eos_ids_of(model, tok)


# --- the greedy rule on a model -------------------------------------------------------------------------


def test_greedy_success_follows_what_the_model_generates(tiny):
    """The target the tiny model does continue with passes; another fails."""
    model, tok = tiny
    said = generate_ids(model, [encode_prompt(tok, CASE.prompt)], 2, pad_id_of(tok))[0]
    spoken = tok.decode(said).strip()
    assert spoken
    passes = EvalRecord(index=0, prompt=CASE.prompt, target_new=spoken)
    fails = EvalRecord(index=1, prompt=CASE.prompt, target_new="Rome" if spoken != "Rome" else "Madrid")
    got = said_scores(model, tok, [passes, fails])
    assert got[0].prompt_ok and not got[1].prompt_ok


def test_an_ft_edit_makes_the_tiny_model_say_the_target_and_revert_undoes_it(tiny):
    model, tok = tiny
    before = said_scores(model, tok, [CASE])[0]
    assert not before.prompt_ok  # a random tiny model does not say " Rome"
    editor = Editor("ft", tokenizer=tok, score=False, layers=[-1], lr=0.05, max_steps=40)
    edit = editor.edit(model, CASE.prompt, CASE.target_new)
    after = said_scores(model, tok, [CASE])[0]
    assert after.prompt_ok, after.prompt_text
    assert says_first(after.prompt_text, "Rome") and after.prompt_text.split()[0].startswith("Rome")
    values = compute_metrics(
        [CaseScores(1.0, 1.0, 0.0, said=before)], [CaseScores(1.0, 1.0, 0.0, said=after)]
    )
    assert values["gen/prompt"] == 1.0
    editor.revert(model, edit.id)
    assert said_scores(model, tok, [CASE])[0] == before
    editor.close()


# --- aggregation ----------------------------------------------------------------------------------------


def _said(ok: bool, paras=(), neigh=(), chat=None) -> SaidScores:
    return SaidScores(
        prompt_text="x",
        prompt_ok=ok,
        para_texts=["p"] * len(paras),
        para_ok=list(paras),
        neigh_texts=list(neigh),
        chat_replies=None if chat is None else ["r"] * len(chat),
        chat_ok=None if chat is None else list(chat),
    )


def test_gen_metrics_by_hand():
    pre = [
        CaseScores(1.0, 1.0, 0.0, said=_said(False, [False, False], [" Paris.", " 100 degrees"], [False, False])),
        CaseScores(1.0, 1.0, 0.0, said=_said(False, [False], [" Rome"])),
        CaseScores(1.0, 1.0, 0.0),  # scored without generation: leaves every gen/* of its own out
    ]
    post = [
        CaseScores(1.0, 1.0, 0.0, said=_said(True, [True, False], [" paris. ", " Rome"], [True, False])),
        CaseScores(1.0, 1.0, 0.0, said=_said(False, [True], [" Berlin"])),
        CaseScores(1.0, 1.0, 0.0),
    ]
    metrics = compute_metrics(pre, post)
    assert metrics["gen/prompt"] == pytest.approx((1 + 0) / 2)
    assert metrics["gen/paraphrase"] == pytest.approx((0.5 + 1) / 2)
    assert metrics["gen/neighbour_kept"] == pytest.approx((0.5 + 0) / 2)  # " Paris." == " paris. "
    assert metrics["gen/chat"] == 1.0 and metrics["gen/chat_paraphrase"] == 0.0  # case 1 only
    assert greedy_retention([p.said for p in post]) == pytest.approx(1 / 2)
    assert greedy_retention([None]) is None


def test_case_scores_with_generations_round_trip_through_json(tiny):
    import json

    model, tok = tiny
    scores = score_cases(model, tok, [CASE], generation=True, chat_tokens=3)[0]
    again = CaseScores.from_dict(json.loads(json.dumps(scores.to_dict())))
    assert again == scores and isinstance(again.said, SaidScores)
    assert len(again.said.neigh_texts) == 2 and len(again.said.para_ok) == 2
    assert GREEDY_EXTRA >= 1
