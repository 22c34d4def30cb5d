"""`factedit train-mend`: train a MEND editor (Hydra configs in `factedit/conf/mend/`, run with accelerate).

    factedit train-mend                              # conf/mend/default.yaml
    factedit train-mend --config-name quick output_dir=/tmp/mend-quick
    accelerate launch -m factedit.cli train-mend ...  # same command on one or many GPUs

The base model stays frozen; only the editor network and its step sizes train (Adam). Every
`val_every` steps the editor is evaluated on validation records (one edit at a time, CounterFact
ES/PS/NS; with `val_kept`, also that many edited one after another and kept); the best one by
`early_stop_key` is saved to `output_dir` as a checkpoint, and training stops after `patience`
evaluations without improvement, at `max_steps`, or after `max_minutes`.
Metrics go to `output_dir/metrics.jsonl` as flat `area/name` keys. `resume=<dir>` continues from a
checkpoint directory written by this command (weights, statistics, optimiser state, step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.configs import validated
from ..core.errors import ConfigError
from ..model.specs import module_of
from ..paths import CONFIG_DIR as PACKAGE_CONFIG_DIR
from ..paths import CONFIG_MODULE
from .config import check_step_scales
from .data import EditExample
from .network import AGGREGATIONS
from .objective import edit_step_loss, skipping_cached_blocks, unwrap
from .prefix import PrefixCache
from .run import Keeper, batches, prepare

LOG = logging.getLogger(__name__)
CONFIG_DIR = PACKAGE_CONFIG_DIR / "mend"


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
    # Which rephrase prompts the paraphrase term reads: "all" (how the shipped editor was trained) or
    # "paraphrase_prompts": only those that ask the edit's question, not CounterFact's generation prompts,
    # which EasyEdit's flat CounterFact files under rephrase_prompt in 83 % of records
    # (factedit/core/rephrases.py); a batch without one takes the edit's NLL for the term.
    paraphrase_term: str = "all"
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
    # Kept-edit validation: the first `val_kept` validation records are also edited one after another and
    # kept by the `mend` method itself, with its defaults and guard (objective.evaluate_kept_edits:
    # val/kept_es, _ps, _ns, _refused, _drift, _score); val/stream_score is the harmonic mean of val/score
    # (one at a time) and val/kept_score. 0 = off.
    val_kept: int = 0
    early_stop_key: str = "val/score"  # val/stream_score needs val_kept > 0
    step_scales: tuple[float, ...] = (1.0, 1.5)  # validate as the `mend` method scales its steps (MENDConfig)
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
        if not 0 <= self.val_kept <= self.n_val:
            raise ValueError(f"val_kept must be between 0 and n_val ({self.n_val}), got {self.val_kept}")
        if self.early_stop_key.startswith(("val/kept_", "val/stream_")) and not self.val_kept:
            raise ValueError(f"early_stop_key {self.early_stop_key!r} is measured only with val_kept > 0")
        if not (0 <= self.c_replay < math.inf and 0 <= self.c_norm < math.inf):
            raise ValueError("c_replay and c_norm must be finite numbers >= 0")
        if self.positions not in ("loss", "all"):
            raise ValueError("positions must be 'loss' or 'all'")
        if self.paraphrase_term not in ("all", "paraphrase_prompts"):
            raise ValueError("paraphrase_term must be 'all' or 'paraphrase_prompts'")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}")
        check_step_scales(self.step_scales)
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


def train(cfg: TrainConfig, model=None, tokenizer=None) -> dict[str, Any]:
    """Train an editor; returns the best validation metrics and the checkpoint path.

    `model`/`tokenizer` default to `factedit.load_model(cfg.model)` (tests pass tiny models).
    """
    from tqdm.auto import tqdm

    from ..model.hooks import frozen

    run = prepare(cfg, model, tokenizer)
    keeper = Keeper(run)
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
                paraphrases_only=cfg.paraphrase_term == "paraphrase_prompts",
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
    from ..scoring.batches import make_batch
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
