"""`factedit eval` end to end on a tiny model saved to disk: every output, every mode, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factedit.editing.editor import Editor
from factedit.evaluation.cli import main, normalize_overrides
from factedit.evaluation.store import read_lines

FIXTURES = Path(__file__).parent / "fixtures"
FAST = [
    "method_overrides.ft_l.layers=[-1]",
    "method_overrides.ft_l.max_steps=3",
    "method_overrides.ft_l.norm_constraint=0.05",
    "method_overrides.ft_l.lr=0.05",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from tiny_models import CHAT_TEMPLATE, save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), chat_template=CHAT_TEMPLATE)


def _eval(tiny_dir: Path, out: Path, *args: str) -> int:
    """`factedit eval` on the small fixture; without plots (a second each) unless `args` ask for them."""
    plots = [] if any(a.startswith("plots=") for a in args) else ["plots=false"]
    return main([f"model={tiny_dir}", f"data={FIXTURES / 'counterfact_small.json'}", f"out={out}", *plots, *args])


def _cases(out: Path) -> list[dict]:
    return read_lines(out / "cases.jsonl")


def test_single_mode_writes_every_output(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _eval(tiny_dir, out, "method=[none,ft_l]", "fluency=true", "gen_tokens=4", "plots=true", *FAST) == 0
    for name in ("summary.json", "cases.jsonl", "report.md", "metrics.png", "run.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["none", "ft_l"] and summary["mode"] == "single"
    assert summary["data"]["sha256"] and summary["data"]["evaluated"] == 3
    assert summary["model"]["id"] and summary["factedit_version"] and "counterfact" in summary["protocol"]
    assert summary["method_configs"]["ft_l"]["layers"] == [-1]
    ft = summary["metrics"]["ft_l"]
    for key in (
        "cf/es",
        "cf/ps",
        "cf/ns",
        "cf/score",
        "tok/reliability",
        "tok/locality",
        "time/edit_ms",
        "time/revert_ms",
        "time/metrics_ms",
        "mem/peak_mb",
        "fluency/ngram_entropy",
        "gen/prompt",
        "gen/paraphrase",
        "gen/chat",
        "gen/chat_paraphrase",
        "gen/neighbour_kept",
    ):
        assert key in ft, key
    assert summary["baseline"]["gen/neighbour_kept"] == 1.0  # unedited: every continuation kept
    assert "generation" in summary["protocol"]
    assert summary["metrics"]["none"]["cf/es"] == summary["baseline"]["cf/es"]
    rows = _cases(out)
    assert len(rows) == 6 and {r["method"] for r in rows} == {"none", "ft_l"}
    assert all(r["pre"] and r["post"] and r["post"]["generations"] for r in rows)
    said = rows[-1]["post"]["said"]  # what the model said, kept beside the verdicts
    assert said["prompt_text"] and len(said["chat_replies"]) == 2 and len(said["neigh_texts"]) == 1
    report = (out / "report.md").read_text()
    # the method "none" is the unedited model: one column and one row for it, not two
    assert "| metric | unedited | ft_l |" in report and "| cf/es |" in report and "| none |" not in report
    assert "| gen/prompt |" in report and "said (`gen/prompt`)" in report
    printed = capsys.readouterr().out
    assert "| cf/es |" in printed and "| gen/chat |" in printed and "side by side" in printed


def test_generation_checks_can_be_switched_off(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert _eval(tiny_dir, out, "method=[ft_l]", "generation=false", *FAST) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert not [k for k in summary["metrics"]["ft_l"] if k.startswith("gen/")]
    assert "cf/es" in summary["metrics"]["ft_l"]
    assert all(r["post"]["said"] is None for r in _cases(out))


SEQUENTIAL = ("method=ft_l", "mode=sequential", "checkpoints=[1,2]", *FAST)


@pytest.fixture(scope="module")
def sequential_run(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seq") / "run"
    assert _eval(tiny_dir, out, "plots=true", *SEQUENTIAL) == 0
    return out


def test_batch_mode_measures_drift_per_batch(tiny_dir, tmp_path):
    out = tmp_path / "batch"
    assert _eval(tiny_dir, out, "method=ft_l", "mode=batch", "batch_size=2", *FAST) == 0
    assert not (out / "metrics.png").exists() and "![" not in (out / "report.md").read_text()  # plots=false
    rows = _cases(out)
    assert [r["batch"] for r in rows] == [[0, 1], [0, 1], [2]]
    ratios = [r["drift"]["drift/ppl_ratio"] for r in rows]
    assert ratios[0] == ratios[1] and all(ratio > 0 for ratio in ratios)
    ft = json.loads((out / "summary.json").read_text())["metrics"]["ft_l"]
    assert ft["drift/ppl_ratio"] == pytest.approx((ratios[0] + ratios[2]) / 2)  # each batch once
    assert ft["drift/ppl_ratio_max"] == max(ratios)
    heldout = [r["drift"]["drift/ppl_ratio_heldout"] for r in rows]  # the same on held-out text
    assert all(ratio > 0 for ratio in heldout)
    assert ft["drift/ppl_ratio_heldout"] == pytest.approx((heldout[0] + heldout[2]) / 2)


def test_sequential_mode_measures_retention_and_drift(sequential_run):
    cps = read_lines(sequential_run / "checkpoints.jsonl")
    assert [c["edits"] for c in cps] == [1, 2, 3]
    assert [c["indices"] for c in cps] == [[0], [0, 1], [0, 1, 2]]
    for cp in cps:  # retention: share of edits so far whose whole target is the greedy continuation
        whole = [post["new_acc"] == 1.0 for post in cp["post"]]
        assert cp["metrics"]["seq/retention"] == sum(whole) / len(whole)
        said = [post["said"]["prompt_ok"] for post in cp["post"]]  # the same, by generation
        assert cp["metrics"]["gen/retention"] == sum(said) / len(said)
        assert cp["metrics"]["drift/ppl"] > 0
        assert cp["metrics"]["drift/ppl_ratio"] == pytest.approx(cp["metrics"]["drift/ppl"] / base_ppl(cps))
        assert cp["metrics"]["drift/ppl_ratio_heldout"] == pytest.approx(
            cp["metrics"]["drift/ppl_heldout"] / base_ppl(cps, "_heldout"))
        assert cp["metrics"]["drift/ppl_heldout"] != cp["metrics"]["drift/ppl"]  # another text
    assert (sequential_run / "retention.png").is_file()
    summary = json.loads((sequential_run / "summary.json").read_text())
    assert [c["edits"] for c in summary["sequential"]["ft_l"]["checkpoints"]] == [1, 2, 3]
    ft = summary["metrics"]["ft_l"]
    assert ft["seq/retention"] == cps[-1]["metrics"]["seq/retention"]
    assert ft["gen/retention"] == cps[-1]["metrics"]["gen/retention"]
    assert ft["drift/ppl_ratio"] == cps[-1]["metrics"]["drift/ppl_ratio"]
    assert ft["drift/ppl_ratio_heldout"] == cps[-1]["metrics"]["drift/ppl_ratio_heldout"]
    assert ft["revert/exact"] == 1.0
    report = (sequential_run / "report.md").read_text()
    assert "| ft_l | 3 |" in report and "drift/ppl_ratio" in report


def test_sequential_batches_are_kept_and_checkpointed_at_whole_batches(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "seq-batches"
    args = ("method=ft_l", "mode=sequential", "sequential_batch=2", "checkpoints=[1]", *FAST)
    real_edit = Editor.edit_batch
    sizes = []

    def counted(self, model, requests):
        sizes.append(len(requests))
        return real_edit(self, model, requests)

    monkeypatch.setattr(Editor, "edit_batch", counted)
    assert _eval(tiny_dir, out, *args) == 0
    assert sizes == [2, 1]  # records 0-1 in one kept edit_batch, then record 2
    rows = _cases(out)
    assert rows[0]["edit_id"] == rows[1]["edit_id"] != rows[2]["edit_id"]
    assert [r["batch"] for r in rows[:2]] == [[0, 1], [0, 1]] and "batch" not in rows[2]
    cps = read_lines(out / "checkpoints.jsonl")
    assert [c["edits"] for c in cps] == [2, 3]  # checkpoint 1 rounds up to the first whole batch
    assert [c["indices"] for c in cps] == [[0, 1], [0, 1, 2]]
    assert json.loads((out / "summary.json").read_text())["metrics"]["ft_l"]["revert/exact"] == 1.0
    # interrupted after the first batch, a run resumes from the journal: the batch's two rows share
    # one edit, which the replayed journal holds, so only record 2 is edited again
    again = tmp_path / "seq-batches-resumed"

    def interrupted(self, model, requests):
        if len(requests) == 1:
            raise KeyboardInterrupt
        return real_edit(self, model, requests)

    monkeypatch.setattr(Editor, "edit_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _eval(tiny_dir, again, *args)
    monkeypatch.setattr(Editor, "edit_batch", counted)
    sizes.clear()
    assert _eval(tiny_dir, again, *args) == 0
    assert sizes == [1]
    resumed = _cases(again)
    assert [r["index"] for r in resumed] == [0, 1, 2]
    assert resumed[2]["post"]["new_nll"] == pytest.approx(rows[2]["post"]["new_nll"], abs=1e-6)


def base_ppl(checkpoints, text: str = "") -> float:
    """The unedited reference perplexity a checkpoint's ratio divides by (ppl / ratio); text "_heldout":
    the held-out text's."""
    first = checkpoints[0]["metrics"]
    return first[f"drift/ppl{text}"] / first[f"drift/ppl_ratio{text}"]


def test_a_breaking_run_is_flagged(tiny_dir, tmp_path, caplog):
    from wreck import WRECK

    from factedit.evaluation.config import DataConfig, EvalConfig, MethodRun, ModelConfig
    from factedit.evaluation.runner import run_eval

    config = EvalConfig(
        methods=(MethodRun("none"), MethodRun(WRECK)), out=tmp_path / "broken", mode="sequential",
        data=DataConfig(path=FIXTURES / "counterfact_small.json"), model=ModelConfig(str(tiny_dir)),
        checkpoints=(1,),
    )
    result = run_eval(config)
    assert result.summary["metrics"][WRECK]["drift/ppl_ratio"] > 2
    assert "breaking the model" in caplog.text
    assert f"**Warning: {WRECK} broke the model**" in result.report
    assert "broke" not in result.report.replace(f"{WRECK} broke", "")  # the baseline is not flagged


def test_the_guard_is_a_method_override_and_a_refused_edit_counts_as_failed(tiny_dir, tmp_path, capsys):
    out = tmp_path / "guarded"
    strong = ["method_overrides.ft_l.layers=[-1]", "method_overrides.ft_l.max_steps=3",
              "method_overrides.ft_l.lr=1.0", "method_overrides.ft_l.norm_constraint=null"]
    assert _eval(tiny_dir, out, "method=ft_l", "generation=false", *strong,
                 "method_overrides.ft_l.guard={max_ratio:1.01}") == 0
    state = json.loads((out / "run.json").read_text())["methods"]["ft_l"]["config"]
    assert state["guard"] == {"max_ratio": 1.01, "texts": 4, "max_tokens": 24, "quick_share": 0.5,
                              "whole_from": 16}  # resume identity
    rows = _cases(out)
    refused = [r for r in rows if r.get("error")]
    assert refused and all("perplexity" in r["error"] for r in refused)
    ft = json.loads((out / "summary.json").read_text())["metrics"]["ft_l"]
    assert ft["data/errors"] == len(refused) < 3
    assert ft["cf/es_requested"] == pytest.approx(ft["cf/es"] * (3 - len(refused)) / 3)
    assert ft["cf/es_requested"] < ft["cf/es"]
    assert _eval(tiny_dir, tmp_path / "x", "method=ft_l", "method_overrides.ft_l.guard=0.5") == 2
    assert "max_ratio must be a number > 1" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_resume_skips_done_records_and_ignores_a_half_written_line(tiny_dir, tmp_path):
    out = tmp_path / "resume"
    assert _eval(tiny_dir, out, "method=ft_l", *FAST) == 0
    full = _cases(out)
    lines = (out / "cases.jsonl").read_text().splitlines()
    (out / "cases.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # interrupted mid-line
    assert _eval(tiny_dir, out, "method=ft_l", *FAST) == 0
    resumed = _cases(out)
    assert [r["index"] for r in resumed] == [0, 1, 2]
    assert resumed[0] == full[0]  # kept, not recomputed (its timings would differ)
    assert resumed[1]["post"]["new_nll"] == pytest.approx(
        full[1]["post"]["new_nll"], abs=1e-6
    )  # redone, same edit
    # another config in the same folder is refused, not mixed in: other records, or another method config
    assert _eval(tiny_dir, out, "method=ft_l", "n=2", *FAST) == 2
    assert _eval(tiny_dir, out, "method=ft_l", *FAST, "method_overrides.ft_l.lr=0.01") == 2
    assert json.loads((out / "run.json").read_text())["methods"]["ft_l"]["config"]["lr"] == 0.05
    # a run recorded before the config gained a field resumes while the field has its default, not otherwise
    state = json.loads((out / "run.json").read_text())
    for key in ("prefixes", "lr"):  # prefixes: at its default (None); lr: overridden (0.05)
        del state["methods"]["ft_l"]["config"][key]
    (out / "run.json").write_text(json.dumps(state))
    assert _eval(tiny_dir, out, "method=ft_l", *FAST) == 2  # lr is not at its default: refused
    assert json.loads((out / "run.json").read_text()) == state  # and nothing written
    state["methods"]["ft_l"]["config"]["lr"] = 0.05
    (out / "run.json").write_text(json.dumps(state))
    assert _eval(tiny_dir, out, "method=ft_l", *FAST) == 0
    assert json.loads((out / "run.json").read_text())["methods"]["ft_l"]["config"]["prefixes"] is None
    # the guard is no config field: turning it off (null) on a run made without the option is a change
    assert _eval(tiny_dir, out, "method=ft_l", *FAST, "method_overrides.ft_l.guard=null") == 2


def test_sequential_resume_replays_the_journal(tiny_dir, sequential_run, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    real_edit = Editor.edit_batch
    calls = {"n": 0}

    def flaky(self, model, requests):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the third edit is interrupted
        return real_edit(self, model, requests)

    monkeypatch.setattr(Editor, "edit_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        _eval(tiny_dir, out, *SEQUENTIAL)
    monkeypatch.setattr(Editor, "edit_batch", real_edit)
    assert len(_cases(out)) == 2 and (out / "journal-ft_l.sqlite").exists()
    assert _eval(tiny_dir, out, *SEQUENTIAL) == 0
    got = json.loads((out / "summary.json").read_text())["metrics"]["ft_l"]
    want = json.loads((sequential_run / "summary.json").read_text())["metrics"]["ft_l"]
    for key in ("cf/es", "cf/ps", "cf/ns", "tok/reliability", "tok/locality", "cf/em", "gen/prompt", "gen/chat"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert [c["edits"] for c in read_lines(out / "checkpoints.jsonl")] == [1, 2, 3]


def test_a_run_on_the_records_whose_rephrase_is_a_paraphrase(tiny_dir, tmp_path):
    records = json.loads((FIXTURES / "counterfact_small.json").read_text())
    records[0]["rephrase_prompt"] = "France's surroundings include"  # a CounterFact generation prompt
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    assert main([f"model={tiny_dir}", f"data={data}", f"out={out}", "plots=false", "method=none",
                 "rephrase=paraphrase"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["rephrase"] == "paraphrase" and [c["index"] for c in _cases(out)] == [1, 2]
    assert "only those whose rephrase prompt is a paraphrase prompt" in (out / "report.md").read_text()
    assert {"cf/ps_paraphrase_prompts", "gen/paraphrase_prompts"} <= set(summary["baseline"])


def test_bad_config_is_a_clear_error(tiny_dir, tmp_path, capsys):
    assert _eval(tiny_dir, tmp_path / "x", "method=nope") == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert _eval(tiny_dir, tmp_path / "x", "mode=sideways") == 2
    assert "mode must be one of" in capsys.readouterr().err
    # one validation path for every part: ill-typed values and unknown keys name the key
    assert _eval(tiny_dir, tmp_path / "x", "n=many") == 2
    assert "key 'n'" in capsys.readouterr().err
    assert _eval(tiny_dir, tmp_path / "x", "+bogus=1") == 2
    assert "unknown config key(s) ['bogus']" in capsys.readouterr().err
    assert _eval(tiny_dir, tmp_path / "x", "data.format=nope") == 2
    assert "data.format must be one of" in capsys.readouterr().err
    assert _eval(tiny_dir, tmp_path / "x", "rephrase=some") == 2
    assert "rephrase must be one of" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_every_mode_in_one_overview(tiny_dir, tmp_path, capsys):
    out = tmp_path / "all"
    args = ("method=[none,ft_l]", "mode=all", "batch_size=2", "checkpoints=[2]", "generation=false", *FAST)
    assert _eval(tiny_dir, out, *args) == 0
    for mode in ("single", "sequential", "batch"):  # each mode an ordinary run of its own
        summary = json.loads((out / mode / "summary.json").read_text())
        assert summary["mode"] == mode and summary["methods"] == ["none", "ft_l"]
        assert summary["cost"]["fwd_bwd_ms"] > 0
        ft = summary["metrics"]["ft_l"]
        assert ft["time/edit_per_fwd_bwd"] == pytest.approx(ft["time/edit_ms"] / summary["cost"]["fwd_bwd_ms"])
        assert "time/edit_per_fwd_bwd" not in summary["metrics"]["none"]
    rows = json.loads((out / "overview.json").read_text())
    assert [(r["method"], r["mode"]) for r in rows] == [
        ("unedited", "–"), ("ft_l", "single"), ("ft_l", "sequential"), ("ft_l", "batch")
    ]
    assert rows[2]["revert/exact"] == 1.0 and "seq/retention" in rows[2] and "seq/retention" not in rows[1]
    table = (out / "overview.md").read_text()
    assert "| ft_l | sequential | 3 |" in table and "edit ÷ fwd+bwd" in table
    assert "| ft_l | batch | 3 |" in capsys.readouterr().out
    # a list of modes runs those only; a run started again resumes each mode's folder
    timed = json.loads((out / "batch" / "summary.json").read_text())["cost"]["fwd_bwd_ms"]
    assert _eval(tiny_dir, out, *[a if a != "mode=all" else "mode=[batch,single]" for a in args]) == 0
    # resumed: the cost unit is the one timed when the run's edits began, not timed again
    assert json.loads((out / "batch" / "summary.json").read_text())["cost"]["fwd_bwd_ms"] == timed
    assert [r["mode"] for r in json.loads((out / "overview.json").read_text())] == ["–", "batch", "single"]
    assert _eval(tiny_dir, tmp_path / "bad", "mode=[single,sideways]") == 2
    assert "mode must be one of" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_override_conveniences():
    assert normalize_overrides(
        ["data=counterfact", "data=/x/y.json", "model=/m", "method_overrides.ft.lr=1"]
    ) == [
        "data=counterfact",
        "data=file",
        "data.path=/x/y.json",
        "model=local",
        "model.path=/m",
        "++method_overrides.ft.lr=1",
    ]
    assert normalize_overrides(["method=[ft_l,lora,custom]"]) == ["method=[ft_l,lora]", "++methods.custom={}"]
    everything = normalize_overrides(["method=all"])[0]  # the unedited model and every registered method
    assert everything.startswith("method=[none,") and all(m in everything for m in ("alphaedit", "grace", "mend"))
    # Hydra's own grammar reads the values: spaces in a list, quoting, and a malformed override refused.
    quoted = ["method=[ft_l, 'lora']", "~seed", "+extra=1"]
    assert normalize_overrides(quoted) == ["method=[ft_l,lora]", "~seed", "+extra=1"]
    from hydra.errors import HydraException

    with pytest.raises(HydraException, match="no viable alternative"):
        normalize_overrides(["method=[ft_l,"])


def test_a_malformed_override_is_a_clear_error(capsys):
    assert main(["method=[ft_l,"]) == 2
    assert "error:" in capsys.readouterr().err
