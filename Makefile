# Two entry points; each creates .venv if missing and installs what it needs (pinned in pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e ".[test,aot]"
	touch $@

demo: $(VENV)/.runtime  ## tiny random model + tokenizer -> HF -> JAX -> vxl infer on a generated H.264 video
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/vxl demo

# Two workers: the suite leaves a core idle about a third of the time (compiles and subprocesses are largely
# single-threaded); whole files go to one worker so that module fixtures run once, the longest files first
# (tests/conftest.py orders them; xdist would otherwise sort files by their number of tests).
TEST_WORKERS ?= 2

test: $(VENV)/.test  ## the default test suite (slow tests excluded; the GPU / TPU compiles included)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-slow: $(VENV)/.test  ## only the slow tests (e.g. conversion peak memory on a >1 GB checkpoint)
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf demo_out .pytest_cache
