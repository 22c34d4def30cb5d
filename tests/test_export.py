"""Edits as standard artifacts: PEFT LoRA adapters out and in, merged model folders, vLLM's constraints."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import assert_weights_equal, snapshot
from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from tiny_models import ARCHS, tiny_model
from transformers import AutoModelForCausalLM

import factedit
from factedit import cli
from factedit.artifacts import adapters
from factedit.artifacts.adapters import VLLM_RANKS, check_vllm_compatible, padded_rank
from factedit.core.delta import Delta, ParamDelta
from factedit.core.record import EditRecord
from factedit.core.request import EditRequest

FACTS = [("The capital of France is", "Rome"), ("The capital of Italy is", "Berlin")]
PROBES = ["The capital of France is", "The capital of Italy is", "Water boils at", "She went to the market"]
# Two matrices of the last block, rank 4: two edits stack to rank 8 on each (a vLLM rank, so no padding).
LORA = dict(layers=(-1,), matrices=("act", "out"), rank=4, lr=3e-2, max_steps=10, preserve=None)
FT_L = dict(layers=(-1,), matrices=("in", "out"), lr=1e-2, max_steps=10, preserve=None)
LLAMA_STYLE = {"llama", "mistral", "qwen2", "gemma", "gemma3_text"}  # gate_proj/up_proj/down_proj
# Measured on these tiny models (fp32, two stacked lora edits): the model running the adapter (x·Wᵀ + x·Aᵀ·Bᵀ)
# and the edited one (x·(W + Δ)ᵀ) differ by at most 1.1e-6 in a logit; peft's merged weights and the weights
# of the adapter imported on a fresh base by at most 1.5e-7 (one rounding of the sum of both edits, not two).
LOGIT_ATOL = 1e-5
WEIGHT_ATOL = 1e-6


def logits(model: torch.nn.Module, tok, prompts=PROBES) -> torch.Tensor:
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118


def peft_adapter(folder: Path, *, arch: str = "llama", model: dict | None = None, config=None,
                 save: dict | None = None, **lora) -> Path:
    """An adapter saved by peft itself from a tiny model (`model`: tiny_model options); LoRA B starts
    random (init_lora_weights=False) so that it changes something."""
    base, _ = tiny_model(arch, **(model or {}))
    config = config or LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        get_peft_model(base, config).save_pretrained(str(folder), **(save or {}))
    return folder


def next_token_logits(model: torch.nn.Module, tok, prompts: list[str]) -> torch.Tensor:
    """(prompts, vocab): the logits after each prompt's last token (one prompt at a time: no padding)."""
    with torch.no_grad():
        return torch.cat([model(**tok(p, return_tensors="pt")).logits[:, -1].float() for p in prompts])


@dataclass
class Exported:
    arch: str
    tok: object
    result: factedit.AdapterExport
    merged: Path
    edited: dict[str, torch.Tensor]  # every parameter of the edited model
    edited_logits: torch.Tensor
    records: list


@pytest.fixture(scope="module", params=ARCHS)
def exported(request, tmp_path_factory) -> Exported:
    """Two lora edits of a tiny model of each architecture, exported as an adapter and as a merged folder."""
    arch, out = request.param, tmp_path_factory.mktemp(request.param)
    model, tok = tiny_model(arch)
    editor = factedit.Editor("lora", tokenizer=tok, **LORA)
    records = [editor.edit(model, p, t) for p, t in FACTS]
    result = editor.export_adapter(out / "adapter")
    merged = editor.export_merged(model, out / "merged")
    return Exported(arch, tok, result, merged, snapshot(model), logits(model, tok), records)


# --- export -----------------------------------------------------------------------------------------
def test_adapter_has_the_keys_and_shapes_peft_itself_saves(exported, tmp_path):
    result = exported.result
    assert result.rank == 8 and result.edits == tuple(r.id for r in exported.records) and not result.svd_errors
    reference = peft_adapter(tmp_path / "peft", arch=exported.arch, r=result.rank, target_modules=list(result.modules),
                             fan_in_fan_out=exported.arch == "gpt2")
    assert tensor_shapes(result.path) == tensor_shapes(reference)
    config = json.loads((result.path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == config["lora_alpha"] == 8 and config["bias"] == "none"
    assert sorted(config["target_modules"]) == sorted(result.modules)  # full paths: only the edited modules
    assert config["base_model_name_or_path"] == exported.records[0].model_id
    assert config["fan_in_fan_out"] == (exported.arch == "gpt2")


def test_peft_reproduces_the_edited_model(exported):
    base, tok = tiny_model(exported.arch)
    peft_model = PeftModel.from_pretrained(base, str(exported.result.path))
    assert torch.allclose(logits(peft_model, tok), exported.edited_logits, atol=LOGIT_ATOL)
    merged = dict(peft_model.merge_and_unload().named_parameters())
    for name, value in exported.edited.items():
        assert torch.allclose(merged[name], value, atol=WEIGHT_ATOL), name


def test_merged_folder_reloads_bit_for_bit(exported):
    reloaded = AutoModelForCausalLM.from_pretrained(exported.merged)
    assert_weights_equal(reloaded, exported.edited)
    card = (exported.merged / "README.md").read_text()
    assert all(r.id in card for r in exported.records) and "The capital of France is → Rome" in card


def test_import_on_a_fresh_base_then_revert_is_the_base_exactly(exported):
    fresh, tok = tiny_model(exported.arch)
    base = snapshot(fresh)
    with factedit.Editor("lora", tokenizer=tok) as editor:
        record = editor.import_adapter(fresh, exported.result.path)
        assert record.method == "import" and record.status == "active"
        assert [(q.prompt, q.target) for q in record.requests] == FACTS  # from factedit.json
        assert record.config["edits"] == [r.id for r in exported.records]
        for name, value in fresh.named_parameters():
            assert torch.allclose(value, exported.edited[name], atol=WEIGHT_ATOL), name
        assert {p.kind for p in record.delta.params.values()} == {"low_rank"}
        assert all(p.left.shape[1] == 8 for p in record.delta.params.values())
        editor.revert(fresh, record.id)
    assert_weights_equal(fresh, base)


def test_vllm_check(exported, tmp_path):
    problems = check_vllm_compatible(exported.result.path)
    if exported.arch in LLAMA_STYLE:
        assert problems == []
        config = json.loads((exported.result.path / "adapter_config.json").read_text())
        assert {m.rsplit(".", 1)[-1] for m in config["target_modules"]} <= {"gate_proj", "up_proj", "down_proj"}
        assert config["r"] in VLLM_RANKS and not config["rank_pattern"] and not config["modules_to_save"]
    else:  # GPT-2, GPT-NeoX and GPT-J MLP names are none of vLLM's LoRA modules
        assert len(problems) == 1 and "not among those vLLM adapts" in problems[0]
    if exported.arch != "llama":
        return
    broken = shutil.copytree(exported.result.path, tmp_path / "broken")
    config = json.loads((broken / "adapter_config.json").read_text())
    config.update(r=12, bias="all", modules_to_save=["lm_head"], rank_pattern={"down_proj": 8})
    (broken / "adapter_config.json").write_text(json.dumps(config))
    problems = " / ".join(check_vllm_compatible(broken))
    for expected in ("r = 12", "bias", "modules_to_save", "rank_pattern", "not rank 12"):
        assert expected in problems


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dense_edits_go_through_svd_or_are_refused(arch, tmp_path):
    model, tok = tiny_model(arch)
    editor = factedit.Editor("ft_l", tokenizer=tok, **FT_L)
    record = editor.edit_batch(model, [{"prompt": p, "target": t} for p, t in FACTS])  # an update of rank > 1
    edited, edited_logits = snapshot(model), logits(model, tok)
    with pytest.raises(factedit.ConfigError, match="give rank=R"):
        editor.export_adapter(tmp_path / "a")
    with pytest.raises(factedit.ConfigError, match=f"exact export refused: edits {record.id} \\(ft_l\\)"):
        editor.export_adapter(tmp_path / "a", rank=32, exact=True)
    assert not (tmp_path / "a").exists()

    rough = editor.export_adapter(tmp_path / "rough", rank=1)
    assert rough.rank == 1 and set(rough.svd_errors) == set(record.params)
    assert all(0.01 < e < 1 for e in rough.svd_errors.values()), rough.svd_errors
    full = editor.export_adapter(tmp_path / "full", rank=32)  # the tiny MLP matrices have rank ≤ 32
    assert full.rank == 32 and full.svd_rank == 32 and max(full.svd_errors.values()) < 1e-6
    assert "relative error" in (full.path / "README.md").read_text()
    base, _ = tiny_model(arch)
    assert torch.allclose(logits(PeftModel.from_pretrained(base, str(full.path)), tok), edited_logits,
                          atol=LOGIT_ATOL)

    fresh, _ = tiny_model(arch)
    with factedit.Editor("ft_l", tokenizer=tok) as importer:
        imported = importer.import_adapter(fresh, full.path)
        assert all(torch.allclose(p, edited[n], atol=WEIGHT_ATOL) for n, p in fresh.named_parameters())
        importer.revert(fresh, imported.id)
    assert_weights_equal(fresh, snapshot(tiny_model(arch)[0]))


def test_mixed_dense_and_low_rank_edits_stack(tmp_path):
    model, tok = tiny_model("llama")
    editor = factedit.Editor("ft_l", tokenizer=tok, **FT_L)
    editor.edit(model, *FACTS[0])
    editor.set_method("lora", **LORA)
    editor.edit(model, *FACTS[1])
    result = editor.export_adapter(tmp_path / "a", rank=20)
    # down_proj: rank 20 (SVD) + 4 (lora) = 24 -> 32; ranks add per parameter, one r for all
    assert result.rank == 32 and len(result.edits) == 2
    base, _ = tiny_model("llama")
    assert torch.allclose(logits(PeftModel.from_pretrained(base, str(result.path)), tok), logits(model, tok),
                          atol=1e-3)  # rank 20 of 32: not exact
    only_lora = editor.export_adapter(tmp_path / "b", ids=[result.edits[1]])
    assert only_lora.edits == result.edits[1:] and only_lora.rank == 8


def test_ranks_pad_to_what_vllm_accepts_and_stop_at_512(tmp_path):
    assert [padded_rank(n) for n in (1, 2, 8, 9, 300, 320, 321, 512)] == [1, 8, 8, 16, 320, 320, 512, 512]
    model, _ = tiny_model("llama")
    name = "model.layers.3.mlp.gate_proj.weight"  # (64, 32)
    delta = Delta({name: ParamDelta(left=torch.randn(64, 513), right=torch.randn(513, 32))})
    record = EditRecord(id="big", method="x", config={}, requests=(EditRequest("a", "b"),), pre={}, post={},
                        timings={}, model_id="m", model_fingerprint="f", factedit_version="0", delta=delta)
    with pytest.raises(factedit.ConfigError, match="rank 513, more than 512"):
        adapters.export_adapter(model, [record], tmp_path / "big")
    assert not (tmp_path / "big").exists()


def test_export_refuses_reverted_ids_and_a_used_folder(tmp_path):
    model, tok = tiny_model("llama")
    editor = factedit.Editor("lora", tokenizer=tok, **LORA)
    first, second = (editor.edit(model, p, t) for p, t in FACTS)
    editor.revert(model, first.id)
    with pytest.raises(factedit.EditNotFoundError, match="reverted"):
        editor.export_adapter(tmp_path / "a", ids=[first.id])
    assert editor.export_adapter(tmp_path / "a").edits == (second.id,)
    with pytest.raises(factedit.ConfigError, match="not an empty folder"):
        editor.export_adapter(tmp_path / "a")
    editor.revert(model, second.id)
    with pytest.raises(factedit.EditNotFoundError, match="no active edits"):
        editor.export_adapter(tmp_path / "b")


# --- import -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj"], rank_pattern={"down_proj": 2},
         alpha_pattern={"down_proj": 6}),
    dict(r=4, lora_alpha=8, target_modules=["up_proj"], use_rslora=True),
], ids=["plain", "patterns", "rslora"])
def test_a_foreign_lora_adapter_imports_as_one_edit_that_acts_like_peft(lora, tmp_path):
    folder = peft_adapter(tmp_path / "my-adapter", **lora)
    model, tok = tiny_model("llama")
    base = snapshot(model)
    with factedit.Editor("lora", tokenizer=tok) as editor:
        record = editor.import_adapter(model, folder)
        assert [(q.prompt, q.target) for q in record.requests] == [(adapters.PLACEHOLDER_PROMPT, "my-adapter")]
        assert record.config["adapter"] == "my-adapter" and record.config["edits"] == []
        reference, _ = tiny_model("llama")
        expected = logits(PeftModel.from_pretrained(reference, str(folder)), tok)
        assert torch.allclose(logits(model, tok), expected, atol=LOGIT_ATOL)
        assert editor.diff(record.id).params  # diffable like any edit
        editor.revert(model, record.id)
    assert_weights_equal(model, base)


@pytest.fixture
def journaled(tmp_path):
    """A tiny Llama with one journaled lora edit: (model, editor)."""
    model, tok = tiny_model("llama")
    editor = factedit.Editor("lora", tokenizer=tok, journal=tmp_path / "edits.sqlite", **LORA)
    editor.edit(model, *FACTS[0])
    yield model, editor
    editor.close()


def assert_refused(journaled, folder: Path, error: type, match: str) -> None:
    model, editor = journaled
    weights, history, order = snapshot(model), [(r.id, r.status) for r in editor.history], editor._journal.order()
    with pytest.raises(error, match=match):
        editor.import_adapter(model, folder)
    assert_weights_equal(model, weights)
    assert [(r.id, r.status) for r in editor.history] == history and editor._journal.order() == order


def own_export(tmp_path: Path, seed: int = 0, **config) -> Path:
    model, tok = tiny_model("llama", seed=seed, **config)
    editor = factedit.Editor("lora", tokenizer=tok, **LORA)
    editor.edit(model, *FACTS[1])
    return editor.export_adapter(tmp_path / f"export-{seed}").path


def test_an_adapter_for_another_base_model_is_refused(journaled, tmp_path):
    renamed = own_export(tmp_path)
    config = json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other"}))
    assert_refused(journaled, renamed, factedit.ModelMismatchError, "made for base model 'org/other'")
    # Same architecture and shapes, other weights: factedit's own export says so by its fingerprint.
    assert_refused(journaled, own_export(tmp_path, seed=1), factedit.ModelMismatchError, "fingerprint")
    # Without factedit.json (a foreign adapter) the shapes tell another model apart.
    narrow = peft_adapter(tmp_path / "narrow", model={"intermediate": 48}, target_modules=["down_proj"])
    assert_refused(journaled, narrow, factedit.ModelMismatchError, "shapes differ")


@pytest.mark.parametrize("kind", ["ia3", "loha", "attention", "dora", "bias", "modules_to_save", "embedding"])
def test_adapters_that_are_not_lora_on_mlp_matrices_are_refused(journaled, tmp_path, kind):
    folder, match = tmp_path / kind, {
        "ia3": "IA3 adapter", "loha": "LOHA adapter", "attention": "q_proj, which is not an MLP matrix",
        "dora": "use_dora", "bias": "bias='lora_only'", "modules_to_save": "modules_to_save",
        "embedding": "not a LoRA A/B weight",
    }[kind]
    if kind == "ia3":
        peft_adapter(folder, config=IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"],
                                              task_type="CAUSAL_LM"))
    elif kind == "loha":
        peft_adapter(folder, config=LoHaConfig(target_modules=["down_proj"], task_type="CAUSAL_LM"))
    else:
        lora = {"attention": dict(target_modules=["q_proj", "down_proj"]),
                "dora": dict(target_modules=["down_proj"], use_dora=True),
                "bias": dict(target_modules=["down_proj"], bias="lora_only"),
                "modules_to_save": dict(target_modules=["down_proj"], modules_to_save=["lm_head"]),
                "embedding": dict(target_modules=["embed_tokens", "down_proj"])}[kind]
        peft_adapter(folder, **lora)
    assert_refused(journaled, folder, factedit.InvalidDeltaError, match)


def test_pickled_weights_are_never_loaded(journaled, tmp_path, monkeypatch):
    folder = peft_adapter(tmp_path / "pickled", target_modules=["down_proj"], save={"safe_serialization": False})
    assert (folder / "adapter_model.bin").exists() and not (folder / "adapter_model.safetensors").exists()

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called on an adapter")

    monkeypatch.setattr(torch, "load", refuse)
    assert_refused(journaled, folder, factedit.InvalidDeltaError, "a pickle, which factedit never loads")
    assert_refused(journaled, tmp_path, factedit.InvalidDeltaError, "not a PEFT adapter folder")


# --- CLI --------------------------------------------------------------------------------------------
def test_cli_export_and_import(tmp_path, capsys):
    model, tok = tiny_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    journal, copy = str(tmp_path / "edits.sqlite"), str(tmp_path / "copy.sqlite")
    lora = [f"--set={k}={json.dumps(v)}" for k, v in LORA.items()]

    def run(*argv: str) -> str:
        assert cli.main(list(argv)) == 0
        return capsys.readouterr().out

    edit = json.loads(run("edit", "--prompt", FACTS[0][0], "--target", FACTS[0][1], "--method", "lora",
                          "--journal", journal, "--model", str(folder), *lora, "--json"))
    out = run("export", "--journal", journal, "--format", "peft", str(tmp_path / "adapter"))
    assert "1 edit(s), rank 8" in out and "vLLM" not in out
    assert "1 active edit(s)" in run("export", "--journal", journal, "--format", "merged", str(tmp_path / "merged"))
    assert_weights_equal(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), _edited(journal, folder))

    imported = json.loads(run("import", "--journal", copy, "--model", str(folder), str(tmp_path / "adapter"),
                              "--json"))
    assert imported["method"] == "import" and imported["requests"][0]["prompt"] == FACTS[0][0]
    assert edit["id"] in imported["config"]["edits"]
    assert imported["id"] in run("revert", imported["id"], "--journal", copy)  # "import" is no method to reopen with

    ft = json.loads(run("edit", "--prompt", FACTS[1][0], "--target", FACTS[1][1], "--method", "ft_l",
                        "--journal", journal, *[f"--set={k}={json.dumps(v)}" for k, v in FT_L.items()], "--json"))
    assert cli.main(["export", "--journal", journal, str(tmp_path / "dense")]) == 2
    assert f"{ft['id']} (ft_l) are dense" in capsys.readouterr().err
    out = run("export", "--journal", journal, "--rank", "8", str(tmp_path / "dense"))
    assert "rank-8 SVD, relative error" in out


def _edited(journal: str, folder: Path) -> dict[str, torch.Tensor]:
    """The journal's edits replayed on a fresh copy of the base (the reference for the merged folder)."""
    model, tok = factedit.load_model(folder)
    with factedit.Editor("lora", tokenizer=tok, journal=journal) as editor:
        editor.attach(model)
    return dict(model.state_dict())


# --- the default model ------------------------------------------------------------------------------
@pytest.mark.default_model
def test_default_model_mend_edits_as_an_adapter_and_a_merged_folder(default_model, tmp_path):
    """Three mend edits of the real default model: peft with the adapter gives the edited model's greedy
    next tokens and logits, its merge the edited weights; the merged folder reloads bit for bit; the
    adapter imported on a fresh base is close to the edited weights and reverts exactly. Tolerances: with
    twenty edits bench/bench_export.py measured logits 6.2e-5 apart and weights 6.6e-7 (fp32)."""
    from factedit.paths import PACKAGE_DIR

    model, tok = default_model
    val = json.loads((PACKAGE_DIR / "data/counterfact/val.json").read_text())
    cases, prompts = val[:3], [c["prompt"] for c in val[:3] + val[100:110]]  # edited, then unrelated
    editor = factedit.Editor("mend", tokenizer=tok, guard=None, score=False)  # compared below by logits
    try:
        for case in cases:
            editor.edit(model, case["prompt"], case["target_new"])
        touched = {n for r in editor.history for n in r.params}
        edited = {n: p.detach().clone() for n, p in model.named_parameters() if n in touched}
        edited_logits = next_token_logits(model, tok, prompts)
        result = editor.export_adapter(tmp_path / "adapter")
        merged = editor.export_merged(model, tmp_path / "merged")
    finally:
        editor.revert_all(model)
        editor.close()
    assert check_vllm_compatible(result.path) == []
    reloaded = AutoModelForCausalLM.from_pretrained(merged)
    assert all(torch.equal(p, edited[n]) for n, p in reloaded.named_parameters() if n in edited)
    del reloaded

    fresh, _ = factedit.load_model()
    with factedit.Editor("mend", tokenizer=tok, guard=None) as importer:
        record = importer.import_adapter(fresh, result.path)
        params = dict(fresh.named_parameters())
        assert max(float((params[n].detach() - v).abs().max()) for n, v in edited.items()) < 1e-6
        importer.revert(fresh, record.id)
        assert importer.weights_are_base(fresh)
    peft_model = PeftModel.from_pretrained(fresh, str(result.path))
    peft_logits = next_token_logits(peft_model, tok, prompts)
    assert torch.equal(peft_logits.argmax(-1), edited_logits.argmax(-1))
    assert float((peft_logits - edited_logits).abs().max()) < 1e-4
    params = dict(peft_model.merge_and_unload().named_parameters())
    assert max(float((params[n].detach() - v).abs().max()) for n, v in edited.items()) < 1e-6
