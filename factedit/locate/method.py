"""The registered locate-then-edit methods: `alphaedit`, `memit`, `rome`, one code path (style.md 13).

    keys    K_l (N, in): the down projection's input at the subject's last token of each request,
            averaged over the prompt under the context prefixes (contexts.py), at block l
    values  v*_i at block L = layers[-1] (values.py)
    solve   for l in layers, lowest first, on the weights updated so far:
                R = (v* − h_L(current)) / (number of layers left)      h_L: block L's output, prompt alone
                                                                       (one block: its down projection's)
                ΔW_l = Rᵀ X_l with X_l = the least-squares rows for (K_l, R):
                    preserve set (AlphaEdit):  KeyPreserver.solve_rows, in the null space of the corpus
                        keys (by default the whole space, with the covariance term), earlier edits' keys held
                    preserve None (MEMIT, ROME): covariance_solve_rows, the corpus keys' outputs weighed
                        by cov_weight (by default the key width; 0: each key inserted exactly, ROME)
            refine  (refine_passes > 0) while some request still has more than refine_tol of its
                    initial ‖v* − h_L‖ left after a pass, the blocks are solved again for what is left
                    (a regularised solve gives each key less than it asks for); each pass adds rank N

Each ΔW_l has rank <= N and is stored as its factors (Rᵀ, X_l). The model is never written: later
blocks see the earlier blocks' updates through functional_call, and the blocks below the first edited
one are not run again (reads.py). `edit_keys` gives the keys an applied edit protects in later solves:
K_l on the weights as they are after it (for the edit just computed: the keys read while spreading it).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.delta import Delta, ParamDelta
from ..core.methods import MethodSpec
from ..core.request import TokenizedRequest, max_context, subject_span
from ..model.contexts import ContextPrefixes
from ..model.hooks import frozen
from ..model.loading import model_id
from ..model.specs import layer_index, mlp_param_names, module_of, weight_layout
from ..model.weights import model_fingerprint
from ..safety.keys import key_statistics
from ..safety.preserve import KeyPreserver, build_preserver, covariance_solve_rows, covariance_weight
from ..safety.reference import key_corpus
from ..scoring.positions import Rows, first_rows, key_rows, subject_of, value_rows
from .config import LocateConfig, MEMITConfig, ROMEConfig
from .reads import Start, block_name, mean_by_owner, read_at_subject
from .values import Values, fit_values, with_what_follows

LOG = logging.getLogger(__name__)
# Models whose tail passes (tails.py) agreed with a full pass once: not checked again, by any Editor (an
# architecture's property; a new Editor per edit, as `factedit eval mode=single` makes, pays it once).
TAILS_AGREE: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
Moments = Callable[[Sequence[str]], dict[str, torch.Tensor]]
Solve = Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Locate:
    """Computes locate-then-edit deltas (module docstring) under one LocateConfig."""

    def __init__(self, config: LocateConfig) -> None:
        self.config = config
        self.prefixes = ContextPrefixes.of(config.prefixes)
        self.last_values = None  # the last compute's Values (steps, NLL): for benchmarks and tests
        self._spread_keys: SpreadKeys | None = None  # the last compute's keys (edit_keys reuses them)

    def param_names(self, model: nn.Module) -> list[str]:
        return mlp_param_names(model, self.config.layers, "out")

    def context_prefixes(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
        return self.prefixes.get(model, tokenizer) if self.prefixes is not None else ("",)

    def compute(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[TokenizedRequest],
        preserver: KeyPreserver | None = None, moments: Moments | None = None,
    ) -> Delta:
        for request in requests:  # a subject that is not in its prompt is refused before any work
            subject_span(request.request.prompt, subject_of(request))
        names = self.param_names(model)
        layers = [layer_index(model, n) for n in names]
        device = next(model.parameters()).device
        with frozen(model):
            prefixes = self.context_prefixes(model, tokenizer)
            kl_prompt = self.config.kl_prompt if self.config.kl_factor else None
            context_length = max_context(model.config)
            measured = measured_at(model, names)
            parts = []
            for start in range(0, len(requests), self.config.v_chunk):  # a fit's memory grows with its rows
                group = requests[start : start + self.config.v_chunk]
                value_batch = value_rows(tokenizer, prefixes, group, kl_prompt, self.config.position,
                                         chat=self.config.chat_context, context_length=context_length)
                if self.config.after_kl and self.config.after_tokens > 1:  # generation reads token lists: CPU rows
                    value_batch = with_what_follows(model, tokenizer, value_batch, self.config.after_tokens - 1,
                                                    context_length)
                value_batch = value_batch.to(device)
                parts.append(fit_values(model, value_batch, len(group), module_of(names[-1]), layers[-1], measured,
                                        self.config, check=model not in TAILS_AGREE))
                if parts[-1].tails:
                    TAILS_AGREE[model] = True
            values = self.last_values = Values.joined(parts)
            solve = self._solver(model, tokenizer, names, preserver, moments)
            rows = key_rows(tokenizer, prefixes, requests, self.config.position, context_length).to(device)
            delta, keys, weights = self._spread(model, rows, values.target, names, layers, measured, solve)
            ascending = layers == sorted(set(layers))  # else a key read early may move under a later update
            self._spread_keys = SpreadKeys(list(requests), keys, weights) if ascending else None
            return delta

    def _spread(
        self, model: nn.Module, rows: Rows, target: torch.Tensor, names: list[str], layers: list[int], measured: str,
        solve: Solve,
    ) -> tuple[Delta, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(ΔW_l for each edited block, lowest first, each on the weights the lower ones left (docstring);
        the keys K_l (N, in) read, on CPU; the weights W_l + ΔW_l)."""
        params = dict(model.named_parameters())
        n = target.shape[0]
        plain = first_rows(rows.owner, n)  # (N,): each request's prompt alone
        updated: dict[str, torch.Tensor] = {}
        start: Start | None = None
        out: dict[str, ParamDelta] = {}
        read: dict[str, torch.Tensor] = {}
        initial: torch.Tensor | None = None  # (N,): ‖v* − h‖ before any update
        for refinement in range(1 + self.config.refine_passes):
            for i, (name, layer) in enumerate(zip(names, layers, strict=True)):
                record = layers[0] if start is None and layers[0] >= 1 else None
                keys, hidden, captured = read_at_subject(model, rows, [module_of(name)], measured, params=updated,
                                                         start=start, record=record)
                start = captured or start
                k = mean_by_owner(keys[module_of(name)], rows.owner, n)  # (N, in)
                read[name] = k.cpu()  # the last pass's: the keys on the final weights below this block
                left = target - hidden[plain]  # (N, H)
                initial = left.norm(dim=1) if initial is None else initial
                x, v = solve(name, k, (left / (len(layers) - i)).to(k.dtype))  # (N, in), (N, out)
                if weight_layout(model, name) == "in_out":  # Conv1D (in, out)
                    step = ParamDelta(left=x.T.contiguous(), right=v.contiguous())
                else:  # Linear (out, in)
                    step = ParamDelta(left=v.T.contiguous(), right=x.contiguous())
                out[name] = step if name not in out else stacked(out[name], step)
                w = params[name].detach()
                updated[name] = w + out[name].materialize(w.dtype, w.device)
                LOG.debug("pass %d, block %d: residual %.3g, keys %.3g", refinement, layer, float(left.norm()),
                          float(k.norm()))
            if refinement == self.config.refine_passes:
                break
            _, hidden, _ = read_at_subject(model, rows, [], measured, params=updated, start=start)
            short = (target - hidden[plain]).norm(dim=1) / initial.clamp(min=1e-12)  # (N,)
            if float(short.max()) <= self.config.refine_tol:
                break
        return Delta(out), read, updated

    def _solver(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, names: list[str],
        preserver: KeyPreserver | None, moments: Moments | None,
    ) -> Solve:
        """The least-squares rows for one matrix: AlphaEdit's null-space solve, or MEMIT's covariance one.
        Outside an Editor (no preserver or moments given) they are built on the model as it is."""
        if self.config.preserve is not None:
            if preserver is None:
                preserver = build_preserver(model, tokenizer, names, self.config.preserve,
                                            fingerprint=model_fingerprint(model), model_id=model_id(model))
            return lambda name, k, v: preserver.solve_rows({name: k}, {name: v})[name]
        if moments is None:
            moments = lambda wanted: own_moments(model, tokenizer, wanted)  # noqa: E731
        second = moments(names)
        weight = self.config.cov_weight
        return lambda name, k, v: covariance_solve_rows(second[name], k, v,
                                                        covariance_weight(weight, second[name].shape[0]))

    def edit_keys(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, names: Sequence[str],
        requests: Sequence[TokenizedRequest],
    ) -> dict[str, torch.Tensor]:
        """{name: (N, in)}: the keys of `requests` (subject's last token, averaged over the prefixes) of
        the matrices `names` on the current weights: what an applied edit protects (safeguards.KeysFn)."""
        reused = self._reused_keys(model, names, requests)
        if reused is not None:
            return reused
        device = next(model.parameters()).device
        modules = sorted({module_of(n) for n in names})
        with frozen(model):
            rows = key_rows(tokenizer, self.context_prefixes(model, tokenizer), requests,
                            self.config.position, max_context(model.config)).to(device)
            top = max(modules, key=lambda m: layer_index(model, m + ".weight"))
            keys, _, _ = read_at_subject(model, rows, modules, top)
        return {n: mean_by_owner(keys[module_of(n)], rows.owner, len(requests)).cpu() for n in names}


    def _reused_keys(
        self, model: nn.Module, names: Sequence[str], requests: Sequence[TokenizedRequest],
    ) -> dict[str, torch.Tensor] | None:
        """The keys the last compute read, when asked for its own requests (the same objects: the
        Editor protects an edit right after applying it) and the matrices hold what it computed, to
        float rounding (the preserver's projection of an update already in its null space). A block's
        key does not depend on its own or higher blocks' updates, so the keys read while spreading
        (lowest block first) are those of the weights after the edit."""
        last = self._spread_keys
        if last is None or len(last.requests) != len(requests) or not set(names) <= set(last.keys):
            return None
        if any(a is not b for a, b in zip(last.requests, requests, strict=True)):
            return None
        params = dict(model.named_parameters())
        for name in names:
            now, then = params[name].detach(), last.weights[name].to(params[name].device)
            if now.shape != then.shape or float((now - then).abs().max()) > 1e-5 * float(then.abs().max()):
                return None
        return {n: last.keys[n] for n in names}


@dataclass(frozen=True)
class SpreadKeys:
    """What a compute read while spreading its update (see Locate._reused_keys)."""

    requests: list[TokenizedRequest]  # the requests it computed, as given
    keys: dict[str, torch.Tensor]  # name -> (N, in) K_l, on CPU
    weights: dict[str, torch.Tensor]  # name -> W_l + ΔW_l as it computed them


def stacked(first: ParamDelta, then: ParamDelta) -> ParamDelta:
    """One low-rank delta equal to `first` + `then`: their factors side by side (rank adds up)."""
    return ParamDelta(left=torch.cat([first.left, then.left], dim=1), right=torch.cat([first.right, then.right], dim=0))


def measured_at(model: nn.Module, names: Sequence[str]) -> str:
    """Where v* is measured: the highest edited block's output (MEMIT: lower blocks' updates add to it
    through the residual stream), or, with one edited block, its down projection's output (ROME)."""
    return module_of(names[-1]) if len(names) == 1 else block_name(model, layer_index(model, names[-1]))


def own_moments(model: nn.Module, tokenizer: PreTrainedTokenizerBase, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """E[k kᵀ] of the reference corpus for `names` on the model as it is (cached per fingerprint)."""
    modules = sorted({module_of(n) for n in names})
    moments = key_statistics(model, tokenizer, modules, key_corpus(), fingerprint=model_fingerprint(model),
                             model_id=model_id(model))
    return {n: moments[module_of(n)] for n in names}


ALPHAEDIT = MethodSpec("alphaedit", LocateConfig, Locate, locates=True)
MEMIT = MethodSpec("memit", MEMITConfig, Locate, locates=True)
ROME = MethodSpec("rome", ROMEConfig, Locate, batched=False, locates=True)
