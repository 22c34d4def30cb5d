"""Run an evaluation: load data and model, score the unedited model, run each method, write outputs.

    from factedit.evaluation import run_eval
    result = run_eval(config)          # an EvalConfig; the CLI builds one from Hydra overrides
    result.summary["metrics"]["ft_l"]["cf/es"]

Output folder (config.out): run.json (what the run is, for resuming), cases.jsonl, checkpoints.jsonl
(sequential), journal-<method>.sqlite (sequential), summary.json, report.md, metrics.png,
retention.png (sequential). An interrupted run started again with the same config continues where it
stopped; `resume=false` starts over.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..core import atomic
from ..core.cost import PeakMemory, forward_backward_ms, stopwatch
from ..core.errors import ConfigError
from ..core.methods import config_to_dict, get_method, make_config
from ..core.request import encode_prompt, encode_target
from ..model.loading import load_model, model_id
from ..model.weights import model_fingerprint
from ..safety.safeguards import resolve_guard
from .config import NONE_METHOD, EvalConfig, MethodRun
from .loaders import LoadedData, load_records, select_records
from .modes import RunContext, run_batch, run_none, run_sequential, run_single, sequential_done
from .report import RunInfo, build_summary, write_outputs
from .store import JsonLines

logger = logging.getLogger(__name__)

PRE_CHUNK = 8  # records per step of the pre-edit scoring (for the progress bar)
COST_RECORDS = 3  # records whose forward+backward pass is timed as the unit of edit cost
EDITOR_GUARD = "guard"  # a method override that is the Editor's drift guard, not a key of the method's config


@dataclass(frozen=True)
class EvalResult:
    out: Path
    summary: dict[str, Any]
    report: str  # report.md's text


def method_configs(config: EvalConfig) -> dict[str, dict[str, Any]]:
    """Each method's full effective config (its defaults plus the overrides); fails before any slow
    work on an unknown method or override key."""
    return {m.name: {} if m.name == NONE_METHOD else _effective_config(m) for m in config.methods}


def _effective_config(method: MethodRun) -> dict[str, Any]:
    """The method's config with its overrides, and the Editor's guard option when one is given (a
    refused bad option fails here, before any slow work)."""
    overrides = dict(method.overrides)
    guard = overrides.pop(EDITOR_GUARD, "auto")
    effective = config_to_dict(make_config(get_method(method.name).config_cls, overrides))
    if guard != "auto":
        resolved = resolve_guard(guard, get_method(method.name).guarded)
        effective[EDITOR_GUARD] = None if resolved is None else dataclasses.asdict(resolved)
    return effective


def _check_method_configs(state: dict[str, Any], configs: dict[str, dict[str, Any]], out: Path) -> None:
    """Record each method's effective config in run.json; refuse to resume one whose config changed
    (other overrides, or changed defaults), since its earlier cases would not be comparable. A field the
    method's config gained since the run was recorded is no change while it is off (False or None) and
    that is its default: a new option, off as before; it is recorded from then on. A new field on by
    default (alphaedit's chat_context) changed what the method does, and is refused like any change."""
    for name, effective in configs.items():
        recorded = state["methods"].setdefault(name, {}).setdefault("config", effective)
        defaults = _default_config(name)  # the Editor's guard is not a config field: never "added"
        recorded.update({k: v for k, v in effective.items()
                         if k not in recorded and k in defaults and v in (False, None) and defaults[k] == v})
        if recorded != effective:
            changed = sorted(k for k in set(recorded) | set(effective) if recorded.get(k) != effective.get(k))
            raise ConfigError(
                f"{out} holds {name} results made with another {name} config (differs in "
                f"{', '.join(changed)}); give another out= or resume=false to start over"
            )


def _default_config(name: str) -> dict[str, Any]:
    """A method's config at its defaults, as `method_configs` gives it ({} for the unedited model)."""
    return {} if name == NONE_METHOD else config_to_dict(make_config(get_method(name).config_cls, {}))


def _save_state(out: Path, state: dict[str, Any]) -> None:
    """Write run.json whole or not at all: a resumed run reads it first."""
    atomic.write_text(out / "run.json", json.dumps(state, indent=1))


def _prepare_out(config: EvalConfig, data_sha256: str) -> dict[str, Any]:
    """Create the output folder; refuse to resume a run made with another config. Returns run.json."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.json"
    identity = {**config.identity(), "data_sha256": data_sha256}
    if config.resume and path.exists():
        state = json.loads(path.read_text())
        differs = sorted(k for k in identity if state.get("identity", {}).get(k) != identity[k])
        if differs:
            raise ConfigError(
                f"{out} holds a run with another config (differs in {', '.join(differs)}); "
                "give another out= or resume=false to start over"
            )
        return state
    for name in os.listdir(out):
        if name in ("cases.jsonl", "checkpoints.jsonl", "run.json") or name.startswith("journal-"):
            (out / name).unlink()
    state = {"identity": identity, "methods": {}}
    _save_state(out, state)
    return state


def _resumable_rows(config: EvalConfig, records: list, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows worth keeping: not duplicated, whole batches (batch mode), a prefix of the record
    order (sequential mode)."""
    position = {r.index: i for i, r in enumerate(records)}
    seen: set[tuple[str, int]] = set()
    kept = []
    for row in rows:
        key = (row["method"], row["index"])
        if key not in seen and row["index"] in position:
            seen.add(key)
            kept.append(row)
    if config.mode == "batch":
        done = {(row["method"], row["index"]) for row in kept}
        size = config.batch_size

        def whole(row: dict[str, Any]) -> bool:
            start = position[row["index"]] // size * size
            return all((row["method"], r.index) in done for r in records[start : start + size])

        kept = [row for row in kept if whole(row)]
    if config.mode == "sequential":
        by_method: dict[str, list[dict[str, Any]]] = {}
        for row in kept:
            by_method.setdefault(row["method"], []).append(row)
        kept = []
        for method_rows in by_method.values():
            order = [position[row["index"]] for row in method_rows]
            if order == list(range(len(order))):
                kept.extend(method_rows)
    return kept


def _score_unedited(ctx: RunContext, rows: list[dict[str, Any]]) -> None:
    """Pre-edit scores of every chosen record: from earlier rows, else one batched pass."""
    from ..scoring.metrics import CaseScores

    for row in rows:
        ctx.pre.setdefault(row["index"], CaseScores.from_dict(row["pre"]))
    missing = [r for r in ctx.records if r.index not in ctx.pre]
    if not missing:
        return
    with (
        stopwatch() as t,
        tqdm(total=len(missing), desc="unedited model", unit="case", dynamic_ncols=True) as bar,
    ):
        for start in range(0, len(missing), PRE_CHUNK):
            chunk = missing[start : start + PRE_CHUNK]
            for record, scores in zip(chunk, ctx.score(chunk), strict=True):
                ctx.pre[record.index] = scores
            bar.update(len(chunk))
    ctx.pre_ms = t["ms"] / len(missing)


def _forward_backward_ms(ctx: RunContext) -> float:
    """One forward+backward pass of the unedited model on an edit's prompt and new target (median over
    the first records): the unit `time/edit_per_fwd_bwd` divides by, measured when the run starts (kept
    in run.json, so a resumed run divides by the figure of the session that began its edits)."""
    device = next(ctx.model.parameters()).device
    times = []
    for record in ctx.records[:COST_RECORDS]:
        ids = encode_prompt(ctx.tokenizer, record.prompt) + encode_target(
            ctx.tokenizer, record.prompt, record.target_new
        )
        times.append(forward_backward_ms(ctx.model, torch.tensor([ids], device=device)))
    return statistics.median(times)


def _run_method(ctx: RunContext, method: MethodRun, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Run one method over the pending records; returns what this session measured of it."""
    config = ctx.config
    done = {row["index"] for row in rows}
    pending = [r for r in ctx.records if r.index not in done]
    state: dict[str, Any] = {}
    sequential = config.mode == "sequential" and method.name != NONE_METHOD
    if (sequential and sequential_done(ctx, method, rows)) or (not sequential and not pending):
        return state
    with PeakMemory(next(ctx.model.parameters()).device) as memory:
        if method.name == NONE_METHOD:
            with ctx.progress(method, len(done)) as bar:
                run_none(ctx, method, pending, bar)
        elif config.mode == "single":
            with ctx.progress(method, len(done)) as bar:
                run_single(ctx, method, pending, bar)
        elif config.mode == "batch":
            size = config.batch_size
            chunks = [ctx.records[i : i + size] for i in range(0, len(ctx.records), size)]
            with ctx.progress(method, len(done)) as bar:
                run_batch(ctx, method, [c for c in chunks if c[0].index not in done], bar)
        else:
            state.update(run_sequential(ctx, method, rows))
    state["peak_mb"] = memory.peak_mb
    return state


def load_data(config: EvalConfig) -> tuple[LoadedData, list]:
    data = load_records(config.data.path, config.data.format, config.data.fields, config.skip_invalid)
    return data, select_records(data.records, config.n, config.shuffle, config.seed, config.start, config.rephrase)


def run_eval(config: EvalConfig) -> EvalResult:
    """Evaluate every configured method on the chosen records and write the outputs (resumable)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    configs = method_configs(config)
    data, records = load_data(config)
    logger.info(
        "%d records from %s (%s format, %d skipped)", len(records), data.path, data.format, data.skipped
    )
    state = _prepare_out(config, data.sha256)
    _check_method_configs(state, configs, config.out)
    _save_state(config.out, state)
    model, tokenizer = load_model(config.model.path, dtype=config.model.dtype, device=config.model.device)
    cases, checkpoints = JsonLines(config.out / "cases.jsonl"), JsonLines(config.out / "checkpoints.jsonl")
    rows = cases.replace(_resumable_rows(config, records, cases.rows()))
    ctx = RunContext(config, model, tokenizer, records, cases, checkpoints)
    _score_unedited(ctx, rows)
    if config.mode in ("batch", "sequential"):
        ctx.drift("unedited model")  # the base perplexity every drift ratio divides by
    fingerprint = model_fingerprint(model)
    edits = any(m.name != NONE_METHOD for m in config.methods)
    if edits and records and "fwd_bwd_ms" not in state:  # timed once, when the run's edits start
        state["fwd_bwd_ms"] = _forward_backward_ms(ctx)
        _save_state(config.out, state)
    fwd_bwd_ms = state.get("fwd_bwd_ms")
    for method in config.methods:
        method_rows = [row for row in rows if row["method"] == method.name]
        measured = _run_method(ctx, method, method_rows)
        if model_fingerprint(model) != fingerprint:  # the next method must start from the same weights
            raise RuntimeError(f"the model's weights differ from the base after running {method.name}")
        if measured:
            earlier = state["methods"].get(method.name, {})
            merged = {**earlier, **measured}
            if earlier.get("peak_mb") and measured.get("peak_mb"):  # a resumed run: the peak of all sessions
                merged["peak_mb"] = max(earlier["peak_mb"], measured["peak_mb"])
            state["methods"][method.name] = merged
            _save_state(config.out, state)
    info = RunInfo(
        config=config,
        data=data,
        records=records,
        model_id=model_id(model),
        model_fingerprint=fingerprint,
        version=__version__,
        fwd_bwd_ms=fwd_bwd_ms,
    )
    summary = build_summary(info, cases.rows(), checkpoints.rows(), state["methods"], ctx.pre)
    report = write_outputs(config.out, summary, plots=config.plots)
    return EvalResult(config.out, summary, report)
