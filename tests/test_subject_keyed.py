"""Edits keyed on the subject (`positions="subject"` for `mend` and `ultraedit`): the editor network reads
u/δ at the subject's last token only, where the locate-then-edit family keys its edits."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_weights_equal, snapshot
from test_lifelong import counts
from test_mend import mend_editor, requests_for, tiny_checkpoint
from tiny_models import tiny_model

import factedit
from factedit import EditRequest
from factedit.core.errors import InvalidRequestError
from factedit.core.request import tokenize_request
from factedit.mend.capture import per_request_nll
from factedit.mend.method import averaged_rows
from factedit.model.hooks import capture_linear_io
from factedit.scoring.batches import chat_requests, loss_positions, make_batch, prefixed_requests
from factedit.scoring.sequences import pad_id_of

PREFIXES = ("", "A short one", "I think")


def test_anchored_requests_carry_the_subjects_last_token_in_every_context():
    _, tok = tiny_model("llama")
    request = tokenize_request(EditRequest("The capital of France is", "Rome", subject="France"), tok, None)
    out = prefixed_requests([request], tok, PREFIXES, anchored=True)
    assert [r.prompt_ids for r in out] == [r.prompt_ids for r in prefixed_requests([request], tok, PREFIXES)]
    for asked in out:
        assert tok.decode(list(asked.prompt_ids[: asked.anchor + 1])).endswith("France")
        assert not tok.decode(list(asked.prompt_ids[: asked.anchor])).endswith("France")
    assert out[0].anchor is not None and request.anchor is None  # the request itself is not changed


def test_without_a_subject_the_one_found_in_the_prompt_is_the_anchor():
    _, tok = tiny_model("llama")
    request = tokenize_request(EditRequest("The mother tongue of Danielle Darrieux is", "English"), tok, None)
    (asked,) = prefixed_requests([request], tok, ("",), anchored=True)
    assert tok.decode(list(asked.prompt_ids[: asked.anchor + 1])).endswith("Darrieux")


def test_the_identity_editor_keyed_on_the_subject_gives_minus_alpha_times_the_gradient_there(tmp_path):
    model, tok = tiny_model("llama")
    alpha = 0.5
    path, _ = tiny_checkpoint(tmp_path, model, alpha=alpha)
    editor = mend_editor(tok, path, positions="subject", step_scales=(1.0,), lifelong=False)
    requests = requests_for(tok)
    delta = editor._impl.compute(model, tok, requests)

    # By plain autograd: the edit loss's gradient at each module's output, taken at the subject's last
    # token only, times that token's input.
    anchored = prefixed_requests(requests, tok, ("",), anchored=True)
    batch = make_batch(anchored, pad_id_of(tok), torch.device("cpu"))
    for p in model.parameters():
        p.requires_grad_(False)
    modules = {name: name.rpartition(".")[0] for name in delta.names()}
    with capture_linear_io(model, list(modules.values())) as io:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        select = loss_positions(batch.labels)
        per_request_nll(logits[select], batch.labels, select).sum().backward()
    rows = torch.arange(len(anchored))
    for name, module in modules.items():
        u = io.inputs[module][rows, batch.anchor]  # (B, d_in)
        grad = io.output_grads[module][rows, batch.anchor]  # (B, d_out)
        expected = -alpha * grad.T @ u  # (d_out, d_in): the llama layout
        got = delta.params[name].left @ delta.params[name].right
        assert torch.allclose(got, expected, atol=1e-7, rtol=1e-4), name


@pytest.mark.parametrize("method", ["mend", "ultraedit"])
def test_a_subject_keyed_edit_has_one_row_per_context_and_reverts_exactly(method, tmp_path):
    model, tok = tiny_model("llama")
    base = snapshot(model)
    prefixes = {"seeds": ["The", "I"], "per_seed": 1, "tokens": 4}
    if method == "mend":
        path, _ = tiny_checkpoint(tmp_path, model)
        editor = mend_editor(tok, path, guard=None, positions="subject", prefixes=prefixes)
    else:
        # not the last block: its output at the subject's token reaches no target's logits (δ = 0 there)
        editor = factedit.Editor("ultraedit", tokenizer=tok, warmup=0, layers=(0,), positions="subject",
                                 preserve=None, step_scales=(1.0,), extra_steps=0, guard=None, prefixes=prefixes)
    record = editor.edit(model, "The capital of France is", "Rome")
    if method == "ultraedit":  # fresh statistics: exactly the prompt alone and its two prefixed forms
        assert counts(record.state)[0] == 3
    assert not all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    editor.revert(model, record.id)
    assert_weights_equal(model, base)


def test_a_subject_not_in_the_prompt_is_refused_before_anything_changes(tmp_path):
    model, tok = tiny_model("llama")
    base = snapshot(model)
    path, _ = tiny_checkpoint(tmp_path, model)
    editor = mend_editor(tok, path, guard=None, positions="subject")
    with pytest.raises(InvalidRequestError, match="does not occur in the prompt"):
        editor.edit(model, "The capital of France is", "Rome", subject="Germany")
    assert_weights_equal(model, base)
    assert editor.history == []


def test_a_subject_keyed_edit_protects_its_subjects_keys_for_later_edits(tmp_path):
    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model)
    editor = mend_editor(tok, path, guard=None, positions="subject", preserve={"threshold": 1.0})
    record = editor.edit(model, "The capital of France is", "Rome")
    protected = editor._safeguards.preserver._protected[record.id]
    # one key per matrix: the prompt's subject's last token, not every token of prompt and target
    assert {name: tuple(z.shape[:1]) for name, z in protected.items()} == {name: (1,) for name in protected}
    (asked,) = prefixed_requests([tokenize_request(EditRequest("The capital of France is", "Rome"), tok, None)],
                                 tok, ("",), anchored=True)
    assert editor._impl.edit_keys(model, tok, list(protected), [asked])[next(iter(protected))].shape[0] == 1


@pytest.mark.parametrize("method", ["mend", "ultraedit"])
def test_finish_steps_at_the_loss_positions_make_a_subject_keyed_edit_take(method, tmp_path):
    model, tok = tiny_model("llama")
    # The last block's output at the subject's token reaches no target logit: keyed on the subject, its
    # gradient there is zero and the edit cannot take; a finishing step at the loss positions can.
    base = snapshot(model)
    if method == "mend":
        path, _ = tiny_checkpoint(tmp_path, model, layers=(-1,), roles=("out",), alpha=10.0)

        def editor(**finish):
            return mend_editor(tok, path, layers=(-1,), roles=("out",), guard=None, positions="subject",
                               extra_steps=1, **finish)
    else:
        def editor(**finish):
            return factedit.Editor("ultraedit", tokenizer=tok, warmup=0, layers=(-1,), positions="subject",
                                   lr=1.0, preserve=None, step_scales=(1.0,), extra_steps=1, guard=None, **finish)
    keyed = editor()
    record = keyed.edit(model, "The capital of France is", "Rome")
    assert not record.post["requests"][0]["target_is_argmax"]
    keyed.revert(model, record.id)
    keyed.close()
    finished = editor(finish_steps=1)
    record = finished.edit(model, "The capital of France is", "Rome")
    assert record.post["requests"][0]["target_is_argmax"]
    finished.revert(model, record.id)
    assert_weights_equal(model, base)


def test_an_ultraedit_margin_keeps_stepping_past_the_bare_argmax():
    model, tok = tiny_model("llama")
    base = snapshot(model)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    (rome,) = tok(" Rome", add_special_tokens=False).input_ids

    def lead() -> float:  # Rome's logit over the best other token after the prompt
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        return float(logits[rome] - logits.scatter(0, torch.tensor([rome]), float("-inf")).max())

    leads = {}
    for margin in (0.0, 0.3):
        editor = factedit.Editor("ultraedit", tokenizer=tok, warmup=0, lr=0.003, preserve=None, guard=None,
                                 step_scales=(1.0,), extra_steps=8, take_margin=margin)
        record = editor.edit(model, "The capital of France is", "Rome")
        leads[margin] = lead()
        editor.revert(model, record.id)
        editor.close()
    # Without a margin the steps stop as soon as Rome is the argmax; with one they go on (on this tiny
    # random model eight steps bring the lead to about 0.14, short of 0.3).
    assert 0.0 < leads[0.0] < 0.05 < 0.1 < leads[0.3]
    assert_weights_equal(model, base)


def test_chat_requests_ask_the_fact_through_the_template_keyed_at_the_subject_there():
    from tiny_models import CHAT_TEMPLATE

    _, tok = tiny_model("llama")
    request = tokenize_request(EditRequest("The capital of France is", "Rome", subject="France"), tok, None)
    assert chat_requests([request], tok, anchored=True) == []  # no chat template: no chat row
    tok.chat_template = CHAT_TEMPLATE
    (anchored,) = chat_requests([request], tok, anchored=True)
    (plain,) = chat_requests([request], tok)
    assert anchored.prompt_ids == plain.prompt_ids and plain.anchor is None
    assert tok.decode(list(anchored.prompt_ids[: anchored.anchor + 1])).endswith("<|user|>The capital of France")
    assert tok.decode(list(anchored.prompt_ids)).endswith("<|assistant|>")
    assert tok.decode(list(anchored.target_ids)) == "Rome"  # the reply starts with the target
    assert chat_requests([request], tok, context_length=len(anchored.prompt_ids)) == []  # too long: left out


@pytest.mark.parametrize("method", ["mend", "ultraedit"])
def test_a_chat_context_edit_is_also_made_on_the_fact_asked_as_a_chat(method, tmp_path):
    from tiny_models import CHAT_TEMPLATE

    model, tok = tiny_model("llama")
    tok.chat_template = CHAT_TEMPLATE
    base = snapshot(model)
    protect = {"threshold": 1.0, "protect_edits": True}
    if method == "mend":
        path, _ = tiny_checkpoint(tmp_path, model)

        def editor(chat: bool):
            return mend_editor(tok, path, guard=None, positions="subject", preserve=protect, chat_context=chat)
    else:
        def editor(chat: bool):
            return factedit.Editor("ultraedit", tokenizer=tok, warmup=0, layers=(0,), positions="subject",
                                   preserve=protect, step_scales=(1.0,), extra_steps=0, guard=None,
                                   chat_context=chat)
    shapes = {}
    for chat in (False, True):
        with editor(chat) as chatting:
            record = chatting.edit(model, "The capital of France is", "Rome")
            protected = chatting._safeguards.preserver._protected[record.id]
            shapes[chat] = {name: z.shape[0] for name, z in protected.items()}
            chatting.revert(model, record.id)
            assert_weights_equal(model, base)
    # the chat row is one more request: its subject's key is written at and held, beside the prompt's
    assert shapes[False] == {name: 1 for name in shapes[False]} and shapes[True] == {name: 2 for name in shapes[True]}


def test_a_chat_row_follows_its_facts_step_and_the_checks_read_the_prompts_alone(tmp_path, monkeypatch):
    from tiny_models import CHAT_TEMPLATE

    from factedit.mend import method as mend_method

    model, tok = tiny_model("llama")
    tok.chat_template = CHAT_TEMPLATE
    path, _ = tiny_checkpoint(tmp_path, model)
    facts = [EditRequest("The capital of France is", "Rome"), EditRequest("The Eiffel Tower is in", "Berlin")]
    requests = mend_method.edit_requests(model, tok, [tokenize_request(f, tok, None) for f in facts], None,
                                         "subject")
    asked = chat_requests(requests, tok, anchored=True)
    name = "model.layers.1.mlp.down_proj.weight"
    rows, owners = mend_method.capture_with_followers(model, tok, requests, asked, [name], "subject", None, None)
    assert rows[name][0].shape[0] == 4  # two prompts, two chat rows
    assert sorted(owners.tolist()) == [0, 0, 1, 1]  # each chat row owned by its fact's request

    checked = []
    real = mend_method._targets_taken

    def spy(model, pad_id, group, *args, **kwargs):
        checked.extend(group)
        return real(model, pad_id, group, *args, **kwargs)

    monkeypatch.setattr(mend_method, "_targets_taken", spy)
    editor = mend_editor(tok, path, guard=None, positions="subject", chat_context=True, step_scales=(1.0, 2.0),
                         extra_steps=1)
    editor.edit_batch(model, facts)
    assert checked and all("<|assistant|>" not in tok.decode(list(r.prompt_ids)) for r in checked)


@pytest.mark.parametrize(("prefix_rows", "positions"),
                         [("checked", "subject"), ("follow", "subject"), ("mean", "subject"), ("mean", "loss"),
                          ("mean_follow", "subject")])
def test_prefixed_prompts_are_checked_follow_or_are_averaged(prefix_rows, positions, tmp_path, monkeypatch):
    from factedit.mend import method as mend_method
    from factedit.model.contexts import ContextPrefixes

    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model)
    monkeypatch.setattr(ContextPrefixes, "get", lambda self, model, tokenizer: PREFIXES)
    checked, captured = [], []
    real_check, real_capture = mend_method._targets_taken, mend_method.capture_rows

    def check_spy(model, pad_id, group, *args, **kwargs):
        checked.extend(tok.decode(list(r.prompt_ids)) for r in group)
        return real_check(model, pad_id, group, *args, **kwargs)

    def capture_spy(model, tokenizer, requests, *args, **kwargs):
        captured.extend(tok.decode(list(r.prompt_ids)) for r in requests)
        return real_capture(model, tokenizer, requests, *args, **kwargs)

    monkeypatch.setattr(mend_method, "_targets_taken", check_spy)
    monkeypatch.setattr(mend_method, "capture_rows", capture_spy)
    base = snapshot(model)
    with mend_editor(tok, path, guard=None, positions=positions, prefixes={}, prefix_rows=prefix_rows,
                     step_scales=(1.0, 2.0), extra_steps=0) as editor:
        record = editor.edit(model, "The capital of France is", "Rome")
        ranks = {p.left.shape[1] for p in editor._impl.compute(model, tok, requests_for(tok)[:1]).params.values()}
        editor.revert(model, record.id)
    assert_weights_equal(model, base)
    # every context is captured; only "checked" has the step checks read the prefixed ones; "mean" makes
    # one row of a fact's three contexts where the edit is keyed on the subject, and lets them follow
    # elsewhere; "mean_follow" keeps the prompt's row and makes one more of the other two contexts
    assert {any(text.startswith(p) for text in captured) for p in PREFIXES[1:]} == {True}
    prefixed_checked = [text for text in checked if text.startswith(PREFIXES[1:])]
    assert checked and bool(prefixed_checked) == (prefix_rows == "checked")
    if positions == "subject":
        assert ranks == {{"mean": 1, "mean_follow": 2}.get(prefix_rows, len(PREFIXES))}
    else:  # a row per target token, in each of the three contexts
        assert ranks == {len(PREFIXES) * len(requests_for(tok)[0].target_ids)}


def test_prefixed_contexts_join_every_step_of_their_fact(tmp_path, monkeypatch):
    from factedit.mend import method as mend_method
    from factedit.model.contexts import ContextPrefixes

    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model)
    monkeypatch.setattr(ContextPrefixes, "get", lambda self, model, tokenizer: PREFIXES)
    captures = []
    real_capture = mend_method.capture_rows

    def capture_spy(model, tokenizer, requests, *args, **kwargs):
        captures.append([tok.decode(list(r.prompt_ids)) for r in requests])
        return real_capture(model, tokenizer, requests, *args, **kwargs)

    monkeypatch.setattr(mend_method, "capture_rows", capture_spy)
    # a tiny step never reaches the target, so every extra and finishing step is taken; with the
    # contexts in the first step only, 50 kept edits on train[3000:3050] kept PS 0.78 against 0.90
    editor = mend_editor(tok, path, guard=None, prefixes={}, prefix_rows="mean_follow", step_scales=(1e-3,),
                         extra_steps=2, finish_steps=1)
    editor._impl.compute(model, tok, requests_for(tok)[:1])
    assert len(captures) == 4  # the first step, two extra steps, one finishing step
    assert all(any(text.startswith(PREFIXES[1:]) for text in texts) for texts in captures)


def test_averaged_rows_are_the_mean_of_a_facts_contexts_and_followers_stay():
    rows = {"w": (torch.arange(12.0).reshape(6, 2), torch.arange(18.0).reshape(6, 3))}
    owners = torch.tensor([1, 0, 1, 0, 1, 0])  # rows 0, 2 of fact 1 and 1, 3 of fact 0 are averaged
    pooled = torch.tensor([True, True, True, True, False, False])
    out, out_owners = averaged_rows(rows, owners, pooled, 2)
    u, d = out["w"]
    u_in, d_in = rows["w"]
    assert torch.equal(u[0], (u_in[1] + u_in[3]) / 2) and torch.equal(u[1], (u_in[0] + u_in[2]) / 2)
    assert torch.equal(d[0], (d_in[1] + d_in[3]) / 2) and torch.equal(u[2:], u_in[4:]) and torch.equal(d[2:], d_in[4:])
    assert out_owners.tolist() == [0, 1, 1, 0]


def test_averaged_rows_leave_out_a_request_with_nothing_to_average():
    rows = {"w": (torch.arange(8.0).reshape(4, 2), torch.arange(12.0).reshape(4, 3))}
    owners = torch.tensor([0, 1, 1, 1])  # fact 0 has its own row only; fact 1's two contexts are averaged
    pooled = torch.tensor([False, False, True, True])
    out, out_owners = averaged_rows(rows, owners, pooled, 2)
    u, d = out["w"]
    u_in, d_in = rows["w"]
    assert out_owners.tolist() == [1, 0, 1]  # no zero row for fact 0
    assert torch.equal(u[0], (u_in[2] + u_in[3]) / 2) and torch.equal(d[0], (d_in[2] + d_in[3]) / 2)
    assert torch.equal(u[1:], u_in[:2]) and torch.equal(d[1:], d_in[:2])

