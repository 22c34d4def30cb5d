"""MEND on tiny random models: the maths, the hooks, checkpoints, and the method contract."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import assert_weights_equal, snapshot
from tiny_models import tiny_model

import factedit
from factedit.core.errors import CheckpointError, ConfigError, ModelMismatchError
from factedit.core.request import EditRequest, tokenize_request
from factedit.mend.capture import per_request_nll
from factedit.mend.checkpoint import base_model_info, load_checkpoint, save_checkpoint
from factedit.mend.config import MENDConfig
from factedit.mend.method import new_network
from factedit.model.hooks import capture_linear_io, forward_hooks
from factedit.scoring.batches import loss_positions, make_batch
from factedit.scoring.sequences import pad_id_of

ROLES = {"llama": ("gate", "in", "out"), "gpt2": ("in", "out")}
PROMPTS = [("The capital of France is", "Rome"), ("The mother tongue of Danielle Darrieux is", "English")]


def requests_for(tok):
    return [tokenize_request(EditRequest(p, t), tok, None) for p, t in PROMPTS]


def tiny_checkpoint(tmp_path, model, layers=(-2, -1), roles=("in", "out"), alpha=1.0, name="ck"):
    network = new_network(model, layers, roles, rank=4, alpha_init=alpha)
    return save_checkpoint(tmp_path / name, network, base_model_info(model)), network


def mend_editor(tok, path, layers=(-2, -1), roles=("in", "out"), **extra):
    """A MEND Editor over a summing tiny checkpoint, without preservation, on the prompt alone and with one
    step keyed at the loss positions (MEND as published) unless asked."""
    extra.setdefault("preserve", None)
    extra.setdefault("extra_steps", 0)
    extra.setdefault("positions", "loss")
    extra.setdefault("finish_steps", 0)
    extra.setdefault("take_margin", 0.0)
    extra.setdefault("prefixes", None)
    return factedit.Editor("mend", tokenizer=tok, checkpoint=str(path), layers=layers, matrices=roles, **extra)


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_identity_editor_gives_minus_alpha_times_the_gradient(arch, tmp_path):
    model, tok = tiny_model(arch)
    roles = ROLES[arch]
    alpha = 0.5
    path, _ = tiny_checkpoint(tmp_path, model, roles=roles, alpha=alpha)
    editor = mend_editor(tok, path, roles=roles, positions="all", step_scales=(1.0,))
    requests = requests_for(tok)
    delta = editor._impl.compute(model, tok, requests)

    # The edit loss by plain autograd: the sum over requests of each one's mean target NLL.
    batch = make_batch(requests, pad_id_of(tok), torch.device("cpu"))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    select = loss_positions(batch.labels)
    per_request_nll(logits[select], batch.labels, select).sum().backward()
    params = dict(model.named_parameters())
    assert len(delta) == 2 * len(roles)
    for name, pdelta in delta.items():
        assert pdelta.kind == "low_rank"
        assert torch.allclose(pdelta.left @ pdelta.right, -alpha * params[name].grad, atol=1e-7, rtol=1e-4), name


def test_a_step_that_does_not_take_is_grown_through_the_step_scales(tmp_path):
    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model, alpha=1e-9)  # far too small to make any target the argmax
    requests = requests_for(tok)
    plain = mend_editor(tok, path, step_scales=(1.0,))._impl.compute(model, tok, requests)
    grown = mend_editor(tok, path, step_scales=(1.0, 2.0, 3.0))._impl.compute(model, tok, requests)
    for name, pdelta in plain.items():  # low rank (d_out, N) @ (N, d_in): the step scales the left factor
        assert torch.equal(grown.params[name].right, pdelta.right)
        assert torch.equal(grown.params[name].left, 3.0 * pdelta.left), name


def _scale_of_step(params, base, plain):
    """The multiple of the plain step's ΔW that `params` add to the base weights (one matrix)."""
    name = next(iter(plain.names()))
    added = params[name].detach() - base[name]
    return float(added.norm() / plain.params[name].materialize(torch.float32).norm())


def test_the_smallest_step_scale_that_takes_is_kept_by_bisection(tmp_path, monkeypatch):
    """The smallest and the largest scales are checked first; those between them are bisected."""
    import factedit.mend.method as method

    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model, alpha=0.1)
    requests = requests_for(tok)
    plain = mend_editor(tok, path, step_scales=(1.0,))._impl.compute(model, tok, requests)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    tried = []

    def takes_from_two(_model, _pad, group, params, *_):
        tried.append(round(_scale_of_step(params, base, plain), 4))
        return torch.full((len(group),), tried[-1] >= 2.0)

    monkeypatch.setattr(method, "_targets_taken", takes_from_two)
    chosen = mend_editor(tok, path, step_scales=(0.5, 1.0, 2.0, 3.0), extra_steps=1)._impl.compute(model, tok, requests)
    assert tried == [0.5, 3.0, 2.0, 1.0]  # the ends, then between; no check again before a second step
    for name, pdelta in plain.items():
        assert torch.equal(chosen.params[name].left, 2.0 * pdelta.left), name


def test_a_step_neither_end_makes_take_is_settled_by_two_checks(tmp_path, monkeypatch):
    import factedit.mend.method as method

    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model, alpha=0.1)
    requests = requests_for(tok)
    plain = mend_editor(tok, path, step_scales=(1.0,))._impl.compute(model, tok, requests)
    tried = []

    def never_takes(_model, _pad, group, *_):
        tried.append(len(group))
        return torch.zeros(len(group), dtype=torch.bool)

    monkeypatch.setattr(method, "_targets_taken", never_takes)
    chosen = mend_editor(tok, path, step_scales=(0.5, 1.0, 2.0, 3.0))._impl.compute(model, tok, requests)
    assert tried == [len(requests)] * 2
    for name, pdelta in plain.items():
        assert torch.equal(chosen.params[name].left, 3.0 * pdelta.left), name


def test_step_scales_must_increase(tmp_path):
    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model)
    for scales in [(2.0, 1.0), (1.0, 1.0), ()]:
        with pytest.raises(ValueError, match="step_scales"):
            mend_editor(tok, path, step_scales=scales)
    with pytest.raises(ValueError, match="step_scales must increase"):
        factedit.Editor("ultraedit", tokenizer=tok, step_scales=(4.0, 2.0))


def test_each_request_of_a_batch_gets_its_own_step_scale(tmp_path, monkeypatch):
    """A fact that takes keeps its step while another grows: only the hard fact's rows are scaled."""
    import factedit.mend.method as method

    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model, alpha=0.1)
    easy, hard = requests_for(tok)
    plain = mend_editor(tok, path, step_scales=(1.0,))._impl.compute(model, tok, [easy, hard])
    checks = []

    def only_easy_takes(_model, _pad, group, *_):
        checks.append(len(group))
        return torch.tensor([r is easy for r in group])

    monkeypatch.setattr(method, "_targets_taken", only_easy_takes)
    mixed = mend_editor(tok, path, step_scales=(1.0, 2.0, 3.0))._impl.compute(model, tok, [easy, hard])
    assert checks == [2, 2]  # easy takes at the smallest scale; hard does not at the largest either
    # Rows (columns of the low-rank left factor) follow the length-sorted requests, one per target token.
    ordered = sorted([easy, hard], key=lambda r: len(r.input_ids))
    expected = torch.cat([torch.full((len(r.target_ids),), 1.0 if r is easy else 3.0) for r in ordered])
    for name, pdelta in plain.items():
        assert torch.equal(mixed.params[name].left, pdelta.left * expected), name
        assert torch.equal(mixed.params[name].right, pdelta.right), name


def test_an_edit_no_scale_makes_take_falls_back_to_the_smaller_ridge(tmp_path, monkeypatch):
    """Least-squares editors try every step scale at the preserve ridge, then at each fallback ridge:
    the step of the level that takes is the one a plain editor at that ridge and scale computes."""
    import factedit.mend.method as method

    model, tok = tiny_model("llama")
    network = new_network(model, (-1,), ("out",), rank=4, alpha_init=0.1, aggregation="least_squares")
    path = save_checkpoint(tmp_path / "ls", network, base_model_info(model))
    requests = requests_for(tok)[:1]

    def editor(ridge, **extra):
        return mend_editor(tok, path, layers=(-1,), roles=("out",),
                           preserve={"threshold": 0.5, "ridge": ridge}, **extra)

    tried = []

    def only_the_top_takes(_model, _pad, group, *_):  # the bottom level, the top, then between
        tried.append(1)
        return torch.full((len(group),), len(tried) == 2)

    at_small_ridge = editor(0.5, step_scales=(2.0,), fallback_ridges=())._impl
    expected = at_small_ridge.compute(model, tok, requests, preserver=_preserver(at_small_ridge, model, tok, 0.5))
    monkeypatch.setattr(method, "_targets_taken", only_the_top_takes)
    ladder = editor(8.0, step_scales=(1.0, 2.0), fallback_ridges=(0.5,))._impl
    chosen = ladder.compute(model, tok, requests, preserver=_preserver(ladder, model, tok, 8.0))
    assert len(tried) == 3  # the top (ridge 0.5, scale 2) took; ridge 8 at scale 2 and ridge 0.5 at 1 did not
    for name, pdelta in expected.items():
        assert torch.allclose(chosen.params[name].materialize(torch.float64), pdelta.materialize(torch.float64),
                              rtol=1e-5, atol=1e-9), name
    with pytest.raises(ValueError, match="fallback_ridges"):
        editor(1.0, fallback_ridges=(0.0,))


def _preserver(impl, model, tok, ridge):
    from factedit.model.loading import model_id as model_id_of
    from factedit.model.weights import model_fingerprint
    from factedit.safety.preserve import PreserveConfig, build_preserver

    return build_preserver(model, tok, impl.param_names(model), PreserveConfig(threshold=0.5, ridge=ridge),
                           fingerprint=model_fingerprint(model), model_id=model_id_of(model))


def test_a_step_check_answers_for_each_request():
    import factedit.mend.method as method

    model, tok = tiny_model("llama")
    other, request = requests_for(tok)
    with torch.no_grad():
        greedy = int(model(input_ids=torch.tensor([request.prompt_ids])).logits[0, -1].argmax())
    taken = dataclasses.replace(request, target_ids=(greedy,))  # the unedited model's own next token
    assert method._targets_taken(model, pad_id_of(tok), [other, taken], {}).tolist() == [False, True]



def test_a_take_margin_asks_the_target_to_lead_the_runner_up_by_that_much():
    import factedit.mend.method as method

    model, tok = tiny_model("llama")
    _, request = requests_for(tok)
    with torch.no_grad():
        top2 = model(input_ids=torch.tensor([request.prompt_ids])).logits[0, -1].topk(2)
    gap = float(top2.values[0] - top2.values[1])
    taken = dataclasses.replace(request, target_ids=(int(top2.indices[0]),))
    second = dataclasses.replace(request, target_ids=(int(top2.indices[1]),))

    def takes(margin: float) -> list[bool]:
        return method._targets_taken(model, pad_id_of(tok), [taken, second], {}, None, margin).tolist()

    assert takes(0.0) == [True, False]
    assert takes(gap * 0.5) == [True, False]
    assert takes(gap * 2.0) == [False, False]
    with pytest.raises(ValueError, match="take_margin"):
        MENDConfig(take_margin=-1.0)

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step_checks_from_the_recorded_states_decide_as_full_forwards_do(arch, tmp_path, monkeypatch):
    import factedit.mend.method as method

    model, tok = tiny_model(arch)
    path, _ = tiny_checkpoint(tmp_path, model, roles=ROLES[arch], alpha=1.0)
    scales = tuple(10.0**k for k in range(-4, 4))  # from no effect to a step that makes the target win
    editor = mend_editor(tok, path, roles=ROLES[arch], step_scales=scales)
    check, pairs = method._targets_taken, []

    def both_ways(model_, pad_id, requests, params, cache=None, margin=0.0):
        (cached,), (full,) = check(model_, pad_id, requests, params, cache), check(model_, pad_id, requests, params)
        pairs.append((bool(cached), bool(full)))
        return torch.tensor([full])

    monkeypatch.setattr(method, "_targets_taken", both_ways)
    editor._impl.compute(model, tok, requests_for(tok)[:1])
    assert 3 <= len(pairs) <= 2 + 3 and {full for _, full in pairs} == {True, False}, pairs  # the ends, a bisection
    assert all(cached == full for cached, full in pairs), pairs
    assert hook_count(model) == 0 and all("forward" not in m.__dict__ for m in model.modules())


def test_an_error_inside_a_step_check_leaves_the_model_as_it_was(tmp_path):
    """The step checks skip the blocks below the edited ones by shadowing their `forward` inside a
    context manager; an error raised mid-edit, while they are shadowed, must restore every one."""
    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model, layers=(-1,), roles=("out",))
    editor = mend_editor(tok, path, layers=(-1,), roles=("out",), step_scales=(1.0, 2.0))
    base = snapshot(model)
    calls = []

    def fail_in_a_check(module, args, output):  # scoring, capture, then the first check
        calls.append(all("forward" in b.__dict__ for b in model.model.layers[:-1]))
        if len(calls) == 3:
            raise RuntimeError("boom")

    with forward_hooks(model, hooks={"model.layers.3": fail_in_a_check}), pytest.raises(RuntimeError, match="boom"):
        editor.edit(model, "The capital of France is", "Rome")
    assert calls == [False, False, True]  # the error came while the lower blocks were shadowed
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert hook_count(model) == 0
    assert_weights_equal(model, base)
    assert editor.history == []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_applied_delta_is_the_update_mend_was_trained_with(arch, tmp_path):
    """The low-rank factors the method returns, in each parameter's own layout (Conv1D included),
    add exactly the W + ΔW that the training objective evaluates (`objective.edited_params`)."""
    from factedit.mend.capture import capture
    from factedit.mend.objective import edited_params
    from factedit.model.hooks import frozen
    from factedit.model.specs import module_of

    model, tok = tiny_model(arch)
    path, network = tiny_checkpoint(tmp_path, model, roles=ROLES[arch])
    network.editors[next(iter(network.editors))].layers[0].up.data.normal_()  # not the identity any more
    save_checkpoint(tmp_path / "ck", network, base_model_info(model))
    editor = mend_editor(tok, path, roles=ROLES[arch], step_scales=(1.0,), guard=None, positions="loss", lifelong=False)
    base = snapshot(model)
    requests = requests_for(tok)
    names = editor._impl.network.param_names
    with frozen(model):
        captured = capture(model, [module_of(n) for n in names], names, make_batch(requests, pad_id_of(tok), "cpu"))
        trained = edited_params(model, editor._impl.network, captured.factors)  # W + ΔW as in training
    record = editor.edit_batch(model, [r.request for r in requests])
    params = dict(model.named_parameters())
    for name in names:
        pdelta = record.delta.params[name]
        assert pdelta.kind == "low_rank" and pdelta.left.shape[1] <= 8  # one row per target token
        assert torch.allclose(params[name] - base[name], trained[name].detach() - base[name], atol=1e-6)


def test_hooks_are_removed_after_an_exception():
    model, _ = tiny_model("llama")
    names = ["model.layers.3.mlp.down_proj", "model.layers.2.mlp.up_proj"]
    with pytest.raises(RuntimeError, match="boom"), capture_linear_io(model, names):
        model(input_ids=torch.tensor([[1, 2, 3]]))
        assert hook_count(model) == 4
        raise RuntimeError("boom")
    assert hook_count(model) == 0

    def failing_hook(module, args, output):
        raise ValueError("inside the hook")

    with pytest.raises(ValueError, match="inside the hook"), forward_hooks(model, hooks={names[0]: failing_hook}):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert hook_count(model) == 0


def test_capture_records_inputs_and_output_gradients():
    model, _ = tiny_model("llama")
    name = "model.layers.3.mlp.down_proj"
    for p in model.parameters():
        p.requires_grad_(False)
    with capture_linear_io(model, [name]) as io:
        model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
    assert io.inputs[name].shape == (1, 4, 64) and io.output_grads[name].shape == (1, 4, 32)
    assert io.output_grads[name].abs().sum() > 0


def test_checkpoint_round_trips_bit_for_bit(tmp_path):
    model, _ = tiny_model("llama")
    network = new_network(model, (-2, -1), ("gate", "in", "out"), rank=4, alpha_init=0.25)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_()
    network.train()
    network({p.name: (torch.randn(5, p.d_in), torch.randn(5, p.d_out)) for p in network.params})
    save_checkpoint(tmp_path / "ck", network, base_model_info(model), train_config={"lr": 1.0},
                    data_hashes={"x.json": "abc"}, metrics={"val/es": 0.5}, step=7)
    loaded = load_checkpoint(tmp_path / "ck")
    original, restored = network.state_dict(), loaded.network.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    meta = loaded.meta
    assert meta["step"] == 7 and meta["metrics"] == {"val/es": 0.5} and meta["data"] == {"x.json": "abc"}
    assert meta["base_model"]["fingerprint"] == factedit.model.weights.model_fingerprint(model)
    assert meta["factedit_version"] == factedit.__version__
    assert [p["name"] for p in meta["params"]] == network.param_names


def test_checkpoint_for_another_model_is_refused(tmp_path):
    model, tok = tiny_model("llama", seed=0)
    path, _ = tiny_checkpoint(tmp_path, model)
    other, _ = tiny_model("llama", seed=1)
    editor = mend_editor(tok, path)
    with pytest.raises(ModelMismatchError, match="another model"):
        editor.edit(other, "The capital of France is", "Rome")
    gpt2, gpt2_tok = tiny_model("gpt2")
    with pytest.raises(ModelMismatchError, match="trained for a .llama. model"):
        mend_editor(gpt2_tok, path).edit(gpt2, "The capital of France is", "Rome")


def test_broken_checkpoints_get_clear_errors(tmp_path):
    model, _ = tiny_model("llama")
    with pytest.raises(CheckpointError, match="no MEND checkpoint"):
        load_checkpoint(tmp_path / "missing")
    path, _ = tiny_checkpoint(tmp_path, model)
    weights = path / "editor.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"oops")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    path, _ = tiny_checkpoint(tmp_path, model, name="ck2")
    meta = json.loads((path / "editor.json").read_text())
    meta["format"] = "something/else"
    (path / "editor.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(path)


def test_layers_must_match_the_checkpoint(tmp_path):
    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model)
    editor = factedit.Editor("mend", tokenizer=tok, checkpoint=str(path), layers=(-1,), matrices=("out",))
    with pytest.raises(ConfigError, match="trained for"):
        editor.edit(model, "The capital of France is", "Rome")


# --- the method contract (test_contract.py's suite, for mend) ---------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compute_leaves_the_model_unchanged(arch, tmp_path):
    model, tok = tiny_model(arch)
    path, _ = tiny_checkpoint(tmp_path, model, roles=ROLES[arch])
    before = snapshot(model)
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    editor = mend_editor(tok, path, roles=ROLES[arch])
    delta = editor._impl.compute(model, tok, requests_for(tok))
    # A real change of the parameters the method edits, finite everywhere.
    assert set(delta.names()) <= set(editor._impl.param_names(model))
    parts = [t for pdelta in delta.params.values() for t in pdelta.tensors().values()]
    assert all(torch.isfinite(t).all() for t in parts) and any(t.abs().sum() > 0 for t in parts)
    assert_weights_equal(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert hook_count(model) == 0
    assert [n for n, _ in model.named_modules()] == [n for n, _ in tiny_model(arch)[0].named_modules()]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edit_makes_the_target_the_argmax_and_revert_is_exact(arch, tmp_path):
    model, tok = tiny_model(arch)
    # An identity editor with a bold step on the last down projection flips a tiny random model.
    path, _ = tiny_checkpoint(tmp_path, model, layers=(-1,), roles=("out",), alpha=10.0)
    base = snapshot(model)
    editor = mend_editor(tok, path, layers=(-1,), roles=("out",))
    record = editor.edit(model, "The capital of France is", "Rome", paraphrases=["France's capital is"])
    assert record.post["requests"][0]["target_is_argmax"]
    assert not record.pre["requests"][0]["target_is_argmax"]
    editor.revert(model, record.id)
    assert_weights_equal(model, base)
    assert [r.status for r in editor.history] == ["reverted"]


def test_edit_batch_is_one_pass_with_rows_of_every_request(tmp_path):
    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model)
    editor = mend_editor(tok, path)
    single = [editor._impl.compute(model, tok, [r]) for r in requests_for(tok)]
    both = editor._impl.compute(model, tok, requests_for(tok))
    for name, pdelta in both.items():
        summed = sum(s.params[name].left @ s.params[name].right for s in single)
        assert torch.allclose(pdelta.left @ pdelta.right, summed, atol=1e-6)


def test_a_second_step_is_computed_at_the_weights_the_first_left(tmp_path, monkeypatch):
    """extra_steps=1: a request the first step leaves short gets a fresh capture at W + ΔW₁, and its rows
    join the update; a request the first step makes take gets none."""
    import factedit.mend.method as mend_method

    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model, alpha=1e-3)  # far too small a step to take
    captures = []
    real_capture = mend_method.capture_rows

    def recording(*args, **kwargs):
        captures.append(args[7] if len(args) > 7 else kwargs.get("params"))
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(mend_method, "capture_rows", recording)
    one = mend_editor(tok, path, step_scales=(1.0,), guard=None).edit(model, *PROMPTS[0])
    assert captures == [None]
    two_editor = mend_editor(tok, path, step_scales=(1.0,), guard=None, extra_steps=1)
    two = two_editor.edit(tiny_model("llama")[0], *PROMPTS[0])
    assert captures[1] is None and captures[2] is not None  # the second pass ran at W + ΔW₁
    name = next(iter(one.delta.names()))
    rank_one, rank_two = one.delta.params[name].left.shape[1], two.delta.params[name].left.shape[1]
    assert rank_two == 2 * rank_one  # the first step's rows and the second's
    assert torch.equal(two.delta.params[name].left[:, :rank_one], one.delta.params[name].left)


def test_a_second_step_captures_from_the_kept_states_as_a_full_forward_does(tmp_path, monkeypatch):
    """A second step's capture runs only the edited blocks, from the states the first capture kept."""
    import factedit.mend.method as method

    model, tok = tiny_model("llama")
    path, _ = tiny_checkpoint(tmp_path, model, alpha=1e-9)  # never takes: every edit takes its second step
    requests = requests_for(tok)
    editor = mend_editor(tok, path, step_scales=(1.0, 2.0), extra_steps=1)
    real, skipped = method._below_edited_blocks, []

    def spying(model_, checks, group, pad_id):
        skipped.append(all(tuple(r.input_ids) in checks.store for r in group))
        return real(model_, checks, group, pad_id)

    monkeypatch.setattr(method, "_below_edited_blocks", spying)
    fast = editor._impl.compute(model, tok, requests)
    assert skipped == [False, True]  # the first capture records, the second skips
    monkeypatch.setattr(method, "_below_edited_blocks", lambda _m, checks, group, _p: checks.recording(
        _m, [tuple(r.input_ids) for r in group]))
    full = editor._impl.compute(model, tok, requests)
    for name, pdelta in full.items():
        assert torch.allclose(fast.params[name].materialize(torch.float64), pdelta.materialize(torch.float64),
                              rtol=1e-5, atol=1e-9), name
