# Two commands do all set-up: `make demo` (main job) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --no-cache-dir torch==2.13.0
	$(VENV)/bin/pip install -q --no-cache-dir -e ".[test,bench]"
	touch $(STAMP)

# lmms-eval (the eval extra) needs torchvision, and torchvision needs its own torch: a second venv, so that the
# core install stays light. The pairs that install here from local disk (pip, Python 3.11): x86_64 takes
# torch 2.14.1 + torchvision 0.29.1 (a 5.5 GB CUDA build, ~1 min), aarch64 torch 2.9.1 + torchvision 0.24.1.
EVAL_VENV := .venv-eval
EVAL_STAMP := $(EVAL_VENV)/.installed
ifeq ($(shell uname -m),aarch64)
EVAL_TORCH ?= torch==2.9.1 torchvision==0.24.1
else
EVAL_TORCH ?= torch==2.14.1 torchvision==0.29.1
endif

$(EVAL_STAMP): pyproject.toml
	$(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/pip install -q --no-cache-dir $(EVAL_TORCH)
	$(EVAL_VENV)/bin/pip install -q --no-cache-dir -e ".[eval,test]"
	touch $(EVAL_STAMP)

.PHONY: demo test eval-venv test-eval
demo: $(STAMP)
	$(VENV)/bin/lightkv demo --out out/demo
	$(VENV)/bin/lightkv demo --model qwen --out out/demo-qwen

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

eval-venv: $(EVAL_STAMP)

# the lmms-eval plugin end to end (real lmms-eval command line, offline local task) against our harness
# (-rP shows the commands, the results table and the agreement numbers of the end-to-end runs)
test-eval: $(EVAL_STAMP)
	$(EVAL_VENV)/bin/python -m pytest -q -rP tests/test_lmms_eval.py -k "agrees or data_parallel"
	$(EVAL_VENV)/bin/python -m pytest -q tests/test_lmms_eval.py -k "not agrees and not data_parallel"
