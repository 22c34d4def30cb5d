"""The `factedit` CLI on a tiny model saved to a folder: edit, history, diff, revert across runs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_model

from factedit import cli
from factedit.editing.journal import Journal


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny_model(tmp_path / "tiny-llama")


def run(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def test_edit_history_diff_revert_each_reloading_and_replaying(model_dir, tmp_path, capsys):
    journal = str(tmp_path / "edits.sqlite")
    ft = ["--set", "layers=[-1]", "--set", "lr=0.01", "--set", "max_steps=40"]
    out = run(capsys, "edit", "--prompt", "The capital of France is", "--target", "Rome", "--method", "ft",
              "--journal", journal, "--model", str(model_dir), *ft, "--json")
    first = json.loads(out)
    assert first["post"]["requests"][0]["target_is_argmax"] and first["model_id"] == str(model_dir)
    second = json.loads(run(capsys, "edit", "--prompt", "The capital of Italy is", "--target", "Berlin",
                            "--journal", journal, *ft, "--json"))
    assert second["method"] == "ft"  # the journal's last method carries over

    history = run(capsys, "history", "--journal", journal)
    assert first["id"] in history and second["id"] in history and "active" in history
    diff = run(capsys, "diff", first["id"], "--journal", journal, "--probe", "The capital of Germany is")
    assert "model.layers.3.mlp.down_proj.weight" in diff and "The capital of Germany is" in diff

    assert first["id"] in run(capsys, "revert", first["id"], "--journal", journal)
    statuses = [r["status"] for r in json.loads(run(capsys, "history", "--journal", journal, "--json"))]
    assert statuses == ["reverted", "active"]

    # What a CLI run replays is the base plus the active delta, bit for bit: the merged model another
    # run writes equals that sum computed here from the saved base and the journal's stored delta.
    run(capsys, "export", "--journal", journal, "--format", "merged", str(tmp_path / "merged"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(model_dir / "model.safetensors"))
    with Journal(journal) as opened:
        (active,) = [r for r in opened.records() if r.status == "active"]
    assert active.id == second["id"] and set(merged) == set(base)
    for name, value in base.items():
        expected = value + active.delta.params[name].materialize(value.dtype) if name in active.params else value
        assert torch.equal(merged[name], expected), name

    run(capsys, "revert", second["id"], "--journal", journal)


def test_errors_are_one_clear_line_and_a_nonzero_exit(model_dir, tmp_path, capsys):
    journal = str(tmp_path / "edits.sqlite")
    code = cli.main(["edit", "--prompt", "", "--target", "Rome", "--journal", journal, "--model", str(model_dir)])
    assert code == 2 and "prompt is empty" in capsys.readouterr().err
    code = cli.main(["revert", "nope", "--journal", journal])
    assert code == 2 and "nope" in capsys.readouterr().err
    notajournal = tmp_path / "x.sqlite"
    notajournal.write_text("hello")
    assert cli.main(["history", "--journal", str(notajournal)]) == 2
    assert "not a factedit journal" in capsys.readouterr().err


def test_read_commands_do_not_create_a_misspelled_journal(model_dir, tmp_path, capsys):
    typo = tmp_path / "typo.sqlite"
    for argv in (["history", "--journal", str(typo)], ["revert", "abc", "--journal", str(typo)],
                 ["diff", "abc", "--journal", str(typo)]):
        assert cli.main(argv) == 2
        assert "no journal at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [model_dir]


@pytest.mark.parametrize("override, match", [("foo=1", "unknown train-mend key"), ("lr=abc", "key 'lr'"),
                                             ("max_steps=0", "max_steps")])
def test_train_mend_refuses_a_bad_config_before_loading_anything(override, match, capsys, monkeypatch):
    from factedit.mend import train

    monkeypatch.setattr(train, "train", lambda cfg: pytest.fail("training started"))
    assert cli.main(["train-mend", "--config-name", "tiny", override]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and re.search(match, err) and "Traceback" not in err
