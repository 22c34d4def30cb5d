"""A reopened journal edits on as the process that wrote it: the context prefixes come from the base
weights the Editor found (model/contexts.py, model/owner.py), the keys a preserver holds for each
edit are those taken right after it, journaled (EditRecord.held_keys), and the drift guard goes on
from the rotation its writer's stood at (the journal's `guard`)."""

from __future__ import annotations

import shutil

import pytest
import sqlitedict
import torch
from test_contract import TINY_OVERRIDES
from test_lifelong import FACTS, assert_same_delta
from test_mend import tiny_checkpoint
from tiny_models import tiny_model
from wreck import WRECK

import factedit
from factedit import EditRequest, GuardConfig
from factedit.core.errors import DriftError
from factedit.editing.journal import TABLE, Journal
from factedit.model import contexts
from factedit.model.contexts import ContextPrefixes, PrefixConfig, generate_prefixes
from factedit.safety.drift import DriftGuard

GUARD_STRICT = GuardConfig(max_ratio=1.5, texts=4, max_tokens=8)


def editor_for(method: str, tok, **extra) -> factedit.Editor:
    return factedit.Editor(method, tokenizer=tok, **{"guard": None, **TINY_OVERRIDES[method], **extra})


def test_the_prefixes_are_the_base_models_after_kept_edits():
    model, tok = tiny_model("llama")
    unedited = generate_prefixes(model, tok, PrefixConfig())
    with editor_for("alphaedit", tok) as editor:
        editor.edit(model, *FACTS[0])
        assert generate_prefixes(model, tok, PrefixConfig()) != unedited  # the edit moves what the model writes
        assert ContextPrefixes(PrefixConfig()).get(model, tok) == unedited


@pytest.mark.parametrize("method", ["memit", "rome", "ft_l", "mend", "ultraedit", "alphaedit"])
def test_a_reopened_journal_gives_bit_for_bit_the_writers_next_delta(method, tmp_path):
    model, tok = tiny_model("llama")

    def editor(journal) -> factedit.Editor:
        if method == "mend":  # its defaults: preserved, keyed on the subject, prefixed, more steps
            path = tmp_path / "ck"
            if not path.exists():
                tiny_checkpoint(tmp_path, model)
            return factedit.Editor("mend", tokenizer=tok, checkpoint=str(path), layers=(-2, -1),
                                   matrices=("in", "out"), guard=None, journal=journal)
        return editor_for(method, tok, journal=journal, **({"prefixes": {}} if method == "ft_l" else {}))

    journal = tmp_path / "edits.sqlite"
    writer = editor(journal)
    # kept edits, replayed by the reader before it computes anything; the second moves the weights the
    # first's keys are read from, and the reverted one is released
    for fact in FACTS[:2]:
        writer.edit(model, *fact)
    writer.revert(model, writer.edit(model, "The capital of Italy is", "Madrid").id)
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


def test_the_keys_held_for_each_edit_are_journaled_and_dropped_with_its_delta(tmp_path):
    model, tok = tiny_model("llama")
    journal = tmp_path / "edits.sqlite"
    with editor_for("alphaedit", tok, journal=journal) as editor:
        kept = editor.edit(model, *FACTS[0])
        reverted = editor.edit(model, *FACTS[1])
        editor.revert(model, reverted.id)
    assert set(kept.held_keys) == set(kept.delta.names())  # every edited matrix, (facts, in) each
    assert all(k.shape[0] == 1 for k in kept.held_keys.values())
    with Journal(journal) as opened:
        active = [r for r in opened.records() if r.status == "active"]
        assert [r.id for r in active] == [kept.id]
        assert all(torch.equal(active[0].held_keys[n], kept.held_keys[n]) for n in kept.held_keys)
        assert opened._tensors("keys", reverted.id) is not None
        opened.compact()
        assert opened._tensors("keys", reverted.id) is None and opened._tensors("keys", kept.id) is not None


def test_a_journal_without_held_keys_takes_them_on_the_replayed_model(tmp_path):
    """A journal written before the keys were journaled replays, and its preserver reads them."""
    model, tok = tiny_model("llama")
    journal = tmp_path / "edits.sqlite"
    with editor_for("alphaedit", tok, journal=journal) as editor:
        kept = editor.edit(model, *FACTS[0])
    with sqlitedict.SqliteDict(str(journal), tablename=TABLE, autocommit=True,
                               encode=lambda x: x, decode=lambda x: x) as db:
        del db[f"keys/{kept.id}"]
    with Journal(journal) as opened:
        assert opened.records()[0].held_keys is None
    fresh, _ = tiny_model("llama")
    with editor_for("alphaedit", tok, journal=journal) as reader:
        record = reader.edit(fresh, *FACTS[1])
        assert reader._safeguards.preserver.protected_edits() == [kept.id, record.id]


def test_a_preserver_over_more_matrices_holds_the_kept_keys_and_reads_the_others():
    model, tok = tiny_model("llama")
    with editor_for("alphaedit", tok, layers=(-2, -1)) as editor:
        kept = editor.edit(model, *FACTS[0])
        editor.set_method("alphaedit", **{**TINY_OVERRIDES["alphaedit"], "layers": (-3, -2, -1)})
        editor.edit(model, *FACTS[1])  # its preserver covers one more matrix: built anew
        held = editor._safeguards.preserver._protected[kept.id]
    assert len(held) == 3 and set(kept.held_keys) < set(held)
    preserver = editor._safeguards.preserver
    for name, keys in kept.held_keys.items():  # in the preserver's null-space coordinates, as protect holds them
        assert torch.equal(held[name], keys.double() @ preserver.bases[name])


@pytest.mark.parametrize("revert_last", [False, True])
def test_a_reopened_preserver_holds_the_writers_inverse_bit_for_bit(revert_last, tmp_path):
    """The writer updates its inverse edit by edit and rebuilds it after a revert; a reader holds the
    edits before the last revert as rebuilt and updates for the ones after it."""
    model, tok = tiny_model("llama")
    journal = tmp_path / "edits.sqlite"
    with editor_for("alphaedit", tok, journal=journal) as writer:
        writer.edit(model, *FACTS[0])
        writer.revert(model, writer.edit(model, "The capital of Italy is", "Madrid").id)
        writer.edit(model, *FACTS[1])  # after a revert: its update follows the rebuild
        if revert_last:  # an edit of a method without a preserver is held too while one exists
            writer.set_method("memit", **TINY_OVERRIDES["memit"])
            writer.revert(model, writer.edit(model, "The Eiffel Tower is in", "Rome").id)
            writer.set_method("alphaedit", **TINY_OVERRIDES["alphaedit"])
        writer.preview(model, [EditRequest(*FACTS[2])])
        theirs = writer._safeguards.preserver
        expected = {n: theirs._current_inverse(n).clone() for n in theirs.names}
    fresh, _ = tiny_model("llama")
    with editor_for("alphaedit", tok, journal=journal) as reader:
        reader.preview(fresh, [EditRequest(*FACTS[2])])
        mine = reader._safeguards.preserver
        assert all(torch.equal(mine._current_inverse(n), expected[n]) for n in expected)


def test_a_reopened_preserver_rebuilds_only_the_matrices_a_revert_touched(tmp_path):
    model, tok = tiny_model("llama")
    journal = tmp_path / "edits.sqlite"
    two = {**TINY_OVERRIDES["alphaedit"], "layers": (-2, -1)}
    with editor_for("alphaedit", tok, journal=journal, layers=(-2, -1)) as writer:
        writer.edit(model, *FACTS[0])
        writer.set_method("alphaedit", **{**two, "layers": (-1,)})
        writer.revert(model, writer.edit(model, "The capital of Italy is", "Madrid").id)  # the last block only
        writer.set_method("alphaedit", **two)
        writer.preview(model, [EditRequest(*FACTS[2])])
        theirs = writer._safeguards.preserver
        expected = {n: theirs._current_inverse(n).clone() for n in theirs.names}
    fresh, _ = tiny_model("llama")
    with editor_for("alphaedit", tok, journal=journal, layers=(-2, -1)) as reader:
        reader.preview(fresh, [EditRequest(*FACTS[2])])
        mine = reader._safeguards.preserver
        assert all(torch.equal(mine._current_inverse(n), expected[n]) for n in expected)


GUARD = GuardConfig(max_ratio=100.0, texts=4, max_tokens=8)  # far from the bound: each check reads one group


def test_a_reopened_guard_reads_what_its_writers_would_have(tmp_path):
    model, tok = tiny_model("llama")
    journal, copy = tmp_path / "edits.sqlite", tmp_path / "copy.sqlite"
    writer = editor_for("ft_l", tok, journal=journal, guard=GUARD)
    for fact in FACTS[:2]:
        writer.edit(model, *fact)
    writer.revert(model, writer.edit(model, "The capital of Italy is", "Madrid").id)
    shutil.copy(journal, copy)  # the journal as it stands before the next edit (every write committed)
    continued = writer.edit(model, *FACTS[2])
    after = writer._safeguards.guard.rotation()
    writer.close()
    assert after["next"] == 4

    fresh, _ = tiny_model("llama")
    with editor_for("ft_l", tok, journal=copy, guard=GUARD) as reader:
        record = reader.edit(fresh, *FACTS[2])
        assert record.drift == continued.drift  # the same group read (a fresh guard reads group 0)
        assert reader._safeguards.guard.rotation() == after


def test_a_refused_edit_moves_the_journaled_rotation(tmp_path):
    model, tok = tiny_model("llama")
    journal = tmp_path / "edits.sqlite"
    with factedit.Editor(WRECK, tokenizer=tok, journal=journal, guard=GUARD_STRICT) as editor:
        with pytest.raises(DriftError):
            editor.edit(model, "The capital of France is", "Rome")
        assert editor.history == []
    with Journal(journal) as kept:
        rotation = kept.guard_rotation()
    assert rotation["next"] == 1 and rotation["last"][0] > GUARD_STRICT.max_ratio  # refused, yet read
    with editor_for("ft_l", tok, journal=journal, guard=GUARD_STRICT) as reader:
        reader.warm_guard(model)
        assert reader._safeguards.guard.plan() == (1, 0)  # the next group, and the one that read worst
    with editor_for("ft_l", tok, journal=journal, guard=GUARD) as other:
        other.warm_guard(model)  # another config: its guard starts afresh, as the writer's would have
        assert other._safeguards.guard.plan() == (0,)


def test_a_guard_takes_up_only_a_rotation_of_its_own_config():
    guard = DriftGuard(GUARD)
    rotation = guard.rotation()
    rotation["next"], rotation["last"][2] = 3, 1.25
    assert DriftGuard(GUARD).resume(rotation)
    taken = DriftGuard(GUARD)
    taken.resume(rotation)
    assert taken.plan() == (3, 2) and taken.rotation() == rotation
    for bad in ({**rotation, "config": {**rotation["config"], "texts": 8}}, {**rotation, "next": len(guard.groups)},
                {**rotation, "last": rotation["last"][:-1]}, {**rotation, "last": ["1.2"] * len(guard.groups)}, {}):
        fresh = DriftGuard(GUARD)
        assert not fresh.resume(bad) and fresh.plan() == (0,)


def test_a_replayed_journal_keeps_the_base_of_what_reverted_edits_touched(tmp_path):
    """The writer keeps the base of every parameter an edit touched, a reverted one's too; the guard
    reads from the lowest such block, so a reader that forgot them would read from another block."""
    model, tok = tiny_model("llama")
    journal, copy = tmp_path / "edits.sqlite", tmp_path / "copy.sqlite"
    writer = editor_for("ft_l", tok, journal=journal, guard=GUARD)
    writer.set_method("ft_l", **{**TINY_OVERRIDES["ft_l"], "layers": (0,)})
    writer.revert(model, writer.edit(model, "The capital of Italy is", "Madrid").id)
    writer.set_method("ft_l", **TINY_OVERRIDES["ft_l"])
    writer.edit(model, *FACTS[0])
    shutil.copy(journal, copy)
    continued = writer.edit(model, *FACTS[1])
    kept = sorted(writer._state.base)
    writer.close()

    fresh, _ = tiny_model("llama")
    with editor_for("ft_l", tok, journal=copy, guard=GUARD) as reader:
        record = reader.edit(fresh, *FACTS[1])
        assert record.drift == continued.drift
        assert sorted(reader._state.base) == kept
