"""Every benchmark script under bench/ imports (the benches import each other and bench/records.py,
so a moved or renamed helper breaks them without any test noticing) and has a `main`."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(BENCH.glob("bench_*.py"))


@pytest.fixture()
def bench_on_path(monkeypatch):
    """bench/ first on the path, as `python bench/X.py` runs them; the bench modules it imported leave
    with the test (the libraries they load stay: importing torch twice breaks it)."""
    monkeypatch.syspath_prepend(str(BENCH))
    yield
    for name, module in list(sys.modules.items()):
        if Path(getattr(module, "__file__", None) or "/").parent == BENCH:
            del sys.modules[name]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_a_benchmark_script_imports_and_has_a_main(script: Path, bench_on_path) -> None:
    spec = importlib.util.spec_from_file_location(f"bench_script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a module-level dataclass looks its module up there
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"


def test_the_benches_read_counterfact_through_one_loader() -> None:
    from_records = importlib.util.spec_from_file_location("bench_records", BENCH / "records.py")
    records = importlib.util.module_from_spec(from_records)
    from_records.loader.exec_module(records)
    val = records.counterfact_split("val")
    assert val and {"prompt", "target_new", "subject"} <= set(val[0])
    with pytest.raises(ValueError, match="unknown CounterFact split"):
        records.counterfact_split("test")
    inline = [s.name for s in SCRIPTS if re.search(r"json\.loads\(\(PACKAGE_DIR[^\n]*counterfact", s.read_text())]
    assert not inline, f"read CounterFact with records.counterfact_split: {inline}"
