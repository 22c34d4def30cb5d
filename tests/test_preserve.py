"""Key preservation (null-space projection, least squares, protected edits) and the drift guard."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_weights_equal, snapshot
from wreck import WRECK

import factedit
from factedit.core.delta import Delta, ParamDelta
from factedit.core.errors import ConfigError, DriftError
from factedit.model.specs import mlp_param_names
from factedit.safety.drift import DriftGuard, GuardConfig, reference_perplexity
from factedit.safety.keys import compute_key_statistics
from factedit.safety.preserve import KeyPreserver, PreserveConfig, covariance_weight, null_space_basis
from factedit.safety.reference import key_corpus, reference_texts


def low_rank_keys(d_in: int, rank: int, n: int, seed: int = 0) -> torch.Tensor:
    """n keys (n, d_in) spanning a `rank`-dimensional subspace: its complement is an exact null space."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d_in, generator=g,
                                                                                  dtype=torch.float64)


def preserver_from_keys(keys: torch.Tensor, d_out: int, layout: str = "out_in", **config) -> KeyPreserver:
    moment = keys.T @ keys / keys.shape[0]
    return KeyPreserver({"w": null_space_basis(moment, 1e-6)}, {"w": layout}, PreserveConfig(**config))


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_projection_leaves_the_protected_keys_outputs_unchanged(layout):
    keys = low_rank_keys(16, 5, 40)  # (40, 16)
    preserver = preserver_from_keys(keys, 8, layout)
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(8, 3, generator=g), torch.randn(3, 16, generator=g)  # ΔW (8, 16), rank 3
    if layout == "in_out":  # Conv1D stores (in, out): the input side is the left factor
        left, right = right.T.contiguous(), left.T.contiguous()
    raw = Delta({"w": ParamDelta(left=left, right=right)})
    projected = preserver.project(raw).params["w"]
    assert projected.kind == "low_rank" and projected.left.shape[1] == 3  # still rank-3 factors

    def outputs(pd: ParamDelta) -> torch.Tensor:  # ΔW k for every protected key: (40, 8)
        dense = pd.materialize(torch.float64)
        return keys @ (dense if layout == "in_out" else dense.T)

    assert outputs(raw.params["w"]).abs().max() > 1.0  # the raw delta does move them
    assert outputs(projected).abs().max() < 1e-4
    dense = preserver.project(Delta({"w": ParamDelta(dense=raw.params["w"].materialize(torch.float32))}))
    assert torch.allclose(dense.params["w"].dense.double(), projected.materialize(torch.float64), atol=1e-5)


def test_least_squares_fits_the_values_and_holds_protected_keys():
    keys = low_rank_keys(24, 6, 60)
    preserver = preserver_from_keys(keys, 4, ridge=1e-6)
    g = torch.Generator().manual_seed(2)
    earlier = torch.randn(2, 24, generator=g, dtype=torch.float64)  # an applied edit's keys
    preserver.protect("e1", {"w": earlier})
    new_keys = torch.randn(3, 24, generator=g, dtype=torch.float64)
    values = torch.randn(3, 4, generator=g, dtype=torch.float64)
    x, v = preserver.solve_rows({"w": new_keys}, {"w": values})["w"]
    delta_w = v.T @ x  # (4, 24)
    assert (keys @ delta_w.T).abs().max() < 1e-6  # corpus keys untouched
    assert (earlier @ delta_w.T).abs().max() < 1e-4  # the earlier edit's keys held
    # the new keys reach their values as far as their null-space part allows (here: fully)
    assert torch.allclose(new_keys @ delta_w.T, values, atol=1e-4)
    preserver.release("e1")
    assert preserver.protected_edits() == []
    x2, v2 = preserver.solve_rows({"w": new_keys}, {"w": values})["w"]
    assert (earlier @ (v2.T @ x2).T).abs().max() > 1e-2  # released: no longer held


def test_covariance_term_leans_on_the_emptiest_null_space_directions():
    # a spectrum with no exact null space: a threshold keeps directions that still carry corpus keys
    g = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(-3, 1, 16, dtype=torch.float64)
    moment = basis @ torch.diag(spectrum) @ basis.T
    q, energy = null_space_basis(moment, 0.5)
    along = ((q.T @ moment) * q.T).sum(dim=1)  # (m,) corpus energy along each kept direction
    keys = torch.randn(2, 16, generator=g, dtype=torch.float64)
    values = torch.randn(2, 4, generator=g, dtype=torch.float64)

    def corpus_effect(cov_weight: float) -> float:  # E‖ΔW k‖² over the corpus: tr(ΔW C ΔWᵀ)
        config = PreserveConfig(threshold=0.5, ridge=1e-3, cov_weight=cov_weight, protect_edits=False)
        preserver = KeyPreserver({"w": (q, energy)}, {"w": "out_in"}, config, {"w": along})
        x, v = preserver.solve_rows({"w": keys}, {"w": values})["w"]
        delta_w = v.T @ x  # (4, 16)
        return float(torch.trace(delta_w @ moment @ delta_w.T))

    assert corpus_effect(1e3) < 0.5 * corpus_effect(0.0)
    with pytest.raises(ConfigError, match="corpus energy"):
        KeyPreserver({"w": (q, energy)}, {"w": "out_in"}, PreserveConfig(cov_weight=1.0))
    with pytest.raises(ConfigError, match="corpus energy"):  # energies for other matrices only
        KeyPreserver({"w": (q, energy)}, {"w": "out_in"}, PreserveConfig(cov_weight=1.0), {"v": along})
    with pytest.raises(ConfigError, match="cov_weight"):
        PreserveConfig(cov_weight=-1.0)


def test_a_threshold_above_every_eigenvalue_gives_memits_covariance_solve_with_earlier_keys_held():
    """threshold above the largest eigenvalue ÷ the mean: the whole input space, and with cov_weight w
    the rows are MEMIT's covariance solve with earlier edits' keys held (docs/locate.md):
    X = K (K Kᵀ + K_p K_pᵀ + r e I + w C)^{-1} (symmetric), e the mean energy of a corpus key."""
    g = torch.Generator().manual_seed(4)
    basis, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    moment = basis @ torch.diag(torch.logspace(-1, 1, 12, dtype=torch.float64)) @ basis.T
    q, energy = null_space_basis(moment, 1000.0)
    assert q.shape == (12, 12) and energy == pytest.approx(float(torch.trace(moment)))
    along = ((q.T @ moment) * q.T).sum(dim=1)  # (12,) the eigenvalues
    config = PreserveConfig(threshold=1000.0, ridge=0.01, cov_weight=50.0)
    preserver = KeyPreserver({"w": (q, energy)}, {"w": "out_in"}, config, {"w": along})
    earlier = torch.randn(2, 12, generator=g, dtype=torch.float64)
    preserver.protect("e1", {"w": earlier})
    keys, values = torch.randn(3, 12, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g)
    x, _ = preserver.solve_rows({"w": keys}, {"w": values})["w"]
    gram = keys.T @ keys + earlier.T @ earlier + 0.01 * energy * torch.eye(12, dtype=torch.float64) + 50.0 * moment
    assert torch.allclose(x.double(), keys @ torch.linalg.inv(gram), atol=1e-9)
    # cov_weight None weighs by the key width: bit for bit the solve with w = 12
    by_width = KeyPreserver({"w": (q, energy)}, {"w": "out_in"}, PreserveConfig(threshold=1000.0, ridge=0.01,
                            cov_weight=None, protect_edits=False), {"w": along})
    explicit = KeyPreserver({"w": (q, energy)}, {"w": "out_in"}, PreserveConfig(threshold=1000.0, ridge=0.01,
                            cov_weight=12.0, protect_edits=False), {"w": along})
    widths = [p.solve_rows({"w": keys}, {"w": values})["w"][0] for p in (by_width, explicit)]
    assert torch.equal(widths[0], widths[1])


def test_the_covariance_weight_by_default_is_the_key_width():
    """A corpus key's kᵀC⁻¹k averages to the width, so w = width makes kᵀ(wC)⁻¹k about 1 at any width."""
    assert covariance_weight(None, 1536) == 1536.0 and covariance_weight(15000.0, 16384) == 15000.0
    assert covariance_weight(0.0, 64) == 0.0
    g = torch.Generator().manual_seed(5)
    for width in (8, 64):
        keys = torch.randn(4000, width, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, width)
        moment = keys.T @ keys / len(keys)  # (width, width)
        s = torch.einsum("ni,ij,nj->n", keys, torch.linalg.inv(covariance_weight(None, width) * moment), keys)
        assert float(s.mean()) == pytest.approx(1.0, rel=1e-6)


def test_protect_then_release_gives_back_the_inverse():
    preserver = preserver_from_keys(low_rank_keys(12, 3, 20), 4)
    before = preserver._inverse["w"].clone()
    keys_a, keys_b = torch.randn(4, 12, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
    preserver.protect("a", {"w": keys_a})
    preserver.protect("b", {"w": keys_b})
    preserver.release("a")  # rebuilt from b alone (Cholesky): what protecting b alone gives
    only_b = preserver_from_keys(low_rank_keys(12, 3, 20), 4)
    only_b.protect("b", {"w": keys_b})
    assert torch.allclose(preserver._inverse_at("w", None), only_b._inverse_at("w", None), atol=1e-9)
    preserver.release("b")
    # nothing held: bit for bit the inverse a new preserver starts from (no inversion to round)
    assert torch.equal(preserver._inverse_at("w", None), before)


def test_protecting_updates_the_inverse_to_the_rebuilt_one():
    """protect's Woodbury update after each edit gives the inverse a rebuild from every held key gives."""
    preserver = preserver_from_keys(low_rank_keys(12, 3, 20), 4)
    g = torch.Generator().manual_seed(3)
    for edit, n in (("a", 1), ("b", 3), ("c", 1)):
        preserver.protect(edit, {"w": torch.randn(n, 12, generator=g, dtype=torch.float64)})
    updated = preserver._inverse["w"]
    rebuilt = preserver._gram_inverse("w", preserver.ridge["w"])
    assert torch.allclose(updated, rebuilt, rtol=1e-9, atol=1e-12)


def test_releases_rebuild_the_inverse_once_when_it_is_next_needed(monkeypatch):
    """A revert is cheap: releasing edits only marks the inverse stale; the next solve rebuilds it
    once, from the edits still protected."""
    g = torch.Generator().manual_seed(5)
    edit_keys = {name: torch.randn(2, 12, generator=g, dtype=torch.float64) for name in "abc"}
    new_keys, values = torch.randn(3, 12, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g)

    def preserver_holding(names: str) -> KeyPreserver:
        preserver = preserver_from_keys(low_rank_keys(12, 3, 20), 4)
        for name in names:
            preserver.protect(name, {"w": edit_keys[name]})
        return preserver

    inversions = []
    real_inverse = torch.cholesky_inverse  # the rebuild's (m, m) inversion (protect's Woodbury update has none)
    monkeypatch.setattr(torch, "cholesky_inverse", lambda m: inversions.append(1) or real_inverse(m))
    released = preserver_holding("abc")
    released.release("a")
    released.release("b")
    assert inversions == [] and released.protected_edits() == ["c"]  # nothing computed at revert time
    x, _ = released.solve_rows({"w": new_keys}, {"w": values})["w"]
    released.solve_rows({"w": new_keys}, {"w": values})
    assert len(inversions) == 1  # rebuilt once, then kept
    expected, _ = preserver_holding("c").solve_rows({"w": new_keys}, {"w": values})["w"]
    assert torch.allclose(x, expected, atol=1e-6)


def test_no_null_space_is_refused():
    full = torch.eye(8, dtype=torch.float64)
    with pytest.raises(ConfigError, match="no null space"):
        null_space_basis(full, 0.5)


def test_the_heldout_text_is_outside_the_key_corpus():
    """The held-out drift text shares no text, and no opening, with the corpus preserving solves hold."""
    heldout, corpus = reference_texts("heldout"), key_corpus()
    assert len(heldout) == 16 and not set(heldout) & set(corpus)
    openings = {" ".join(t.split()[:4]) for t in corpus}  # "During the winter festival" / "... months"
    assert not {" ".join(t.split()[:4]) for t in heldout} & openings


def test_key_statistics_are_the_second_moment_of_the_module_inputs(tiny):
    model, tok = tiny
    (name,) = mlp_param_names(model, (1,), ("out",))
    module = name.rpartition(".")[0]
    texts = ["The capital of France is Paris.", "Rome is in Italy."]
    moments, tokens = compute_key_statistics(model, tok, [module], texts)
    seen = []
    handle = model.get_submodule(module).register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    try:
        for text in texts:
            model(input_ids=torch.tensor([tok(text).input_ids]))
    finally:
        handle.remove()
    keys = torch.cat(seen).double()  # (tokens, d_in)
    assert tokens == keys.shape[0]
    assert torch.allclose(moments[module], keys.T @ keys / tokens, atol=1e-6)


@pytest.mark.parametrize("method", ["ft", "lora"])
def test_preserving_editors_stay_in_the_null_space_and_revert_exactly(tiny, method):
    model, tok = tiny
    base = snapshot(model)
    overrides = dict(layers=(-1,), matrices=("out",), lr=5e-2, max_steps=40)
    (name,) = mlp_param_names(model, (-1,), ("out",))
    module = name.rpartition(".")[0]
    moment = compute_key_statistics(model, tok, [module], key_corpus())[0][module]  # C = E[k kᵀ]
    threshold = 0.3
    bound = threshold * float(torch.linalg.eigvalsh(moment).clamp(min=0).mean())

    def energy_per_unit_change(editor) -> float:  # E ||ΔW k||² / ||ΔW||²_F over the corpus keys
        record = editor.edit(model, "The capital of France is", "Rome")
        dense = record.delta.params[name].materialize(torch.float64)
        editor.revert(model, record.id)
        assert_weights_equal(model, base)
        return float(torch.trace(dense @ moment @ dense.T) / dense.square().sum())

    plain = energy_per_unit_change(factedit.Editor(method, tokenizer=tok, preserve=None, **overrides))
    kept = energy_per_unit_change(
        factedit.Editor(method, tokenizer=tok, preserve={"threshold": threshold}, **overrides))
    assert plain > bound  # unconstrained, the change lands on directions the corpus uses
    assert kept <= bound * (1 + 1e-4)  # preserved, only on directions below the threshold


def test_guard_refuses_a_breaking_edit_and_changes_nothing(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "j.sqlite"
    editor = factedit.Editor(WRECK, tokenizer=tok, journal=path, guard=1.5)
    ok = factedit.Editor("ft", tokenizer=tok, guard=1.5, layers=(-1,), lr=1e-2)
    base = snapshot(model)
    with pytest.raises(DriftError, match="perplexity of the reference text") as caught:
        editor.edit(model, "The capital of France is", "Rome")
    assert caught.value.ratio > 1.5 and caught.value.max_ratio == 1.5
    assert_weights_equal(model, base)
    assert editor.history == []
    editor.close()
    assert factedit.Editor(WRECK, tokenizer=tok, journal=path).history == []  # nothing journaled
    record = ok.edit(model, "The capital of France is", "Rome")  # a gentle edit passes
    assert record.drift is not None and record.drift < 1.5 and record.timings["guard_ms"] > 0


def test_guard_options(tiny):
    _, tok = tiny
    with pytest.raises(ConfigError, match="guard"):
        factedit.Editor("ft", tokenizer=tok, guard="strict")
    with pytest.raises(ConfigError, match="> 1"):
        factedit.Editor("ft", tokenizer=tok, guard=0.5)
    assert factedit.Editor("ft", tokenizer=tok).guard is None
    assert factedit.Editor("ft", tokenizer=tok, guard=3).guard == GuardConfig(max_ratio=3.0)


def test_reference_perplexity_with_base_params_ignores_the_edit(tiny):
    model, tok = tiny
    texts = reference_texts("samples")[:3]
    before = reference_perplexity(model, tok, texts)
    editor = factedit.Editor(WRECK, tokenizer=tok)
    editor.edit(model, "The capital of France is", "Rome")
    assert reference_perplexity(model, tok, texts) != pytest.approx(before)
    assert reference_perplexity(model, tok, texts, params=editor._state.base) == pytest.approx(before)


def test_the_guard_reads_the_next_texts_and_the_worst_at_each_check(tiny):
    """A fixed few texts would let edits that spare them through: each check reads the next group,
    and the group that read worst so far again."""
    model, tok = tiny
    guard = DriftGuard(GuardConfig(texts=4, max_tokens=8))
    assert len(guard.groups) == len(reference_texts("samples")) // 4
    for checks in range(1, len(guard.groups) + 1):
        assert guard.ratio(model, tok, {}) == pytest.approx(1.0)  # nothing edited
        assert sum(g.last is not None for g in guard.groups) == checks  # a new group at each check
    guard.groups[5].last = 3.0  # as if group 5 had read badly at the last check
    assert guard.ratio(model, tok, {}) == pytest.approx(1.0)
    assert guard.groups[5].last == pytest.approx(1.0)  # read again (the next group is 0)


@pytest.mark.parametrize("quick_share", [0.5, 0.0])
def test_far_below_the_bound_a_check_reads_one_group_and_near_it_two(tiny, monkeypatch, quick_share):
    """The quick check: one group while it and every group's last reading are under the quick limit
    (1.25 for a 1.5 bound at share 0.5); the worst group again once one is past it. Share 0: always two."""
    model, tok = tiny
    ratios, reads = {2: 1.3}, []  # group 2 reads past the quick limit, every other group 1.01

    def scripted(self, model, tokenizer, index, *args):
        reads.append(index)
        return ratios.get(index, 1.01)

    monkeypatch.setattr(DriftGuard, "_read", scripted)
    guard = DriftGuard(GuardConfig(max_ratio=1.5, texts=4, max_tokens=8, quick_share=quick_share))
    per_check = []
    for _ in range(5):
        before = len(reads)
        guard.ratio(model, tok, {})
        per_check.append(reads[before:])
    if quick_share:
        # first check: group 0 alone; then 1 alone; 2 reads 1.3, so the worst so far (0) is read too;
        # after that group 2 is the worst and past the limit: every check reads it again
        assert per_check == [[0], [1], [2, 0], [3, 2], [4, 2]]
    else:
        assert per_check == [[0], [1, 0], [2, 0], [3, 2], [4, 2]]
    assert guard.groups[2].last == 1.3


def test_a_quick_share_outside_0_1_is_refused():
    for bad in (-0.1, 1.0, "half"):
        with pytest.raises(ConfigError, match="quick_share"):
            GuardConfig(quick_share=bad)


def test_an_edit_of_many_facts_is_checked_on_the_whole_reference_text(tiny):
    """From `whole_from` facts the guard reads every shipped sample in full (evaluation's drift), not groups:
    the record's drift is that ratio, and the groups' rotation does not move; fewer facts read groups."""
    model, tok = tiny
    samples = reference_texts("samples")
    base = reference_perplexity(model, tok, samples)
    guard = GuardConfig(max_ratio=100.0, whole_from=2)
    editor = factedit.Editor("ft", tokenizer=tok, layers=(-1,), lr=1e-2, max_steps=3, score=False, guard=guard)
    facts = [{"prompt": "The capital of France is", "target": "Rome"},
             {"prompt": "The Eiffel Tower is in", "target": "Berlin"}]
    record = editor.edit_batch(model, facts)
    assert record.drift == pytest.approx(reference_perplexity(model, tok, samples) / base, rel=1e-6)
    assert record.drift != pytest.approx(1.0)  # the edit moved the text: the reading is a real one
    checker = editor._safeguards.guard
    assert all(g.last is None for g in checker.groups) and checker.base_perplexity == pytest.approx(base)
    one = editor.edit(model, "The Louvre is in", "Madrid")
    assert sum(g.last is not None for g in checker.groups) >= 1 and one.drift is not None
    editor.close()


def test_guard_whole_from_must_be_a_positive_int_or_none():
    assert GuardConfig(whole_from=None).reads_whole(1000) is False
    assert GuardConfig(whole_from=8).reads_whole(8) and not GuardConfig(whole_from=8).reads_whole(7)
    for bad in (0, -1, 2.5, "8"):
        with pytest.raises(ConfigError, match="whole_from"):
            GuardConfig(whole_from=bad)


def test_a_damaged_key_statistics_cache_is_recomputed(tiny, tmp_path, monkeypatch, caplog):
    from factedit.safety.keys import key_statistics

    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    model, tok = tiny
    module = mlp_param_names(model, 1, "out")[0].rpartition(".")[0]
    texts = reference_texts("samples")[:4]
    first = key_statistics(model, tok, [module], texts, fingerprint="fp", model_id="tiny")[module]
    (cached,) = tmp_path.glob(f"keys/fp/*/{module}.safetensors")
    cached.write_bytes(b"damaged")
    again = key_statistics(model, tok, [module], texts, fingerprint="fp", model_id="tiny")[module]
    assert torch.equal(again, first) and "ignoring the damaged cache file" in caplog.text


def test_a_partial_preserve_override_keeps_the_methods_other_settings():
    """`preserve.protect_edits=true` on ultraedit changes that key only: its threshold (0.5) and ridge
    (10) stay, not PreserveConfig's class defaults; a method whose default is None takes the class's."""
    from factedit.core.configs import validated
    from factedit.mend.ultraedit import UltraEditConfig
    from factedit.peft.ft import FTConfig

    default = UltraEditConfig().preserve
    merged = validated(UltraEditConfig, {"preserve": {"protect_edits": not default.protect_edits}}).preserve
    assert merged == PreserveConfig(threshold=default.threshold, ridge=default.ridge,
                                    protect_edits=not default.protect_edits)
    assert validated(FTConfig, {"preserve": {"threshold": 0.3}}).preserve == PreserveConfig(threshold=0.3)
    assert validated(UltraEditConfig, {"preserve": None}).preserve is None
