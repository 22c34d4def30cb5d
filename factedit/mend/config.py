"""Configuration of the `mend` edit method (what `Editor("mend", **overrides)` accepts)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import ClassVar

from ..core.settable import Choice, Choices, Flag, Integer, Integers, Nested, Number, Numbers, Settable
from ..model.contexts import PrefixConfig
from ..safety.preserve import PreserveConfig, preserve_field

POSITIONS = ("loss", "all", "subject")
# What the rows of an edit's prefixed prompts do (MENDConfig.prefix_rows).
PREFIX_ROWS = ("checked", "follow", "mean", "mean_follow")


def check_step_scales(scales: tuple[float, ...]) -> None:
    """Step scales are one or more increasing numbers > 0 (`scaled_step` bisects them)."""
    if not scales or any(not scale > 0 for scale in scales):
        raise ValueError("step_scales must be one or more numbers > 0")
    if any(later <= earlier for earlier, later in itertools.pairwise(scales)):
        raise ValueError(f"step_scales must increase (the smallest that takes is searched), got {scales}")


def check_take_margin(margin: float) -> None:
    """A take margin is a number of nats in [0, 10] (0: the argmax alone)."""
    if not 0.0 <= margin <= 10.0:
        raise ValueError(f"take_margin must be in [0, 10], got {margin!r}")


def check_prefix_rows(prefix_rows: str) -> None:
    """`prefix_rows` is one of PREFIX_ROWS."""
    if prefix_rows not in PREFIX_ROWS:
        raise ValueError(f"prefix_rows must be one of {PREFIX_ROWS}, got {prefix_rows!r}")


@dataclass(frozen=True)
class MENDConfig:
    """How MEND edits; the editor network's own shape lives in its checkpoint.

    checkpoint: a directory written by `save_checkpoint` (or `factedit train-mend`); None = the
        editor shipped for the default model (`factedit/mend/checkpoints/smollm2-135m`).
    layers / matrices: the blocks and MLP roles ("gate", "in", "out") whose weights are edited;
        None = those the checkpoint was trained for (given, they must name exactly those).
    positions: which token positions feed the editor: "loss" = the positions whose output predicts
        a target token (MEND's masking); "all" = every non-padding position (the exact gradient; the
        shipped editor was trained on it, and it was the default before); "subject" (the default) = the
        subject's last token only (the request's `subject`, else the one `find_subject` reads in the
        prompt), where the locate-then-edit family keys an edit: the update then maps what the model
        holds about the subject, which other wordings that name it read too, and with
        `preserve.protect_edits` later edits hold those keys only; None = as the checkpoint was
        trained. With `finish_steps=4` and `take_margin=1` (the defaults since 2026-12-05), 200 kept
        edits on CounterFact val[1700:1900] (the prompt alone, `prefixes=None`): PS 0.855 against 0.73
        keyed at "all", the target still said at the end 0.91 against 0.875, chat 0.20 against 0.09,
        drift 1.051× against 1.045×, at about 1.6 times the compute an edit (docs/lifelong.md, "Keyed
        on the subject, with a margin").
    pass_size: `edit_batch` runs the base model on at most this many requests at a time, sorted by
        length so little padding is computed (the result does not depend on it); None = one pass.
    step_scales: multipliers of the learned step sizes α, increasing: the smallest under which every
        target token is the argmax (the criterion the fine-tuning editors stop on) is kept, else the
        largest. The smallest and the largest are checked first, then the scales between them are
        bisected (`scaled_step`); in `edit_batch` each request's rows get their own scale. Each check
        runs the edited blocks once (from states the capture pass keeps); a single value is applied
        without a check (1.0 = the step as trained). An edit thus gets no more of the step than it needs
        to take. Small scales and more steps (`extra_steps`) edit better than large scales: a step far
        along the first gradient overshoots into what plain text uses, a fresh gradient at the weights
        the last step left points where the target still needs to go (100 kept edits on CounterFact
        train[3000:3100]: scales to 3.5 with one extra step kept 0.68 of the targets said at 1.029×
        drift; adding a scale 5.25 drifted 1.31×; scales to 1.5 with eight extra steps kept 0.94 at
        1.013×: docs/lifelong.md, "Lifelong editing").
    preserve: the null space and ridge of the least-squares solve (`aggregation: least_squares`
        editors; for "sum" editors, the projection of the summed update); None = no preservation.
    lifelong: the normalisation statistics of (u, δ) keep learning while the editor edits: each edit's
        rows are merged into them (Welford, as in training) before they are normalised, and the
        statistics an edit leaves are journaled with it (`StreamState`), so a reopened journal edits
        on exactly as the process that wrote it would. False: the checkpoint's statistics, frozen.
    extra_steps: more steps for an edit whose target is still not the argmax after the first: each a
        fresh forward and backward at the weights the steps so far left (the same editor, statistics,
        solve and step checks), its rows added to the update; 0 = one step (MEND as published). Most
        edits take at the first step; a hard fact takes up to 8 more (at most 9 forward and backward).
    take_margin: what "takes" asks of the step checks and the extra steps: every target token the
        argmax and ahead of the runner-up token by at least this many nats (logits); 0 = the argmax.
        Default 1: a subject-keyed edit that only just takes is undone by later edits more often (100
        kept on CounterFact train[3000:3100], keyed on the subject with `finish_steps=4`: the target
        still said at the end 0.93 with margin 1 against 0.84 with 0). Keyed at "all", margin 1 gave
        said 0.95 against 0.94 but neighbours' answers kept 0.60 against 0.67, 1.2× the compute.
    finish_steps: after the extra steps, up to this many more for an edit still short of its target,
        keyed at the "loss" positions whatever `positions` says: a subject-keyed edit that the subject
        alone does not make take still ends taken; 0 = none. Default 4.
    fallback_ridges: smaller ridges tried, in order, for an edit that no step scale makes take at the
        preserve ridge (each again with every step scale); () = none. The shipped editor was trained
        with ridge 1; a large ridge keeps each update small and off the directions plain text uses.
        Measured on CounterFact val[240:300] (one at a time ES / PS / NS, then drift after 60 edits
        one after another, guard off): ridge 10 alone 0.83 / 0.60 / 0.62, ×1.11; with fallback 3
        0.90 / 0.65 / 0.62, ×3.3; with fallback 1 0.85 / 0.72 / 0.60, ×8.4 after 40. The default
        keeps edits accumulating; `fallback_ridges=(3.0,)` suits edits reverted soon after. Ridge 1
        alone (as trained) moved perplexity ×1.15 after five edits (val[300:305]).
    prefixes: the edit is also made under these short model-written prefixes (contexts.py, MEMIT's
        context templates): each request's prompt under each prefix is one more context of the same
        fact (what its rows do: `prefix_rows`); None = the prompt alone (MEND as published). On by
        default since 2026-12-05 (five prefixes, `prefix_rows="mean_follow"`): held out, one at a time
        on CounterFact val[0:80] PS 0.912 against 0.762, said para 0.287 against 0.175, chat 0.412
        against 0.113, the prompt said 0.925 against 0.90, NS as unedited, at 7.5 forward+backward
        passes an edit against 4.0; 200 kept on val[1700:1900] PS 0.90 against 0.855, said at the end
        0.94 against 0.91, chat 0.395 against 0.20, drift 1.079× against 1.051× (docs/lifelong.md,
        "Several contexts").
    chat_context: the edit is also made on the prompt asked as one user message through the tokenizer's
        chat template, the target as the start of the reply (`chat_requests`; the locate family's chat
        row), keyed at the subject there too: its rows join every step of its fact at that fact's step
        scale, and the step checks read the prompt alone (`capture_with_followers`); nothing for a tokenizer
        without a chat template. Off by default (measured with `prefixes=None`, the defaults of the
        day): one at a time on CounterFact val[0:80] it raised chat
        answers from 0.113 to 0.25 and PS from 0.762 to 0.812 at 7.5 forward+backward passes an edit
        against 4.0, but 200 kept edits (val[1700:1900]) drifted 1.128× against 1.051× and kept fewer
        targets said (0.87 against 0.91) with chat answers no better (docs/lifelong.md, "The fact asked as a
        chat, for `mend`").
    prefix_rows: with `prefixes`, what the prefixed prompts' rows do. "checked": each is one more
        request, its rows in the update and the step checks (a step is kept once the target leads by
        the margin in every context). "follow": its rows join its fact's step scale and steps, as the
        chat row's do, and the checks read the prompt alone. "mean": a fact's rows at the subject's last
        token are averaged over its contexts into one row (MEMIT's key averaged over contexts), stepped
        and checked as the prompt's; at other positions (positions "loss" or "all", and the finishing
        steps) the contexts' rows follow, as with "follow". "mean_follow" (the default): the prompt's
        row stays as it is, stepped and checked; the other contexts' rows at the subject's last token
        are averaged into one more row that follows its step (two rows a fact; elsewhere they
        follow): the prompt keeps its own reach, which "mean" gives up, and the stream drifts about
        as with "mean" (100 kept on train[3000:3100]: "checked" 1.105×, "follow" 1.114×, "mean"
        1.030×, "mean_follow" 1.040×, the prompt alone 1.022×).
    """

    checkpoint: str | None = None
    layers: tuple[int, ...] | None = None
    matrices: tuple[str, ...] | None = None
    positions: str | None = "subject"
    pass_size: int | None = None
    step_scales: tuple[float, ...] = (1.0, 1.5)
    preserve: PreserveConfig | None = preserve_field(PreserveConfig(threshold=0.5, ridge=10.0))
    fallback_ridges: tuple[float, ...] = ()
    lifelong: bool = True
    extra_steps: int = 8
    take_margin: float = 1.0
    finish_steps: int = 4
    prefixes: PrefixConfig | None = field(default=PrefixConfig(), metadata={"dataclass": PrefixConfig})
    chat_context: bool = False
    prefix_rows: str = "mean_follow"

    # What the app and the service may set per edit (settable.py). Not the checkpoint: a path on the
    # server; the operator chooses it (SessionConfig.method_overrides).
    SETTABLE: ClassVar[Settable] = {
        "layers": Integers(-64, 63, max_items=8, optional=True),
        "matrices": Choices("gate", "in", "out", optional=True), "positions": Choice(*POSITIONS, optional=True),
        "pass_size": Integer(1, 64, optional=True), "step_scales": Numbers(1e-3, 100.0, max_items=6),
        "preserve": Nested(PreserveConfig.SETTABLE), "fallback_ridges": Numbers(1e-3, 1e3, max_items=4),
        "lifelong": Flag(), "extra_steps": Integer(0, 8), "take_margin": Number(0.0, 10.0),
        "finish_steps": Integer(0, 8), "prefixes": Nested(PrefixConfig.SETTABLE), "chat_context": Flag(),
        "prefix_rows": Choice(*PREFIX_ROWS),
    }

    def __post_init__(self) -> None:
        if (self.layers is not None and not self.layers) or (self.matrices is not None and not self.matrices):
            raise ValueError("layers and matrices must not be empty (None: as the checkpoint was trained)")
        if self.positions is not None and self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.pass_size is not None and self.pass_size < 1:
            raise ValueError("pass_size must be >= 1, or None for one pass")
        check_step_scales(self.step_scales)
        if self.extra_steps < 0 or self.finish_steps < 0:
            raise ValueError("extra_steps and finish_steps must be >= 0")
        check_take_margin(self.take_margin)
        check_prefix_rows(self.prefix_rows)
        if any(not ridge > 0 for ridge in self.fallback_ridges):
            raise ValueError("fallback_ridges must be numbers > 0")
