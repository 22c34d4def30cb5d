"""The fine-tuning editors: the L∞ ball of ft_l, LoRA factors, early stop, and the `peft` import."""

from __future__ import annotations

import contextlib
import importlib
import sysconfig
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHS, tiny_model

import factedit
from factedit.core.errors import ConfigError
from factedit.core.request import EditRequest, encode_prompt, tokenize_request
from factedit.model.contexts import in_context, token_at
from factedit.model.hooks import capture_linear_io
from factedit.peft import ft, lora, training
from factedit.scoring import batches


def _requests(tok, *facts):
    return [tokenize_request(EditRequest(p, t), tok, None) for p, t in facts]


def test_import_peft_inside_factedit_is_huggingface_peft():
    import peft

    lora = importlib.import_module("factedit.peft.lora")
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(peft.__file__).resolve().is_relative_to(site), peft.__file__
    assert lora.LoraConfig.__module__.startswith("peft.")
    assert lora.get_peft_model is peft.get_peft_model
    assert factedit.peft.__name__ == "factedit.peft" and factedit.peft is not peft


def test_ft_l_keeps_every_weight_inside_the_linf_ball():
    model, tok = tiny_model("llama")
    radius = 1e-3
    editor = factedit.Editor("ft_l", tokenizer=tok, layers=(-1, -2), matrices=("in", "out"),
                             norm_constraint=radius, lr=1e-2, max_steps=15)
    delta = editor._impl.compute(model, tok, _requests(tok, ("The capital of France is", "Rome")))
    assert len(delta) == 4
    for pdelta in delta.params.values():
        # float32 rounding of (w ± r) - w may exceed r by an ulp of w
        assert float(pdelta.dense.abs().max()) <= radius * (1 + 1e-3)
        assert float(pdelta.dense.abs().max()) > radius / 2  # the constraint was active


def test_ft_stops_as_soon_as_every_target_token_is_the_argmax(monkeypatch):
    model, tok = tiny_model("llama")
    seen = []
    real = training.target_nll_at

    def spy(logits, labels, stop=None):
        loss, done = real(logits, labels, stop)
        seen.append(done)
        return loss, done

    monkeypatch.setattr(training, "target_nll_at", spy)
    editor = factedit.Editor("ft", tokenizer=tok, layers=(-1,), lr=1e-2, max_steps=200)
    editor.edit(model, "The capital of France is", "Rome")
    # score=True scoring does not go through target_nll_at: every call is one optimisation check.
    assert seen[-1] is True and not any(seen[:-1])
    assert len(seen) < 200


def test_lora_delta_is_rank_r_factors_equal_to_the_adapters_change():
    # The default matrix is the one before the activation: the gate of a gated MLP, else the up projection.
    for arch, default_matrix in (("llama", "model.layers.3.mlp.gate_proj"), ("gpt2", "transformer.h.3.mlp.c_fc")):
        model, tok = tiny_model(arch)
        editor = factedit.Editor("lora", tokenizer=tok, layers=(-1,), rank=4, lr=3e-2, max_steps=10)
        delta = editor._impl.compute(model, tok, _requests(tok, ("The capital of France is", "Rome")))
        (name, pdelta), = delta.items()
        assert name == default_matrix + ".weight"
        assert pdelta.kind == "low_rank" and pdelta.left.shape[1] == 4
        assert tuple(pdelta.shape) == tuple(dict(model.named_parameters())[name].shape)
        assert int(torch.linalg.matrix_rank(pdelta.materialize(torch.float64))) <= 4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_edit_changes_the_output_as_the_trained_adapter_did(arch, monkeypatch):
    """Folding must be exact up to float rounding: the edited model's logits match those of the model
    with the trained adapter still in it (its real scale alpha / r), read just before folding."""
    from factedit.peft import lora

    model, tok = tiny_model(arch)
    ids = torch.tensor([tok("The capital of France is Rome")["input_ids"]])
    adapter_logits = []
    real_fold = lora._fold

    def fold_after_reading_the_adapters_output(layer, layout):
        if not adapter_logits:  # the adapter is injected into `model` in place while compute runs
            with torch.no_grad():
                adapter_logits.append(model(input_ids=ids).logits)
        return real_fold(layer, layout)

    monkeypatch.setattr(lora, "_fold", fold_after_reading_the_adapters_output)
    editor = factedit.Editor("lora", tokenizer=tok, layers=(-1,), rank=4, alpha=12.0, lr=3e-2, max_steps=10,
                             score=False)
    record = editor.edit(model, "The capital of France is", "Rome")
    with torch.no_grad():
        edited_logits = model(input_ids=ids).logits
    editor.revert(model, record.id)
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    assert not torch.allclose(edited_logits, base_logits, atol=1e-3)  # the edit did something
    assert torch.allclose(edited_logits, adapter_logits[0], atol=1e-5)


@pytest.mark.parametrize("ratio", [1.0, 8.0])
def test_lora_plus_steps_b_ratio_times_as_far_as_a(ratio, monkeypatch):
    """LoRA+ (`b_lr_ratio`): Adam's first step moves each entry with a gradient by its learning rate, so
    after one step B (zero at the start) is lr·ratio at its largest; A has not moved (its gradient goes
    through B, zero before that step): why plain LoRA's product B·A grows slowly and a faster B helps."""
    from factedit.peft import lora

    model, tok = tiny_model("llama")
    lr, seen = 1e-3, {}
    real_fold = lora._fold

    def fold_after_reading_the_factors(layer, layout):
        seen["a_moved"] = float((layer.lora_A[lora.ADAPTER].weight - seen["a0"]).abs().max())
        seen["b"] = float(layer.lora_B[lora.ADAPTER].weight.abs().max())
        return real_fold(layer, layout)

    monkeypatch.setattr(lora, "_fold", fold_after_reading_the_factors)
    _keep_a_at_the_start(lora, monkeypatch, seen)
    editor = factedit.Editor("lora", tokenizer=tok, layers=(-1,), rank=4, lr=lr, b_lr_ratio=ratio, max_steps=1,
                             preserve=None, score=False)
    editor._impl.compute(model, tok, _requests(tok, FACT))
    assert seen["b"] == pytest.approx(lr * ratio, rel=1e-2)
    assert seen["a_moved"] == 0.0


def test_lora_keys_init_starts_a_on_the_edits_own_inputs(monkeypatch):
    """`init="keys"`: A's first rows are orthonormal and span the matrix's inputs at the positions that
    predict a target token (the edit's keys)."""
    from factedit.peft import lora

    model, tok = tiny_model("llama")
    seen = {}
    _keep_a_at_the_start(lora, monkeypatch, seen)
    editor = factedit.Editor("lora", tokenizer=tok, layers=(-1,), rank=4, init="keys", max_steps=1, preserve=None,
                             score=False)
    module = "model.layers.3.mlp.gate_proj"
    batch = batches.training_batch(model, tok, _requests(tok, FACT), None)
    keys = lora.target_keys(model, [module], batch)[module]  # (N, in)
    editor._impl.compute(model, tok, _requests(tok, FACT))
    k = min(4, int(torch.linalg.matrix_rank(keys)))
    rows = seen["a0"][:k]  # (k, in)
    assert torch.allclose(rows @ rows.T, torch.eye(k), atol=1e-5)
    assert torch.allclose(keys @ rows.T @ rows, keys, atol=1e-4)  # every key lies in their span
    with pytest.raises(ConfigError, match="init"):
        factedit.Editor("lora", tokenizer=tok, init="pissa")


def _keep_a_at_the_start(lora, monkeypatch, seen: dict) -> None:
    """lora's optimize, spied: `seen["a0"]` is the A factor (r = 4) as the optimisation starts."""
    real_optimize = lora.optimize

    def optimize_keeping_a0(forward, batch, optimizer, **kwargs):
        (a0,) = [p for g in optimizer.param_groups for p in g["params"] if p.shape[0] == 4]  # A: (r, in)
        seen["a0"] = a0.detach().clone()
        return real_optimize(forward, batch, optimizer, **kwargs)

    monkeypatch.setattr(lora, "optimize", optimize_keeping_a0)


def test_a_b_lr_ratio_below_one_is_refused():
    _, tok = tiny_model("llama")
    with pytest.raises(ConfigError, match="b_lr_ratio"):
        factedit.Editor("lora", tokenizer=tok, b_lr_ratio=0.5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["ft_l", "lora"])
def test_skipping_the_frozen_blocks_trains_exactly_as_full_passes(arch, method, monkeypatch):
    """The fine-tuning loop runs the blocks below the trained ones once (replay.skip_frozen_blocks); the
    delta is bit for bit the one full passes at every step give."""
    from factedit.model import replay

    skipped = []
    real = replay.skip_frozen_blocks

    def recording(*args):
        with real(*args) as skips:
            skipped.append(skips)
            yield skips

    def deltas(patch):
        monkeypatch.setattr(training, "skip_frozen_blocks", contextlib.contextmanager(patch))
        model, tok = tiny_model(arch)
        editor = factedit.Editor(method, tokenizer=tok, layers=(2,), lr=3e-2, max_steps=4, preserve=None)
        return editor._impl.compute(model, tok, _requests(tok, FACT))

    def full_passes(*args):
        yield False

    fast, full = deltas(recording), deltas(full_passes)
    assert skipped == [True]  # blocks 0-1 were skipped
    assert any(float(change.materialize(torch.float32).abs().max()) > 0 for change in fast.params.values())
    for name, change in fast.items():
        assert torch.equal(change.materialize(torch.float32), full.params[name].materialize(torch.float32))


# Subject-anchored fine-tuning: the prompt also trained under the model's context prefixes.
PREFIXES = {"seeds": ["The", "Because", "I"], "per_seed": 2, "tokens": 4}
FACT = ("The capital of France is", "Rome")


def _captured_batches(module, monkeypatch):
    """The batch each `optimize` call of `module` trains on."""
    batches = []
    real = module.optimize

    def spy(forward, batch, *args, **kwargs):
        batches.append(batch)
        return real(forward, batch, *args, **kwargs)

    monkeypatch.setattr(module, "optimize", spy)
    return batches


@pytest.mark.parametrize("method, module", [("ft_l", ft), ("lora", lora)])
def test_prefixes_put_the_prompt_under_each_prefix_in_the_training_batch(method, module, monkeypatch):
    model, tok = tiny_model("llama")
    captured = _captured_batches(module, monkeypatch)
    request, = _requests(tok, FACT)
    for _ in range(2):  # two editors: the same model gives the same prefixes, the same batch
        editor = factedit.Editor(method, tokenizer=tok, layers=(-1,), max_steps=2, preserve=None, prefixes=PREFIXES)
        editor._impl.compute(model, tok, [request])
    first, second = captured
    prefixes = editor._impl.prefixes.get(model, tok)
    assert prefixes[0] == "" and len(prefixes) == 1 + 3 * 2 and len(set(prefixes)) == len(prefixes)
    assert first.input_ids.shape[0] == len(prefixes)
    assert first.stop.tolist() == [True] + [False] * (len(prefixes) - 1)  # the stop check reads the prompt alone
    target = list(request.target_ids)
    for row, prefix in enumerate(prefixes):
        text, offset = in_context(prefix, FACT[0])
        assert text[offset:] == FACT[0] and (offset == 0) == (prefix == "")
        prompt = encode_prompt(tok, text)
        expected = prompt + target
        n = int(first.attention_mask[row].sum())
        assert first.input_ids[row, :n].tolist() == expected
        labelled = first.labels[row] != batches.IGNORE
        assert labelled.nonzero().flatten().tolist() == list(range(len(prompt), len(expected)))
        assert first.labels[row, labelled].tolist() == target  # the same target ids in every context
    assert first.input_ids[0, : len(request.input_ids)].tolist() == list(request.input_ids)
    for a, b in zip((first.input_ids, first.attention_mask, first.labels, first.stop),
                    (second.input_ids, second.attention_mask, second.labels, second.stop), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method, module", [("ft_l", ft), ("lora", lora)])
def test_chat_context_adds_the_fact_asked_as_a_chat_to_the_training_batch(method, module, monkeypatch):
    from tiny_models import CHAT_TEMPLATE

    model, tok = tiny_model("llama")
    captured = _captured_batches(module, monkeypatch)
    request, = _requests(tok, FACT)
    editor = factedit.Editor(method, tokenizer=tok, layers=(-1,), max_steps=2, preserve=None, chat_context=True)
    editor._impl.compute(model, tok, [request])  # no chat template: the request alone
    tok.chat_template = CHAT_TEMPLATE
    editor._impl.compute(model, tok, [request])
    alone, chat = captured
    assert alone.input_ids.tolist() == [list(request.input_ids)]
    assert chat.input_ids.shape[0] == 2 and chat.stop.tolist() == [True, False]  # the stop reads the prompt
    n = int(chat.attention_mask[1].sum())
    labelled = chat.labels[1] != batches.IGNORE
    assert tok.decode(chat.input_ids[1, :n][~labelled[:n]]) == f"<|user|>{FACT[0]}<|assistant|>"
    assert tok.decode(chat.labels[1, labelled]) == FACT[1].strip()  # the reply starts with the target


def test_without_prefixes_the_batch_is_the_requests_alone(monkeypatch):
    model, tok = tiny_model("llama")
    captured = _captured_batches(ft, monkeypatch)
    request, = _requests(tok, FACT)
    editor = factedit.Editor("ft_l", tokenizer=tok, layers=(-1,), max_steps=1, preserve=None)
    editor._impl.compute(model, tok, [request])
    batch, = captured
    assert batch.input_ids.tolist() == [list(request.input_ids)] and batch.stop is None


def test_stop_reads_only_the_prompt_alone_and_the_loss_averages_over_contexts():
    labels = torch.full((2, 4), batches.IGNORE)
    labels[:, 3] = 1  # one target token per row
    logits = torch.zeros(2, 4, 3)
    logits[0, 2, 1] = 5.0  # the prompt alone predicts the target
    logits[1, 2, 2] = 5.0  # the prefixed row does not
    at_targets = logits[batches.loss_positions(labels)]  # (M, V): what batch_target_logits gives
    loss, done = batches.target_nll_at(at_targets, labels, torch.tensor([True, False]))
    assert done and not batches.target_nll_at(at_targets, labels)[1]
    per_row = [torch.nn.functional.cross_entropy(logits[r, 2:3], labels[r, 3:4]) for r in range(2)]
    assert torch.allclose(loss, (per_row[0] + per_row[1]) / 2)


@pytest.mark.parametrize("method", ["ft_l", "lora"])
def test_prefixed_edit_makes_the_target_the_argmax_and_reverts_exactly(method):
    model, tok = tiny_model("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = {"norm_constraint": 0.1} if method == "ft_l" else {}
    editor = factedit.Editor(method, tokenizer=tok, layers=(-1,), lr=1e-2, max_steps=100, prefixes=PREFIXES,
                             **kwargs)
    record = editor.edit(model, *FACT)
    assert record.post["requests"][0]["target_is_argmax"]
    assert record.config["prefixes"]["per_seed"] == 2  # the record says how it trained
    assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters())
    editor.revert(model, record.id)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["ft_l", "lora"])
@pytest.mark.parametrize("bad", [{"per_seed": -1}, {"tokens": 0}, {"seeds": ["The", " "]}, {"colour": 1},
                                 {"tokens": "many"}, "yes"])
def test_a_bad_prefixes_config_is_refused_and_changes_nothing(method, bad):
    model, tok = tiny_model("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="prefixes"):
        factedit.Editor(method, tokenizer=tok, prefixes=bad)
    editor = factedit.Editor(method, tokenizer=tok, layers=(-1,), max_steps=1)
    before = editor.config
    with pytest.raises(ConfigError, match="prefixes"):
        editor.set_method(method, prefixes=bad)
    assert editor.config == before and editor.config.prefixes is None
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["ft", "ft_l", "lora"])
def test_a_float16_model_is_trained_through_float32_copies(method):
    """Adam's eps is 0 in float16: training float16 weights directly gave NaN deltas (refused)."""
    model, tok = tiny_model("llama")
    model = model.half()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with factedit.Editor(method, tokenizer=tok, layers=(-1,), lr=1e-3, max_steps=5) as editor:
        record = editor.edit(model, "The capital of France is", "Rome")
        for pdelta in record.delta.params.values():
            assert all(torch.isfinite(t).all() for t in pdelta.tensors().values())
        assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters())
        editor.revert(model, record.id)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float16 and torch.equal(p, base[name]), name


# Subject-anchored fine-tuning: the loss reaches the edited block through the subject's last token only.
@pytest.mark.parametrize("method, module", [("ft_l", ft), ("lora", lora)])
def test_an_anchored_batch_is_the_prefixed_batch_with_the_subjects_last_token(method, module, monkeypatch):
    model, tok = tiny_model("llama")
    captured = _captured_batches(module, monkeypatch)
    request, = _requests(tok, FACT)
    for anchor in ("all", "subject"):
        editor = factedit.Editor(method, tokenizer=tok, layers=(-1,), max_steps=1, preserve=None, prefixes=PREFIXES,
                                 anchor=anchor)
        editor._impl.compute(model, tok, [request])
    plain, anchored = captured
    assert plain.anchor is None
    for a, b in zip((plain.input_ids, plain.attention_mask, plain.labels, plain.stop),
                    (anchored.input_ids, anchored.attention_mask, anchored.labels, anchored.stop), strict=True):
        assert torch.equal(a, b)
    for row, prefix in enumerate(editor._impl.prefixes.get(model, tok)):
        text, offset = in_context(prefix, FACT[0])
        subject_end = offset + FACT[0].index("France") + len("France")
        assert int(anchored.anchor[row]) == token_at(tok, text, subject_end)[1]  # "France"'s last token


LAST_OUT = "model.layers.3.mlp.down_proj"  # the tiny llama's last block (of 4)


def _out_weight_grad(model, batch, anchored: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the targets, gradient of the target NLL with respect to the last block's down projection)."""
    weight = model.get_submodule(LAST_OUT).weight
    weight.grad = None
    names = [f"{LAST_OUT}.weight"]
    hold = training.through_anchor(model, names, batch) if anchored else contextlib.nullcontext()
    with hold:
        logits = batches.batch_target_logits(model, batch)
        loss, _ = batches.target_nll_at(logits, batch.labels)
        loss.backward()
    return logits.detach(), weight.grad.clone()


def test_through_anchor_passes_the_gradient_at_the_anchor_only_and_keeps_the_forward():
    model, tok = tiny_model("llama")
    assert len(model.model.layers) == 4
    requests = _requests(tok, FACT, ("Danielle Darrieux's mother tongue is", "English"))
    batch = batches.anchored_batch(requests, tok, ("", "Some words first"), torch.device("cpu"))
    rows = torch.arange(len(batch.anchor))
    full_logits, full_grad = _out_weight_grad(model, batch, anchored=False)
    anchored_logits, anchored_grad = _out_weight_grad(model, batch, anchored=True)
    assert torch.equal(full_logits, anchored_logits)  # the same forward: the stop check sees the edit as applied
    with capture_linear_io(model, [LAST_OUT]) as io:  # u (B, T, in), δ (B, T, out)
        loss, _ = batches.target_nll_at(batches.batch_target_logits(model, batch), batch.labels)
        loss.backward()
    u = io.inputs[LAST_OUT][rows, batch.anchor]  # (B, in)
    delta = io.output_grads[LAST_OUT][rows, batch.anchor]  # (B, out)
    assert torch.allclose(anchored_grad, delta.T @ u, atol=1e-6)  # Σ over rows of δ uᵀ at the anchor alone
    assert not torch.allclose(anchored_grad, full_grad, atol=1e-6)


@pytest.mark.parametrize("method", ["ft_l", "lora"])
def test_an_anchored_edit_raises_the_target_and_reverts_exactly(method):
    """On a tiny random model the subject's token carries too little for the target to become the argmax
    (the default model's figures are in docs/measured.md); the edit still moves the target up."""
    model, tok = tiny_model("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = {"norm_constraint": 0.1} if method == "ft_l" else {}
    # not the last block: at the subject's token its output reaches the target only through later blocks
    editor = factedit.Editor(method, tokenizer=tok, layers=(1,), lr=1e-2, max_steps=20, prefixes=PREFIXES,
                             anchor="subject", **kwargs)
    record = editor.edit(model, *FACT)
    before, after = record.pre["requests"][0], record.post["requests"][0]
    assert after["target_prob"] > before["target_prob"] and record.config["anchor"] == "subject"
    assert record.requests[0].subject == "France"  # the record says where it anchored (found in the prompt)
    editor.revert(model, record.id)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["ft_l", "lora"])
def test_an_anchor_that_is_not_in_the_prompt_or_not_known_is_refused_and_changes_nothing(method):
    model, tok = tiny_model("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="anchor"):
        factedit.Editor(method, tokenizer=tok, anchor="object")
    editor = factedit.Editor(method, tokenizer=tok, layers=(-1,), max_steps=2, anchor="subject")
    with pytest.raises(factedit.InvalidRequestError, match="Berlin"):
        editor.edit(model, *FACT, subject="Berlin")
    assert editor.history == [] and all(torch.equal(p, base[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_an_anchored_edit_reverts_exactly_on_every_architecture(arch):
    model, tok = tiny_model(arch)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = factedit.Editor("ft_l", tokenizer=tok, layers=(1,), max_steps=3, prefixes=PREFIXES, anchor="subject")
    record = editor.edit(model, *FACT)
    assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters())
    editor.revert(model, record.id)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
