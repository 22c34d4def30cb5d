"""Where factedit's own files are: inside the package, so a wheel install has them too.

    PACKAGE_DIR/conf/   Hydra configs (eval.yaml, mend/*.yaml, method/, data/, model/, app.yaml)
    PACKAGE_DIR/data/   the datasets factedit ships (CounterFact, zsRE), with provenance
    PACKAGE_DIR/resources/reference/   reference text (drift, preserved keys)

Relative data paths in configs ("data/counterfact/val.json") are resolved from the working
directory first, then from the package directory (`resolve_path`).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "conf"
CONFIG_MODULE = "factedit.conf"  # the same folder as Hydra's pkg:// search path


def resolve_path(path: str | Path) -> Path:
    """An absolute path as is; a relative one from the working directory, else from the package."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate.resolve()
    packaged = PACKAGE_DIR / candidate
    return packaged if packaged.exists() else candidate.resolve()
