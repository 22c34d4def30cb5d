"""The run's summary (summary.json) and its formatted views (report.md, plots). Metrics are computed by
`factedit.scoring.metrics.compute_metrics` only; this module collects and formats them."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..scoring.metrics import CaseScores, compute_metrics
from .config import NONE_METHOD, EvalConfig
from .loaders import LoadedData
from .records import EvalRecord

PROTOCOL = {
    "name": "factedit-eval/1",
    "counterfact": (
        "CounterFact (ROME, Meng et al. 2022): P(o) = exp(-mean per-token NLL of o after the prompt). "
        "cf/es, cf/ps: share of edit prompts / paraphrases with P(o*) > P(oc); cf/ns: share of neighbourhood "
        "prompts with P(oc) > P(o*); cf/em, cf/pm: mean P(o*) - P(oc); cf/nm: mean P(oc) - P(o*); "
        "cf/score: harmonic mean of es, ps, ns; cf/ps_paraphrase_prompts: cf/ps over the rephrase prompts that "
        "ask the same question, where the data tells them from CounterFact's generation prompts "
        "(factedit.core.rephrases: EasyEdit's flat CounterFact holds one of either in rephrase_prompt)"
    ),
    "token_accuracy": (
        "EasyEdit (Yao et al. 2023): tok/reliability, tok/generalization: teacher-forced share of o* tokens "
        "that are the argmax after the edit prompt / paraphrases; tok/locality: share of argmax tokens over "
        "the answers of locality pairs and neighbourhood prompts that are the same before and after the edit"
    ),
    "generation": (
        "what the model says (factedit.scoring.said; off with generation=false). Greedy rule: "
        "len(target tokens) + 2 tokens generated greedily; success when the continuation, normalised "
        "(NFKC, casefolded, whitespace collapsed), starts with the normalised target ending at a word "
        "boundary. gen/prompt, gen/paraphrase: the greedy rule after the edit prompt / paraphrases. "
        "gen/prompt_repeats: the prompt's continuation holds the target twice (' Italy, Italy'). "
        "Chat rule: the question as one user message through the tokenizer's chat template, chat_tokens "
        "(default 16) tokens of greedy reply; success when the reply contains the new target at word "
        "boundaries and, those taken out, not the true object (except where the reply restates the question's "
        "words), and does not loop (a run of 1-4 words three times in a row, or a word glued to itself three "
        "times). gen/chat: the edit prompt as 'Complete the sentence: "
        "{prompt}'; gen/chat_paraphrase: each paraphrase as '{paraphrase} what?'; absent without a chat "
        "template. gen/chat_loops: share of the chat replies (every question's) that loop. "
        "gen/paraphrase_prompts, gen/chat_paraphrase_prompts: gen/paraphrase and "
        "gen/chat_paraphrase over the rephrase prompts that ask the same question (as "
        "cf/ps_paraphrase_prompts; after a generation prompt the target is often not the answer). "
        "gen/neighbour_kept: share of neighbourhood and locality prompts whose greedy "
        "continuation (len(answer tokens) + 2 tokens) is the same before and after the edit"
    ),
    "fluency": "fluency/ngram_entropy: ROME's weighted bi-/tri-gram entropy of greedy generations (opt-in)",
    "aggregation": "per case first (mean over its paraphrases, neighbours, ...), then the mean over cases",
    "join_rule": "target = continuation of the prompt: one space between them unless either side has it",
    "sequential": "metrics of a sequential run are re-measured after the last edit, over every edit; "
    "seq/retention: share of the edits so far whose whole target is still the greedy continuation of "
    "its prompt, teacher-forced (every target token the argmax); gen/retention: the same by generation "
    "(the greedy rule)",
    "refused": "data/errors: edits the method or the drift guard refused (nothing applied). Rates are over "
    "the applied edits; cf/es_requested and gen/prompt_requested are over every edit asked for, a refused "
    "edit counted as failed",
    "cost": "time/<part>_ms: mean wall time per case of each part (edit: the whole Editor call); "
    "time/edit_per_fwd_bwd: time/edit_ms over one forward+backward pass of the unedited model on an edit "
    "prompt and its new target (cost.fwd_bwd_ms, timed when the run's edits began; a gradient editor's floor)",
    "drift": "drift/ppl: perplexity of the shipped reference text (sampled from the unedited default model); "
    "drift/ppl_ratio: over the unedited model's (1 = unchanged). Batch mode: mean over batches, with "
    "drift/ppl_ratio_max; sequential: at each checkpoint. The samples are part of the key corpus that "
    "preserving editors hold; drift/ppl_ratio_heldout reads the same on held-out text the model writes "
    "(resources/reference/heldout.json), which no solve looked at",
}

# Success rates also reported over every edit asked for (<key>_requested), a refused edit counted as
# failed; the plain rates are over the edits that were applied.
REQUESTED_RATES = ("cf/es", "gen/prompt")
ROW_ORDER = [  # teacher-forced and generated figures of the same question side by side
    "cf/es",
    "cf/es_requested",
    "gen/prompt",
    "gen/prompt_requested",
    "gen/prompt_repeats",
    "gen/chat",
    "cf/ps",
    "gen/paraphrase",
    "gen/chat_paraphrase",
    "cf/ps_paraphrase_prompts",
    "gen/paraphrase_prompts",
    "gen/chat_paraphrase_prompts",
    "gen/chat_loops",
    "cf/ns",
    "gen/neighbour_kept",
    "cf/score",
    "cf/em",
    "cf/pm",
    "cf/nm",
    "tok/reliability",
    "tok/generalization",
    "tok/locality",
    "fluency/ngram_entropy",
    "seq/retention",
    "gen/retention",
    "drift/ppl_ratio",
    "drift/ppl_ratio_max",
    "drift/ppl_ratio_heldout",
    "drift/ppl",
    "drift/ppl_heldout",
    "revert/exact",
    "time/edit_ms",
    "time/edit_per_fwd_bwd",
    "time/compute_ms",
    "time/apply_ms",
    "time/guard_ms",
    "time/metrics_ms",
    "time/revert_ms",
    "time/metrics_share",
    "mem/peak_mb",
    "data/cases",
    "data/errors",
]
CHECKPOINT_KEYS = [
    "cf/es",
    "gen/prompt",
    "cf/ps",
    "gen/paraphrase",
    "gen/paraphrase_prompts",
    "gen/chat",
    "cf/ns",
    "gen/neighbour_kept",
    "tok/reliability",
    "tok/locality",
    "seq/retention",
    "gen/retention",
    "drift/ppl_ratio",
    "drift/ppl_ratio_heldout",
]
# The headline table: each question scored teacher-forced (probabilities) and by what the model
# generates, in adjacent columns.
SIDE_BY_SIDE = [
    ("ES", "cf/es"),
    ("said", "gen/prompt"),
    ("chat", "gen/chat"),
    ("PS", "cf/ps"),
    ("said para", "gen/paraphrase"),
    ("chat para", "gen/chat_paraphrase"),
    ("chat loops", "gen/chat_loops"),
    ("said para, same question", "gen/paraphrase_prompts"),
    ("NS", "cf/ns"),
    ("neighbour kept", "gen/neighbour_kept"),
]


@dataclass(frozen=True)
class RunInfo:
    config: EvalConfig
    data: LoadedData
    records: list[EvalRecord]
    model_id: str
    model_fingerprint: str
    version: str
    fwd_bwd_ms: float | None = None  # one forward+backward pass of the unedited model (the cost unit)


def _scores(items: Sequence[Mapping[str, Any]]) -> list[CaseScores]:
    return [CaseScores.from_dict(item) for item in items]


def _sequential_metrics(
    rows: list[dict[str, Any]],
    checkpoints: list[dict[str, Any]],
    state: Mapping[str, Any],
    pre: Mapping[int, CaseScores],
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics after the last edit (re-measured over all edits) and the per-checkpoint view."""
    immediate = compute_metrics(
        _scores([r["pre"] for r in rows]), _scores([r["post"] for r in rows]), [r["timings"] for r in rows]
    )
    timings = [dict(r["timings"]) for r in rows]
    if state.get("revert_all_ms") and rows:
        for t in timings:  # revert_all's time, spread over the edits
            t["revert_ms"] = state["revert_all_ms"] / len(rows)
    final = checkpoints[-1] if checkpoints else None
    if final is None:
        return immediate, {"immediate": immediate, "checkpoints": []}
    now = _scores(final["post"])
    metrics = compute_metrics([pre[i] for i in final["indices"]], now, timings, state.get("peak_mb"))
    for key in ("seq/retention", "gen/retention", "drift/ppl", "drift/ppl_ratio", "drift/ppl_heldout",
                "drift/ppl_ratio_heldout"):
        if key in final["metrics"]:
            metrics[key] = final["metrics"][key]
    if "revert_exact" in state:  # revert of every edit gave the base back bit for bit (torch.equal)
        metrics["revert/exact"] = float(state["revert_exact"])
    view = {
        "immediate": immediate,
        "checkpoints": [{"edits": c["edits"], "metrics": c["metrics"]} for c in checkpoints],
    }
    return metrics, view


def _batch_drift(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean and max of the per-batch drift (each batch counted once)."""
    batches = {tuple(r["batch"]): r["drift"] for r in rows if r.get("drift")}
    if not batches:
        return {}
    ratios = [d["drift/ppl_ratio"] for d in batches.values()]
    out = {
        "drift/ppl_ratio": sum(ratios) / len(ratios),
        "drift/ppl_ratio_max": max(ratios),
        "drift/ppl": sum(d["drift/ppl"] for d in batches.values()) / len(batches),
    }
    heldout = [d["drift/ppl_ratio_heldout"] for d in batches.values() if "drift/ppl_ratio_heldout" in d]
    if len(heldout) == len(batches):  # runs made before the held-out text have none
        out["drift/ppl_ratio_heldout"] = sum(heldout) / len(heldout)
    return out


def drift_warnings(summary: Mapping[str, Any]) -> list[str]:
    """One line per method whose model more than doubled the reference perplexity."""
    from .modes import DRIFT_WARNING

    lines = []
    for method, values in summary["metrics"].items():
        worst = values.get("drift/ppl_ratio_max", values.get("drift/ppl_ratio"))
        if worst is not None and not worst <= DRIFT_WARNING:
            lines.append(
                f"**Warning: {method} broke the model**: the perplexity of the reference text reached "
                f"{worst:.3g}× the unedited model's; its other figures describe a damaged model."
            )
    return lines


def _method_metrics(
    info: RunInfo,
    name: str,
    mine: list[dict[str, Any]],
    checkpoints: list[dict[str, Any]],
    state: Mapping[str, Any],
    pre: Mapping[int, CaseScores],
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """One method's metrics over its case rows (in record order), and its sequential view if any."""
    ok = [r for r in mine if r.get("post")]
    view = None
    if info.config.mode == "sequential" and name != NONE_METHOD:
        values, view = _sequential_metrics(ok, checkpoints, state, pre)
    else:
        values = compute_metrics(
            _scores([r["pre"] for r in ok]),
            _scores([r["post"] for r in ok]),
            [r["timings"] for r in ok],
            state.get("peak_mb"),
        )
        values.update(_batch_drift(ok))
    values["data/errors"] = float(len(mine) - len(ok))
    if name != NONE_METHOD and mine:  # the rates over every edit asked for: a refused edit counts as failed
        for key in REQUESTED_RATES:
            if key in values:
                values[f"{key}_requested"] = values[key] * len(ok) / len(mine)
    if info.fwd_bwd_ms and "time/edit_ms" in values and name != NONE_METHOD:
        values["time/edit_per_fwd_bwd"] = values["time/edit_ms"] / info.fwd_bwd_ms
    return values, view


def build_summary(
    info: RunInfo,
    rows: list[dict[str, Any]],
    checkpoints: list[dict[str, Any]],
    states: Mapping[str, Mapping[str, Any]],
    pre: Mapping[int, CaseScores],
) -> dict[str, Any]:
    """summary.json's content: the metrics of every method, the baseline, and what the run was."""
    config = info.config
    position = {r.index: i for i, r in enumerate(info.records)}
    unedited = [pre[r.index] for r in info.records]
    metrics: dict[str, dict[str, float]] = {}
    sequential: dict[str, Any] = {}
    for method in config.methods:
        mine = sorted(
            (r for r in rows if r["method"] == method.name and r["index"] in position),
            key=lambda r: position[r["index"]],
        )
        cps = sorted((c for c in checkpoints if c["method"] == method.name), key=lambda c: c["edits"])
        metrics[method.name], view = _method_metrics(info, method.name, mine, cps, states.get(method.name, {}), pre)
        if view is not None:
            sequential[method.name] = view
    summary = {
        "factedit_version": info.version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "protocol": PROTOCOL,
        "model": {"id": info.model_id, "path": config.model.path, "fingerprint": info.model_fingerprint},
        "data": {
            "path": str(info.data.path),
            "name": config.data.name,
            "format": info.data.format,
            "sha256": info.data.sha256,
            "records_in_file": info.data.total,
            "skipped_invalid": info.data.skipped,
            "evaluated": len(info.records),
            "shuffle": config.shuffle,
            "seed": config.seed,
            "start": config.start,
            "rephrase": config.rephrase,
        },
        "mode": config.mode,
        "methods": [m.name for m in config.methods],
        "method_configs": {m.name: states.get(m.name, {}).get("config", {}) for m in config.methods},
        "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
        "baseline": compute_metrics(unedited, unedited),
        "metrics": metrics,
    }
    if info.fwd_bwd_ms:
        summary["cost"] = {"fwd_bwd_ms": info.fwd_bwd_ms}
    if sequential:
        summary["sequential"] = sequential
    return summary


def format_value(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key.startswith("data/"):
        return str(int(value))
    if key.startswith("mem/"):
        return f"{value:.0f}"
    if key.endswith("_ms") or key == "time/edit_per_fwd_bwd":
        return f"{value:.1f}"
    if key.startswith("drift/"):
        return f"{value:.4g}"
    return f"{value:.3f}"


def _ordered_keys(dicts: Sequence[Mapping[str, float]]) -> list[str]:
    present = {k for d in dicts for k in d}
    return [k for k in ROW_ORDER if k in present] + sorted(present - set(ROW_ORDER))


def method_columns(summary: Mapping[str, Any]) -> dict[str, Mapping[str, float]]:
    """{"unedited": the baseline, then each method's metrics}: the columns of a mode's tables and plots.
    The method "none" (method=all runs it) is left out: its figures are the baseline's."""
    return {"unedited": summary["baseline"],
            **{name: values for name, values in summary["metrics"].items() if name != NONE_METHOD}}


def metrics_table(summary: Mapping[str, Any]) -> str:
    """Markdown table: one row per metric, one column per method, after the unedited model."""
    columns = method_columns(summary)
    columns["unedited"] = {k: v for k, v in summary["baseline"].items() if not k.startswith(("time/", "mem/"))}
    keys = _ordered_keys(list(columns.values()))
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {k} | " + " | ".join(format_value(k, c.get(k)) for c in columns.values()) + " |" for k in keys]
    return "\n".join(lines)


def side_by_side_table(summary: Mapping[str, Any]) -> str | None:
    """Markdown table, one row per method (after the unedited model): ES/PS/NS each beside what the
    model then says (greedy, chat); None when the run has no generation checks."""
    columns = method_columns(summary)
    if not any(k.startswith("gen/") for values in columns.values() for k in values):
        return None
    lines = [
        "| method | " + " | ".join(f"{label} (`{key}`)" for label, key in SIDE_BY_SIDE) + " |",
        "|---|" + "---:|" * len(SIDE_BY_SIDE),
    ]
    for method, values in columns.items():
        lines.append(f"| {method} | " + " | ".join(format_value(k, values.get(k)) for _, k in SIDE_BY_SIDE) + " |")
    return "\n".join(lines)


def checkpoint_table(summary: Mapping[str, Any]) -> str:
    lines = [
        "| method | edits | " + " | ".join(CHECKPOINT_KEYS) + " |",
        "|---|---:|" + "---:|" * len(CHECKPOINT_KEYS),
    ]
    for method, view in summary.get("sequential", {}).items():
        for cp in view["checkpoints"]:
            cells = " | ".join(format_value(k, cp["metrics"].get(k)) for k in CHECKPOINT_KEYS)
            lines.append(f"| {method} | {cp['edits']} | {cells} |")
    return "\n".join(lines)


def render_report(summary: Mapping[str, Any], plots: Sequence[str]) -> str:
    data, model = summary["data"], summary["model"]
    source = f"`{data['path']}` ({data['format']}, sha256 {data['sha256'][:12]}…)"
    order = f"shuffled (seed {data['seed']})" if data["shuffle"] else "file order"
    if data.get("start"):
        order += f", from record {data['start']}"
    if data.get("rephrase", "all") != "all":  # absent in summaries written before the choice existed
        order += f", only those whose rephrase prompt is a {data['rephrase']} prompt"
    skipped = f"; {data['skipped_invalid']} malformed skipped" if data["skipped_invalid"] else ""
    methods = ", ".join(summary["methods"])
    head = [
        "# factedit evaluation",
        "",
        f"- model: `{model['id']}` (fingerprint {model['fingerprint'][:12]})",
        f"- data: {source}: {data['evaluated']} of {data['records_in_file']} records, {order}{skipped}",
        f"- mode: {summary['mode']}; methods: {methods}; factedit {summary['factedit_version']}",
        (
            f"- protocol: {summary['protocol']['name']}: CounterFact (cf/*, ROME) and token accuracy "
            "(tok/*, EasyEdit), and what the model says (gen/*: greedy continuations and chat replies); "
            "per-case values averaged over cases. Definitions: summary.json → protocol."
        ),
        "",
        *[line + "\n" for line in drift_warnings(summary)],
    ]
    paired = side_by_side_table(summary)
    if paired is not None:
        head += ["## Probabilities and what the model says, side by side", "", paired, "", "## All metrics", ""]
    head += [metrics_table(summary), ""]
    if summary.get("sequential"):
        head += [
            "## Sequential: every edit so far, re-measured at each checkpoint",
            "",
            checkpoint_table(summary),
            "",
        ]
    head += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(head) + "\n"


def write_outputs(out: Path, summary: dict[str, Any], *, plots: bool = True) -> str:
    """summary.json, the plots (unless `plots` is False) and report.md; returns report.md's text."""
    from .plots import plot_metrics, plot_retention

    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=False))
    written = []
    if plots:
        written.append(plot_metrics(summary, out / "metrics.png"))
        if summary.get("sequential"):
            written.append(plot_retention(summary, out / "retention.png"))
    report = render_report(summary, [p.name for p in written if p is not None])
    (out / "report.md").write_text(report)
    return report
