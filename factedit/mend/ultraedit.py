"""`ultraedit`: a lifelong editor for any supported model, with no training (Gu et al. 2025, UltraEdit).

It is MEND's machinery with the identity in place of a trained network:

1. one forward and one backward pass of the model on the edit gives, per edited matrix and token,
   the input u (the key) and the gradient δ at the output (`capture_rows`);
2. lifelong normalisation: [u; δ] is standardised with running statistics that every edit keeps
   updating and never resets (the `StreamState` the Editor journals), so the editor adapts to the
   stream of edits it sees. They start from the rows of `warmup` edits of the shipped CounterFact
   training records, computed once per model: one fact alone has too few rows to standardise with
   (a single target token gives one row, whose deviation from its own mean is zero);
3. each token's value is −lr·‖ũ‖²·δ̃ (the normalised gradient, weighted by its normalised key's
   energy, UltraEdit's rule);
4. the update is the least-squares map from the raw keys to those values inside the null space of
   the reference corpus's keys, with a ridge (`KeyPreserver.solve_rows`): it leaves ordinary text
   alone and stays small, which is what lets thousands of edits accumulate;
5. the step is checked as `mend` checks it (`step_scales`): the smallest scale under which every
   target token is the argmax is kept.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.delta import Delta
from ..core.methods import MethodSpec, StreamState
from ..core.request import TokenizedRequest
from ..core.settable import Choice, Choices, Flag, Integer, Integers, Nested, Number, Numbers, Settable
from ..model.contexts import ContextPrefixes, PrefixConfig
from ..model.specs import mlp_param_names, num_layers
from ..paths import PACKAGE_DIR
from ..safety.preserve import KeyPreserver, PreserveConfig, preserve_field
from .config import POSITIONS, PREFIX_ROWS, check_prefix_rows, check_step_scales, check_take_margin
from .data import load_examples
from .method import capture_rows, edit_requests, edit_with_network, new_network, subject_keys_fn
from .network import MENDNetwork, Stats

STREAM_TAG = "ultraedit"
WARMUP_DATA = "data/counterfact/train.json"  # shipped inside the package (data/README.md)


@dataclass(frozen=True)
class UltraEditConfig:
    """How `ultraedit` edits (see the module docstring).

    layers / matrices: the blocks and MLP roles ("gate", "in", "out") edited; negative layers count
        from the last block. None: three consecutive blocks from a fifth of the model's depth (6, 7, 8
        of the default model's 30), where facts are stored and the null space is wide.
    lr: the step: each value is −lr·‖ũ‖²·δ̃.
    positions: "loss" = the positions whose output predicts a target token (UltraEdit's); "all" =
        every non-padding position; "subject" = the subject's last token only (MENDConfig.positions;
        its gradient there is smaller: it needs an `lr` about ten times larger). It reaches more
        paraphrases but kept edits do not hold: 200 kept on CounterFact train[3000:3200] with lr 5e-4
        and `finish_steps=4`, PS 0.705 against 0.62, retention 0.715 against 0.86, drift 1.052× against
        1.012× (docs/lifelong.md, "Edits keyed on the subject").
    step_scales: multipliers of lr, increasing (as MENDConfig.step_scales): the smallest under which
        every target token is the argmax is kept, else the largest. Small steps, more of them (with
        `extra_steps`): scales 1-2 with up to 8 extra steps hold a stream of edits the former scales
        1-8 did not (1,000 kept edits on CounterFact val[700:1700]: ES 0.93, drift 1.084×, none refused,
        against ES 0.89, 1.48× and 348 refused), for fewer paraphrases one edit at a time (PS 0.725
        against 0.80 on val[0:40]; docs/lifelong.md, "Small steps for `ultraedit` too").
    preserve: the null space and ridge of the least-squares solve; `protect_edits` holds earlier
        edits' keys (every token's) at zero change. None: no null space, the plain ridge solve
        ΔW = V Kᵀ (K Kᵀ + ridge·I)^{-1} of the UltraEdit paper.
    ridge: that plain solve's ridge (used only when `preserve` is None).
    extra_steps: more steps for an edit still short of the target, each from a fresh gradient at the
        weights the steps so far left (MENDConfig.extra_steps).
    finish_steps: after the extra steps, up to this many more keyed at the "loss" positions for an
        edit still short of its target (MENDConfig.finish_steps); 0 = none.
    take_margin: what "takes" asks of the step checks and the extra steps: every target token ahead of
        the runner-up by at least this many nats (MENDConfig.take_margin); 0 = the argmax. Default 1
        (since 2026-12-05): an edit that only just takes is undone by later ones more often (200 kept
        on CounterFact val[1700:1900]: docs/lifelong.md, "A margin for `ultraedit`").
    warmup: how many edits of the shipped CounterFact training records (their first records) start the
        statistics, computed once per model; 0 = start empty.
    pass_size: edit_batch runs at most this many requests per pass (None: one pass).
    prefixes: the edit is also made under these short model-written prefixes (contexts.py, MEMIT's
        context templates): each request's prompt under each prefix is one more request of the same
        edit (its rows in the capture, the solve and the step checks, so a step is kept once the
        target is the argmax in every context); None = the prompt alone.
        Off by default: one at a time it gains paraphrases and chat answers for 2-3 times the cost, but
        kept `ultraedit` edits drifted 1.22× after 100 against 1.04× (docs/lifelong.md, "Lifelong editing").
    chat_context: the edit is also made on the prompt asked through the chat template (as `mend`'s
        `chat_context`); off by default.
    prefix_rows: with `prefixes`, what the prefixed prompts' rows do: "checked", "follow", "mean" or
        "mean_follow" (as `mend`'s).
    """

    layers: tuple[int, ...] | None = None
    matrices: tuple[str, ...] = ("out",)
    lr: float = 1e-4
    positions: str = "all"
    step_scales: tuple[float, ...] = (1.0, 2.0)
    preserve: PreserveConfig | None = preserve_field(PreserveConfig(threshold=0.5, ridge=10.0, protect_edits=False))
    ridge: float = 1.0
    warmup: int = 32
    extra_steps: int = 8
    finish_steps: int = 0
    take_margin: float = 1.0
    pass_size: int | None = None
    prefixes: PrefixConfig | None = field(default=None, metadata={"dataclass": PrefixConfig})
    chat_context: bool = False
    prefix_rows: str = "checked"

    # What the app and the service may set per edit (settable.py): the warm-up bounds the edits run
    # once per model, step scales and extra steps the passes of one edit.
    SETTABLE: ClassVar[Settable] = {
        "layers": Integers(-64, 63, max_items=8, optional=True), "matrices": Choices("gate", "in", "out"),
        "lr": Number(1e-8, 0.1), "positions": Choice(*POSITIONS), "step_scales": Numbers(1e-3, 100.0, max_items=6),
        "preserve": Nested(PreserveConfig.SETTABLE), "ridge": Number(1e-3, 1e3), "warmup": Integer(0, 64),
        "extra_steps": Integer(0, 8), "finish_steps": Integer(0, 8),
        "take_margin": Number(0.0, 10.0), "pass_size": Integer(1, 64, optional=True),
        "prefixes": Nested(PrefixConfig.SETTABLE), "chat_context": Flag(),
        "prefix_rows": Choice(*PREFIX_ROWS),
    }

    def __post_init__(self) -> None:
        if (self.layers is not None and not self.layers) or not self.matrices:
            raise ValueError("layers and matrices must not be empty (layers None: the default blocks)")
        if not self.lr > 0 or not self.ridge > 0:
            raise ValueError("lr and ridge must be > 0")
        if self.warmup < 0 or self.extra_steps < 0 or self.finish_steps < 0:
            raise ValueError("warmup, extra_steps and finish_steps must be >= 0")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        check_step_scales(self.step_scales)
        check_take_margin(self.take_margin)
        check_prefix_rows(self.prefix_rows)
        if self.pass_size is not None and self.pass_size < 1:
            raise ValueError("pass_size must be >= 1, or None for one pass")


class UltraEdit:
    """Computes `ultraedit` deltas; the identity editor network is built per model on first use."""

    def __init__(self, config: UltraEditConfig) -> None:
        self.config = config
        self._networks: weakref.WeakKeyDictionary[nn.Module, MENDNetwork] = weakref.WeakKeyDictionary()
        self._initial: weakref.WeakKeyDictionary[nn.Module, dict[str, Stats]] = weakref.WeakKeyDictionary()
        self.prefixes = ContextPrefixes.of(config.prefixes)

    def layers(self, model: nn.Module) -> tuple[int, ...]:
        if self.config.layers is not None:
            return self.config.layers
        first, count = num_layers(model) // 5, min(3, num_layers(model))
        return tuple(range(min(first, num_layers(model) - count), min(first, num_layers(model) - count) + count))

    def param_names(self, model: nn.Module) -> list[str]:
        return mlp_param_names(model, self.layers(model), self.config.matrices)

    @property
    def edit_keys(self) -> Callable[..., dict[str, torch.Tensor]] | None:
        """The keys an edit protects (as `MEND.edit_keys`)."""
        return subject_keys_fn(self.config.positions, self.prefixes, self.config.chat_context)

    def _network(self, model: nn.Module) -> MENDNetwork:
        if model not in self._networks:
            network = new_network(model, self.layers(model), self.config.matrices, rank=1, n_hidden=0,
                                  alpha_init=self.config.lr, aggregation="least_squares")
            self._networks[model] = network.to(next(model.parameters()).device).eval()
        return self._networks[model]

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
        preserver: KeyPreserver | None = None, stream: StreamState | None = None,
    ) -> Delta:
        """The delta for `requests`; the stream's statistics (fresh ones without a stream) with this
        edit's rows merged in normalise them, and go back into the stream."""
        network = self._network(model)
        if preserver is None:  # preserve=None: UltraEdit's own solve, a plain ridge over the whole space
            preserver = KeyPreserver.full_space({p.name: p.d_in for p in network.params},
                                                {p.name: p.layout for p in network.params}, self.config.ridge)
        def initial() -> dict[str, Stats]:  # the warm-up, only for a stream that starts here
            return self._initial_stats(model, tokenizer, network)

        return edit_with_network(model, tokenizer, requests, network, self.param_names(model),
                                 preserver, stream if stream is not None else StreamState(), STREAM_TAG,
                                 positions=self.config.positions, pass_size=self.config.pass_size,
                                 step_scales=self.config.step_scales, key_weighted=True, initial=initial,
                                 extra_steps=self.config.extra_steps, finish_steps=self.config.finish_steps,
                                 take_margin=self.config.take_margin, prefixes=self.prefixes,
                                 chat=self.config.chat_context, prefix_rows=self.config.prefix_rows)

    def _initial_stats(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, network: MENDNetwork,
    ) -> dict[str, Stats]:
        """The statistics a stream starts from (the `warmup` config field), once per model."""
        if model not in self._initial:
            stats = {key: Stats.empty(editor.d_in + editor.d_out) for key, editor in network.editors.items()}
            if self.config.warmup:
                path = PACKAGE_DIR / WARMUP_DATA
                examples = load_examples(path, tokenizer, "counterfact", limit=self.config.warmup)
                requests = edit_requests(model, tokenizer, [e.edit for e in examples], None, self.config.positions)
                rows, _ = capture_rows(model, tokenizer, requests, network.param_names, self.config.positions, 8, None)
                stats = network.merged_stats(stats, rows)
            self._initial[model] = stats
        return self._initial[model]


def build(config: UltraEditConfig) -> UltraEdit:
    return UltraEdit(config)


METHOD = MethodSpec("ultraedit", UltraEditConfig, build, guarded=True)
