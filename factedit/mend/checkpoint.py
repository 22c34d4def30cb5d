"""MEND checkpoints: a directory with `editor.safetensors` (weights, step sizes, normalisation
statistics) and `editor.json` (what the editor is for and how it was made). Never pickle.

The JSON records the base model's id and fingerprints, the edited parameters (name, widths, layout),
the network's shape, the training config, sha256 of every training/validation data file, the
validation metrics, the factedit version and the sha256 of the weights file. Loading checks all of
it; `check_model` refuses a model the editor was not trained for.

Two fingerprints of the base model are kept: `fingerprint` (`model_fingerprint`, all parameters) as
trained, and `anchor_fingerprint` (the config and the input embeddings, which no edit method
changes). A model is accepted when its anchor matches, so an editor keeps working on a model that
already carries edits (e.g. replayed from a journal).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..core.atomic import write_text
from ..core.errors import CheckpointError, ModelMismatchError
from ..core.hashing import file_sha256
from ..model.weights import config_identity, model_fingerprint
from .network import EditedParam, MENDNetwork

LOG = logging.getLogger(__name__)

FORMAT = "factedit.mend/1"
WEIGHTS = "editor.safetensors"
META = "editor.json"
SHIPPED = Path(__file__).resolve().parent / "checkpoints" / "smollm2-135m"
_REQUIRED = ("format", "factedit_version", "base_model", "params", "network", "weights_sha256")


@dataclass
class MENDCheckpoint:
    """A loaded editor: its network (eval mode) and its metadata."""

    network: MENDNetwork
    meta: dict[str, Any]
    path: Path | None = None


def anchor_fingerprint(model: nn.Module, samples: int = 8192) -> str:
    """Config plus a strided sample of the input embeddings: what edits never change."""
    digest = hashlib.sha256(config_identity(model))
    with torch.no_grad():
        weight = model.get_input_embeddings().weight.detach().reshape(-1)
        digest.update(f"{tuple(model.get_input_embeddings().weight.shape)}".encode())
        sample = weight[:: max(1, weight.numel() // samples)].to("cpu", torch.float64)
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def base_model_info(model: nn.Module) -> dict[str, str]:
    from ..model.loading import model_id

    return {
        "id": model_id(model),
        "model_type": str(model.config.model_type),
        "fingerprint": model_fingerprint(model),
        "anchor_fingerprint": anchor_fingerprint(model),
    }


def save_checkpoint(
    directory: str | Path,
    network: MENDNetwork,
    base_model: Mapping[str, str],
    *,
    train_config: Mapping[str, Any] | None = None,
    data_hashes: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    step: int = 0,
    preserve: Mapping[str, Any] | None = None,
) -> Path:
    """Write the editor to `directory` (created); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    weights = directory / WEIGHTS
    save_file(state, str(weights), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "method": "mend",
        "factedit_version": __version__,
        "base_model": dict(base_model),
        "params": [p.__dict__ for p in network.params],
        "network": {"rank": network.rank, "n_hidden": network.n_hidden, "aggregation": network.aggregation},
        "preserve": dict(preserve or {}),
        "train_config": dict(train_config or {}),
        "data": dict(data_hashes or {}),
        "metrics": dict(metrics or {}),
        "step": int(step),
        "weights_sha256": file_sha256(weights),
    }
    write_text(directory / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def build_network(meta: Mapping[str, Any]) -> MENDNetwork:
    """An untrained network of the shape `meta` describes (identity init, α = 0 until loaded)."""
    params = [EditedParam(**p) for p in meta["params"]]
    net = meta["network"]
    return MENDNetwork(params, rank=int(net["rank"]), n_hidden=int(net["n_hidden"]), alpha_init=0.0,
                       aggregation=net.get("aggregation", "sum"))


def read_meta(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    meta_path = directory / META
    if not directory.is_dir() or not meta_path.is_file() or not (directory / WEIGHTS).is_file():
        raise CheckpointError(
            f"no MEND checkpoint at {directory}: expected a directory with {META} and {WEIGHTS} "
            "(train one with `factedit train-mend`)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON: {exc}") from None
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} lacks {missing}; it is not a factedit MEND checkpoint")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{meta_path} has format {meta['format']!r}; this factedit reads {FORMAT!r}")
    return meta


def load_checkpoint(directory: str | Path | None = None) -> MENDCheckpoint:
    """Load and check a checkpoint directory (None: the shipped editor for the default model)."""
    directory = Path(directory) if directory is not None else SHIPPED
    meta = read_meta(directory)
    weights = directory / WEIGHTS
    if file_sha256(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights} does not match the sha256 recorded in {META}: the file is corrupt")
    if meta["factedit_version"] != __version__:
        LOG.warning("MEND checkpoint %s was written by factedit %s (this is %s)", directory,
                    meta["factedit_version"], __version__)
    try:
        network = build_network(meta)
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{directory / META} describes no valid editor network: {exc}") from None
    state = load_file(str(weights))
    expected = network.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not fit {META}: missing {missing}, unexpected {unexpected}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape or tensor.dtype != expected[key].dtype:
            raise CheckpointError(
                f"{weights}: {key} is {tuple(tensor.shape)} {tensor.dtype}, expected "
                f"{tuple(expected[key].shape)} {expected[key].dtype}"
            )
    network.load_state_dict(state, strict=True)
    network.eval()
    return MENDCheckpoint(network, meta, directory)


def check_model(checkpoint: MENDCheckpoint, model: nn.Module) -> None:
    """Refuse a model the editor was not trained for (ModelMismatchError, saying what differs)."""
    base = checkpoint.meta["base_model"]
    where = checkpoint.path or "this checkpoint"
    if str(model.config.model_type) != base.get("model_type"):
        raise ModelMismatchError(
            f"the MEND editor at {where} was trained for a {base.get('model_type')!r} model "
            f"({base.get('id')!r}), not for this {model.config.model_type!r} model; train an editor "
            "for it with `factedit train-mend`"
        )
    params = dict(model.named_parameters())
    for p in checkpoint.meta["params"]:
        shape = (p["d_in"], p["d_out"]) if p["layout"] == "in_out" else (p["d_out"], p["d_in"])
        if p["name"] not in params or tuple(params[p["name"]].shape) != shape:
            raise ModelMismatchError(
                f"the MEND editor at {where} edits {p['name']} of shape {shape}, which this model does "
                f"not have; it was trained for {base.get('id')!r}"
            )
    anchor = anchor_fingerprint(model)
    if anchor != base.get("anchor_fingerprint"):
        raise ModelMismatchError(
            f"the MEND editor at {where} was trained for base model {base.get('id')!r} (anchor "
            f"fingerprint {base.get('anchor_fingerprint')}), but this model's is {anchor}: it is another "
            "model. Use the model the editor was trained for, or train one with `factedit train-mend`."
        )
