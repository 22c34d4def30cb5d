"""MEND training on tiny random models: the objective learns, the Hydra entry point runs and resumes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from helpers import assert_weights_equal, no_hooks, snapshot
from tiny_models import tiny_model

from factedit.core.errors import ConfigError
from factedit.mend.checkpoint import load_checkpoint
from factedit.mend.config import MENDConfig
from factedit.mend.data import load_examples
from factedit.mend.method import new_network
from factedit.mend.objective import edit_step_loss
from factedit.mend.prefix import PrefixCache
from factedit.mend.run import load_data
from factedit.mend.train import CONFIG_DIR, TrainConfig, compose_config, train
from factedit.model.hooks import frozen
from factedit.paths import PACKAGE_DIR
from factedit.scoring.sequences import pad_id_of


def tiny_examples(tok, n=4):
    return load_examples(PACKAGE_DIR / "data/counterfact/train.json", tok, "counterfact", limit=n)


def test_a_short_training_run_lowers_the_edit_loss():
    model, tok = tiny_model("llama")
    examples = tiny_examples(tok)
    network = new_network(model, (-2, -1), ("in", "out"), rank=8, alpha_init=0.05)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    pad = pad_id_of(tok)
    losses = []
    with frozen(model):
        for _ in range(40):
            loss, metrics = edit_step_loss(model, network, examples, pad, c_edit=1.0, c_loc=0.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(metrics["edit/nll"])
    assert losses[-1] < losses[0] - 0.2, losses


def test_the_prefix_cache_gives_the_same_loss_and_leaves_no_trace():
    model, tok = tiny_model("llama")
    examples = tiny_examples(tok)
    network = new_network(model, (-2, -1), ("in", "out"), rank=8, alpha_init=0.05).eval()
    before = snapshot(model)
    pad = pad_id_of(tok)
    with frozen(model):
        plain, m1 = edit_step_loss(model, network, examples, pad, c_edit=1.0, c_loc=1.0, c_margin=1.0)
        cached, m2 = edit_step_loss(model, network, examples, pad, c_edit=1.0, c_loc=1.0, c_margin=1.0,
                                    cache=PrefixCache(model, -2))
    assert torch.allclose(plain, cached, rtol=1e-4, atol=1e-5)
    assert m1["edit/nll_pre"] == pytest.approx(m2["edit/nll_pre"], rel=1e-5)
    assert_weights_equal(model, before)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert no_hooks(model)


def test_the_locality_terms_vanish_without_an_edit_and_the_margin_term_adds_up():
    model, tok = tiny_model("llama")
    examples = tiny_examples(tok)
    network = new_network(model, (-2, -1), ("in", "out"), rank=8, alpha_init=0.05).eval()
    pad = pad_id_of(tok)
    with frozen(model):
        with torch.no_grad():
            network.alpha.zero_()  # ΔW = 0: post == pre
        _, still = edit_step_loss(model, network, examples, pad, c_edit=1.0, c_loc=1.0, c_margin=1.0)
        assert still["loc/margin_drop"] == 0.0 and still["loc/kl"] == pytest.approx(0.0, abs=1e-6)
        with torch.no_grad():
            network.alpha.fill_(5.0)  # a large edit that moves the locality prompts
        without, _ = edit_step_loss(model, network, examples, pad, c_edit=1.0, c_loc=1.0)
        with_margin, m = edit_step_loss(model, network, examples, pad, c_edit=1.0, c_loc=1.0, c_margin=3.0,
                                        margin=50.0)
    assert m["loc/margin_drop"] > 0
    assert (with_margin - without).item() == pytest.approx(3.0 * m["loc/margin_drop"], rel=1e-4)


def test_the_paraphrase_term_can_read_real_paraphrases_only():
    """With paraphrases_only, rephrases that are CounterFact generation prompts leave the paraphrase term:
    a batch without a real paraphrase takes the edit's NLL there; with one, its rephrase alone."""
    model, tok = tiny_model("llama")
    examples = tiny_examples(tok)
    assert [e.same_question for e in examples] == [False, True, False, False]  # train[0:4] as shipped
    network = new_network(model, (-2, -1), ("in", "out"), rank=8, alpha_init=0.05).eval()
    pad = pad_id_of(tok)
    none = [dataclasses.replace(e, same_question=False) for e in examples]
    with frozen(model), torch.no_grad():
        loss, m = edit_step_loss(model, network, none, pad, c_edit=1.0, c_loc=0.0, paraphrases_only=True)
        assert loss.item() == pytest.approx(m["edit/nll"], rel=1e-5)
        loss, m = edit_step_loss(model, network, examples, pad, c_edit=1.0, c_loc=0.0, paraphrases_only=True)
        # the same update (rephrases are not part of it) with every rephrase row the real paraphrase's
        theirs = [dataclasses.replace(e, rephrase=examples[1].rephrase) for e in examples]
        _, m_theirs = edit_step_loss(model, network, theirs, pad, c_edit=1.0, c_loc=0.0)
        assert m["edit/nll_rephrase"] == pytest.approx(m_theirs["edit/nll_rephrase"], rel=1e-4)
        assert loss.item() == pytest.approx((m["edit/nll"] + m["edit/nll_rephrase"]) / 2, rel=1e-5)
        _, every = edit_step_loss(model, network, examples, pad, c_edit=1.0, c_loc=0.0)
    assert every["edit/nll_rephrase"] != pytest.approx(m["edit/nll_rephrase"], rel=1e-5)
    with pytest.raises(ValueError, match="paraphrase_term"):
        TrainConfig(paraphrase_term="some")


def test_hydra_config_is_validated():
    cfg = compose_config(["--config-name", "tiny", "rank=4"])
    assert cfg.rank == 4 and cfg.layers == (-2, -1)
    with pytest.raises(ConfigError, match="unknown"):
        compose_config(["--config-name", "tiny", "+no_such_key=1"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in ("default", "quick", "tiny", "stream"):  # every key present, so any `key=value` override works
        assert set(yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())) == fields, name
    assert compose_config(["--config-name", "quick"]).layers == (-3, -2, -1)
    # stream.yaml is the shipped editor's last stage (PROVENANCE.md, stage 4): the settings its checkpoint
    # records (not how long it ran, nor how it was validated), and it validates as the `mend` method edits
    stream, shipped = compose_config(["--config-name", "stream"]), load_checkpoint().meta["train_config"]
    for key in ("layers", "matrices", "positions", "aggregation", "rank", "lr", "lr_alpha", "c_loc", "c_margin",
                "preserve_threshold", "preserve_ridge", "episode_length", "c_replay", "replay_edits", "c_norm"):
        value = getattr(stream, key)
        assert (list(value) if isinstance(value, tuple) else value) == shipped[key], key
    assert stream.step_scales == MENDConfig().step_scales


def test_train_writes_a_checkpoint_metrics_and_resumes(tmp_path):
    model, tok = tiny_model("llama")
    out = tmp_path / "run"
    cfg = compose_config(["--config-name", "tiny", f"output_dir={out}", "max_steps=10", "val_every=5",
                          f"prefix_cache_file={tmp_path / 'cache.safetensors'}"])
    result = train(cfg, model, tok)
    assert result["steps"] == 10
    loaded = load_checkpoint(out)
    assert loaded.meta["step"] in (5, 10)
    assert set(loaded.meta["data"]) == {"data/counterfact/train.json", "data/counterfact/val.json"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*lines)
    assert {"edit/nll", "loc/kl", "val/es", "val/ps", "val/ns", "time/step_s"} <= keys
    assert (tmp_path / "cache.safetensors").is_file()

    resumed = compose_config(["--config-name", "tiny", f"output_dir={tmp_path / 'run2'}", "max_steps=15",
                              "val_every=5", f"resume={out / 'last'}"])
    assert train(resumed, model, tok)["steps"] == 15
    # It went on from step 10: only steps 11-15 ran (a run that ignored resume would log from step 1).
    steps = {json.loads(line)["step"] for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()}
    assert steps and min(steps) > 10 and max(steps) == 15


def test_an_episode_trains_on_the_edited_model_and_restores_it_exactly(tmp_path):
    """Stream training (episode_length > 1): each edit is computed on the model the earlier edits of
    the episode left, the replay and norm terms are logged, and the weights are restored bit for bit."""
    from factedit.mend.train import episode_step

    model, tok = tiny_model("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = compose_config(["--config-name", "tiny", f"output_dir={tmp_path / 'run'}", "episode_length=3",
                          "c_replay=1.0", "c_norm=0.1", "max_steps=4", "val_every=4"])
    train_set, _, _ = load_data(cfg, tok)
    network = new_network(model, cfg.layers, cfg.matrices, rank=cfg.rank, alpha_init=cfg.alpha_init)
    seen_weights = []

    def backward(loss):
        seen_weights.append(dict(model.named_parameters())["model.layers.3.mlp.down_proj.weight"].detach().clone())
        loss.backward()

    with frozen(model):
        metrics = episode_step(model, network, [train_set[0:2], train_set[2:4], train_set[4:6]], cfg,
                               pad_id_of(tok), None, None, backward)
    assert {"replay/nll", "edit/norm_ratio"} <= set(metrics)
    assert not torch.equal(seen_weights[0], seen_weights[1])  # the second edit saw the first applied
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    assert train(cfg, model, tok)["steps"] == 4


def test_kept_edit_validation_runs_the_method_on_a_stream_and_reverts_it_exactly(tmp_path):
    """evaluate_kept_edits edits with the `mend` method (an Editor on the checkpoint), keeps the edits one
    after another, reads every fact and the drift at the end, and leaves the weights bit for bit as they
    were; an editor whose step is zero moves nothing."""
    from factedit.mend.checkpoint import base_model_info, save_checkpoint
    from factedit.mend.objective import evaluate_kept_edits, evaluate_single_edits

    model, tok = tiny_model("llama")
    examples = tiny_examples(tok, n=3)
    network = new_network(model, (-2, -1), ("in", "out"), rank=8, alpha_init=0.05)
    before = snapshot(model)
    pad = pad_id_of(tok)
    with torch.no_grad():
        network.alpha.zero_()
    still = evaluate_kept_edits(model, tok, save_checkpoint(tmp_path / "still", network, base_model_info(model)),
                                examples, pad)
    unedited = evaluate_single_edits(model, network, examples, tok, pad)
    assert still["val/kept_drift"] == still["val/kept_drift_horizon"] == 1.0 and still["val/kept_refused"] == 0.0
    assert [still[f"val/kept_{k}"] for k in ("es", "ps", "ns")] == [unedited[f"val/{k}"] for k in ("es", "ps", "ns")]
    assert_weights_equal(model, before)
    with torch.no_grad():
        network.alpha.fill_(50.0)  # large kept edits: the model moves (or the guard refuses them)
    moved = evaluate_kept_edits(model, tok, save_checkpoint(tmp_path / "moved", network, base_model_info(model)),
                                examples, pad)
    assert moved["val/kept_drift"] != 1.0 or moved["val/kept_refused"] > 0
    assert moved["val/kept_drift_horizon"] == pytest.approx(moved["val/kept_drift"] ** (200 / 3))
    assert 0 < moved["val/kept_score"] <= 1
    assert_weights_equal(model, before)


def test_training_validates_kept_edits_when_asked(tmp_path):
    model, tok = tiny_model("llama")
    with pytest.raises(ConfigError, match="val_kept"):
        compose_config(["--config-name", "tiny", "val_kept=5"])  # more than n_val (4)
    with pytest.raises(ConfigError, match="val_kept > 0"):
        compose_config(["--config-name", "tiny", "early_stop_key=val/stream_score"])
    cfg = compose_config(["--config-name", "tiny", f"output_dir={tmp_path / 'run'}", "max_steps=2", "val_every=2",
                          "val_kept=2", "early_stop_key=val/stream_score"])
    result = train(cfg, model, tok)
    assert {"val/kept_es", "val/kept_drift", "val/kept_score", "val/stream_score"} <= set(result["best"])
    assert load_checkpoint(tmp_path / "run").meta["metrics"]["val/stream_score"] == result["best"]["val/stream_score"]
