"""Replaying a journal onto a freshly loaded model: check it is the journal's base model (sha256 of every
parameter, and of each parameter an edit touched first), apply the active edits in order, and check the
result against the hashes the journal's writer recorded after its last change. The weight state then
keeps the base of every parameter an edit ever touched, as the writer's did."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import ModelMismatchError
from ..core.record import EditRecord
from ..model.weights import WeightState, model_sha256, tensor_sha256
from .journal import Journal

LOG = logging.getLogger(__name__)


@dataclass
class Replayed:
    """What a replay left: the weight state (base values and active deltas), every record, each lifelong
    method's latest state, the base model's sha256, and the parameters whose replayed bits differ from
    the writer's ([] = exact)."""

    state: WeightState
    records: list[EditRecord] = field(default_factory=list)
    streams: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    base_sha256: str | None = None
    differs: list[str] = field(default_factory=list)


def replay(
    journal: Journal | None, model: nn.Module, model_id: str, fingerprint: str, timings: dict[str, float],
) -> Replayed:
    """Replay `journal` onto `model` (nothing to replay without one); ModelMismatchError, with the model
    untouched, when it is not the journal's base; a corrupt delta leaves the model as it was. What
    hashing the base cost goes into `timings["hash_ms"]` (refused or not)."""
    if journal is None:
        return Replayed(WeightState())
    t = time.perf_counter()
    base_sha256 = model_sha256(model)  # exact: every byte of every parameter
    timings["hash_ms"] = round((time.perf_counter() - t) * 1000, 3)
    journal.check_model(model_id, fingerprint, base_sha256)
    _check_base_hashes(journal, model)
    records = journal.records()
    state = WeightState()
    try:
        for record in records:
            if record.status == "active":
                state.apply(model, record.id, record.delta)
        # The parameters only reverted edits touched are base now; the writer kept them as base too, and
        # what is read from the base weights (the guard's first block, among others) follows that set.
        state.keep_base(model, sorted(journal.meta.get("base_hashes", {})))
    except BaseException:
        state.restore_base(model)  # undo the ones already replayed
        raise
    differs = _differences(model, journal.weights_hashes())
    return Replayed(state, records, journal.latest_states(records), base_sha256, differs)


def _check_base_hashes(journal: Journal, model: nn.Module) -> None:
    params = dict(model.named_parameters())
    for name, expected in journal.meta.get("base_hashes", {}).items():
        if name not in params or tensor_sha256(params[name]) != expected:
            raise ModelMismatchError(
                f"parameter {name!r} of the given model differs from the base that journal {journal.path} was "
                "made on (another model, or a model already edited). Give a freshly loaded copy of the "
                "journal's base model."
            )


def _differences(model: nn.Module, expected: Mapping[str, str]) -> list[str]:
    """The parameters whose sha256 is not the one the journal recorded after its last change (warned)."""
    params = dict(model.named_parameters())
    differ = [name for name, digest in expected.items() if name in params and tensor_sha256(params[name]) != digest]
    if differ:
        LOG.warning("replaying the journal gave other values than its writer had for %d parameter(s) (%s): "
                    "the edits hold, but not bit for bit (another torch version or processor?)",
                    len(differ), ", ".join(differ[:3]) + (", ..." if len(differ) > 3 else ""))
    return differ
