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
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.runtime  ## tiny random model + tokenizer -> HF -> JAX -> vxl infer on a generated H.264 video
	$(BIN)/vxl demo

test: $(VENV)/.test  ## the default test suite (slow tests excluded)
	$(BIN)/python -m pytest

test-slow: $(VENV)/.test  ## only the slow tests (e.g. conversion peak memory on a >1 GB checkpoint)
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf demo_out .pytest_cache
