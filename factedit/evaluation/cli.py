"""`factedit eval ...`: Hydra overrides in, an evaluation run out (see factedit/conf/eval.yaml).

    factedit eval method=ft_l data=counterfact n=200 mode=single out=DIR
    factedit eval method=[ft,ft_l,lora] data=counterfact n=200
    factedit eval method=none data=path/to/records.jsonl model=path/to/local/model
    factedit eval method=all mode=all n=200 batch_size=64     every method, every mode, one overview
    factedit eval --cfg ...      print the composed config and stop
    factedit eval --help

Conveniences on top of plain Hydra overrides:
    data=<file>      a path (not a config of conf/data/) selects `data=file data.path=<file>`
    model=<folder>   a path (not a config of conf/model/) selects `model=local model.path=<folder>`
    method=<name>    a registered method without a conf/method/<name>.yaml runs with its defaults
    method=all       the unedited model and every registered method
    mode=all         single, sequential and batch (or a list: mode=[single,batch]), each in out/<mode>/,
                     with one overview table in out/overview.md
    method_overrides.<method>.<key>=<value>   works without Hydra's `++` prefix
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import FacteditError
from ..core.methods import available_methods
from ..paths import CONFIG_DIR, CONFIG_MODULE
from .config import NONE_METHOD, configs_by_mode, several_modes

ALL_METHODS = "all"  # method=all: the unedited model and every registered method

logger = logging.getLogger(__name__)

PATH_GROUPS = {"data": ("file", "path"), "model": ("local", "path")}


def _options(group: str) -> set[str]:
    return {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}


def normalize_overrides(argv: Sequence[str]) -> list[str]:
    """Rewrite the conveniences of the module docstring into plain Hydra overrides (each parsed with Hydra's
    own override grammar: a malformed one is refused here as Hydra would refuse it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out: list[str] = []
    for arg in argv:
        override = parser.parse_override(arg)
        key = override.key_or_group
        if override.is_add() or override.is_force_add() or override.is_delete() or override.package is not None:
            out.append(arg)
        elif key in PATH_GROUPS and override.get_value_element_as_str() not in _options(key):
            option, field = PATH_GROUPS[key]
            out += [f"{key}={option}", f"{key}.{field}={override.get_value_element_as_str()}"]
        elif key == "method":
            value = override.value()
            names = [str(n) for n in value] if isinstance(value, list) else [str(value)]
            if names == [ALL_METHODS]:
                names = [NONE_METHOD, *available_methods()]
            known = _options("method")
            out.append("method=[" + ",".join(n for n in names if n in known) + "]")
            out += [f"++methods.{n}={{}}" for n in names if n not in known]
        elif key.startswith("method_overrides."):
            out.append("++" + arg)
        else:
            out.append(arg)
    return out


def compose(argv: Sequence[str]) -> Any:
    """The composed eval config (an OmegaConf DictConfig) for these command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3", job_name="factedit_eval"):
        return hydra_compose("eval", overrides=normalize_overrides(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Run `factedit eval` with Hydra overrides; prints the report table. Returns the exit status."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help", "help"} & set(argv):
        print(__doc__)
        print(
            f"config: {CONFIG_DIR / 'eval.yaml'}; groups: "
            + "; ".join(f"{g}: {', '.join(sorted(_options(g)))}" for g in ("method", "data", "model"))
        )
        return 0
    show_config = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    try:
        cfg = compose(argv)
        if show_config:
            print(OmegaConf.to_yaml(cfg))
            return 0
        container = OmegaConf.to_container(cfg, resolve=True)
        configs = configs_by_mode(container)
        if several_modes(container):
            from .report import drift_warnings
            from .suite import run_suite

            suite = run_suite(configs)
            for mode, result in suite.results.items():
                for warning in drift_warnings(result.summary):
                    print(f"{mode}: " + warning.replace("**", ""), file=sys.stderr)
            print(suite.overview)
            print(f"\noutputs in {suite.out.resolve()}: overview.md, overview.json, and a run per mode")
            return 0
        from .runner import run_eval

        result = run_eval(configs[0])
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"error: {exc}".rstrip(), file=sys.stderr)
        return 2
    except FacteditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .report import drift_warnings, metrics_table, side_by_side_table

    for warning in drift_warnings(result.summary):
        print(warning.replace("**", ""), file=sys.stderr)
    print(metrics_table(result.summary))
    paired = side_by_side_table(result.summary)
    if paired is not None:
        print("\nteacher-forced and generated, side by side:\n" + paired)
    print(f"\noutputs in {Path(result.out).resolve()}: summary.json, cases.jsonl, report.md, plots")
    return 0
