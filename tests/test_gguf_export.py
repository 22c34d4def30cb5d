"""GGUF exports (gguf_export.py) on tiny random models, without llama.cpp: tensor names, shapes, metadata,
round trips through gguf-py's reader, and refusal of what a GGUF file cannot hold. The real engine runs in
tests/test_llama_cpp.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import ARCHS, save_tiny_model, tiny_model

import factedit
from factedit import cli
from factedit.artifacts import gguf_export
from factedit.artifacts.gguf_export import (
    ARTIFACT_KEY,
    export_gguf_lora,
    gguf_architecture,
    gguf_tensor_name,
    read_gguf_lora,
)
from factedit.core.delta import Delta, ParamDelta
from factedit.core.errors import ConfigError, InvalidDeltaError, ModelMismatchError
from factedit.core.record import EditRecord
from factedit.core.request import EditRequest
from factedit.model.specs import mlp_param_names, num_layers, spec_for, weight_layout

FACTS = [("The capital of France is", "Rome"), ("The capital of Italy is", "Berlin")]
LORA = dict(layers=(-1,), matrices=("act", "out"), rank=4, lr=3e-2, max_steps=10, preserve=None)
FT_L = dict(layers=(-1,), matrices=("in", "out"), lr=1e-2, max_steps=10, preserve=None)
Q8_0 = gguf.GGMLQuantizationType.Q8_0
F32 = gguf.GGMLQuantizationType.F32


def out_in(model, name: str, weight: torch.Tensor) -> torch.Tensor:
    return weight.T if weight_layout(model, name) == "in_out" else weight


def quantize_mlp_in_place(model, qtype=Q8_0) -> None:
    """Round the model's MLP matrices through `qtype`, as a model loaded from a quantized GGUF is."""
    spec = spec_for(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in mlp_param_names(model, range(num_layers(model)), spec.roles):
            values = out_in(model, name, params[name]).numpy()
            back = gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype)
            params[name].copy_(out_in(model, name, torch.from_numpy(np.array(back, dtype=np.float32))))


def write_base_gguf(model, path: Path, *, qtype=Q8_0, arch: str | None = None, kind: str = "model",
                    drop: str | None = None) -> Path:
    """A stand-in for the base model's GGUF: every MLP matrix under its llama.cpp name in `qtype`, a norm in
    F32, and metadata of the kinds a real GGUF holds (strings, numbers, a string array)."""
    arch = arch or gguf_architecture(model)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(kind)
    writer.add_name("tiny base")
    writer.add_block_count(num_layers(model))
    writer.add_token_list(["<a>", "b", "c"])
    writer.add_float32("tiny.some_float", 0.25)
    spec = spec_for(model)
    params = dict(model.named_parameters())
    for name in mlp_param_names(model, range(num_layers(model)), spec.roles):
        tname = gguf_tensor_name(model, name, gguf_architecture(model))
        if tname == drop:
            continue
        values = out_in(model, name, params[name].detach()).numpy().astype(np.float32)
        writer.add_tensor(tname, gguf.quants.quantize(values, qtype) if qtype != F32 else values, raw_dtype=qtype)
    writer.add_tensor("output_norm.weight", np.linspace(0, 1, model.config.hidden_size, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def edited_editor(method: str, config: dict, arch: str = "llama", *, quantized: bool = True):
    model, tok = tiny_model(arch)
    if quantized:
        quantize_mlp_in_place(model)
    editor = factedit.Editor(method, tokenizer=tok, score=False, guard=None, **config)
    for prompt, target in FACTS:
        editor.edit(model, prompt, target)
    return model, editor


def summed_change(model, editor, name: str) -> torch.Tensor:
    """Σ of the active edits' changes to `name`, (out, in), float64."""
    total = 0
    for record in editor.history:
        pdelta = editor.delta(record.id).params.get(name)
        if pdelta is not None:
            total = total + out_in(model, name, pdelta.materialize(torch.float64))
    return total


# --- names and the adapter's layout -----------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_names_shapes_and_round_trip_on_every_architecture(arch, tmp_path):
    model, editor = edited_editor("lora", LORA, arch, quantized=False)
    result = editor.export_adapter(tmp_path / "edits.gguf", format="gguf")  # no base GGUF: a tiny model has none
    assert result.base is None and result.svd_errors == {}
    pairs, meta = read_gguf_lora(result.path)
    assert meta["general.architecture"] == gguf_architecture(model) == result.architecture
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(result.rank)  # llama.cpp's scale alpha/r is 1
    touched = [n for n in dict(model.named_parameters()) if n in editor.history[0].params]
    assert len(touched) == 2 and set(pairs) == set(result.tensors)
    last = num_layers(model) - 1
    for name in touched:
        tname = gguf_tensor_name(model, name, result.architecture)
        assert tname.startswith(f"blk.{last}.ffn_") and tname.endswith(".weight")
        a, b = pairs[tname]
        rows, cols = out_in(model, name, dict(model.named_parameters())[name]).shape
        assert a.shape == (result.rank, cols) and b.shape == (rows, result.rank)  # GGUF ne [in, r] and [r, out]
        torch.testing.assert_close((b.double() @ a.double()), summed_change(model, editor, name),
                                   rtol=0, atol=1e-6)
    assert result.rank == 8  # two rank-4 lora edits stacked, no padding to vLLM's ranks


def test_llama_names_follow_llama_cpp():
    model, _ = tiny_model("llama")
    assert [gguf_tensor_name(model, f"model.layers.2.mlp.{m}.weight", "llama")
            for m in ("gate_proj", "up_proj", "down_proj")] == [
        "blk.2.ffn_gate.weight", "blk.2.ffn_up.weight", "blk.2.ffn_down.weight"]


def test_the_file_describes_itself_and_checks_the_base(tmp_path):
    model, editor = edited_editor("lora", LORA)
    base = write_base_gguf(model_base(editor, model), tmp_path / "base.gguf")
    result = editor.export_adapter(tmp_path / "edits.gguf", format="gguf", base_gguf=base)
    assert result.base == base
    _, meta = read_gguf_lora(result.path)
    artifact = meta[ARTIFACT_KEY]
    assert artifact["kind"] == "gguf_lora" and artifact["rank"] == result.rank
    assert [e["id"] for e in artifact["edits"]] == [r.id for r in editor.history]
    assert artifact["edits"][0]["requests"][0]["target"] == "Rome"
    assert artifact["model_fingerprint"] == editor.history[0].model_fingerprint
    reader = gguf.GGUFReader(result.path)
    types = {t.tensor_type for t in reader.tensors}
    assert types == {F32}
    assert all(t.name.endswith((".lora_a", ".lora_b")) for t in reader.tensors)


def model_base(editor, model):
    """A fresh copy of the unedited model `edited_editor` made (tiny models are deterministic): what its base
    GGUF was made from."""
    base, _ = tiny_model("llama")
    quantize_mlp_in_place(base)
    assert all(torch.equal(dict(base.named_parameters())[n], p) for n, p in dict(model.named_parameters()).items()
               if n not in editor.history[0].params)
    return base


def test_ids_choose_the_edits_and_f16_halves_the_factors(tmp_path):
    model, editor = edited_editor("lora", LORA)
    first = editor.history[0]
    one = gguf_export.export_gguf_lora(model, [editor.record(first.id)], tmp_path / "one.gguf", dtype="f16")
    assert one.edits == (first.id,) and one.rank == 4
    reader = gguf.GGUFReader(one.path)
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}
    pairs, _ = read_gguf_lora(one.path)
    for name in first.params:
        a, b = pairs[gguf_tensor_name(model, name, "llama")]
        expected = out_in(model, name, editor.delta(first.id).params[name].materialize(torch.float64))
        assert float((b.double() @ a.double() - expected).abs().max()) < 1e-3 * float(expected.abs().max())
    with pytest.raises(ConfigError, match="dtype"):
        gguf_export.export_gguf_lora(model, [editor.record(first.id)], tmp_path / "x.gguf", dtype="q4_1")


# --- dense edits ------------------------------------------------------------------------------------
def test_dense_edits_need_a_rank_and_report_the_svd_error(tmp_path):
    model, editor = edited_editor("ft_l", FT_L)
    with pytest.raises(ConfigError, match="rank"):
        editor.export_adapter(tmp_path / "a.gguf", format="gguf")
    with pytest.raises(ConfigError, match="exact"):
        editor.export_adapter(tmp_path / "a.gguf", format="gguf", rank=4, exact=True)
    assert not (tmp_path / "a.gguf").exists()
    result = editor.export_adapter(tmp_path / "a.gguf", format="gguf", rank=4)
    assert result.svd_rank == 4 and result.rank == 4
    assert set(result.svd_errors) == set(result.tensors) and all(0 < e < 1 for e in result.svd_errors.values())
    full = editor.export_adapter(tmp_path / "full.gguf", format="gguf", rank=64)  # full rank: exact
    pairs, _ = read_gguf_lora(full.path)
    for name in editor.history[0].params:
        a, b = pairs[gguf_tensor_name(model, name, "llama")]
        torch.testing.assert_close(b.double() @ a.double(), summed_change(model, editor, name), rtol=0, atol=1e-6)
    assert max(full.svd_errors.values()) < 1e-6


# --- refusals ---------------------------------------------------------------------------------------
def hand_record(model, delta: Delta) -> EditRecord:
    return EditRecord(id="e1", method="hand", config={}, requests=(EditRequest("The capital of France is", "Rome"),),
                      pre={}, post={}, timings={}, model_id="tiny", model_fingerprint="f" * 16,
                      factedit_version=factedit.__version__, delta=delta)


def test_refuses_what_a_gguf_lora_cannot_express(tmp_path, monkeypatch):
    model, _ = tiny_model("llama")
    q = "model.layers.0.self_attn.q_proj.weight"
    attention = hand_record(model, Delta({q: ParamDelta(left=torch.ones(32, 1), right=torch.ones(1, 32))}))
    with pytest.raises(InvalidDeltaError, match="not an MLP matrix"):
        export_gguf_lora(model, [attention], tmp_path / "a.gguf")
    down = "model.layers.0.mlp.down_proj.weight"
    module = hand_record(model, Delta({down: ParamDelta(left=torch.ones(32, 1), right=torch.ones(1, 64))}))
    with monkeypatch.context() as m:  # a change of another kind (an editor that adds a module)
        m.setattr(ParamDelta, "kind", property(lambda self: "module"))
        with pytest.raises(InvalidDeltaError, match="module changes"):
            export_gguf_lora(model, [module], tmp_path / "a.gguf")
    with pytest.raises(factedit.EditNotFoundError):
        export_gguf_lora(model, [], tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())


def test_refuses_a_base_gguf_of_another_model(tmp_path):
    model, editor = edited_editor("lora", LORA)
    base = model_base(editor, model)
    cases = {
        "arch": (write_base_gguf(base, tmp_path / "arch.gguf", arch="qwen2"), ModelMismatchError, "qwen2"),
        "adapter": (write_base_gguf(base, tmp_path / "adapter.gguf", kind="adapter"), ConfigError, "not a model"),
        "missing": (write_base_gguf(base, tmp_path / "missing.gguf", drop="blk.3.ffn_down.weight"),
                    ModelMismatchError, "no tensor"),
        # another checkpoint: the same names and shapes, other values
        "values": (write_base_gguf(tiny_model("llama", seed=1)[0], tmp_path / "other.gguf"), ModelMismatchError,
                   "another checkpoint"),
        "small": (write_base_gguf(tiny_model("llama", intermediate=32)[0], tmp_path / "small.gguf"),
                  ModelMismatchError, "ne"),
    }
    for path, error, match in cases.values():
        with pytest.raises(error, match=match):
            editor.export_adapter(tmp_path / "out.gguf", format="gguf", base_gguf=path)
        with pytest.raises(error, match=match):
            editor.export_merged(model, tmp_path / "out.gguf", format="gguf", base_gguf=path)
    assert not (tmp_path / "out.gguf").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        editor.export_adapter(tmp_path / "out.gguf", format="gguf", base_gguf=tmp_path / "nope.gguf")


def test_refuses_to_overwrite_and_odd_names_and_formats(tmp_path):
    model, editor = edited_editor("lora", LORA)
    (tmp_path / "there.gguf").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already exists"):
        editor.export_adapter(tmp_path / "there.gguf", format="gguf")
    assert (tmp_path / "there.gguf").read_bytes() == b"x"
    with pytest.raises(ConfigError, match=".gguf"):
        editor.export_adapter(tmp_path / "adapter.bin", format="gguf")
    with pytest.raises(ConfigError, match="format"):
        editor.export_adapter(tmp_path / "a.gguf", format="ggml")
    with pytest.raises(ConfigError, match="format"):
        editor.export_merged(model, tmp_path / "a.gguf", format="safetensors")
    with pytest.raises(ConfigError, match="base"):  # a tiny model has no GGUF of its own
        editor.export_merged(model, tmp_path / "m.gguf", format="gguf")


# --- merged model -----------------------------------------------------------------------------------
def test_merged_f32_holds_the_edited_weights_and_copies_everything_else(tmp_path):
    model, editor = edited_editor("lora", LORA)
    base_path = write_base_gguf(model_base(editor, model), tmp_path / "base.gguf")
    merged = editor.export_merged(model, tmp_path / "merged.gguf", format="gguf", base_gguf=base_path)
    params = dict(model.named_parameters())
    base, out = gguf.GGUFReader(base_path), gguf.GGUFReader(merged.path)
    assert [t.name for t in out.tensors] == [t.name for t in base.tensors]
    edited = {gguf_tensor_name(model, n, "llama"): n for n in editor.history[0].params}
    assert set(merged.tensors) == set(edited) and set(merged.tensors.values()) == {"F32"}
    assert merged.copied == len(base.tensors) - len(edited)
    for old, new in zip(base.tensors, out.tensors, strict=True):
        if new.name in edited:
            assert new.tensor_type == F32
            assert torch.equal(torch.from_numpy(np.array(new.data)), params[edited[new.name]].detach())
        else:
            assert new.tensor_type == old.tensor_type and np.array_equal(new.data, old.data)  # byte for byte
    assert max(merged.edit_errors.values()) < 1e-5
    for key in ("general.name", "general.type", "tokenizer.ggml.tokens", "tiny.some_float", "llama.block_count"):
        assert out.get_field(key).contents() == base.get_field(key).contents()
    artifact = json.loads(out.get_field(ARTIFACT_KEY).contents())
    assert artifact["kind"] == "gguf_merged" and len(artifact["edits"]) == 2


def test_merged_requantized_to_the_base_type_reports_what_the_grid_loses(tmp_path):
    model, editor = edited_editor("lora", LORA)
    base_path = write_base_gguf(model_base(editor, model), tmp_path / "base.gguf")
    requantized = editor.export_merged(model, tmp_path / "q.gguf", format="gguf", base_gguf=base_path, dtype="base")
    assert set(requantized.tensors.values()) == {"Q8_0"}
    assert all(e > 1e-4 for e in requantized.edit_errors.values())  # the grid rounds part of the change away
    half = editor.export_merged(model, tmp_path / "h.gguf", format="gguf", base_gguf=base_path, dtype="f16")
    assert set(half.tensors.values()) == {"F16"}
    assert max(half.edit_errors.values()) < max(requantized.edit_errors.values())
    with pytest.raises(ConfigError, match="dtype"):
        editor.export_merged(model, tmp_path / "x.gguf", format="gguf", base_gguf=base_path, dtype="q4_k")


def test_merged_refuses_a_type_gguf_py_cannot_quantize(tmp_path, monkeypatch):
    model, editor = edited_editor("lora", LORA)
    base_path = write_base_gguf(model_base(editor, model), tmp_path / "base.gguf")

    def cannot(values, qtype):
        raise NotImplementedError

    monkeypatch.setattr(gguf.quants, "quantize", cannot)
    with pytest.raises(ConfigError, match="cannot quantize"):
        editor.export_merged(model, tmp_path / "m.gguf", format="gguf", base_gguf=base_path, dtype="base")
    assert not (tmp_path / "m.gguf").exists()


# --- CLI --------------------------------------------------------------------------------------------
def test_cli_exports_gguf_lora_and_gguf(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "tiny-llama")
    model, _ = tiny_model("llama")  # the weights saved in the folder
    base_path = write_base_gguf(model, tmp_path / "base.gguf", qtype=F32)
    journal = str(tmp_path / "edits.sqlite")
    lora = [f"--set={k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in LORA.items()]
    assert cli.main(["edit", "--prompt", FACTS[0][0], "--target", FACTS[0][1], "--journal", journal,
                     "--model", str(folder), "--method", "lora", *lora]) == 0
    capsys.readouterr()
    start = time.perf_counter()
    assert cli.main(["export", str(tmp_path / "a.gguf"), "--journal", journal, "--format", "gguf-lora",
                     "--base-gguf", str(base_path)]) == 0
    assert "GGUF LoRA adapter (llama) of 1 edit(s), rank 4" in capsys.readouterr().out
    pairs, _ = read_gguf_lora(tmp_path / "a.gguf")
    assert set(pairs) == {"blk.3.ffn_gate.weight", "blk.3.ffn_down.weight"}
    assert cli.main(["export", str(tmp_path / "m.gguf"), "--journal", journal, "--format", "gguf",
                     "--base-gguf", str(base_path), "--dtype", "f16"]) == 0
    out = capsys.readouterr().out
    assert "blk.3.ffn_down.weight: F16" in out and "copied" in out
    assert time.perf_counter() - start < 60
    with pytest.raises(SystemExit, match="--dtype"):
        cli.main(["export", str(tmp_path / "b.gguf"), "--journal", journal, "--format", "gguf-lora", "--dtype", "f16"])
    with pytest.raises(SystemExit, match="--base-gguf"):
        cli.main(["export", str(tmp_path / "p"), "--journal", journal, "--base-gguf", str(base_path)])


def test_merged_f32_all_and_the_f32_base_dequantize_every_tensor(tmp_path):
    model, editor = edited_editor("lora", LORA)
    base_path = write_base_gguf(model_base(editor, model), tmp_path / "base.gguf")
    merged = editor.export_merged(model, tmp_path / "all.gguf", format="gguf", base_gguf=base_path, dtype="f32-all")
    plain = gguf_export.export_gguf_f32(base_path, tmp_path / "base-f32.gguf")
    base, out, f32 = gguf.GGUFReader(base_path), gguf.GGUFReader(merged.path), gguf.GGUFReader(plain)
    assert merged.copied == 1  # the F32 norm; the Q8_0 matrices are dequantized
    edited = {gguf_tensor_name(model, n, "llama"): n for n in editor.history[0].params}
    params = dict(model.named_parameters())
    for old, new, unedited in zip(base.tensors, out.tensors, f32.tensors, strict=True):
        assert new.tensor_type == unedited.tensor_type == F32
        values = gguf.quants.dequantize(old.data, old.tensor_type)
        assert np.array_equal(unedited.data, values)
        if new.name in edited:
            assert torch.equal(torch.from_numpy(np.array(new.data)), params[edited[new.name]].detach())
        else:
            assert np.array_equal(new.data, values)
    assert out.get_field("general.file_type").contents() == f32.get_field("general.file_type").contents() == 0
