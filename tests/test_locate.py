"""The locate-then-edit family (alphaedit, memit, rome) on tiny random models, and two checks on the
default model. The contract every method keeps (tests/test_contract.py) runs for them too."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_weights_equal, snapshot
from peft import PeftModel
from tiny_models import tiny_model

import factedit
from factedit.core.errors import ConfigError, InvalidRequestError
from factedit.core.request import EditRequest, find_subject, tokenize_request
from factedit.locate import values as values_module
from factedit.locate.config import LocateConfig, MEMITConfig
from factedit.locate.method import Locate, measured_at
from factedit.locate.reads import read_at_subject
from factedit.locate.tails import first_pass, split_at_subject, tail_logits
from factedit.locate.values import fit_values, selection, with_what_follows
from factedit.model.contexts import ContextPrefixes, PrefixConfig, generate_prefixes, token_at
from factedit.model.hooks import capture_linear_io
from factedit.safety.preserve import PreserveConfig, covariance_solve_rows
from factedit.scoring.positions import IGNORE, key_rows, value_rows
from factedit.scoring.sequences import logits_at

TINY = dict(v_steps=10, v_weight_decay=None, clamp_norm=None, layers=(1, 2))
NULL = {"threshold": 0.5, "ridge": 1e-3, "cov_weight": 0.0}  # a tiny random model needs a wider null space
PROMPT = "The capital of France is"


def tokenized(tok, prompt=PROMPT, target="Rome", subject=None):
    return tokenize_request(EditRequest(prompt, target, subject), tok, None)


def test_find_subject_rule():
    assert find_subject("The capital of France is") == "France"
    assert find_subject("BBC One, by") == "BBC One"
    assert find_subject("Danielle Darrieux's mother tongue is") == "Danielle Darrieux"
    assert find_subject("The Eiffel Tower is located in") == "Eiffel Tower"
    assert find_subject("Windows 10 was made by") == "Windows 10"
    assert find_subject("In Germany, the official language is") == "Germany"
    assert find_subject("the mother tongue of paris is") == "paris"
    with pytest.raises(InvalidRequestError):
        find_subject("...")


def test_the_record_names_the_subject_it_used():
    model, tok = tiny_model("llama")
    editor = factedit.Editor("memit", tokenizer=tok, **TINY)
    found = editor.edit(model, PROMPT, "Rome")
    given = editor.edit(model, "The capital of Italy is", "Paris", subject="Italy")
    assert found.requests[0].subject == "France" and given.requests[0].subject == "Italy"
    assert [r.requests[0].subject for r in editor.history] == ["France", "Italy"]


def test_keys_are_read_at_the_subjects_last_token():
    model, tok = tiny_model("llama")
    request = tokenized(tok, "The capital of the Eiffel Tower region is", subject="Eiffel Tower")
    rows = key_rows(tok, ("",), [request])
    ids = list(rows.input_ids[0][: int(rows.attention_mask[0].sum())])
    index = int(rows.subject[0])
    assert tok.decode(ids[: index + 1]).endswith("Eiffel Tower")
    assert not tok.decode(ids[: index]).endswith("Eiffel Tower")
    # edit_keys (what an edit protects) is the down projection's input at that token
    method = Locate(MEMITConfig(prefixes=None, layers=(2,)))
    name = method.param_names(model)[0]
    keys = method.edit_keys(model, tok, [name], [request])[name]
    with capture_linear_io(model, [name.rpartition(".")[0]], grads=False) as io, torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    assert torch.allclose(keys[0], io.inputs[name.rpartition(".")[0]][0, index], atol=1e-6)


def test_chat_context_adds_the_fact_asked_as_a_chat_to_the_value_rows():
    from tiny_models import CHAT_TEMPLATE

    model, tok = tiny_model("llama")
    request = tokenized(tok, "The capital of the Eiffel Tower region is", "Rome", subject="Eiffel Tower")
    plain = value_rows(tok, ("",), [request], "{} is a", chat=True)
    assert plain.input_ids.shape[0] == 2  # no chat template: the prompt and the KL row only
    tok.chat_template = CHAT_TEMPLATE
    rows = value_rows(tok, ("",), [request], "{} is a", chat=True)
    assert rows.input_ids.shape[0] == 3 and rows.kl.tolist() == [False, False, True]
    ids = rows.input_ids[1][: int(rows.attention_mask[1].sum())].tolist()
    index = int(rows.subject[1])
    assert tok.decode(ids[: index + 1]).endswith("<|user|>The capital of the Eiffel Tower")
    labelled = rows.labels[1][rows.labels[1] != -100].tolist()
    assert tok.decode(labelled) == "Rome" and ids[-len(labelled):] == labelled
    assert tok.decode(ids[: -len(labelled)]).endswith("<|assistant|>")  # the reply starts with the target
    editor = factedit.Editor("alphaedit", tokenizer=tok, chat_context=True, prefixes=None, preserve=NULL, **TINY)
    record = editor.edit_batch(model, [request.request])
    assert record.post["requests"][0]["target_prob"] > record.pre["requests"][0]["target_prob"]
    # a template that rewrites the message: the subject cannot be placed, the edit is refused, nothing changes
    tok.chat_template = CHAT_TEMPLATE.replace("m['content']", "m['content'] | upper")
    before = snapshot(model)
    with pytest.raises(InvalidRequestError, match="chat template"):
        editor.edit(model, "The capital of Spain is", "Paris")
    assert_weights_equal(model, before)
    assert len(editor.history) == 1


def test_contexts_that_would_not_fit_the_model_are_left_out():
    """A prompt near the context length: its prefixed and chat rows would run past the model's positions
    (GPT-2's are absolute: an index error), so they are left out and the prompt alone is edited."""
    from tiny_models import CHAT_TEMPLATE, CONTEXT

    model, tok = tiny_model("gpt2")
    tok.chat_template = CHAT_TEMPLATE
    n = 0  # words before the prompt: as many as leave room for the target
    while len(tok("word " * (n + 1) + PROMPT)["input_ids"]) <= CONTEXT - 6:
        n += 1
    prompt = "word " * n + PROMPT
    request = tokenized(tok, prompt, "Rome", subject="France")
    prefixes = ("", "Some words written first, as a context", "And another context")
    rows = value_rows(tok, prefixes, [request], "{} is a", chat=True, context_length=CONTEXT)
    assert rows.input_ids.shape[1] <= CONTEXT
    assert rows.input_ids.shape[0] == 2 and rows.kl.tolist() == [False, True]  # the prompt alone and the KL row
    assert key_rows(tok, prefixes, [request], context_length=CONTEXT).input_ids.shape[0] == 1
    before = snapshot(model)
    editor = factedit.Editor("alphaedit", tokenizer=tok, chat_context=True, preserve=NULL, score=False,
                             **{**TINY, "prefixes": {"per_seed": 1, "tokens": 8}})
    record = editor.edit(model, prompt, "Rome", subject="France")
    editor.revert(model, record.id)
    assert_weights_equal(model, before)


def test_token_at_finds_the_last_token_of_a_span_after_a_prefix():
    _, tok = tiny_model("llama")
    text = "Some words. The capital of France is"
    ids, index = token_at(tok, text, text.index("France") + len("France"))
    assert tok.decode(ids[index]).strip() == "France" or tok.decode(ids[: index + 1]).endswith("France")


def test_prefixes_are_deterministic_and_start_with_the_prompt_alone():
    model, tok = tiny_model("llama")
    config = PrefixConfig(seeds=("The", "I"), per_seed=2, tokens=5)
    rng = torch.get_rng_state()
    first = ContextPrefixes(config).get(model, tok)
    assert torch.equal(rng, torch.get_rng_state())  # torch's global RNG is not touched
    assert first == generate_prefixes(tiny_model("llama")[0], tok, config)
    assert len(first) == 5 and first[0] == ""
    assert all(p.startswith(("The", "I")) for p in first[1:])
    assert generate_prefixes(model, tok, PrefixConfig(seeds=("The",), per_seed=2, seed=1)) != first[:3]


def test_a_read_view_shares_its_models_prefixes(monkeypatch):
    from factedit.model import contexts
    from factedit.model.views import read_view

    model, tok = tiny_model("llama")
    written = []
    real = contexts.generate_prefixes
    monkeypatch.setattr(contexts, "generate_prefixes", lambda *a: written.append(a[0]) or real(*a))
    prefixes = ContextPrefixes(PrefixConfig(seeds=("The",), tokens=3))
    first = prefixes.get(read_view(model), tok)  # a preview's view before any edit
    assert prefixes.get(model, tok) == first and prefixes.get(read_view(model), tok) == first
    assert len(written) == 1  # written once for the model and every view of it
    other, _ = tiny_model("llama")
    prefixes.get(other, tok)
    assert len(written) == 2


@pytest.mark.parametrize("method", ["alphaedit", "memit", "rome"])
def test_compute_leaves_the_model_unchanged(method):
    model, tok = tiny_model("llama")
    before = snapshot(model)
    extra = {"layers": (2,)} if method == "rome" else {"preserve": NULL} if method == "alphaedit" else {}
    editor = factedit.Editor(method, tokenizer=tok, **{**TINY, **extra})
    delta = editor._impl.compute(model, tok, [tokenized(tok)])
    assert_weights_equal(model, before)
    assert all(p.kind == "low_rank" and p.left.shape[1] == 1 for _, p in delta.items())  # rank one per block
    assert sorted(delta.names()) == sorted(editor._impl.param_names(model))


def test_edit_batch_is_one_solve_of_rank_the_number_of_facts_and_reverts_exactly():
    model, tok = tiny_model("llama")
    base = snapshot(model)
    editor = factedit.Editor("alphaedit", tokenizer=tok, **TINY, preserve=NULL)
    record = editor.edit_batch(model, [EditRequest(PROMPT, "Rome"), EditRequest("The capital of Italy is", "Paris"),
                                       EditRequest("The capital of Spain is", "Berlin")])
    assert len(record.requests) == 3
    assert all(p.left.shape[1] == 3 for _, p in record.delta.items())
    editor.revert(model, record.id)
    assert_weights_equal(model, base)


def test_v_star_is_fitted_in_groups_of_v_chunk_requests_each_as_if_alone():
    model, tok = tiny_model("llama")
    facts = [("The capital of France is", "Rome"), ("The capital of Spain is", "Paris"),
             ("The capital of Italy is", "Berlin")]
    requests = [tokenized(tok, p, t) for p, t in facts]
    grouped = Locate(LocateConfig(**TINY, v_chunk=2, preserve=PreserveConfig(**NULL), prefixes=None))
    grouped.compute(model, tok, requests)
    alone = Locate(LocateConfig(**TINY, v_chunk=2, preserve=PreserveConfig(**NULL), prefixes=None))
    alone.compute(model, tok, requests[:2])
    first = alone.last_values
    alone.compute(model, tok, requests[2:])
    assert torch.equal(grouped.last_values.target, torch.cat([first.target, alone.last_values.target]))
    assert grouped.last_values.steps == max(first.steps, alone.last_values.steps)
    with pytest.raises(ValueError, match="v_chunk"):
        LocateConfig(v_chunk=0)


def test_sequential_edits_hold_the_keys_of_earlier_edits():
    model, tok = tiny_model("llama")
    base = snapshot(model)
    editor = factedit.Editor("alphaedit", tokenizer=tok, **TINY, preserve=NULL)
    first = editor.edit(model, PROMPT, "Rome")
    later = [tokenized(tok, "The capital of Italy is", "Paris", "Italy")]
    names = editor._impl.param_names(model)
    held = editor._impl.edit_keys(model, tok, names, [tokenized(tok, subject="France")])  # what the editor protects
    second = editor.edit(model, "The capital of Italy is", "Paris")
    fresh = editor._impl.edit_keys(model, tok, names, later)
    for name in names:
        change = second.delta.params[name].materialize(torch.float64)  # (out, in)
        moved_old = (change @ held[name][0].double()).norm()
        moved_new = (change @ fresh[name][0].double()).norm()
        assert moved_old < 0.02 * moved_new, name
    # without holding them, the same later edit moves the earlier key much more
    editor.revert(model, second.id)
    editor.set_method("alphaedit", **TINY, preserve={**NULL, "protect_edits": False})
    unheld = editor.edit(model, "The capital of Italy is", "Paris")
    name = names[0]
    change = unheld.delta.params[name].materialize(torch.float64)
    assert (change @ held[name][0].double()).norm() > 10 * (
        second.delta.params[name].materialize(torch.float64) @ held[name][0].double()).norm()
    editor.revert_all(model)
    assert_weights_equal(model, base)
    assert first.id in [r.id for r in editor.history]


def test_a_subject_missing_from_the_prompt_is_refused_and_nothing_changes():
    model, tok = tiny_model("llama")
    base = snapshot(model)
    editor = factedit.Editor("alphaedit", tokenizer=tok, **TINY, preserve=NULL)
    with pytest.raises(InvalidRequestError, match="does not occur in the prompt"):
        editor.edit(model, PROMPT, "Rome", subject="Germany")
    with pytest.raises(InvalidRequestError, match="does not occur"):
        editor.edit_batch(model, [EditRequest(PROMPT, "Rome"), EditRequest("The capital of Italy is", "X", "italy")])
    assert_weights_equal(model, base)
    assert editor.history == []


def test_bad_config_is_refused():
    _, tok = tiny_model("llama")
    for bad in (dict(position="first"), dict(kl_prompt="no subject"), dict(layers=()), dict(v_lr=0.0),
                dict(cov_weight=-1.0), dict(clamp_norm=-1.0)):
        with pytest.raises(ConfigError):
            factedit.Editor("alphaedit", tokenizer=tok, **bad)


def test_covariance_solve_inserts_keys_exactly_at_weight_zero_and_shrinks_with_weight():
    gen = torch.Generator().manual_seed(0)
    corpus = torch.randn(500, 12, generator=gen, dtype=torch.float64)
    second = corpus.T @ corpus / 500
    keys, values = torch.randn(3, 12, generator=gen), torch.randn(3, 5, generator=gen)
    x, v = covariance_solve_rows(second, keys, values, 0.0)
    change = v.double().T @ x.double()  # (5, 12)
    assert torch.allclose(change @ keys.double().T, values.double().T, atol=1e-4)
    x, v = covariance_solve_rows(second, keys, values, 100.0)
    assert (v.double().T @ x.double()).norm() < change.norm()
    with pytest.raises(ConfigError):
        covariance_solve_rows(second, keys, values, -1.0)


def test_export_as_a_peft_adapter_is_exact_for_low_rank_edits(tmp_path):
    model, tok = tiny_model("llama")
    editor = factedit.Editor("memit", tokenizer=tok, **TINY)
    editor.edit(model, PROMPT, "Rome")
    exported = editor.export_adapter(tmp_path / "adapter", exact=True)
    assert exported.svd_rank is None and exported.svd_errors == {}  # no part was approximated
    # PEFT merges the adapter into a fresh base: the edited weights, to float rounding.
    base, _ = tiny_model("llama")
    merged = dict(PeftModel.from_pretrained(base, str(exported.path)).merge_and_unload().named_parameters())
    for name, value in model.named_parameters():
        assert torch.allclose(merged[name], value, atol=1e-6), name


@pytest.mark.default_model
def test_default_model_france_rome_takes_and_the_paraphrase_follows(default_model):
    model, tok = default_model
    base = snapshot(model)
    with factedit.Editor("alphaedit", tokenizer=tok) as editor:
        record = editor.edit(model, PROMPT, "Rome")
        assert record.requests[0].subject == "France"
        for prompt in (PROMPT, "The capital city of France is"):
            ids = torch.tensor([tok(prompt).input_ids])
            out = model.generate(ids, max_new_tokens=3, do_sample=False)
            assert "Rome" in tok.decode(out[0, ids.shape[1]:]), prompt
        ids = torch.tensor([tok("The capital of Germany is").input_ids])  # a neighbour keeps its answer
        assert "Berlin" in tok.decode(model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:])
        editor.revert(model, record.id)
    assert_weights_equal(model, base)


def _value_setup(arch):
    model, tok = tiny_model(arch)
    requests = [tokenized(tok), tokenized(tok, "Paris, the city", "big town", "Paris")]  # "Paris": first token
    rows = value_rows(tok, ("", "Some prefix words here", "I"), requests, "{} is a")
    return model, tok, rows, requests


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gptj", "gemma"])
def test_tail_passes_give_the_full_passes_logits(arch):
    model, _, rows, _ = _value_setup(arch)
    select, _ = selection(rows)
    full = logits_at(model, rows.input_ids, rows.attention_mask, select)
    for layer in (0, 1):
        tails, logits, _ = first_pass(model, split_at_subject(model, rows, select), layer)
        assert tails.ids.shape[0] == 2 and tails.ids.numel() < int(rows.attention_mask.sum())  # a row per request
        assert torch.allclose(logits, full, atol=1e-5), layer
        assert torch.allclose(tail_logits(model, tails), full, atol=1e-5), layer  # replayed from block `layer`


def test_v_star_is_the_same_from_tails_and_from_whole_rows(monkeypatch):
    model, _, rows, _ = _value_setup("llama")
    config = LocateConfig(**TINY)
    name = "model.layers.2.mlp.down_proj"
    tails = fit_values(model, rows, 2, name, 2, "model.layers.2", config)
    monkeypatch.setattr(values_module, "_agree", lambda *args: False)  # as if the cache did not replay exactly
    whole = fit_values(model, rows, 2, name, 2, "model.layers.2", config)
    assert tails.tails and not whole.tails and tails.steps == whole.steps
    assert torch.allclose(tails.target, whole.target, atol=1e-4)
    # a sliding window shorter than the rows: its cache does not fit the packed mask and whole rows are run
    model, _, rows, _ = _value_setup("gemma3_text")
    assert not fit_values(model, rows, 2, name, 2, "model.layers.2", LocateConfig(**{**TINY, "v_steps": 1})).tails


def test_a_request_that_met_the_stop_leaves_the_passes_and_the_others_fit_as_if_alone():
    model, tok, rows, requests = _value_setup("llama")
    name, prefixes = "model.layers.2.mlp.down_proj", ("", "Some prefix words here", "I")
    unedited = fit_values(model, rows, 2, name, 2, "model.layers.2", LocateConfig(**{**TINY, "v_steps": 0})).nll
    config = LocateConfig(**{**TINY, "v_stop_nll": float(unedited.mean())})  # between the two requests' NLL
    both = fit_values(model, rows, 2, name, 2, "model.layers.2", config)
    alone = [fit_values(model, value_rows(tok, prefixes, [r], "{} is a"), 1, name, 2, "model.layers.2", config)
             for r in requests]
    assert sorted(a.steps for a in alone) == [0, config.v_steps]  # one stops at once, one runs every step
    assert both.steps == config.v_steps
    assert torch.allclose(both.target, torch.cat([a.target for a in alone]), atol=1e-5)
    assert torch.allclose(both.nll, torch.cat([a.nll for a in alone]), atol=1e-5)


def test_the_tails_of_some_requests_give_those_requests_logits():
    model, _, rows, _ = _value_setup("llama")
    select, _ = selection(rows)
    tails, full, _ = first_pass(model, split_at_subject(model, rows, select), 1)
    for keep in ([True, False], [False, True]):
        kept = torch.tensor(keep)
        of_kept = kept[rows.owner[select.nonzero()[:, 0]]]  # (M,): positions in a kept request's rows
        assert torch.allclose(tail_logits(model, tails.of_requests(kept)), full[of_kept], atol=1e-5)


def test_v_star_is_shortened_to_the_least_of_its_length_that_still_meets_the_stop():
    model, tok, _, requests = _value_setup("llama")
    # one request: on a tiny random model no one stop lies between two requests' start and reach
    rows = value_rows(tok, ("", "Some prefix words here", "I"), requests[:1], "{} is a")
    name, block = "model.layers.2.mlp.down_proj", "model.layers.2"

    def fitted(**settings):
        return fit_values(model, rows, 1, name, 2, block, LocateConfig(**{**TINY, **settings}))

    start, far = fitted(v_steps=0).nll, fitted(v_steps=20, v_stop_nll=0.0).nll  # (1,) each
    stop = float((start.max() + far.max()) / 2)  # met within 20 steps, not at the start
    assert float(far.max()) < stop < float(start.max())
    plain, short = fitted(v_steps=20, v_stop_nll=stop), fitted(v_steps=20, v_stop_nll=stop, v_shrink_checks=6)
    assert bool((plain.nll < stop).all()) and short.steps == plain.steps
    assert bool((short.nll < stop).all()) and bool((short.nll >= plain.nll).all())
    wanted, kept = plain.target - plain.initial, short.target - short.initial  # (1, H) each
    fraction = kept.norm(dim=1) / wanted.norm(dim=1)
    assert bool((fraction < 1).all()) and bool((fraction > 0).all())
    assert torch.allclose(kept, wanted * fraction[:, None], atol=1e-5)  # the same direction, shorter
    # a request that did not meet the stop keeps its δ as Adam left it
    unmet = fitted(v_steps=1, v_stop_nll=0.0), fitted(v_steps=1, v_stop_nll=0.0, v_shrink_checks=6)
    assert torch.equal(unmet[0].target, unmet[1].target)
    with pytest.raises(ValueError, match="v_shrink_checks"):
        LocateConfig(v_shrink_checks=-1)


def test_each_request_stops_on_its_own_and_gets_the_value_it_would_alone():
    model, tok, rows, requests = _value_setup("llama")
    name, block = "model.layers.2.mlp.down_proj", "model.layers.2"
    prefixes = ("", "Some prefix words here", "I")

    def fitted(rows, n, **settings):
        return fit_values(model, rows, n, name, 2, block, LocateConfig(**{**TINY, "v_steps": 20, **settings}))

    start, far = fitted(rows, 2, v_steps=0).nll, fitted(rows, 2, v_stop_nll=0.0).nll  # (2,) each
    stop = float((start.max() + far.max()) / 2)
    alone = [fitted(value_rows(tok, prefixes, [r], "{} is a"), 1, v_stop_nll=stop) for r in requests]
    assert alone[0].steps != alone[1].steps  # one request meets the stop before the other
    together = fitted(rows, 2, v_stop_nll=stop)
    assert together.steps == max(a.steps for a in alone)
    # the request that met the stop first was not pushed on while the other one went on
    assert torch.allclose(together.target, torch.cat([a.target for a in alone]), atol=1e-4)
    assert torch.allclose(together.nll, torch.cat([a.nll for a in alone]), atol=1e-4)


def test_gradient_steps_move_each_value_by_its_share_of_the_hidden_norm_along_its_gradient():
    model, _, rows, _ = _value_setup("llama")
    name, block = "model.layers.2.mlp.down_proj", "model.layers.2"
    config = LocateConfig(**{**TINY, "v_optimizer": "gradient", "v_lr": 0.25, "v_steps": 1, "v_stop_nll": 0.0})
    one = fit_values(model, rows, 2, name, 2, block, config)
    moved = one.target - one.initial  # (2, H)
    assert torch.allclose(moved.norm(dim=1), 0.25 * one.initial.norm(dim=1), rtol=1e-5)
    two = fit_values(model, rows, 2, name, 2, block, LocateConfig(**{**vars(config), "v_steps": 2}))
    assert bool((two.nll < one.nll).all())  # a second step along the fresh gradient lowers the NLL again
    with pytest.raises(ValueError, match="v_optimizer"):
        LocateConfig(v_optimizer="sgd")


def test_the_keys_an_edit_protects_are_those_read_while_spreading():
    model, tok = tiny_model("llama")
    editor = factedit.Editor("alphaedit", tokenizer=tok, **TINY, preserve=NULL)
    record = editor.edit(model, PROMPT, "Rome")  # applied after the preserver's projection
    method, names = editor._impl, editor._impl.param_names(model)
    requests = method._spread_keys.requests
    reused = method._reused_keys(model, names, requests)
    fresh = method.edit_keys(model, tok, names, [tokenized(tok, subject="France")])  # other objects: read again
    assert reused is not None
    for name in names:
        assert torch.allclose(reused[name], fresh[name], rtol=1e-5, atol=1e-6), name
    editor.revert(model, record.id)  # the weights no longer hold what it computed: read again
    assert method._reused_keys(model, names, requests) is None


def _share_left(method: Locate, model, tok, request, delta) -> float:
    """‖v* − h‖ at the measured block on the prompt alone with `delta` applied, over the same before it."""
    rows = key_rows(tok, ("",), [request])
    names = method.param_names(model)
    params = dict(model.named_parameters())
    updated = {n: params[n].detach() + delta.params[n].materialize(params[n].dtype) for n in names}
    _, after, _ = read_at_subject(model, rows, [], measured_at(model, names), params=updated)
    _, before, _ = read_at_subject(model, rows, [], measured_at(model, names))
    target = method.last_values.target[0]
    return float((target - after[0]).norm() / (target - before[0]).norm())


def test_memits_default_covariance_weight_is_the_key_width():
    model, tok = tiny_model("llama")
    request = tokenized(tok, subject="France")
    width = model.model.layers[0].mlp.down_proj.in_features
    deltas = [Locate(MEMITConfig(**TINY, prefixes=None, cov_weight=w)).compute(model, tok, [request])
              for w in (None, float(width), 10.0 * width)]
    for name, param in deltas[0].params.items():
        assert torch.equal(param.materialize(torch.float32), deltas[1].params[name].materialize(torch.float32))
    assert not torch.equal(next(iter(deltas[0].params.values())).materialize(torch.float32),
                           next(iter(deltas[2].params.values())).materialize(torch.float32))


def test_refinement_passes_solve_again_for_what_a_regularised_solve_left():
    model, tok = tiny_model("llama")
    request = tokenized(tok, subject="France")
    left, ranks = {}, {}
    for passes, tol in ((0, 0.0), (3, 0.0), (3, 1.0)):
        method = Locate(MEMITConfig(**TINY, prefixes=None, cov_weight=100.0, refine_passes=passes, refine_tol=tol))
        delta = method.compute(model, tok, [request])
        left[passes, tol] = _share_left(method, model, tok, request, delta)
        ranks[passes, tol] = {p.left.shape[1] for p in delta.params.values()}
    assert left[0, 0.0] > 0.3  # the covariance term holds the single pass back
    assert left[3, 0.0] < 0.1 * left[0, 0.0]
    assert ranks == {(0, 0.0): {1}, (3, 0.0): {4}, (3, 1.0): {1}}  # a pass adds rank N; tol 1 stops after one
    # through an Editor: the keys it protects are still those of the final weights; revert is exact
    base = snapshot(model)
    editor = factedit.Editor("alphaedit", tokenizer=tok, **TINY, preserve={**NULL, "cov_weight": 1e3},
                             refine_passes=2, refine_tol=0.0)
    record = editor.edit(model, PROMPT, "Rome")
    names = editor._impl.param_names(model)
    reused = editor._impl._reused_keys(model, names, editor._impl._spread_keys.requests)
    fresh = editor._impl.edit_keys(model, tok, names, [tokenized(tok, subject="France")])
    assert all(torch.allclose(reused[n], fresh[n], rtol=1e-5, atol=1e-6) for n in names)
    editor.revert(model, record.id)
    assert_weights_equal(model, base)
    for bad in (dict(refine_passes=-1), dict(refine_tol=1.5)):
        with pytest.raises(ConfigError):
            factedit.Editor("alphaedit", tokenizer=tok, **bad)


def test_after_kl_keeps_what_follows_the_target_as_the_unedited_model_has_it(monkeypatch):
    model, _, rows, _ = _value_setup("llama")
    name, block = "model.layers.2.mlp.down_proj", "model.layers.2"
    plain, _ = selection(rows)
    select, targets = selection(rows, after=True)
    with_target = (rows.labels != IGNORE).any(1)  # (B,)
    last = rows.attention_mask.sum(1) - 1
    assert torch.equal(select & ~plain, torch.zeros_like(select).index_put_(
        (with_target.nonzero()[:, 0], last[with_target]), torch.tensor(True)))  # one more: each target row's last
    assert int((targets == IGNORE).sum()) == int(with_target.sum() + rows.kl.sum())

    readings = []
    real = values_module._losses
    monkeypatch.setattr(values_module, "_losses", lambda *a: readings.append(real(*a)) or readings[-1])

    def after_at_the_end(weight: float) -> float:
        readings.clear()
        config = LocateConfig(**{**TINY, "v_steps": 30, "v_stop_nll": 0.0, "after_kl": weight})
        fit_values(model, rows, 2, name, 2, block, config)
        return float(readings[-1][3].detach().sum())  # (nll, stop, kl, after): the last pass's

    # a tiny random model's edit moves the next token little: the weight that shows it is large
    loose, held = after_at_the_end(1e-9), after_at_the_end(1e3)
    assert loose > 0 and held < loose / 2  # held close to the unedited distribution after the target
    with pytest.raises(ValueError, match="after_kl"):
        LocateConfig(after_kl=-1.0)
    with pytest.raises(ValueError, match="after_tokens"):
        LocateConfig(after_tokens=0)


def test_after_tokens_hold_the_unedited_continuation_after_the_target():
    model, tok, rows, _ = _value_setup("llama")
    longer = with_what_follows(model, tok, rows, 2, None)
    has_target = (rows.labels != IGNORE).any(1)
    grown = longer.attention_mask.sum(1) - rows.attention_mask.sum(1)  # (B,)
    assert bool((grown[~has_target] == 0).all()) and bool((grown[has_target] <= 2).all()) and int(grown.sum()) > 0
    for b in range(rows.input_ids.shape[0]):  # the text and its labels as they were, the continuation unlabelled
        n = int(rows.attention_mask[b].sum())
        assert torch.equal(longer.input_ids[b, :n], rows.input_ids[b, :n])
        assert torch.equal(longer.labels[b, :n], rows.labels[b, :n])
        assert bool((longer.labels[b, n:] == IGNORE).all())
        if int(grown[b]):  # what the model itself says next (greedy)
            with torch.no_grad():
                first = model(input_ids=rows.input_ids[b : b + 1, :n]).logits[0, -1].argmax()
            assert int(longer.input_ids[b, n]) == int(first)
    select, targets = selection(longer, after=True)
    last = longer.attention_mask.sum(1) - 1
    target_end = (longer.labels != IGNORE).float().cumsum(1).argmax(1)  # (B,): the last labelled position
    for b in range(longer.input_ids.shape[0]):
        if has_target[b]:  # from the target's last token to the row's last: one more read than tokens appended
            assert bool(select[b, int(target_end[b]) : int(last[b]) + 1].all())
            assert int(select[b, int(target_end[b]) :].sum()) == int(grown[b]) + 1
    assert int((targets == IGNORE).sum()) == int((grown + 1)[has_target].sum() + rows.kl.sum())
