# Two commands do all set-up: `make demo` (main job) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test,bench]"
	touch $(STAMP)

.PHONY: demo test
demo: $(STAMP)
	$(VENV)/bin/lightkv demo --out out/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
