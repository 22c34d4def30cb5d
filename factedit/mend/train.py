"""`factedit train-mend`: train a MEND editor (Hydra configs in `factedit/conf/mend/`, run with accelerate).

    factedit train-mend                              # conf/mend/default.yaml
    factedit train-mend --config-name quick output_dir=/tmp/mend-quick
    accelerate launch -m factedit.cli train-mend ...  # same command on one or many GPUs

The base model stays frozen; only the editor network and its step sizes train (Adam). Every
`val_every` steps the editor is evaluated on validation records (one edit at a time, CounterFact
ES/PS/NS); the best one by `early_stop_key` is saved to `output_dir` as a checkpoint, and training
stops after `patience` evaluations without improvement, at `max_steps`, or after `max_minutes`.
Metrics go to `output_dir/metrics.jsonl` as flat `area/name` keys. `resume=<dir>` continues from a
checkpoint directory written by this command (weights, statistics, optimiser state, step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import factedit

from ..editing.configs import validated
from ..editing.errors import CheckpointError, ConfigError
from ..editing.hashing import file_sha256
from ..editing.preserve import PreserveConfig, build_preserver
from ..editing.scoring import pad_id_of
from ..editing.specs import resolve_layers
from ..paths import CONFIG_DIR as PACKAGE_CONFIG_DIR
from ..paths import CONFIG_MODULE, resolve_path
from .checkpoint import base_model_info, check_model, load_checkpoint, save_checkpoint
from .data import EditExample, load_examples
from .method import new_network
from .network import AGGREGATIONS
from .objective import edit_step_loss, evaluate_single_edits, module_of, skipping_cached_blocks, unwrap
from .prefix import PrefixCache

LOG = logging.getLogger(__name__)
CONFIG_DIR = PACKAGE_CONFIG_DIR / "mend"
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"


@dataclass(frozen=True)
class TrainConfig:
    """One training run; YAML in conf/mend/ is validated into this at the boundary."""

    model: str = "default"  # load_model() name or path
    output_dir: str = "runs/mend"  # checkpoint + metrics.jsonl (relative paths: to the cwd)
    resume: str | None = None  # a checkpoint directory written by this command
    layers: tuple[int, ...] = (-3, -2, -1)
    matrices: tuple[str, ...] = ("gate", "in", "out")
    positions: str = "loss"  # "loss" | "all" (see MENDConfig)
    aggregation: str = "sum"  # "sum" (MEND) | "least_squares" (values fitted in the null space, network.py)
    preserve_threshold: float = 0.1  # PreserveConfig.threshold (least_squares only)
    preserve_ridge: float = 1.0  # PreserveConfig.ridge (least_squares only)
    rank: int = 256  # rank of each low-rank residual layer
    n_hidden: int = 1  # hidden layers of the editor MLP (n_hidden + 1 residual layers)
    alpha_init: float = 1e-4  # initial step size α of every matrix
    lr: float = 1e-4  # Adam, editor network
    lr_alpha: float = 1e-4  # Adam, step sizes
    c_edit: float = 1.0
    c_loc: float = 1.0
    c_margin: float = 0.0  # neighbour margin term (objective.py); 0 = off
    margin: float = 2.0  # its cap, in nats of mean per-token log-prob
    batch_size: int = 4  # edits per step (applied together)
    # Training for a stream of edits (RLEdit-style): a step is an episode of `episode_length` batch
    # edits applied one after another to the model in place (each computed on the already edited
    # model, as at edit time), the loss summed over them; the weights are restored after each episode.
    episode_length: int = 1  # 1 = one batch edit per step on the unedited model (MEND)
    c_replay: float = 0.0  # NLL of the episode's earlier edits at the current weights (they must hold)
    replay_edits: int = 16  # how many of the latest earlier edits are replayed
    c_norm: float = 0.0  # Σ ‖ΔW‖²_F / ‖W‖²_F of each update (keeps updates small over a stream)
    max_steps: int = 2000
    max_minutes: float | None = None  # wall-clock cap; None = off
    stats_batches: int = 20  # batches used to initialise the normalisation statistics
    train_counterfact: str = "data/counterfact/train.json"  # relative: to the cwd, else the package
    train_zsre: str | None = "data/zsre/train-1k.json"
    n_train: int | None = None  # first n CounterFact train records; None = all
    n_zsre: int | None = None  # first n zsRE records; None = all
    val_file: str = "data/counterfact/val.json"
    val_start: int = 200  # val records [val_start, val_start + n_val): the first 200 are the benchmark's
    n_val: int = 50
    val_every: int = 200
    patience: int = 5  # evaluations without improvement before stopping; None-like 0 = never stop
    early_stop_key: str = "val/score"
    step_scales: tuple[float, ...] = (1.0, 1.5, 2.25)  # validate as the `mend` method edits (MENDConfig)
    grad_clip: float = 100.0
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads; None leaves it
    cpu: bool = False  # force the CPU even when a GPU is present
    prefix_cache: bool = True  # cache hidden states below the first edited block (prefix.py)
    prefix_cache_file: str | None = None  # keep that cache on disk here (reused by resume); None = memory only
    log_every: int = 10

    def __post_init__(self) -> None:
        if min(self.batch_size, self.max_steps, self.val_every, self.episode_length, self.replay_edits) < 1:
            raise ValueError("batch_size, max_steps, val_every, episode_length and replay_edits must be >= 1")
        if not (0 <= self.c_replay < math.inf and 0 <= self.c_norm < math.inf):
            raise ValueError("c_replay and c_norm must be finite numbers >= 0")
        if self.positions not in ("loss", "all"):
            raise ValueError("positions must be 'loss' or 'all'")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}")
        positive = ("lr", "lr_alpha", "preserve_threshold", "preserve_ridge", "grad_clip", "margin")
        if not all(0 < getattr(self, name) < math.inf for name in positive):
            raise ValueError(f"{', '.join(positive)} must be finite numbers > 0")
        if not all(0 <= getattr(self, name) < math.inf for name in ("alpha_init", "c_edit", "c_loc", "c_margin")):
            raise ValueError("alpha_init, c_edit, c_loc and c_margin must be finite numbers >= 0")




def compose_config(argv: Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from `[--config-name NAME] key=value ...` (Hydra compose over conf/mend),
    validated (unknown keys, types, ranges) before anything is loaded."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    argv, name = list(argv), "default"
    for flag in ("--config-name", "-cn"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
                raise ConfigError(f"{flag} needs a config name: one of {names}")
            name = argv[i + 1]
            del argv[i : i + 2]
    fields = sorted(f.name for f in dataclasses.fields(TrainConfig))
    unknown = sorted({a.partition("=")[0].lstrip("+~") for a in argv} - set(fields))
    if unknown:
        raise ConfigError(f"unknown train-mend key(s) {unknown}; known: {fields}")
    try:
        with initialize_config_module(config_module=f"{CONFIG_MODULE}.mend", version_base="1.3"):
            cfg = compose(config_name=name, overrides=argv)
        values: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"train-mend config: {str(exc).splitlines()[0]}") from None
    return validated(TrainConfig, values, "train-mend config")


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
class _Run:
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


def _prepare(cfg: TrainConfig, model, tokenizer) -> _Run:
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
    return _Run(cfg, accelerator, model, tokenizer, network, optimizer, train_set, val_set, hashes, base_info,
                cache, preserve, preserver, state, pad_id_of(tokenizer), start_time)


class _Keeper:
    """The run's log, validation, best checkpoint and `last` (the state a later run resumes from)."""

    def __init__(self, run: _Run) -> None:
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


def train(cfg: TrainConfig, model=None, tokenizer=None) -> dict[str, Any]:
    """Train an editor; returns the best validation metrics and the checkpoint path.

    `model`/`tokenizer` default to `factedit.load_model(cfg.model)` (tests pass tiny models).
    """
    from tqdm.auto import tqdm

    from ..editing.hooks import frozen

    run = _prepare(cfg, model, tokenizer)
    keeper = _Keeper(run)
    accelerator, network, optimizer, train_set = run.accelerator, run.network, run.optimizer, run.train_set
    rank, world = accelerator.process_index, accelerator.num_processes
    step = int(run.state.get("step", 0))
    stream = batches(len(train_set), cfg.batch_size * world, cfg.seed + 1, step)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train-mend", disable=not keeper.main)
    with frozen(run.model):
        if step == 0 and not cfg.resume:
            stats_stream = batches(len(train_set), cfg.batch_size * world, cfg.seed, 0)
            _init_statistics(run.model, accelerator.unwrap_model(network), train_set, stats_stream, cfg, run.pad_id,
                             rank, run.cache)
        network.train()
        while step < cfg.max_steps:
            episode = []
            for _ in range(cfg.episode_length):
                _, indices = next(stream)
                episode.append([train_set[i] for i in indices[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]])
            t = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            metrics = episode_step(run.model, network, episode, cfg, run.pad_id, run.cache, run.preserver,
                                   accelerator.backward)
            accelerator.clip_grad_norm_(network.parameters(), cfg.grad_clip)
            optimizer.step()
            with torch.no_grad():
                accelerator.unwrap_model(network).alpha.clamp_(min=0.0)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0:
                keeper.log({"step": step, **metrics, "time/step_s": round(time.perf_counter() - t, 3)})
                bar.set_postfix(nll=f"{metrics['edit/nll']:.2f}", kl=f"{metrics['loc/kl']:.3f}")
            out_of_time = cfg.max_minutes is not None and keeper.minutes() > cfg.max_minutes
            at_val = step % cfg.val_every == 0 or step == cfg.max_steps or out_of_time
            if at_val and (keeper.evaluate_and_save(step) or out_of_time):
                break
    bar.close()
    wall = round(keeper.minutes(), 2)
    keeper.log({"step": step, "time/train_min": wall})
    return {"best": keeper.best, "checkpoint": str(keeper.out_dir), "steps": step, "minutes": wall}


def episode_step(
    model, network, episode: Sequence[Sequence[EditExample]], cfg: TrainConfig, pad_id: int,
    cache: PrefixCache | None, preserver, backward,
) -> dict[str, float]:
    """One training step: the episode's batch edits applied one after another to the frozen model
    in place, each loss backpropagated into the editor (`backward`), then every edited weight
    restored exactly. With one edit it is MEND's step. Returns the last edit's metrics."""
    params = dict(model.named_parameters())
    names = unwrap(network).param_names
    saved = {name: params[name].detach().clone() for name in names}
    seen: list[EditExample] = []
    metrics: dict[str, float] = {}
    try:
        for examples in episode:
            updates: dict[str, torch.Tensor] = {}
            loss, metrics = edit_step_loss(
                model, network, examples, pad_id, c_edit=cfg.c_edit, c_loc=cfg.c_loc, c_margin=cfg.c_margin,
                margin=cfg.margin, positions=cfg.positions, cache=cache, preserver=preserver,
                replay=seen[-cfg.replay_edits :], c_replay=cfg.c_replay, c_norm=cfg.c_norm,
                updates=updates if len(episode) > 1 else None,
            )
            backward(loss / len(episode))
            with torch.no_grad():
                for name, change in updates.items():
                    params[name].add_(change.to(params[name].dtype))
            seen.extend(examples)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
    return metrics


def _init_statistics(model, network, train_set, stream, cfg: TrainConfig, pad_id: int, rank: int,
                     cache: PrefixCache | None) -> None:
    """Fill the running mean/std of [u; δ] from `stats_batches` batches before any update."""
    from ..editing.batches import make_batch
    from .capture import capture

    names = network.param_names
    device = next(model.parameters()).device
    for _ in range(cfg.stats_batches):
        _, indices = next(stream)
        mine = indices[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        requests = [train_set[i].edit for i in mine]
        batch = make_batch(requests, pad_id, device)
        with skipping_cached_blocks(cache, model, requests, pad_id):
            captured = capture(model, [module_of(n) for n in names], names, batch, positions=cfg.positions)
        for p in network.params:
            u, d = captured.factors[p.name]
            network.editors[p.shape_key].update_stats(torch.cat([u, d], -1))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `factedit train-mend [--config-name NAME] key=value ...`; returns an exit code."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help", "help"} & set(argv):
        print(__doc__)
        print(f"configs ({CONFIG_DIR}): {', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))}")
        print("keys: " + ", ".join(f.name for f in dataclasses.fields(TrainConfig)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = compose_config(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = train(cfg)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
