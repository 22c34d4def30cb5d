"""What a session's callers (the app, the service) may ask, checked before anything runs: settable
config fields and their bounds, request limits, imported files read whole; the session's bookkeeping on
every path that changes weights; previews and diffs on a read view while generations go on; journal
compaction that replays bit for bit."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import snapshot
from tiny_models import save_tiny_model, tiny_model

import factedit
from factedit.core.configs import validated
from factedit.core.delta import delta_metadata
from factedit.core.errors import (
    ConfigError,
    ConfigNotAllowedError,
    EditNotFoundError,
    InvalidDeltaError,
    LimitError,
)
from factedit.core.methods import available_methods, get_method, make_config
from factedit.core.settable import settable_fields
from factedit.editing.journal import Journal
from factedit.model.views import read_view, viewed_model
from factedit.peft.ft import FTConfig
from factedit.session import EditSession, SessionConfig
from factedit.session.limits import RequestLimits

FT_L = {"layers": [-1], "lr": 0.1, "norm_constraint": 0.1, "max_steps": 10}
FACT = ("The capital of France is", "Rome")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def session(tiny_dir, tmp_path):
    config = SessionConfig(model=str(tiny_dir), journal=str(tmp_path / "journal.sqlite"), default_method="ft_l",
                           method_overrides={"ft_l": FT_L}, warm_guard=False)
    session = EditSession(config)
    yield session
    session.close()


def journal_bytes(session: EditSession) -> bytes:
    return session.journal_path.read_bytes()


# --- settable fields --------------------------------------------------------------------------------
def test_every_method_declares_settable_fields_that_its_config_has():
    shipped = [m for m in available_methods() if get_method(m).config_cls.__module__.startswith("factedit.")]
    assert {"ft", "ft_l", "lora", "mend", "ultraedit", "alphaedit", "memit", "rome"} <= set(shipped)
    for method in shipped:  # test modules register methods of their own
        config_cls = get_method(method).config_cls
        fields = set(config_cls.__dataclass_fields__)
        declared = settable_fields(config_cls)
        assert declared, f"{method} declares nothing a caller may set"
        assert set(declared) <= fields, (method, set(declared) - fields)


@pytest.mark.parametrize("overrides, message", [
    ({"max_steps": 1_000_000}, "max_steps must be between"),
    ({"lr": "${oc.env:HOME}"}, "lr takes a finite number"),
    ({"lr": float("nan")}, "lr takes a finite number"),
    ({"max_steps": True}, "max_steps takes an integer"),
    ({"layers": list(range(20))}, "layers takes a list of 1 to 8"),
    ({"matrices": ["out", "bogus"]}, "matrices[1] takes one of"),
    ({"preserve": {"ridge": 1e9}}, "preserve.ridge must be between"),
    ({"preserve": {"bogus": 1}}, "preserve.bogus cannot be set"),
    ({"prefixes": {"seeds": ["a"]}}, "prefixes.seeds cannot be set"),
    ({"no_such_field": 1}, "no_such_field cannot be set"),
])
def test_a_caller_cannot_set_what_a_method_does_not_declare(session, overrides, message):
    before = snapshot(session.model)
    with pytest.raises(ConfigNotAllowedError, match=message.replace("[", r"\[")) as caught:
        session.edit("ft_l", *FACT, overrides=overrides, predict=False)
    assert "/root" not in str(caught.value) and str(Path.home()) not in str(caught.value)
    assert session.history() == []
    for name, p in session.model.named_parameters():
        assert torch.equal(p, before[name])


@pytest.mark.parametrize("method, overrides", [
    ("mend", {"checkpoint": "/etc"}),
    ("lora", {"rank": 100_000}),
    ("ultraedit", {"extra_steps": 1000}),
    ("ultraedit", {"step_scales": [1.0] * 50}),
    ("alphaedit", {"kl_prompt": "{} is"}),
])
def test_paths_and_unbounded_work_are_not_settable(session, method, overrides):
    with pytest.raises(ConfigNotAllowedError):
        session.preview(method, *FACT, overrides=overrides)
    with pytest.raises(ConfigNotAllowedError):
        session.edit_requests([factedit.EditRequest(*FACT)], method, overrides)
    assert session.history() == []


def test_settable_values_within_bounds_are_used(session):
    record = session.edit_requests([factedit.EditRequest(*FACT)], "ft_l", {"max_steps": 3, "lr": 0.05})
    assert record.config["max_steps"] == 3 and record.config["lr"] == 0.05


def test_config_values_are_taken_literally_everywhere():
    """Even the operator's own overrides are never resolved by OmegaConf (no `${oc.env:...}`)."""
    with pytest.raises(ConfigError, match="interpolation"):
        validated(FTConfig, {"matrices": ["${oc.env:HOME}"]})
    with pytest.raises(ConfigError, match="interpolation"):
        make_config(FTConfig, {"preserve": {"ridge": "${oc.env:HOME}"}})


# --- request limits --------------------------------------------------------------------------------
def test_requests_past_the_limits_are_refused_before_anything_runs(session):
    session.request_limits = RequestLimits(max_facts=2, max_paraphrases=3, max_locality=3, max_text_chars=50)
    many = [factedit.EditRequest(f"Fact {i} is", "x") for i in range(3)]
    with pytest.raises(LimitError, match="at most 2 facts"):
        session.edit_requests(many)
    with pytest.raises(LimitError, match="at most 3 paraphrases"):
        session.edit("ft_l", *FACT, paraphrases=["p"] * 4, predict=False)
    with pytest.raises(LimitError, match="at most 3 locality"):
        session.preview("ft_l", *FACT, locality=["l"] * 4)
    with pytest.raises(LimitError, match="longer than 50"):
        session.edit("ft_l", "x" * 60, "y", predict=False)
    assert session.history() == []


# --- imports ---------------------------------------------------------------------------------------
def altered_export(data: bytes, change) -> bytes:
    """The exported file with its record's JSON changed by `change(record)`, tensors as they were."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    record = json.loads(header["__metadata__"]["record"])
    change(record)
    header["__metadata__"]["record"] = json.dumps(record)
    # Pad with spaces to an 8-byte boundary, as safetensors writes its header.
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + header_len:]


@pytest.mark.parametrize("change", [
    lambda r: r.update(id=["not", "a", "string"]),
    lambda r: r.update(created_at="yesterday"),
    lambda r: r.update(timings={"edit_ms": "slow"}),
    lambda r: r.update(requests=[]),
    lambda r: r.update(requests=[{"prompt": "p", "target": 5}]),
    lambda r: r.update(requests=[{"prompt": "p", "target": "t", "extra": 1}]),
    lambda r: r.update(config=[1, 2]),
    lambda r: r.pop("model_fingerprint"),
], ids=["id", "created_at", "timings", "no-requests", "target", "extra-field", "config", "fingerprint"])
def test_an_import_with_an_altered_record_changes_nothing(session, change):
    record = session.edit_requests([factedit.EditRequest(*FACT)])
    exported = session.export_edit(record.id)
    session.revert(record.id)
    before, journal = snapshot(session.model), journal_bytes(session)
    health, version = session.health(), session.version
    with pytest.raises(InvalidDeltaError):
        session.import_edit(altered_export(exported, change))
    assert session.version == version and journal_bytes(session) == journal
    assert {k: v for k, v in session.health().items() if k != "journal"} == \
        {k: v for k, v in health.items() if k != "journal"}
    for name, p in session.model.named_parameters():
        assert torch.equal(p, before[name])
    assert delta_metadata(exported)  # the original still imports
    assert session.import_edit(exported).status == "active"


def test_an_import_carrying_more_facts_than_an_edit_may_is_refused(session):
    record = session.edit_requests([factedit.EditRequest(*FACT), factedit.EditRequest("The sky is", "green")])
    exported = session.export_edit(record.id)
    session.revert(record.id)
    session.request_limits = RequestLimits(max_facts=1)
    with pytest.raises(LimitError, match="at most 1 facts"):
        session.import_edit(exported)
    assert [r.status for r in session.history()] == ["reverted"]


def test_the_bookkeeping_follows_a_change_that_fails_after_it_reached_the_weights(session, monkeypatch):
    """An import applied and journaled, then a failure in the session's own step after it: health,
    version and history tell the truth (before, health kept the old counts and the version stayed)."""
    record = session.edit_requests([factedit.EditRequest(*FACT)])
    exported = session.export_edit(record.id)
    version = session.version

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(session.origins, "imported", broken)
    with pytest.raises(OSError):
        session.import_edit(exported)
    assert session.version == version + 1
    health = session.health()
    assert health["edits"] == 2 and health["active_edits"] == 2
    assert session.last_change["kind"] == "import"
    assert session.last_change["edit_ids"] == [session.history()[-1].id]


# --- read views ------------------------------------------------------------------------------------
def test_a_read_view_shares_every_tensor_and_cannot_be_edited():
    model, tok = tiny_model("llama")
    view = read_view(model)
    assert view is not model and viewed_model(view) is model
    assert all(a is b for a, b in zip(model.parameters(), view.parameters(), strict=True))
    with factedit.Editor("ft", tokenizer=tok, layers=(-1,), max_steps=2) as editor, \
            pytest.raises(ConfigError, match="read view"):
        editor.edit(view, *FACT)


def test_a_diff_runs_while_a_generation_holds_the_weights_and_never_shows_it_other_weights(session):
    """A diff swaps the edit's weights out through functional_call on a read view: a reader holding the
    weights meanwhile (as a generation does) neither waits for it nor sees anything but the weights."""
    record = session.edit_requests([factedit.EditRequest(*FACT)])
    ids = session.tokenizer("The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = session.model(ids).logits
    done, seen = threading.Event(), []

    def reader():
        with session.reading(), torch.no_grad():  # a generation's hold on the weights
            while not done.is_set():
                seen.append(torch.equal(session.model(ids).logits, expected))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        time.sleep(0.05)
        session.access.lock_timeout = 10.0
        for probes in (["The sky is"], ["The sea is"], ["Grass is"]):
            diff = session.diff(record.id, probes=probes)
            assert diff["probes"]
        session.try_prompt("The capital of France is", record.id, max_new_tokens=2)
    finally:
        done.set()
        thread.join()
    assert seen and all(seen)


# --- journal compaction ----------------------------------------------------------------------------
def test_compaction_drops_old_reverted_deltas_and_replays_bit_for_bit(tiny_dir, tmp_path):
    path = tmp_path / "edits.sqlite"
    model, tok = factedit.load_model(str(tiny_dir))
    with factedit.Editor("ultraedit", tokenizer=tok, journal=path, layers=(1, 2, 3), warmup=0) as editor:
        kept = editor.edit(model, *FACT)
        dropped = [editor.edit(model, f"Fact {i} is", "green") for i in range(3)]
        for record in dropped:
            editor.revert(model, record.id)
        edited = snapshot(model)
        before_size = path.stat().st_size
        assert editor.compact_journal(older_than_s=3600)["dropped"] == 0  # none reverted that long ago
        report = editor.compact_journal()
        assert report["dropped"] == 3 and report["bytes_before"] == before_size
        assert report["bytes_after"] < before_size
        with pytest.raises(EditNotFoundError, match="compacted"):
            editor.diff(dropped[0].id, model=model)
        assert editor.diff(kept.id, model=model).params  # the active edit still diffs
        next_delta = editor.preview(model, [factedit.EditRequest("The sky is", "red")]).delta
    # Reopening replays the same weights and the same lifelong state: the next delta is bit for bit.
    reopened, _ = factedit.load_model(str(tiny_dir))
    with factedit.Editor("ultraedit", tokenizer=tok, journal=path, layers=(1, 2, 3), warmup=0) as editor:
        editor.attach(reopened)
        for name, p in reopened.named_parameters():
            assert torch.equal(p, edited[name]), name
        again = editor.preview(reopened, [factedit.EditRequest("The sky is", "red")]).delta
        assert [r.compacted_at is not None for r in editor.history] == [False, True, True, True]
    for name, pdelta in next_delta.items():
        for part, tensor in pdelta.tensors().items():
            assert torch.equal(tensor, again.params[name].tensors()[part]), (name, part)
    with Journal(path) as journal:
        assert journal.records()[0].delta is not None


def test_the_session_compacts_and_reports_the_journals_size(session):
    record = session.edit_requests([factedit.EditRequest(*FACT)])
    session.revert(record.id)
    health = session.health()["journal"]
    assert health["deltas"] == 1 and health["bytes"] == session.journal_path.stat().st_size
    report = session.compact_journal()
    assert report["dropped"] == 1
    health = session.health()["journal"]
    assert health["deltas"] == 0 and health["bytes"] == report["bytes_after"]
    assert session.history()[0].compacted_at is not None


def test_the_cli_compacts_a_journal(tmp_path, capsys):
    from factedit.cli import main

    path = tmp_path / "edits.sqlite"
    model, tok = tiny_model("llama")
    with factedit.Editor("ft", tokenizer=tok, journal=path, layers=(-1,), max_steps=2) as editor:
        editor.revert(model, editor.edit(model, *FACT).id)
        editor.edit(model, "The sky is", "green")
    assert main(["journal", "compact", "--journal", str(path), "--older-than-days", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"] == 0
    assert main(["journal", "compact", "--journal", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"] == 1
    with Journal(path) as journal:
        assert [r.compacted_at is not None for r in journal.records(deltas=False)] == [True, False]


def test_running_out_of_memory_is_not_called_the_callers_invalid_config(session, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(factedit.Editor, "set_method", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        session.edit("ft", *FACT, predict=False)

    def missing(*args, **kwargs):
        raise FileNotFoundError("no checkpoint at /somewhere")

    monkeypatch.setattr(factedit.Editor, "set_method", missing)
    with pytest.raises(ConfigError, match="not available"):
        session.edit("ft", *FACT, predict=False)
    assert session.history() == []


def test_a_new_journal_stops_the_generator_before_holding_the_weights(session, monkeypatch):
    """Joining the generator's worker while holding the weights alone stalls: the worker may be waiting
    for them. The generator is stopped first and started again on the fresh model."""
    from factedit.session.generation import BatchGenerator

    session.start_generator(max_batch=2)
    closes = []
    real_close = BatchGenerator.close

    def close(self, *args, **kwargs):
        closes.append(session.rw.writing)
        return real_close(self, *args, **kwargs)

    monkeypatch.setattr(BatchGenerator, "close", close)
    old_model, old_generator = session.model, session.generator
    session.start_new_journal()
    assert closes == [False]
    assert session.model is not old_model and session.generator is not old_generator


# --- the default method -----------------------------------------------------------------------------
def test_a_session_that_names_no_method_edits_with_a_lifelong_editor_that_fits_its_model(tiny_dir, tmp_path):
    """`mend`'s shipped network was trained for the default model: on another model the session's default
    falls to `ultraedit`, which needs none; a method the config names stays its default."""
    from factedit.core.methods import DEFAULT_METHODS, default_method_for

    model, _ = factedit.load_model(str(tiny_dir))
    assert DEFAULT_METHODS == ("mend", "ultraedit")
    assert default_method_for(model, available_methods()) == "ultraedit"
    assert default_method_for(model, ["ft_l", "lora"]) == "ft_l"  # neither lifelong editor registered
    config = SessionConfig(model=str(tiny_dir), journal=str(tmp_path / "journal.sqlite"), warm_guard=False,
                           method_overrides={"ultraedit": {"layers": [1, 2, 3]}})
    named = SessionConfig(model=str(tiny_dir), journal=str(tmp_path / "named.sqlite"), warm_guard=False,
                          default_method="ft_l", method_overrides={"ft_l": FT_L})
    for session_config, expected in ((config, "ultraedit"), (named, "ft_l")):
        session = EditSession(session_config)
        try:
            assert session.default_method == expected == session.health()["default_method"]
            assert session.editor is not None and session._switch.method == expected
        finally:
            session.close()


@pytest.mark.default_model
def test_on_the_default_model_the_default_method_is_mend(default_model):
    from factedit.core.methods import default_method_for

    model, _ = default_model
    assert default_method_for(model, available_methods()) == "mend"
