"""The evaluation suite: datasets, runs in single/batch/sequential mode, reports and plots.

    from factedit.evaluation import load_records, run_eval, EvalConfig
    factedit eval method=[ft_l,lora] data=counterfact n=200 out=runs/eval/x      (the CLI: .cli.main)

Metrics are computed in `factedit.scoring.metrics` (one function, `compute_metrics`).
"""

from .config import DataConfig, EvalConfig, MethodRun, ModelConfig
from .loaders import DatasetError, LoadedData, load_records, select_records
from .records import EvalRecord
from .runner import EvalResult, run_eval

__all__ = [
    "DataConfig",
    "DatasetError",
    "EvalConfig",
    "EvalRecord",
    "EvalResult",
    "LoadedData",
    "MethodRun",
    "ModelConfig",
    "load_records",
    "run_eval",
    "select_records",
]
