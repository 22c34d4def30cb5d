"""A MEND training run's setup and bookkeeping: the data and its batch stream, the network and optimizer
(new or resumed), the prefix cache and the null space of the solve (`prepare`); the log, validation,
best checkpoint and the `last` state a later run resumes from (`Keeper`, `save_training_state`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

import factedit

from ..core.errors import CheckpointError
from ..core.hashing import file_sha256
from ..model.specs import resolve_layers
from ..paths import resolve_path
from ..safety.preserve import PreserveConfig, build_preserver
from ..scoring.sequences import pad_id_of
from .checkpoint import base_model_info, check_model, load_checkpoint, save_checkpoint
from .data import EditExample, load_examples
from .method import new_network
from .objective import evaluate_kept_edits, evaluate_single_edits, harmonic_mean
from .prefix import PrefixCache

if TYPE_CHECKING:
    from .train import TrainConfig

LOG = logging.getLogger(__name__)
OPTIMIZER = "optimizer.safetensors"  # in `last`: the optimizer's tensors
STATE = "trainer_state.json"  # in `last`: step, best metrics, patience, the optimizer's scalars


def load_data(cfg: TrainConfig, tokenizer) -> tuple[list[EditExample], list[EditExample], dict[str, str]]:
    cf = resolve_path(cfg.train_counterfact)
    train = load_examples(cf, tokenizer, "counterfact", limit=cfg.n_train)
    hashes = {cfg.train_counterfact: file_sha256(cf)}
    if cfg.train_zsre:
        zs = resolve_path(cfg.train_zsre)
        train += load_examples(zs, tokenizer, "zsre", limit=cfg.n_zsre)
        hashes[cfg.train_zsre] = file_sha256(zs)
    val_path = resolve_path(cfg.val_file)
    val = load_examples(val_path, tokenizer, "counterfact", start=cfg.val_start, limit=cfg.n_val)
    hashes[cfg.val_file] = file_sha256(val_path)
    return train, val, hashes


def batches(n_examples: int, batch_size: int, seed: int, start_step: int):
    """Endless (step, indices) from seeded per-epoch permutations, skipping to `start_step`."""
    per_epoch = n_examples // batch_size
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = list(range(n_examples))
        random.Random(seed * 100003 + epoch).shuffle(order)
        yield step, order[offset * batch_size : (offset + 1) * batch_size]
        step += 1


def save_training_state(directory: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Adam moments as safetensors and the loop state as JSON (never pickle)."""
    tensors, scalars = {}, {}
    for index, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / OPTIMIZER))
    (directory / STATE).write_text(json.dumps({**state, "optimizer_scalars": scalars}, indent=2))


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if not (directory / STATE).is_file():
        return {}
    state = json.loads((directory / STATE).read_text())
    tensors = load_file(str(directory / OPTIMIZER)) if (directory / OPTIMIZER).is_file() else {}
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(state.pop("optimizer_scalars", {}).items()):
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    saved = optimizer.state_dict()
    saved["state"] = per_param
    optimizer.load_state_dict(saved)
    return state


@dataclass
class Run:
    """Everything a training run sets up before its first step."""

    cfg: TrainConfig
    accelerator: Any
    model: Any
    tokenizer: Any
    network: Any
    optimizer: torch.optim.Optimizer
    train_set: list[EditExample]
    val_set: list[EditExample]
    hashes: dict[str, str]
    base_info: dict[str, Any]
    cache: PrefixCache | None
    preserve: PreserveConfig | None
    preserver: Any
    state: dict[str, Any]  # a resumed run's trainer state ({} for a new run)
    pad_id: int
    start_time: float


def prepare(cfg: TrainConfig, model, tokenizer) -> Run:
    """Load the model and data, build (or resume) the network and its optimizer, the prefix cache and the
    null space of the solve."""
    from accelerate import Accelerator

    start_time = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator = Accelerator(cpu=cfg.cpu)
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer = factedit.load_model(None if cfg.model == "default" else cfg.model)
    model.to(accelerator.device)
    train_set, val_set, hashes = load_data(cfg, tokenizer)
    base_info = base_model_info(model)
    cache = PrefixCache(model, min(resolve_layers(model, cfg.layers))) if cfg.prefix_cache else None
    if cache is not None and cfg.prefix_cache_file:
        LOG.info("prefix cache: %d sequences loaded from %s", cache.load(cfg.prefix_cache_file,
                 base_info["anchor_fingerprint"], accelerator.device), cfg.prefix_cache_file)
    network = new_network(model, cfg.layers, cfg.matrices, rank=cfg.rank, n_hidden=cfg.n_hidden,
                          alpha_init=cfg.alpha_init, aggregation=cfg.aggregation)
    preserve = preserver = None
    if cfg.aggregation == "least_squares":
        preserve = PreserveConfig(threshold=cfg.preserve_threshold, ridge=cfg.preserve_ridge, protect_edits=False)
        preserver = build_preserver(model, tokenizer, network.param_names, preserve,
                                    fingerprint=base_info["fingerprint"], model_id=base_info["id"])
    if cfg.resume:
        loaded = load_checkpoint(cfg.resume)
        check_model(loaded, model)
        if loaded.network.param_names != network.param_names:
            raise CheckpointError(f"{cfg.resume} edits {loaded.network.param_names}, not {network.param_names}")
        network.load_state_dict(loaded.network.state_dict())
    net_params = [p for n, p in network.named_parameters() if n != "alpha"]
    optimizer = torch.optim.Adam([{"params": net_params, "lr": cfg.lr},
                                  {"params": [network.alpha], "lr": cfg.lr_alpha}])
    state = load_training_state(Path(cfg.resume), optimizer) if cfg.resume else {}
    network, optimizer = accelerator.prepare(network, optimizer)
    return Run(cfg, accelerator, model, tokenizer, network, optimizer, train_set, val_set, hashes, base_info,
                cache, preserve, preserver, state, pad_id_of(tokenizer), start_time)


class Keeper:
    """The run's log, validation, best checkpoint and `last` (the state a later run resumes from)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.out_dir = Path(run.cfg.output_dir)
        self.best: dict[str, Any] = run.state.get("best", {})
        self.best_value = self.best.get(run.cfg.early_stop_key, -math.inf)
        self.bad_evals = int(run.state.get("bad_evals", 0))
        self.main = run.accelerator.is_main_process
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(run.cfg).items()}
        self.preserve_meta = dataclasses.asdict(run.preserve) if run.preserve is not None else None

    def log(self, metrics: dict[str, Any]) -> None:
        if self.main:
            with open(self.out_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(metrics) + "\n")

    def minutes(self) -> float:
        return (time.perf_counter() - self.run.start_time) / 60

    def evaluate_and_save(self, at_step: int) -> bool:
        """Validate, keep the best checkpoint and `last`; True when training should stop (patience)."""
        run, cfg = self.run, self.run.cfg
        t = time.perf_counter()
        network = run.accelerator.unwrap_model(run.network)
        metrics = evaluate_single_edits(run.model, network, run.val_set, run.tokenizer, run.pad_id, cfg.positions,
                                        run.cache, cfg.step_scales, run.preserver)
        if cfg.val_kept:
            with tempfile.TemporaryDirectory(prefix="mend-val-") as folder:
                save_checkpoint(folder, network, run.base_info, train_config=self.cfg_dict)
                metrics.update(evaluate_kept_edits(run.model, run.tokenizer, folder, run.val_set[: cfg.val_kept],
                                                   run.pad_id, run.cache))
            metrics["val/stream_score"] = harmonic_mean(metrics["val/score"], metrics["val/kept_score"])
        metrics.update({"step": at_step, "time/val_s": round(time.perf_counter() - t, 2),
                        "time/elapsed_min": round(self.minutes(), 2)})
        self.log(metrics)
        LOG.info("step %d: %s", at_step, {k: round(v, 4) for k, v in metrics.items()})
        if metrics[cfg.early_stop_key] > self.best_value:
            self.best_value, self.best, self.bad_evals = metrics[cfg.early_stop_key], metrics, 0
            self._checkpoint(self.out_dir, network, metrics, at_step)
        else:
            self.bad_evals += 1
        if run.cache is not None and cfg.prefix_cache_file and self.main:
            run.cache.save(cfg.prefix_cache_file, run.base_info["anchor_fingerprint"])
        if self.main:
            state = {"step": at_step, "best": self.best, "bad_evals": self.bad_evals}
            save_training_state(self.out_dir / "last", run.optimizer, state)
        self._checkpoint(self.out_dir / "last", network, metrics, at_step)
        return cfg.patience > 0 and self.bad_evals >= cfg.patience

    def _checkpoint(self, folder: Path, network, metrics: dict[str, Any], step: int) -> None:
        if self.main:
            save_checkpoint(folder, network, self.run.base_info, train_config=self.cfg_dict,
                            data_hashes=self.run.hashes, metrics=metrics, step=step, preserve=self.preserve_meta)
