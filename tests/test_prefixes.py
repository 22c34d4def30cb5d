"""Context prefixes are written by the weights an Editor found (model/contexts.py, model/owner.py)."""

from __future__ import annotations

import pytest
import torch
from test_contract import TINY_OVERRIDES
from test_lifelong import FACTS, assert_same_delta
from test_mend import tiny_checkpoint
from tiny_models import tiny_model

import factedit
from factedit import EditRequest
from factedit.model import contexts
from factedit.model.contexts import ContextPrefixes, PrefixConfig, generate_prefixes


def editor_for(method: str, tok, **extra) -> factedit.Editor:
    return factedit.Editor(method, tokenizer=tok, guard=None, **{**TINY_OVERRIDES[method], **extra})


def test_the_prefixes_are_the_base_models_after_kept_edits():
    model, tok = tiny_model("llama")
    unedited = generate_prefixes(model, tok, PrefixConfig())
    with editor_for("alphaedit", tok) as editor:
        editor.edit(model, *FACTS[0])
        assert generate_prefixes(model, tok, PrefixConfig()) != unedited  # the edit moves what the model writes
        assert ContextPrefixes(PrefixConfig()).get(model, tok) == unedited


@pytest.mark.parametrize("method", ["memit", "rome", "ft_l", "mend"])
def test_a_reopened_journal_writes_the_same_prefixes_and_the_same_next_delta(method, tmp_path):
    model, tok = tiny_model("llama")

    def editor(journal) -> factedit.Editor:
        if method == "mend":  # its defaults: preserved, keyed on the subject, more steps
            path = tmp_path / "ck"
            if not path.exists():
                tiny_checkpoint(tmp_path, model)
            return factedit.Editor("mend", tokenizer=tok, checkpoint=str(path), layers=(-2, -1),
                                   matrices=("in", "out"), guard=None, journal=journal)
        return editor_for(method, tok, journal=journal, **({"prefixes": {}} if method == "ft_l" else {}))

    journal = tmp_path / "edits.sqlite"
    writer = editor(journal)
    writer.edit(model, *FACTS[0])  # kept: the reader replays it before it computes anything
    continued = writer.preview(model, [EditRequest(*FACTS[2])])
    writer.close()

    fresh, _ = tiny_model("llama")
    with editor(journal) as reader:
        assert_same_delta(reader.edit(fresh, *FACTS[2]), continued)


def test_editors_binding_the_same_weights_write_the_prefixes_once(monkeypatch):
    written = []
    real = contexts.generate_prefixes
    monkeypatch.setattr(contexts, "generate_prefixes", lambda *a, **k: written.append(1) or real(*a, **k))
    model, tok = tiny_model("llama")
    for fact in FACTS[:2]:  # as `factedit eval mode=single` does: an Editor per edit, each edit reverted
        with editor_for("alphaedit", tok) as editor:
            editor.revert(model, editor.edit(model, *fact).id)
    assert len(written) == 1
    with editor_for("alphaedit", tok) as editor:  # other base weights: written anew
        editor.edit(model, *FACTS[0])
    with editor_for("alphaedit", tok) as editor:
        editor.edit(model, *FACTS[1])
    assert len(written) == 2


def test_alphaedits_next_delta_after_reopening_is_the_writers_to_rounding(tmp_path):
    """Not bit for bit: the writer protects the keys it read while spreading the edit, on the unprojected
    update (locate/method.py, `_reused_keys`); the reader reads them again on the applied weights."""
    model, tok = tiny_model("llama")
    journal = tmp_path / "edits.sqlite"
    with editor_for("alphaedit", tok, journal=journal) as writer:
        writer.edit(model, *FACTS[0])
        continued = writer.preview(model, [EditRequest(*FACTS[2])])
    fresh, _ = tiny_model("llama")
    with editor_for("alphaedit", tok, journal=journal) as reader:
        record = reader.edit(fresh, *FACTS[2])
    for name in continued.delta.names():
        mine, theirs = record.delta.params[name].materialize(torch.float64), continued.delta.params[name].materialize(
            torch.float64)
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6 * float(theirs.abs().max())), name
