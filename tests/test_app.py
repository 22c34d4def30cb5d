"""The Streamlit app (apps/app.py), driven by Streamlit's AppTest on a tiny random Llama saved to disk.

Each test gets its own journal and settings (FACTEDIT_APP_* environment variables), so its shared
app state is its own; the state is released (journal closed) after every test.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest
from tiny_models import save_tiny_model, tiny_model

import factedit
from factedit.core import request as request_module
from factedit.core.methods import MethodSpec, config_to_dict
from factedit.model.contexts import PrefixConfig
from factedit.session import EditSession

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "app.py"
sys.path.insert(0, str(REPO / "apps"))  # the app's modules (editapp), for the service-level tests

from editapp.config import load_app_config  # noqa: E402 - found through the path set above

PROMPT, TARGET = "The capital of France is", "Rome"
# Settings that make the tiny model's top token " Rome" after one edit, in a few steps.
TEST_CONFIG = """
default_method: ft_l
continuation_tokens: 3
method_overrides:
  ft_l: {layers: [-1], lr: 0.1, norm_constraint: 0.1, max_steps: 10}
  ft: {layers: [-1], lr: 0.1, max_steps: 10}
  lora: {layers: [-1]}
probes:
  - The capital of France is
  - The capital of Germany is
  - Water boils at one hundred
"""
TIMEOUT = 120  # seconds per script run: the CPU is shared


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def app_env(tmp_path, monkeypatch, tiny_dir):
    config = tmp_path / "app.yaml"
    config.write_text(TEST_CONFIG)
    journal = tmp_path / "journal.sqlite"
    monkeypatch.setenv("FACTEDIT_APP_CONFIG", str(config))
    monkeypatch.setenv("FACTEDIT_APP_MODEL", str(tiny_dir))
    monkeypatch.setenv("FACTEDIT_APP_JOURNAL", str(journal))
    yield SimpleNamespace(journal=journal, model=tiny_dir, config=config)
    st.cache_resource.clear()  # releases the shared state: closes its journal


def start() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def run(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, at.exception
    return at


def apply_edit(at: AppTest, prompt: str = PROMPT, target: str = TARGET, method: str | None = None) -> AppTest:
    if method is not None:
        at.selectbox(key="edit_method").select(method)
    at.text_input(key="edit_prompt").input(prompt)
    at.text_input(key="edit_target").input(target)
    at.button(key="apply_edit").click()
    return run(at)


def markdown(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown]


def now_line(at: AppTest) -> str:
    (line,) = [m for m in markdown(at) if m.startswith("Now:")]
    return line


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def table_with(at: AppTest, column: str):
    """The first table that has `column` (tables: before/after top-5, probes, history, diff)."""
    return next(t.value for t in at.table if column in t.value.columns)


def status_lines(at: AppTest) -> list[str]:
    """The status lines under the action buttons (edit and compare) that report an outcome."""
    return [c.value for c in at.caption if c.value.startswith(("Edit ", "Compared", "Previewed", "The ", "Nothing"))
            and not c.value.startswith("Edit took")]


def history(at: AppTest):
    return table_with(at, "status")


def test_edit_shows_before_after_probes_and_history(app_env):
    at = start()
    before = now_line(at)
    assert "**Rome**" not in before
    at = apply_edit(at)
    assert errors(at) == []
    assert any("applied with ft_l" in s.value for s in at.success)
    assert any(m.startswith("**After:** top prediction **Rome**") for m in markdown(at))
    assert any(m.startswith("**Before:**") for m in markdown(at))
    assert "top prediction **Rome**" in now_line(at)
    frame = history(at)
    assert list(frame["status"]) == ["active"] and list(frame["method"]) == ["ft_l"]
    assert frame["prompt"][0] == PROMPT and frame["old → new"][0].endswith("→ Rome")
    assert frame["edit ms"][0] > 0
    probes = table_with(at, "probe")  # the probe table: the edited prompt's answer changed
    france = probes[probes["probe"] == PROMPT].iloc[0]
    assert france["flag"] == "top changed" and france["answer now"].startswith("Rome ")
    assert any(m.startswith(f"**Last edit** `{frame['id'][0]}` (ft_l, active)") for m in markdown(at))


def test_revert_one_and_revert_all(app_env):
    at = start()
    original = now_line(at)
    at = apply_edit(at)
    assert "**Rome**" in now_line(at)
    at.button(key="revert_selected").click()
    at = run(at)
    assert now_line(at) == original
    assert list(history(at)["status"]) == ["reverted"]
    at = apply_edit(at, target="Berlin")
    at = apply_edit(at, target="Madrid", method="ft")  # another method: the journal holds both
    assert list(history(at)["method"]) == ["ft_l", "ft_l", "ft"]
    at.button(key="revert_all").click()
    at = run(at)
    assert list(history(at)["status"]) == ["reverted"] * 3
    assert now_line(at) == original
    assert errors(at) == []
    assert any(s.value.startswith("2 edit(s) reverted") for s in at.success)  # the first was reverted already


def test_compacting_the_journal_keeps_the_history_and_the_weights(app_env):
    at = apply_edit(start())
    at.button(key="revert_selected").click()
    at = apply_edit(run(at), target="Berlin")
    edited = now_line(at)
    assert not at.button(key="compact_journal").disabled
    at.button(key="compact_journal").click()
    at = run(at)
    assert any(s.value.startswith("Dropped the deltas of 1 reverted edit(s)") for s in at.success)
    assert list(history(at)["status"]) == ["reverted", "active"]
    assert at.button(key="compact_journal").disabled  # nothing left to drop
    assert now_line(at) == edited and errors(at) == []


def selected_edit(at: AppTest):
    return next(s for s in at.selectbox if s.label == "Selected edit")


def diff_heading(at: AppTest) -> str | None:
    return next((h.value for h in at.subheader if h.value.startswith("Diff of edit")), None)


def test_diff_of_an_edit(app_env):
    at = apply_edit(start())
    at.button(key="diff_selected").click()
    at = run(at)
    edit_id = history(at)["id"][0]
    assert diff_heading(at) == f"Diff of edit {edit_id} (active)"
    params = table_with(at, "parameter")
    assert list(params["parameter"]) == ["model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.down_proj.weight"]
    assert int(params["rank"][0]) >= 1
    changes = table_with(at, "without the edit")
    assert changes["prompt"][0] == PROMPT and changes["changed"][0] == "top changed"
    assert changes["with the edit"][0].startswith("Rome ")
    at.button(key="hide_diff").click()
    at = run(at)
    assert diff_heading(at) is None


def test_diff_follows_the_selected_edit_and_shows_what_a_reverted_edit_did(app_env):
    at = apply_edit(start())  # A: France -> Rome
    first = history(at)["id"][0]
    at.button(key="diff_selected").click()
    at = apply_edit(run(at), target="Madrid")  # B, on top of A
    second = history(at)["id"][1]
    assert selected_edit(at).value == second
    assert diff_heading(at) == f"Diff of edit {second} (active)"  # the diff follows the newest edit
    at.button(key="revert_selected").click()
    at = run(at)
    assert diff_heading(at) == f"Diff of edit {second} (reverted)"
    assert any("is not active (reverted)" in i.value for i in at.info)
    changes = table_with(at, "without the edit")
    # Not two identical columns, and not A's effect: the model now (A) against B re-applied.
    assert changes["without the edit"][0].startswith("Rome ")
    assert changes["with the edit"][0].startswith("Madrid ")
    selected_edit(at).select(first)
    at = run(at)
    assert diff_heading(at) == f"Diff of edit {first} (active)"
    changes = table_with(at, "without the edit")
    assert changes["with the edit"][0].startswith("Rome ")
    assert not changes["without the edit"][0].startswith("Rome ")


def test_probes_can_be_changed_and_persist(app_env):
    at = start()
    at.text_area(key="probes_text").input("The capital of Spain is\n\nThe capital of Japan is\n")
    at.button(key="save_probes").click()
    at = run(at)
    assert list(table_with(at, "probe")["probe"]) == ["The capital of Spain is", "The capital of Japan is"]
    st.cache_resource.clear()  # a restart keeps the list
    assert list(table_with(start(), "probe")["probe"]) == ["The capital of Spain is", "The capital of Japan is"]


@pytest.mark.parametrize(
    "prompt, target, message",
    [("", TARGET, "prompt is empty"), (PROMPT, "   ", "target is empty"), (PROMPT, "\u200b", "tokenizes to nothing")],
)
def test_bad_input_shows_an_inline_error(app_env, monkeypatch, prompt, target, message):
    if message == "tokenizes to nothing":  # no real tokenizer drops a whole target; make this one do so
        monkeypatch.setattr(request_module, "encode_target", lambda tok, p, t: [])
    at = apply_edit(start(), prompt, target)
    assert any(message in e for e in errors(at)), errors(at)
    assert not any("status" in t.value.columns for t in at.table)  # nothing was recorded


def test_method_that_cannot_be_built_shows_an_error(app_env, monkeypatch):
    def broken_build(config):
        raise RuntimeError("no checkpoint for this model")

    spec = MethodSpec("broken", factedit.core.methods.get_method("ft").config_cls, broken_build)
    monkeypatch.setitem(factedit.core.methods._REGISTERED, "broken", spec)
    at = apply_edit(start(), method="broken")
    assert any("no checkpoint for this model" in e for e in errors(at)), errors(at)
    at = apply_edit(at, method="ft_l")  # the other methods still work
    assert "**Rome**" in now_line(at)


def test_journal_persists_across_restarts_and_tabs(app_env):
    first = apply_edit(start())
    other_tab = start()  # a second session of the same server shares the state
    assert list(history(other_tab)["status"]) == ["active"]
    assert "**Rome**" in now_line(other_tab)
    st.cache_resource.clear()  # a restart: the state is released, the journal closed
    restarted = start()
    assert list(history(restarted)["status"]) == ["active"]
    assert "**Rome**" in now_line(restarted)  # replayed onto the freshly loaded model
    assert history(restarted)["id"][0] == history(first)["id"][0]


def test_journal_from_another_model_is_refused_inline(app_env):
    other, tok = tiny_model("llama", seed=1)
    with factedit.Editor("ft", tokenizer=tok, journal=app_env.journal, layers=[-1]) as editor:
        editor.edit(other, PROMPT, TARGET)
    at = start()
    assert any("journal cannot be used" in e and "other weights" in e for e in errors(at)), errors(at)
    at = apply_edit(at)
    assert any("The edit failed" in e for e in errors(at))
    at.button(key="new_journal").click()
    at = run(at)
    at = apply_edit(at)
    assert errors(at) == []
    assert "**Rome**" in now_line(at)
    assert app_env.journal.exists()  # the old journal is left as it was


def test_import_needs_a_file(app_env):
    at = apply_edit(start())
    at.button(key="import_apply").click()
    at = run(at)
    assert "Choose an edit file first." in errors(at)


def exported_edit(app_env, tmp_path) -> tuple[bytes, factedit.EditRecord]:
    """An edit file made on another copy of the app's model (the same weights)."""
    model, tok = factedit.load_model(str(app_env.model))
    editor = factedit.Editor("ft", tokenizer=tok, layers=[-1], lr=0.1, max_steps=10)
    record = editor.edit(model, PROMPT, TARGET)
    return editor.export_edit(record.id, tmp_path / "rome.safetensors").read_bytes(), record


def test_an_import_is_marked_keeps_its_timings_and_becomes_the_last_edit(app_env, tmp_path):
    data, original = exported_edit(app_env, tmp_path)
    at = apply_edit(start(), target="Berlin")
    at.button(key="revert_selected").click()
    at = run(at)
    at.file_uploader(key="import_file").set_value(("rome.safetensors", data, "application/octet-stream"))
    at = run(at)
    assert at.button(key="import_apply")  # choosing a file keeps the import section and its button
    at.button(key="import_apply").click()
    at = run(at)
    assert errors(at) == []
    frame = history(at)
    imported = frame.iloc[-1]
    assert imported["status"] == "active" and imported["method"] == "ft"
    assert imported["origin"].startswith(f"imported from {original.id}")
    assert imported["edit ms"] == pytest.approx(original.timings["edit_ms"], abs=1)
    assert frame.iloc[0]["origin"] == "edit"
    assert selected_edit(at).value == imported["id"]
    last = [m for m in markdown(at) if m.startswith("**Last edit**")]
    assert last == [f"**Last edit** `{imported['id']}` (ft, active, imported from edit `{original.id}`): "
                    "The capital of France is → **Rome**"]
    assert "**Rome**" in now_line(at)


def test_compare_methods_then_apply_one(app_env):
    at = start()
    original = now_line(at)
    at.multiselect(key="compare_methods").set_value(["ft_l", "ft"])  # the compare form's own fields
    at.text_input(key="compare_prompt").input(PROMPT)
    at.text_input(key="compare_target").input(TARGET)
    at.button(key="compare").click()
    at = run(at)
    assert errors(at) == []
    assert f"**Compared: {PROMPT} → {TARGET}**" in markdown(at)
    assert status_lines(at) == ["Compared 2 method(s): nothing applied; apply one below."]
    summary = table_with(at, "ft_l")
    assert list(summary.columns) == ["ft_l", "ft"]
    assert summary.loc["top answer with the edit", "ft"].startswith("Rome ")
    assert summary.loc["layers touched", "ft_l"] == "3"
    assert not any("status" in t.value.columns for t in at.table)  # nothing applied
    assert now_line(at) == original
    prompts = table_with(at, "now")
    assert list(prompts.columns) == ["now", "ft_l", "ft"] and len(prompts) == 3  # the prompt and two probes
    at.button(key="apply_preview:ft").click()
    at = run(at)
    assert errors(at) == []
    frame = history(at)
    assert list(frame["method"]) == ["ft"] and frame["origin"][0] == "previewed, applied as computed"
    assert "**Rome**" in now_line(at)
    assert at.button(key="apply_preview:ft_l").disabled  # fitted to weights that changed since
    assert any("weights changed since this comparison" in i.value for i in at.info)
    health = next(m for m in markdown(at) if m.startswith("**Model health**"))
    assert "**1** active edit(s) of 1" in health and re.search(r"drift \*\*\d\.\d{3}×\*\*", health)


def test_the_guards_refusal_is_shown_in_the_header(app_env):
    app_env.config.write_text(TEST_CONFIG + "guard_max_ratio: 1.0000001\n")
    at = apply_edit(start())
    assert any("refused by the drift guard" in e for e in errors(at)), errors(at)
    assert any(e.startswith("The drift guard refused the ft_l edit of 'The capital of France is'")
               for e in errors(at))
    assert not any("status" in t.value.columns for t in at.table)  # nothing recorded
    health = next(m for m in markdown(at) if m.startswith("**Model health**"))
    assert "**0** active edit(s)" in health


def the_applied_edit(at: AppTest, app_env) -> factedit.EditRecord:
    """Apply the page's edit with its settings; the journal's one record."""
    at = apply_edit(run(at))
    assert errors(at) == []
    st.cache_resource.clear()  # closes the journal, to read it here
    with factedit.editing.journal.Journal(app_env.journal) as journal:
        (record,) = journal.records(deltas=False)
    return record


def test_method_settings_descriptions_and_help(app_env):
    at = start()
    assert any(c.value.startswith("Constrained fine-tuning (FT+L)") for c in at.caption)
    lr = at.text_input(key="setting:ft_l:lr")
    assert lr.value == "0.1" and lr.label == "Learning rate"  # factedit/conf/app.yaml's value, a human label
    assert lr.help == "Adam learning rate (setting `lr`)"  # FTConfig's own help, and the field's name
    at.text_input(key="setting:ft_l:max_steps").input("2")
    at.text_input(key="setting:ft_l:lr").input("fast")
    at = run(at)
    assert any("These settings would be refused" in e and "lr" in e for e in errors(at))
    at.text_input(key="setting:ft_l:lr").input("0.1")
    at.text_input(key="setting:ft_l:max_steps").input("100000")  # past the bound a caller may set
    at = run(at)
    assert any("would be refused" in e and "max_steps must be between 1 and 200" in e for e in errors(at))
    at.text_input(key="setting:ft_l:max_steps").input("2")
    record = the_applied_edit(at, app_env)
    assert record.config["max_steps"] == 2 and record.config["lr"] == 0.1


def test_a_flag_setting_reads_true_or_false():
    from editapp.methods import parse_value

    assert parse_value("True", False, "bool") is True and parse_value(" off ", True, "bool") is False
    assert parse_value("yes", False, "bool") is True
    with pytest.raises(factedit.ConfigError, match="not true or false"):
        parse_value("maybe", False, "bool")


def test_a_nested_config_setting_reads_on_or_off():
    from editapp.methods import format_value, parse_value

    configured = {"seeds": ["The"], "tokens": 8}
    assert format_value(configured) == "on" and format_value(None) == ""
    assert parse_value("on", configured, "PrefixConfig | None") == configured  # as configured
    assert parse_value("on", None, "PrefixConfig | None") == {}  # the nested config's defaults
    assert parse_value("off", configured, "PrefixConfig | None") is None
    assert parse_value("", configured, "PrefixConfig | None") is None
    with pytest.raises(factedit.ConfigError, match="not on or off"):
        parse_value("some", None, "PrefixConfig | None")


def test_mend_contexts_are_offered_and_checked(app_env):
    at = start()
    at.selectbox(key="edit_method").select("mend")
    at = run(at)
    prefixes = at.text_input(key="setting:mend:prefixes")
    assert prefixes.value == "on" and prefixes.label == "Also edit under contexts the model writes"
    assert "on / off" in prefixes.help
    assert at.text_input(key="setting:mend:prefix_rows").value == "mean_follow"
    at.text_input(key="setting:mend:prefix_rows").input("sometimes")
    at = run(at)
    assert any("would be refused" in e and "prefix_rows" in e for e in errors(at))
    at.text_input(key="setting:mend:prefix_rows").input("checked")
    at.text_input(key="setting:mend:prefixes").input("off")
    at = run(at)
    assert not any("would be refused" in e for e in errors(at))


def test_contexts_set_on_the_page_reach_the_edit(app_env):
    at = start()
    at.selectbox(key="edit_method").select("ultraedit")
    at = run(at)
    assert at.text_input(key="setting:ultraedit:prefixes").value == ""  # off for ultraedit
    at.text_input(key="setting:ultraedit:prefixes").input("on")
    at.text_input(key="setting:ultraedit:prefix_rows").input("mean_follow")
    record = the_applied_edit(at, app_env)
    assert record.config["prefix_rows"] == "mean_follow"
    assert record.config["prefixes"] == config_to_dict(PrefixConfig())


def test_probes_are_flagged_by_probability_shift():
    from editapp.probes_view import probe_frame

    def row(before, after, flipped):
        top = [{"token": " Rome", "id": 1, "prob": after}]
        return {"prompt": "The capital of Italy is", "before": [{"token": " Rome", "id": 1, "prob": before}],
                "after": top, "flipped": flipped, "shift": after - before,
                "shift_token": {"token": " Rome", "id": 1, "before": before, "after": after}}

    italy = row(0.380, 0.545, False)  # the same top answer, 0.165 more likely
    assert probe_frame([italy], 0.1)["flag"][0] == "moved"
    assert probe_frame([italy], 0.2)["flag"][0] == ""
    assert probe_frame([row(0.5, 0.45, True)], 0.2)["flag"][0] == "top changed"
    assert probe_frame([{**italy, "before": None}], 0.1)["flag"][0] == ""  # a probe added since


def test_try_the_model_without_and_with_the_selected_edit(app_env):
    at = apply_edit(start())
    edit_id = history(at)["id"][0]
    at.radio(key="try_mode").set_value("Plain continuation")
    at = run(at)
    at.text_area(key="try_prompt").input("The capital of France is")
    at.slider(key="try_tokens").set_value(5)
    at.button(key="try_generate").click()
    at = run(at)
    heads = [m for m in markdown(at) if m.startswith(("**Without edit", "**With edit"))]
    assert len(heads) == 2 and edit_id in heads[0] and "next token" in heads[1]
    assert "next token Rome" in heads[1] and "Rome" not in heads[0]
    texts = [c.value for c in at.code if c.value.startswith("The capital of France is")]
    assert len(texts) >= 2
    at.button(key="revert_selected").click()
    at = run(at)  # refreshed for the new weights: the reverted edit is shown re-applied
    heads = [m for m in markdown(at) if m.startswith(("**Without edit", "**With edit"))]
    assert "the edit is reverted" in heads[0] and "re\\-applied" in heads[1] and "next token Rome" in heads[1]


def test_export_and_import_through_the_service(app_env, tmp_path):
    service = EditSession(load_app_config())
    try:
        record = service.edit("ft_l", PROMPT, TARGET).record
        data = service.export_edit(record.id)
        service.revert(record.id)
        imported = service.import_edit(data, name="rome.safetensors")
        assert imported.id != record.id and imported.method == "ft_l"
        origin = service.origin(imported.id)
        assert origin["source_id"] == record.id and origin["timings"] == dict(record.timings)
        assert service.predict(PROMPT).top[0]["token"] == " Rome"
        assert service.last_change["kind"] == "import" and service.last_change["edit_ids"] == [imported.id]
        assert service.predict(PROMPT).top[0]["token"] == " Rome"
        with pytest.raises(factedit.InvalidDeltaError):
            service.import_edit(b"not a safetensors file")
        other, tok = tiny_model("llama", seed=1)
        editor = factedit.Editor("ft", tokenizer=tok, layers=[-1])
        foreign = editor.export_edit(editor.edit(other, PROMPT, TARGET).id, tmp_path / "foreign.safetensors")
        with pytest.raises(factedit.ModelMismatchError):
            service.import_edit(foreign.read_bytes())
        assert [r.status for r in service.history()] == ["reverted", "active"]
    finally:
        service.close()


def test_paraphrases_and_locality_are_reported(app_env):
    at = start()
    at.text_area(key="edit_paraphrases").input("The capital city of France is")
    at.text_area(key="edit_locality").input("The capital of Germany is\nWater boils at one hundred")
    at = apply_edit(at)
    assert errors(at) == []
    paraphrases = table_with(at, "paraphrase")
    assert list(paraphrases["paraphrase"]) == ["The capital city of France is"]
    locality = table_with(at, "locality prompt")
    assert list(locality["locality prompt"]) == ["The capital of Germany is", "Water boils at one hundred"]


def test_markdown_in_prompts_is_shown_as_typed(app_env):
    at = apply_edit(start(), prompt="The *price* is $5 and", target="ten")
    assert errors(at) == []
    assert now_line(at).startswith(r"Now: The \*price\* is \$5 and → top prediction")


def test_settings_file_and_environment(tmp_path):
    shipped = load_app_config({})  # configs/app.yaml as shipped
    assert shipped.model == "default" and shipped.default_method is None  # chosen for the model: MethodSwitch
    assert shipped.journal_path.name == "edits-default.sqlite"
    env = {"FACTEDIT_APP_MODEL": "/models/x", "FACTEDIT_APP_JOURNAL": str(tmp_path / "j.sqlite"),
           "FACTEDIT_APP_THREADS": "0"}
    config = load_app_config(env)
    assert (config.model, config.journal_path, config.torch_threads) == ("/models/x", tmp_path / "j.sqlite", None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: default\n")
    with pytest.raises(factedit.ConfigError, match="unknown app setting"):
        load_app_config({"FACTEDIT_APP_CONFIG": str(bad)})


def health_line(at: AppTest) -> str:
    return next(m for m in markdown(at) if m.startswith("**Model health**"))


def test_preview_then_confirm_applies_exactly_the_previewed_edit(app_env):
    at = start()
    original = now_line(at)
    at.button(key="preview_edit").click()
    at = run(at)
    assert errors(at) == [] and now_line(at) == original  # computed and shown, nothing applied
    assert not any("status" in t.value.columns for t in at.table)
    assert status_lines(at)[0].startswith("Previewed the ft_l edit in ")
    assert f"**Preview of the ft_l edit** {PROMPT} → **Rome** · nothing is applied yet" in markdown(at)
    preview = at.session_state["preview"]["preview"]
    top = preview.edit_row["after"][0]
    assert top["token"] == " Rome"
    assert any(s.value.startswith("With this edit the model would answer **Rome**") for s in at.success) or any(
        w.value.startswith("A weak flip. With this edit the model would answer **Rome**") for w in at.warning)
    rows = table_with(at, "with the edit")
    assert list(rows["what"])[:3] == ["edit", "probe", "probe"] and rows["prompt"].iloc[0] == PROMPT
    at.button(key="confirm_preview").click()
    at = run(at)
    assert errors(at) == [] and status_lines(at) == [f"Edit {history(at)['id'][0]} applied."]
    frame = history(at)
    assert list(frame["origin"]) == ["previewed, applied as computed"] and list(frame["method"]) == ["ft_l"]
    # The weights now give exactly the previewed probability: the previewed delta, not a new computation.
    assert now_line(at).endswith(f"top prediction **Rome** (p = {top['prob']:.3f})")
    assert "preview" not in at.session_state and not at.button(key="apply_edit").disabled


def test_discarding_a_preview_changes_nothing(app_env):
    at = start()
    at.button(key="preview_edit").click()
    at = run(at)
    at.button(key="discard_preview").click()
    at = run(at)
    assert not any(m.startswith("**Preview of") for m in markdown(at))
    assert not any("status" in t.value.columns for t in at.table)


def test_a_preview_says_in_plain_words_which_probe_it_would_break():
    from editapp.preview_view import verdict

    def row(kind, prompt, target, before, after, old_before, old_after, flipped):
        return {"kind": kind, "prompt": prompt, "target": target, "before": before, "after": after,
                "old": {"token": old_before[0]["token"], "id": 1, "before": old_before[0]["prob"], "after": old_after},
                "flipped": flipped, "shift": -0.766, "target_before": 0.001 if target else None,
                "target_after": 0.176 if target else None,
                "shift_token": {"token": " Berlin", "id": 2, "before": 0.796, "after": 0.030}}

    paris, rome, berlin = [{"token": " Paris", "prob": 0.773}], [{"token": " Rome", "prob": 0.176}], \
        [{"token": " Berlin", "prob": 0.796}]
    rows = [row("edit", PROMPT, " Rome", paris, rome, paris, 0.142, True),
            row("probe", "The capital of Germany is", None, berlin, [{"token": " Rome", "prob": 0.41}], berlin, 0.030,
                True)]
    preview = SimpleNamespace(rows=rows, edit_row=rows[0], drift=None)
    lines = verdict(preview, {"The capital of Germany is": "same relation"}, 0.1)
    # The case: Rome 0.176 against Paris 0.142 is a flip, but a weak one.
    assert lines[0] == ("warning", "A weak flip. With this edit the model would answer **Rome** (p 0.176, before "
                                   "0.001); **Paris** falls 0.773 → 0.142.")
    assert lines[1] == ("warning", "It would also change a neighbour (same relation) “The capital of Germany is”: its "
                                   "answer goes from **Berlin** (0.796) to **Rome** (0.410); Berlin falls to 0.030.")
    assert verdict(preview, {}, 0.1)[1][1].startswith("It would also change the probe “The capital of Germany is”")
    assert verdict(SimpleNamespace(rows=rows[:1], edit_row=rows[0], drift=None), {}, 0.1)[1][0] == "success"
    guarded = SimpleNamespace(rows=rows[:1], edit_row=rows[0], drift=2.04, max_drift=1.5, guard_refuses=True)
    assert verdict(guarded, {}, 0.1)[1] == (
        "warning", "The drift guard would refuse this edit: the perplexity of the reference text would be **2.040×** "
                   "the base model's (the guard allows 1.5×). Try another method or other settings.")


def test_a_preview_the_guard_would_refuse_says_so_and_cannot_be_applied(app_env):
    app_env.config.write_text(TEST_CONFIG + "guard_max_ratio: 1.0000001\n")
    at = start()
    at.button(key="preview_edit").click()
    at = run(at)
    assert errors(at) == []
    assert any(w.value.startswith("The drift guard would refuse this edit") for w in at.warning), \
        [w.value for w in at.warning]
    assert at.button(key="confirm_preview").disabled
    assert not any("status" in t.value.columns for t in at.table)  # nothing applied


def test_automatic_neighbours_of_the_same_relation_and_subject():
    from editapp.neighbours import SAME_RELATION, SAME_SUBJECT, neighbours

    probes = ["The capital of Germany is", "The official language of Spain is", "The Eiffel Tower is located in"]
    assert neighbours(PROMPT, probes) == {
        "The capital of Germany is": SAME_RELATION, "The official language of France is": SAME_SUBJECT,
        "The capital of Spain is": SAME_RELATION}
    assert neighbours(PROMPT, probes, known=probes) == {  # prompts scored anyway are not repeated
        "The official language of France is": SAME_SUBJECT, "The capital of Spain is": SAME_RELATION}
    assert neighbours("water boils at", probes) == {}  # no subject found: no neighbours


def test_the_status_line_states_the_outcome(app_env):
    at = apply_edit(start(), prompt="", target=TARGET)
    assert status_lines(at) == ["The edit failed: see below."]
    assert not any(c.value == "Done." for c in at.caption)
    at = apply_edit(at)
    assert status_lines(at) == [f"Edit {history(at)['id'][0]} applied."]


def test_health_is_measured_again_after_every_change_and_names_the_journal(app_env):
    at = start()
    header = next(c.value for c in at.caption if c.value.startswith("model "))
    assert "journal `journal.sqlite`" in header and str(app_env.journal.parent) not in header
    assert "drift **1.000×**" in health_line(at) and "no change since the app started" in health_line(at)
    at = apply_edit(at)
    edit_id = history(at)["id"][0]
    assert f"measured after the edit `{edit_id}`" in health_line(at)
    assert "perplexity of 4 reference texts (24 tokens each) over the base model's" in health_line(at)
    at.button(key="revert_selected").click()
    at = run(at)
    health = health_line(at)
    assert f"measured after the revert of `{edit_id}`" in health
    assert "drift **1.000×**" in health  # the base weights again, bit for bit: exactly the base perplexity


def test_an_empty_try_prompt_says_so(app_env):
    at = start()
    at.radio(key="try_mode").set_value("Plain continuation")
    at = run(at)
    at.text_area(key="try_prompt").input("  ")
    at.button(key="try_generate").click()
    at = run(at)
    assert any(w.value.startswith("The prompt is empty") for w in at.warning)


@pytest.fixture
def chat_env(app_env, tmp_path_factory, monkeypatch):
    """The app on the tiny model saved with a chat template (tiny_models.CHAT_TEMPLATE)."""
    from tiny_models import CHAT_TEMPLATE

    folder = save_tiny_model(tmp_path_factory.mktemp("tiny_chat") / "llama", chat_template=CHAT_TEMPLATE)
    monkeypatch.setenv("FACTEDIT_APP_MODEL", str(folder))
    return app_env


def ask(at: AppTest, question: str) -> AppTest:
    at.text_input(key="chat_question").input(question)
    at.slider(key="chat_tokens").set_value(8)
    at.button(key="chat_ask").click()
    return run(at)


def test_chat_view_replies_without_and_with_the_edit(chat_env):
    at = apply_edit(start())
    edit_id = history(at)["id"][0]
    assert at.radio(key="try_mode").value == "Chat"  # the chat is the first view
    at = ask(at, "Which city is the capital of France?")
    assert errors(at) == []
    heads = [m for m in markdown(at) if m.startswith(("**Without edit", "**With edit"))]
    assert heads == [f"**Without edit {edit_id}** (its weights removed)", f"**With edit {edit_id}** (the model now)"]
    edited = dict(at.session_state["chat_replies"]["replies"])  # now: streamed with the edit; other: without
    at.button(key="revert_selected").click()
    at = run(at)  # the weights changed: the replies are kept, marked as older than the change
    assert any(i.value.startswith("These replies were made before the last change") for i in at.info)
    assert not any(m.startswith(("**Without edit", "**With edit")) and "(before the change)" not in m
                   for m in markdown(at))
    at.button(key="chat_ask").click()
    at = run(at)  # asked again: the sides swap engines
    heads = [m for m in markdown(at) if m.startswith(("**Without edit", "**With edit"))]
    assert heads == [f"**Without edit {edit_id}** (the model now)",
                     f"**With edit {edit_id}** (re-applied on the current weights)"]
    reverted = at.session_state["chat_replies"]["replies"]
    # The generation engine (streamed) and the toggled weights' greedy generation agree on the same weights.
    assert reverted["now"] == edited["other"] and reverted["other"] == edited["now"]


def test_chat_view_says_when_the_question_is_empty_or_there_is_no_template(chat_env, app_env, tiny_dir,
                                                                           monkeypatch):
    at = ask(start(), " ")
    assert any(w.value.startswith("The question is empty") for w in at.warning)
    st.cache_resource.clear()
    monkeypatch.setenv("FACTEDIT_APP_MODEL", str(tiny_dir))  # saved without a chat template
    at = start()
    assert any("has no chat template" in i.value for i in at.info)


def test_progress_shows_for_methods_with_and_without_steps():
    from editapp.progress import Ticker

    drawn = []
    slot = SimpleNamespace(progress=lambda value, text: drawn.append((round(value, 3), text)))
    with Ticker(slot, "Previewing the mend edit") as ticker:  # a one-pass method: seconds, no steps
        assert drawn[-1] == (0.0, "Previewing the mend edit… 0 s")
    with Ticker(slot, "Comparing 2/2: lora", start=0.5, share=0.5) as ticker:
        ticker.report(10, 20, 0.25)  # a method that reports steps: placed in its share of the bar
    assert drawn[-1] == (0.75, "Comparing 2/2: lora: step 10/20, loss 0.250 · 0 s")


def test_tokens_are_shown_as_people_read_them():
    from editapp.tokens import readable, readable_all

    assert [readable(t) for t in (" Paris", "Rome", "<|im_end|>", "<|endoftext|>", "\n", "\n\n", " ", "\ufffd")] == [
        "Paris", "Rome", "(end of turn)", "(end of text)", "(new line)", "(2 new lines)", "(space)",
        "(part of a character)"]
    assert readable_all([" Paris", "Paris", " Rome"]) == ["␣Paris", "Paris", "Rome"]  # the space tells them apart


def test_compare_preselects_the_configured_methods(app_env):
    app_env.config.write_text(TEST_CONFIG + "compare_methods: [ft, lora, no_such_method]\n")
    assert start().multiselect(key="compare_methods").value == ["ft", "lora"]  # the registered ones
