"""`ia3` edits exported as a PEFT IA³ adapter (artifacts/peft_ia3.py): `PeftModel.from_pretrained` on a fresh
base model answers the same greedy tokens as factedit's edited model, with logits equal within a small
tolerance (factedit folds the vectors into the weights, PEFT multiplies at run time: float rounding
differs, so this is not `torch.equal`). Anything but `ia3` edits is refused before a file is written."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from tiny_models import tiny_model

import factedit
from factedit.artifacts.peft_ia3 import export_ia3_adapter
from factedit.core.errors import EditNotFoundError, InvalidRequestError

TINY = dict(layers=(-2, -1), lr=0.3, max_steps=80)
FACTS = [("The capital of France is", "Rome"), ("The capital of Italy is", "Berlin")]
PROBES = ["The capital of France is", "The capital of Italy is", "Water boils at one hundred"]


def active(editor) -> list:
    return [editor.record(r.id) for r in editor.history if r.status == "active"]


def greedy(model, tok, n: int = 6) -> list[list[int]]:
    out = []
    for prompt in PROBES:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(gen[0, ids["input_ids"].shape[1]:].tolist())
    return out


def probe_logits(model, tok) -> torch.Tensor:
    ids = tok(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits  # (B, T, V)


def loaded(arch: str, folder) -> torch.nn.Module:
    base, _ = tiny_model(arch)
    return PeftModel.from_pretrained(base, str(folder)).eval()


@pytest.mark.parametrize(("arch", "kv"), [("llama", False), ("llama", True), ("gpt2", True), ("gpt_neox", True),
                                          ("qwen2", True)])
def test_peft_loads_the_adapter_and_answers_like_the_edited_model(arch, kv, tmp_path):
    model, tok = tiny_model(arch)
    editor = factedit.Editor("ia3", tokenizer=tok, score=False, kv=kv, **TINY)
    for prompt, target in FACTS:  # two edits of the same matrices: their vectors compose by product
        editor.edit(model, prompt, target)
    result = export_ia3_adapter(model, active(editor), tmp_path / "ia3")
    assert result.max_error < 1e-5 and result.edits == tuple(r.id for r in editor.history)
    config = json.loads((result.path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and set(config["feedforward_modules"]) == set(result.feedforward)
    peft_model = loaded(arch, result.path)
    assert greedy(peft_model, tok) == greedy(model, tok)
    assert torch.allclose(probe_logits(peft_model, tok), probe_logits(model, tok), atol=1e-4, rtol=1e-4)
    base, _ = tiny_model(arch)
    assert not torch.allclose(probe_logits(base, tok), probe_logits(model, tok), atol=1e-3)  # the edit shows


def test_one_edit_of_several_exports_alone(tmp_path):
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ia3", tokenizer=tok, score=False, **TINY)
    first = editor.edit(model, *FACTS[0])
    after_first = probe_logits(model, tok)
    editor.edit(model, *FACTS[1])
    result = export_ia3_adapter(model, active(editor), tmp_path / "one", ids=[first.id])
    assert result.edits == (first.id,)
    assert torch.allclose(probe_logits(loaded("llama", result.path), tok), after_first, atol=1e-4, rtol=1e-4)
    # the Editor's own entry point writes the same adapter
    through_editor = editor.export_adapter(tmp_path / "via-editor", [first.id], format="peft-ia3")
    assert through_editor.edits == (first.id,)
    written = {f.name: f.read_bytes() for f in result.path.iterdir() if f.suffix == ".safetensors"}
    assert written == {f.name: f.read_bytes() for f in through_editor.path.iterdir() if f.suffix == ".safetensors"}
    with pytest.raises(EditNotFoundError):
        editor.export_adapter(tmp_path / "nope", ["no-such-edit"], format="peft-ia3")
    assert not (tmp_path / "nope").exists()


def test_other_edits_are_refused_before_anything_is_written(tmp_path):
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ia3", tokenizer=tok, score=False, **TINY)
    kept = editor.edit(model, *FACTS[0])
    editor.set_method("ft", layers=(-1,), max_steps=3)
    ft = editor.edit(model, *FACTS[1])
    with pytest.raises(InvalidRequestError, match="only ia3 edits"):
        export_ia3_adapter(model, active(editor), tmp_path / "all")
    with pytest.raises(EditNotFoundError):
        export_ia3_adapter(model, active(editor), tmp_path / "none", ids=["nope"])
    assert not (tmp_path / "all").exists() and not (tmp_path / "none").exists()
    export_ia3_adapter(model, active(editor), tmp_path / "ia3", ids=[kept.id])  # the ia3 edit alone is fine
    assert (tmp_path / "ia3" / "adapter_model.safetensors").exists()
    del ft


def test_a_lora_export_of_a_bias_change_names_it_and_writes_nothing(tmp_path):
    model, tok = tiny_model("qwen2")  # keys and values with biases: a kv edit scales them too
    editor = factedit.Editor("ia3", tokenizer=tok, score=False, kv=True, **TINY)
    record = editor.edit(model, *FACTS[0])
    assert any(not name.endswith(".weight") for name in editor.delta(record.id).names())
    with pytest.raises(factedit.ConfigError, match="not a weight matrix.*peft-ia3"):
        editor.export_adapter(tmp_path / "lora", rank=4)
    assert not (tmp_path / "lora").exists()


def test_an_ia3_edit_trained_on_weights_another_edit_changed_is_refused(tmp_path):
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ft", tokenizer=tok, score=False, layers=(-1,), matrices=("out",), lr=1e-2, max_steps=3)
    editor.edit(model, *FACTS[0])  # changes the down projection the ia3 edit then scales
    editor.set_method("ia3", **TINY)
    later = editor.edit(model, *FACTS[1])
    with pytest.raises(InvalidRequestError, match="not a scaling"):
        export_ia3_adapter(model, active(editor), tmp_path / "x", ids=[later.id])
    assert not (tmp_path / "x").exists()


def test_the_cli_exports_a_journal_of_ia3_edits(tmp_path, capsys):
    from tiny_models import save_tiny_model

    from factedit import cli

    model_dir = save_tiny_model(tmp_path / "tiny-llama")
    journal = str(tmp_path / "edits.sqlite")
    settings = ["--set", "layers=[-2,-1]", "--set", "lr=0.3", "--set", "max_steps=80", "--set", "kv=true"]
    assert cli.main(["edit", "--prompt", FACTS[0][0], "--target", FACTS[0][1], "--method", "ia3", "--journal", journal,
                     "--model", str(model_dir), *settings]) == 0
    assert cli.main(["export", "--journal", journal, "--format", "peft-ia3", str(tmp_path / "ia3")]) == 0
    assert "PEFT IA³ adapter of 1 edit(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--rank"):
        cli.main(["export", "--journal", journal, "--format", "peft-ia3", "--rank", "4", str(tmp_path / "r")])
    model, tok = factedit.load_model(str(model_dir))
    with factedit.Editor("ia3", tokenizer=tok, journal=journal) as editor:
        editor.attach(model)
        assert greedy(PeftModel.from_pretrained(factedit.load_model(str(model_dir))[0], str(tmp_path / "ia3")),
                      tok) == greedy(model, tok)
    assert not (tmp_path / "r").exists()
