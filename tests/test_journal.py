"""The journal: replay bit for bit, refusal of other models and non-journals, locking, crashes."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlitedict
import torch
from helpers import assert_weights_equal, snapshot
from safetensors.torch import load_file
from tiny_models import tiny_model

import factedit
from factedit.core.delta import Delta, ParamDelta
from factedit.editing.journal import TABLE, Journal

TESTS_DIR = Path(__file__).parent
FT = dict(layers=(-1,), lr=1e-2, max_steps=40)
FACTS = [("The capital of France is", "Rome"), ("The capital of Italy is", "Berlin"),
         ("The capital of Germany is", "Madrid"), ("Paris is the capital of", "Italy")]


def run_python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    script = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r})\n" + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def journal_with_one_edit(tmp_path: Path):
    """A journal holding one active `ft` edit (FACTS[0]) of a tiny Llama: (path, edited model, tokenizer)."""
    path = tmp_path / "edits.sqlite"
    model, tok = tiny_model("llama")
    with factedit.Editor("ft", tokenizer=tok, journal=path, **FT) as editor:
        editor.edit(model, *FACTS[0])
    return path, model, tok


def replayed_reference(journal_path: Path) -> dict[str, torch.Tensor]:
    """Base tiny model plus the journal's active deltas, applied in order without the Editor."""
    model, _ = tiny_model("llama")
    params = dict(model.named_parameters())
    with Journal(journal_path) as journal, torch.no_grad():
        for record in journal.records():
            if record.status == "active":
                for name, pdelta in record.delta.items():
                    params[name].add_(pdelta.materialize(params[name].dtype))
    return snapshot(model)


def test_reopening_replays_the_active_edits_bit_for_bit(tmp_path):
    path = tmp_path / "edits.sqlite"
    model, tok = tiny_model("llama")
    with factedit.Editor("ft", tokenizer=tok, journal=path, **FT) as editor:
        records = [editor.edit(model, p, t) for p, t in FACTS[:3]]
        editor.revert(model, records[1].id)
        edited = snapshot(model)

    fresh, tok = tiny_model("llama")
    with factedit.Editor("ft", tokenizer=tok, journal=path, **FT) as editor:
        assert [r.status for r in editor.history] == ["active", "reverted", "active"]
        editor.attach(fresh)
        assert_weights_equal(fresh, edited)
        editor.revert_all(fresh)
        assert_weights_equal(fresh, snapshot(tiny_model("llama")[0]))


def test_revert_all_is_one_transaction_and_leaves_the_base_bit_for_bit(tmp_path, monkeypatch):
    """revert_all restores the base once instead of replaying the others per edit; the journal marks
    every edit in one transaction (or none: a failed write leaves model and history as they were)."""
    path = tmp_path / "edits.sqlite"
    model, tok = tiny_model("llama")
    base = snapshot(tiny_model("llama")[0])
    with factedit.Editor("ft", tokenizer=tok, journal=path, layers=(-2, -1), lr=1e-2, max_steps=5) as editor:
        records = [editor.edit(model, p, t) for p, t in FACTS]
        editor.revert(model, records[1].id)
        edited = snapshot(model)
        commits = []
        real_commit = Journal._commit

        def failing(self, items):
            commits.append(sorted(items))
            raise factedit.JournalError("disk full")

        monkeypatch.setattr(Journal, "_commit", failing)
        with pytest.raises(factedit.JournalError):
            editor.revert_all(model)
        assert_weights_equal(model, edited)
        assert [r.status for r in editor.history] == ["active", "reverted", "active", "active"]
        monkeypatch.setattr(Journal, "_commit", real_commit)
        reverted = editor.revert_all(model)
        assert [r.id for r in reverted] == [records[3].id, records[2].id, records[0].id]  # newest first
        assert_weights_equal(model, base)
        assert editor.revert_all(model) == []
    assert commits == [["meta", *sorted(f"record/{records[i].id}" for i in (0, 2, 3))]]  # one transaction
    fresh, _ = tiny_model("llama")
    with factedit.Editor("ft", tokenizer=tok, journal=path) as editor:
        assert {r.status for r in editor.history} == {"reverted"}
        editor.attach(fresh)
        assert editor.replay_differs == []  # the hashes it recorded are the base's
        assert_weights_equal(fresh, base)


def test_a_reverted_delta_is_read_back_from_the_journal_when_needed(tmp_path):
    """With a journal, a reverted edit's tensors leave memory; diff and export read the same bytes back."""
    path = tmp_path / "edits.sqlite"
    model, tok = tiny_model("llama")
    with factedit.Editor("ft", tokenizer=tok, journal=path, **FT) as editor:
        record = editor.edit(model, *FACTS[0])
        kept = {name: pdelta.dense.clone() for name, pdelta in record.delta.items()}
        editor.revert(model, record.id)
        (in_memory,) = editor.history
        assert in_memory.delta is None and in_memory.params == record.params == tuple(kept)
        read_back = editor.delta(record.id)
        assert set(read_back.names()) == set(kept)
        for name, dense in kept.items():
            assert torch.equal(read_back.params[name].dense, dense)
        assert [p.name for p in editor.diff(record.id).params] == list(kept)
        exported = factedit.Delta.from_bytes(editor.export_edit(record.id, tmp_path / "e.safetensors").read_bytes())
        assert all(torch.equal(exported.params[name].dense, dense) for name, dense in kept.items())
    with Journal(path) as journal:
        (listed,) = journal.records()
        assert listed.status == "reverted" and listed.delta is None and listed.params == tuple(kept)


def test_replay_in_another_process_is_bit_for_bit(tmp_path):
    path, weights = tmp_path / "edits.sqlite", tmp_path / "edited.safetensors"
    proc = run_python(
        """
        import factedit
        from safetensors.torch import save_file
        from tiny_models import tiny_model
        model, tok = tiny_model("llama")
        editor = factedit.Editor("lora", tokenizer=tok, journal=sys.argv[1], layers=(-1,), lr=3e-2, max_steps=40)
        a = editor.edit(model, "The capital of France is", "Rome")
        b = editor.edit(model, "The capital of Italy is", "Berlin")
        editor.revert(model, a.id)
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, sys.argv[2])
        """,
        str(path), str(weights),
    )
    _, err = proc.communicate(timeout=600)  # a hang guard only: under a loaded CPU this took over 120 s
    assert proc.returncode == 0, err
    fresh, tok = tiny_model("llama")
    with factedit.Editor("lora", tokenizer=tok, journal=path) as editor:
        editor.attach(fresh)
    assert_weights_equal(fresh, load_file(weights))


def test_a_journal_from_another_model_is_refused_and_changes_nothing(tmp_path):
    path, _, tok = journal_with_one_edit(tmp_path)
    other, _ = tiny_model("llama", seed=1)
    before = snapshot(other)
    with (factedit.Editor("ft", tokenizer=tok, journal=path, **FT) as editor,
          pytest.raises(factedit.ModelMismatchError, match="other weights .*sha256 of all parameters")):
        editor.edit(other, *FACTS[1])
    assert_weights_equal(other, before)
    with Journal(path) as journal:
        assert len(journal.records()) == 1


def test_one_changed_value_in_an_untouched_parameter_is_refused(tmp_path):
    """The base check hashes every parameter: +1.0 in one element of a matrix no edit touches."""
    path, _, tok = journal_with_one_edit(tmp_path)
    fresh, _ = tiny_model("llama")
    name = "model.layers.0.self_attn.q_proj.weight"
    with torch.no_grad():
        dict(fresh.named_parameters())[name][3, 5] += 1.0
    before = snapshot(fresh)
    with factedit.Editor("ft", tokenizer=tok, journal=path, **FT) as editor:
        with pytest.raises(factedit.ModelMismatchError, match="other weights"):
            editor.attach(fresh)
        assert editor.attach_timings["hash_ms"] > 0
    assert_weights_equal(fresh, before)


def test_a_journal_with_a_corrupt_delta_replays_nothing(tmp_path):
    """The second of two active edits holds a NaN: attaching fails and the first is undone too."""
    path = tmp_path / "edits.sqlite"
    model, tok = tiny_model("llama")
    with factedit.Editor("ft", tokenizer=tok, journal=path, **FT) as editor:
        editor.edit(model, *FACTS[0])
        second = editor.edit(model, *FACTS[1])
    with Journal(path) as journal:  # corrupt the stored delta of the second edit
        delta = journal.record(second.id).delta
        name = delta.names()[0]
        bad = delta.params[name].dense.clone()
        bad[0, 0] = float("nan")
        corrupt = Delta({**delta.params, name: ParamDelta(dense=bad)})
        journal._commit({f"delta/{second.id}": corrupt.to_bytes({"edit_id": second.id})})
    assert_attach_refused(path, tok, factedit.InvalidDeltaError, "NaN")


def assert_attach_refused(path, tok, error: type[Exception], match: str) -> None:
    """Attaching a fresh model to the journal at `path` raises `error`, and leaves the model as it was
    and the Editor unbound."""
    fresh, _ = tiny_model("llama")
    before = snapshot(fresh)
    editor = factedit.Editor("ft", tokenizer=tok, journal=path, **FT)
    with pytest.raises(error, match=match):
        editor.attach(fresh)
    assert_weights_equal(fresh, before)
    assert editor._model_ref is None and not hasattr(fresh, "factedit_editor")  # unbound, model free
    editor.close()


def test_a_refused_first_request_replays_nothing(tmp_path):
    path, _, tok = journal_with_one_edit(tmp_path)
    fresh, _ = tiny_model("llama")
    before = snapshot(fresh)
    with factedit.Editor("ft", tokenizer=tok, journal=path, **FT) as editor:
        too_long = "The capital of France is " * fresh.config.max_position_embeddings
        with pytest.raises(factedit.InvalidRequestError, match="context"):
            editor.edit(fresh, too_long, "Rome")
        assert_weights_equal(fresh, before)  # the journal's edit was not replayed first


def test_an_already_edited_model_is_refused(tmp_path):
    """Same architecture and sampled fingerprint can't tell; the touched parameters' hashes do."""
    path, model, tok = journal_with_one_edit(tmp_path)
    with factedit.Editor("ft", tokenizer=tok, journal=path, **FT) as editor, pytest.raises(factedit.ModelMismatchError):
        editor.attach(model)  # `model` still carries the edit: replaying would apply it twice


@pytest.mark.parametrize(
    "content", [b"", b"not a database at all", b"SQLite format 3\x00" + b"\x00" * 100]
)
def test_a_file_that_is_not_a_journal_is_refused(tmp_path, content):
    path = tmp_path / "notes.sqlite"
    if content:
        path.write_bytes(content)
        with pytest.raises(factedit.JournalError, match="not a"):
            Journal(path)
        assert path.read_bytes() == content
    else:  # an empty file is a new journal
        Journal(path).close()


def test_an_sqlite_file_of_something_else_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    before = path.read_bytes()
    with pytest.raises(factedit.JournalError, match="not a factedit journal"):
        Journal(path)
    assert path.read_bytes() == before


def test_the_journal_holds_json_and_safetensors_only(tmp_path):
    path, _, _ = journal_with_one_edit(tmp_path)
    with sqlite3.connect(path) as conn:
        rows = dict(conn.execute(f"SELECT key, value FROM {TABLE}").fetchall())
    for key, value in rows.items():
        if key.startswith("delta/"):
            header = json.loads(value[8 : 8 + int.from_bytes(value[:8], "little")])
            assert header["__metadata__"]["format"] == "factedit.delta/1"
        else:
            json.loads(value)  # records, order and meta are plain JSON
        assert not value.startswith(b"\x80"), f"{key} looks like a pickle"


def test_a_second_process_waits_then_gets_a_clear_error(tmp_path):
    """One child process: refused with a clear error while this process holds the journal; then, asking
    again with a longer timeout, it waits until the holder closes and gets in."""
    path = tmp_path / "edits.sqlite"
    holder = Journal(path)
    proc = run_python(
        """
        import time
        from factedit.editing.journal import Journal
        from factedit import JournalError
        try:
            Journal(sys.argv[1], lock_timeout=0.5)
        except JournalError as exc:
            print("refused:", exc, flush=True)
        start = time.monotonic()
        Journal(sys.argv[1], lock_timeout=60).close()
        print(f"opened after {time.monotonic() - start:.2f} s", flush=True)
        """,
        str(path),
    )
    try:
        refused = proc.stdout.readline()
        assert refused.startswith("refused:") and "in use by another process" in refused, proc.stderr.read()
        time.sleep(1.0)  # the child is now waiting on the lock
    finally:
        holder.close()
    out, err = proc.communicate(timeout=60)
    assert out.startswith("opened after"), err
    assert float(out.split()[2]) >= 0.9  # it waited for the holder, it did not get in beside it


def test_sigkill_mid_edit_leaves_the_journal_at_the_last_whole_edit(tmp_path):
    path = tmp_path / "edits.sqlite"
    proc = run_python(
        """
        import itertools, factedit
        from tiny_models import tiny_model
        model, tok = tiny_model("llama")
        editor = factedit.Editor("ft", tokenizer=tok, journal=sys.argv[1], layers=(-1,), lr=1e-2, max_steps=3)
        facts = [("The capital of France is", "Rome"), ("The capital of Italy is", "Berlin")]
        for i in itertools.count():
            record = editor.edit(model, *facts[i % 2])
            if i % 3 == 2:
                editor.revert(model, record.id)
            print("committed", record.id, flush=True)
        """,
        str(path),
    )
    committed = []
    while len(committed) < 4:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        committed.append(line.split()[1])
    time.sleep(0.05)  # land somewhere inside a later edit or commit
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    committed += [line.split()[1] for line in proc.stdout.read().splitlines() if line.startswith("committed")]

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Journal(path) as journal:
        ids = journal.order()
        assert ids[: len(committed)] == committed and len(ids) <= len(committed) + 1
    fresh, tok = tiny_model("llama")
    with factedit.Editor("ft", tokenizer=tok, journal=path, **FT) as editor:
        editor.attach(fresh)
    assert_weights_equal(fresh, replayed_reference(path))


def test_replay_is_checked_against_the_weights_the_writer_had(tmp_path, monkeypatch):
    """The journal keeps each touched parameter's sha256 after every edit and revert; a replay that
    gives other bits (another processor rounding a product differently) is reported, not silent."""
    path = tmp_path / "edits.sqlite"
    model, tok = tiny_model("llama")
    with factedit.Editor("lora", tokenizer=tok, journal=path, layers=(-1,), max_steps=3) as editor:
        kept = editor.edit(model, *FACTS[0])
        editor.revert(model, editor.edit(model, *FACTS[1]).id)
    fresh, _ = tiny_model("llama")
    with factedit.Editor("lora", tokenizer=tok, journal=path) as editor:
        editor.attach(fresh)
        assert editor.replay_differs == []
    assert_weights_equal(fresh, snapshot(model))

    real = ParamDelta.materialize

    def rounded_otherwise(self, *args, **kwargs):
        value = real(self, *args, **kwargs)
        return value + 1e-7 * value.abs().max()

    monkeypatch.setattr(ParamDelta, "materialize", rounded_otherwise)
    other, _ = tiny_model("llama")
    with factedit.Editor("lora", tokenizer=tok, journal=path) as editor:
        editor.attach(other)
        assert editor.replay_differs == list(kept.params)


def test_an_edit_whose_delta_fails_to_write_leaves_nothing_behind(tmp_path, monkeypatch):
    """A statement that fails inside sqlitedict's worker (here: the delta is past SQLite's length limit;
    in life a full disk) must not let the record be committed without its delta: the journal stays at
    the last whole edit and opens."""
    path, _, tok = journal_with_one_edit(tmp_path)
    model, _ = tiny_model("llama")
    connect, opened = sqlitedict.sqlite3.connect, []

    def kept(*args, **kwargs):
        opened.append(connect(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(sqlitedict.sqlite3, "connect", kept)
    with factedit.Editor("ft", tokenizer=tok, journal=path, **FT) as editor:
        editor.attach(model)
        before = snapshot(model)
        opened[-1].setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 4_000)  # a record (~1.6 kB) fits, a delta (~8.5 kB) not
        with pytest.raises(factedit.JournalError):
            editor.edit(model, *FACTS[1])
        assert_weights_equal(model, before)
        assert len(editor.history) == 1
    monkeypatch.setattr(sqlitedict.sqlite3, "connect", connect)
    with Journal(path) as journal:
        assert len(journal.order()) == 1 and len(journal.records()) == 1
        keys = list(journal._db.keys())
    assert sorted(k.split("/")[0] for k in keys) == ["delta", "meta", "order", "record"]


@pytest.mark.parametrize("meta", [b"not json", b'{"format": "factedit.journal/1"}', b"[1, 2]",
                                  b'{"format": "other/9", "model_id": "m"}'])
def test_a_journal_with_bad_metadata_is_refused(tmp_path, meta):
    path, _, _ = journal_with_one_edit(tmp_path)
    with Journal(path) as journal:
        journal._commit({"meta": meta})
    with pytest.raises(factedit.JournalError, match="metadata|format"):
        Journal(path)


def test_paths_that_cannot_be_journals_are_refused_and_nothing_is_created(tmp_path):
    with pytest.raises(factedit.JournalError, match="is a directory"):
        Journal(tmp_path)
    with pytest.raises(factedit.JournalError, match="does not exist"):
        Journal(tmp_path / "missing" / "edits.sqlite")
    with pytest.raises(factedit.JournalError, match="no journal at"):
        Journal(tmp_path / "typo.sqlite", create=False)
    assert list(tmp_path.iterdir()) == []  # no journal, no lock file


def test_a_journal_with_a_corrupt_guard_rotation_replays_nothing(tmp_path):
    path, _, tok = journal_with_one_edit(tmp_path)
    with Journal(path) as journal:
        journal._commit({"guard": b"{not json"})
    assert_attach_refused(path, tok, factedit.JournalError, "guard rotation is not JSON")
