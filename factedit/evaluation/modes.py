"""The three evaluation modes, each resumable from the run's JSON-lines files.

single      per record: edit, measure, revert (a fresh Editor per edit, so reverted deltas are not
            kept in memory)
batch       per chunk of `batch_size` records: one `edit_batch`, measure each record, revert
sequential  edit every record in turn without reverting (or `sequential_batch` records per kept
            `edit_batch`); after each edit measure it, and at each checkpoint re-measure every edit so
            far (retention, drift). Retention two ways: seq/retention (teacher-forced: every target
            token still the argmax) and gen/retention (generated: the target still the greedy
            continuation, said.py's rule). The edits go to a journal in
            the output folder, so an interrupted run replays them instead of recomputing.

Drift: with every batch edit (batch mode) and at every checkpoint (sequential mode) the perplexity of
the shipped reference text (drift.py) is measured, as `drift/ppl` and as `drift/ppl_ratio` over the
unedited model's; a ratio above `DRIFT_WARNING` is logged as a warning: the model is breaking. The same
over held-out text (`drift/ppl_ratio_heldout`): the samples are in the key corpus preserving editors hold.
The unedited baseline (method "none") scores each record once: post = pre.

Per-case timings: edit_ms (the whole Editor call), compute_ms/apply_ms (its parts), metrics_ms (the
post-edit scoring plus this case's share of the batched pre-edit scoring), revert_ms.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..core.cost import stopwatch
from ..core.errors import DriftError, InvalidDeltaError, InvalidRequestError
from ..core.record import EditRecord
from ..editing.editor import Editor
from ..safety.drift import reference_perplexity
from ..safety.reference import reference_texts
from ..scoring.metrics import CaseScores, compute_metrics, score_cases
from ..scoring.said import greedy_retention
from .config import EvalConfig, MethodRun
from .records import EvalRecord
from .store import JsonLines

logger = logging.getLogger(__name__)

# Errors that refuse one request (recorded in its case line; the run goes on). Anything else, such as a
# config the model does not fit, stops the run.
REFUSED = (InvalidRequestError, InvalidDeltaError, DriftError)
DRIFT_WARNING = 2.0  # perplexity ratio past which a run warns that the model is breaking


@dataclass
class RunContext:
    """What every mode needs: the model, the chosen records, their pre-edit scores, the output files."""

    config: EvalConfig
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    records: list[EvalRecord]  # the chosen records, in evaluation order
    cases: JsonLines
    checkpoints: JsonLines
    pre: dict[int, CaseScores] = field(default_factory=dict)  # record index -> unedited scores
    pre_ms: float = 0.0  # per-case share of the batched pre-edit scoring
    base_perplexity: dict[str, float] = field(default_factory=dict)  # reference kind -> on the unedited model

    def drift(self, where: str) -> dict[str, float]:
        """Perplexity of the reference text now, and over the unedited model's (warns past 2×); the same
        over the held-out text, which no preserving solve holds (the samples are in the key corpus)."""
        now, ratio = self._perplexity("samples")
        heldout, heldout_ratio = self._perplexity("heldout")
        if not ratio <= DRIFT_WARNING:
            logger.warning(
                "%s: the perplexity of the reference text is %.3g× the unedited model's (%.2f -> %.2f): "
                "the edits are breaking the model",
                where,
                ratio,
                self.base_perplexity["samples"],
                now,
            )
        return {"drift/ppl": now, "drift/ppl_ratio": ratio, "drift/ppl_heldout": heldout,
                "drift/ppl_ratio_heldout": heldout_ratio}

    def _perplexity(self, kind: str) -> tuple[float, float]:
        """(perplexity of a reference text now, its ratio to the unedited model's, the first reading)."""
        now = reference_perplexity(self.model, self.tokenizer, reference_texts(kind),
                                   batch_size=self.config.score_batch_size)
        return now, now / self.base_perplexity.setdefault(kind, now)

    def score(self, records: Sequence[EvalRecord]) -> list[CaseScores]:
        cfg = self.config
        return score_cases(
            self.model,
            self.tokenizer,
            records,
            batch_size=cfg.score_batch_size,
            padding_side=cfg.padding_side,
            fluency_tokens=cfg.gen_tokens if cfg.fluency else None,
            generation=cfg.generation,
            chat_tokens=cfg.chat_tokens,
        )

    def editor(self, method: MethodRun, journal: Path | None = None) -> Editor:
        return Editor(method.name, tokenizer=self.tokenizer, journal=journal, score=False, **dict(method.overrides))

    def progress(self, method: MethodRun, done: int) -> tqdm:
        return tqdm(
            total=len(self.records),
            initial=done,
            desc=f"{method.name} ({self.config.mode})",
            unit="case",
            dynamic_ncols=True,
        )


def case_row(
    method: str,
    mode: str,
    record: EvalRecord,
    pre: CaseScores,
    post: CaseScores | None,
    timings: dict[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """One line of cases.jsonl."""
    return {
        "method": method,
        "mode": mode,
        "index": record.index,
        "case_id": record.case_id,
        "prompt": record.prompt,
        "target_new": record.target_new,
        "target_true": record.target_true,
        "pre": pre.to_dict(),
        "post": post.to_dict() if post is not None else None,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        **extra,
    }


def _edit_timings(record_timings: dict[str, float], share: int = 1) -> dict[str, float]:
    return {
        k: record_timings[k] / share
        for k in ("edit_ms", "compute_ms", "apply_ms", "guard_ms", "journal_ms")
        if k in record_timings
    }


def run_none(ctx: RunContext, method: MethodRun, pending: list[EvalRecord], bar: tqdm) -> None:
    for record in pending:
        pre = ctx.pre[record.index]
        ctx.cases.append([case_row(method.name, ctx.config.mode, record, pre, pre, {"metrics_ms": ctx.pre_ms})])
        bar.update(1)


def run_single(ctx: RunContext, method: MethodRun, pending: list[EvalRecord], bar: tqdm) -> None:
    for record in pending:
        ctx.cases.append([_edit_measure_revert(ctx, method, [record])[0]])
        bar.update(1)


def run_batch(ctx: RunContext, method: MethodRun, chunks: list[list[EvalRecord]], bar: tqdm) -> None:
    for chunk in chunks:
        ctx.cases.append(_edit_measure_revert(ctx, method, chunk))
        bar.update(len(chunk))


def _edit_measure_revert(ctx: RunContext, method: MethodRun, records: list[EvalRecord]) -> list[dict[str, Any]]:
    """One Editor call for `records`, then their post scores, then the exact revert."""
    with ctx.editor(method) as editor:  # closed after the revert: the model is free for the next one
        scored = _edit_and_score(ctx, method.name, editor, records)
        if isinstance(scored, list):
            return scored
        batch = ctx.config.mode == "batch"
        drift = ctx.drift(f"{method.name}, batch of records {records[0].index}..") if batch else None
        with stopwatch() as revert_t:
            editor.revert(ctx.model, scored.edit.id)
    return _case_rows(
        ctx, method.name, records, scored, {"revert_ms": revert_t["ms"]}, **({"drift": drift} if batch else {})
    )


@dataclass(frozen=True)
class _Scored:
    """An applied edit and its records' scores measured right after it."""

    edit: EditRecord
    posts: list[CaseScores]
    post_ms: float  # the scoring's wall time, for all the records


def _edit_and_score(
    ctx: RunContext, name: str, editor: Editor, records: list[EvalRecord]
) -> _Scored | list[dict[str, Any]]:
    """One `edit_batch` of `records` and their scores right after it; for an edit the method refuses,
    the error rows instead (recorded, nothing applied, the run goes on)."""
    try:
        edit = editor.edit_batch(ctx.model, [record.to_request() for record in records])
    except REFUSED as exc:
        logger.warning("%s refused records %s: %s", name, [r.index for r in records], exc)
        return [case_row(name, ctx.config.mode, r, ctx.pre[r.index], None, {}, error=str(exc)) for r in records]
    with stopwatch() as post_t:
        posts = ctx.score(records)
    return _Scored(edit, posts, post_t["ms"])


def _case_rows(
    ctx: RunContext, name: str, records: list[EvalRecord], scored: _Scored, shared_ms: dict[str, float], **extra: Any
) -> list[dict[str, Any]]:
    """The case rows of one edit: its timings and `shared_ms` (e.g. the revert) split evenly over the
    records; a batch's rows name the batch and its whole edit time."""
    k, timings = len(records), dict(scored.edit.timings)
    split = {**_edit_timings(timings, k), "metrics_ms": scored.post_ms / k + ctx.pre_ms}
    split.update({key: ms / k for key, ms in shared_ms.items()})
    if ctx.config.mode == "batch" or k > 1:
        extra = {"batch_edit_ms": timings.get("edit_ms"), "batch": [r.index for r in records], **extra}
    return [
        case_row(name, ctx.config.mode, record, ctx.pre[record.index], post, dict(split), **extra)
        for record, post in zip(records, scored.posts, strict=True)
    ]


# --- sequential ---------------------------------------------------------------------------------------


def checkpoint_targets(config: EvalConfig, n: int) -> list[int]:
    """Record counts at which every edit so far is re-measured: the configured ones up to n, each
    rounded up to a whole `sequential_batch`, and n."""
    step = config.sequential_batch
    return sorted({min(n, -(-c // step) * step) for c in config.checkpoints if c <= n} | {n})


def retention(now: Sequence[CaseScores]) -> float | None:
    """Share of the edits so far whose whole target is still the greedy continuation of its prompt
    (every target token the argmax, teacher-forced, which is what greedy decoding then produces)."""
    return sum(s.new_acc == 1.0 for s in now) / len(now) if now else None


def _journal_path(ctx: RunContext, method: MethodRun) -> Path:
    return ctx.cases.path.parent / f"journal-{method.name}.sqlite"


def _remove_journal(path: Path) -> None:
    for candidate in (path, path.with_name(path.name + ".lock"), path.with_name(path.name + "-journal")):
        candidate.unlink(missing_ok=True)


def _open_sequential(
    ctx: RunContext, method: MethodRun, rows: list[dict[str, Any]]
) -> tuple[Editor, list[dict[str, Any]]]:
    """The Editor holding the edits of `rows` (replayed from the journal), or a fresh one and no rows
    when they cannot be replayed."""
    path = _journal_path(ctx, method) if ctx.config.journal else None
    if path is not None and rows:
        editor = ctx.editor(method, path)
        editor.attach(ctx.model)  # replays the journal's active edits
        active = [r.id for r in editor.history if r.status == "active"]
        expected = list(dict.fromkeys(row["edit_id"] for row in rows if row.get("edit_id")))  # a batch's rows share one
        if active[: len(expected)] == expected:
            for extra in reversed(active[len(expected) :]):  # edited, but the case line was lost
                editor.revert(ctx.model, extra)
            logger.info("%s: resumed %d sequential edits from %s", method.name, len(rows), path)
            return editor, rows
        logger.warning("%s: journal %s does not match cases.jsonl; restarting this method", method.name, path)
        editor.revert_all(ctx.model)
        editor.close()
    elif rows:
        logger.warning("%s: sequential run without a journal cannot resume; restarting this method", method.name)
    if path is not None:
        _remove_journal(path)
    return ctx.editor(method, path), []


def _measured_checkpoints(ctx: RunContext, method: str) -> set[int]:
    return {row["edits"] for row in ctx.checkpoints.rows() if row["method"] == method}


def sequential_done(ctx: RunContext, method: MethodRun, rows: list[dict[str, Any]]) -> bool:
    """Whether every edit and every checkpoint of this method is already on disk."""
    targets = checkpoint_targets(ctx.config, len(ctx.records))
    return len(rows) == len(ctx.records) and set(targets) <= _measured_checkpoints(ctx, method.name)


def run_sequential(ctx: RunContext, method: MethodRun, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply every record's edit in turn, then revert them all; returns that revert's time (ms) and
    whether it gave the base weights back bit for bit (`torch.equal` on every touched parameter)."""
    name = method.name
    measured = _measured_checkpoints(ctx, name)
    targets = checkpoint_targets(ctx.config, len(ctx.records))
    editor, rows = _open_sequential(ctx, method, rows)
    if not rows:  # restarting: drop this method's old lines
        ctx.cases.rewrite(lambda r: r["method"] != name)
        ctx.checkpoints.rewrite(lambda r: r["method"] != name)
        measured = set()
    immediate = {row["index"]: CaseScores.from_dict(row["post"]) for row in rows if row.get("post")}
    with editor, ctx.progress(method, len(rows)) as bar:
        position = len(rows)
        while True:
            if position in targets and position not in measured:
                _checkpoint(ctx, name, position, immediate)
            if position == len(ctx.records):
                break
            chunk = ctx.records[position : position + ctx.config.sequential_batch]
            ctx.cases.append(_edit_and_measure(ctx, name, editor, chunk, immediate))
            position += len(chunk)
            bar.update(len(chunk))
        start = time.perf_counter()
        editor.revert_all(ctx.model)
        revert_ms = (time.perf_counter() - start) * 1000
        return {"revert_all_ms": revert_ms, "revert_exact": editor.weights_are_base(ctx.model)}


def _edit_and_measure(
    ctx: RunContext,
    name: str,
    editor: Editor,
    chunk: list[EvalRecord],
    immediate: dict[int, CaseScores],
) -> list[dict[str, Any]]:
    """One kept `edit_batch` of `chunk`, each record measured right after it (into `immediate`); the
    case rows. A refused edit is recorded, not applied, and the run goes on."""
    scored = _edit_and_score(ctx, name, editor, chunk)
    if isinstance(scored, list):
        return scored
    immediate.update({record.index: post for record, post in zip(chunk, scored.posts, strict=True)})
    return _case_rows(ctx, name, chunk, scored, {}, edit_id=scored.edit.id)


def _checkpoint(ctx: RunContext, method: str, edits: int, immediate: dict[int, CaseScores]) -> None:
    """Re-measure the edits among the first `edits` records with all of them applied (refused ones
    are left out); one line of checkpoints.jsonl."""
    records = [r for r in ctx.records[:edits] if r.index in immediate]
    if not records:
        return
    start = time.perf_counter()
    now = ctx.score(records)
    metrics = compute_metrics([ctx.pre[r.index] for r in records], now)
    kept = retention(now)
    if kept is not None:
        metrics["seq/retention"] = kept
    said = greedy_retention([s.said for s in now])
    if said is not None:
        metrics["gen/retention"] = said
    metrics.update(ctx.drift(f"{method} after {edits} sequential edits"))
    ctx.checkpoints.append(
        [
            {
                "method": method,
                "edits": edits,
                "metrics": metrics,
                "score_ms": (time.perf_counter() - start) * 1000,
                "indices": [r.index for r in records],
                "post": [s.to_dict() for s in now],
            }
        ]
    )
    logger.info(
        "%s: checkpoint after %d edits: %s",
        method,
        edits,
        ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith(("cf/", "tok/", "seq/", "gen/"))),
    )
