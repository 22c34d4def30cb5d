"""The Streamlit app (apps/app.py), driven by Streamlit's AppTest on a tiny random Llama saved to disk.

Each test gets its own journal and settings (FACTEDIT_APP_* environment variables), so its shared
app state is its own; the state is released (journal closed) after every test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest
from tiny_models import tiny_model

import factedit
from factedit.editing import request as request_module
from factedit.editing.methods import MethodSpec
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
    model, tok = tiny_model("llama")
    path = tmp_path_factory.mktemp("tiny") / "llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


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


def history(at: AppTest):
    return table_with(at, "status")


def test_edit_shows_before_after_probes_and_history(app_env):
    at = start()
    before = now_line(at)
    assert "' Rome'" not in before
    at = apply_edit(at)
    assert errors(at) == []
    assert any("applied with ft_l" in s.value for s in at.success)
    assert any(m.startswith("**After:** top prediction ' Rome'") for m in markdown(at))
    assert any(m.startswith("**Before:**") for m in markdown(at))
    assert "top prediction ' Rome'" in now_line(at)
    frame = history(at)
    assert list(frame["status"]) == ["active"] and list(frame["method"]) == ["ft_l"]
    assert frame["prompt"][0] == PROMPT and frame["old → new"][0].endswith("→ 'Rome'")
    assert frame["edit ms"][0] > 0
    probes = table_with(at, "probe")  # the probe table: the edited prompt's answer changed
    france = probes[probes["probe"] == PROMPT].iloc[0]
    assert france["changed"] == "changed" and france["answer now"].startswith("' Rome'")


def test_revert_one_and_revert_all(app_env):
    at = start()
    original = now_line(at)
    at = apply_edit(at)
    assert "' Rome'" in now_line(at)
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


def test_diff_of_an_edit(app_env):
    at = apply_edit(start())
    at.button(key="diff_selected").click()
    at = run(at)
    assert any(h.value.startswith("Diff of edit") for h in at.subheader)
    params = table_with(at, "parameter")
    assert list(params["parameter"]) == ["model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.down_proj.weight"]
    assert int(params["rank"][0]) >= 1
    changes = table_with(at, "without the edit")
    assert changes["prompt"][0] == PROMPT and changes["changed"][0] == "changed"
    at.button(key="hide_diff").click()
    at = run(at)
    assert not any(h.value.startswith("Diff of edit") for h in at.subheader)


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

    spec = MethodSpec("broken", factedit.editing.methods.get_method("ft").config_cls, broken_build)
    monkeypatch.setitem(factedit.editing.methods._REGISTERED, "broken", spec)
    at = apply_edit(start(), method="broken")
    assert any("no checkpoint for this model" in e for e in errors(at)), errors(at)
    at = apply_edit(at, method="ft_l")  # the other methods still work
    assert "' Rome'" in now_line(at)


def test_journal_persists_across_restarts_and_tabs(app_env):
    first = apply_edit(start())
    other_tab = start()  # a second session of the same server shares the state
    assert list(history(other_tab)["status"]) == ["active"]
    assert "' Rome'" in now_line(other_tab)
    st.cache_resource.clear()  # a restart: the state is released, the journal closed
    restarted = start()
    assert list(history(restarted)["status"]) == ["active"]
    assert "' Rome'" in now_line(restarted)  # replayed onto the freshly loaded model
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
    assert "' Rome'" in now_line(at)
    assert app_env.journal.exists()  # the old journal is left as it was


def test_import_needs_a_file(app_env):
    at = apply_edit(start())
    at.button(key="import_apply").click()
    at = run(at)
    assert "Choose an edit file first." in errors(at)


def test_export_and_import_through_the_service(app_env, tmp_path):
    service = EditSession(load_app_config())
    try:
        record = service.edit("ft_l", PROMPT, TARGET).record
        data = service.export_edit(record.id)
        service.revert(record.id)
        imported = service.import_edit(data)
        assert imported.id != record.id and imported.method == "ft_l"
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
    assert shipped.model == "default" and shipped.default_method in factedit.available_methods()
    assert shipped.journal_path.name == "edits-default.sqlite"
    env = {"FACTEDIT_APP_MODEL": "/models/x", "FACTEDIT_APP_JOURNAL": str(tmp_path / "j.sqlite"),
           "FACTEDIT_APP_THREADS": "0"}
    config = load_app_config(env)
    assert (config.model, config.journal_path, config.torch_threads) == ("/models/x", tmp_path / "j.sqlite", None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: default\n")
    with pytest.raises(factedit.ConfigError, match="unknown app setting"):
        load_app_config({"FACTEDIT_APP_CONFIG": str(bad)})
