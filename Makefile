# Two commands set everything up on a fresh machine:
#   make demo   venv + install, the tiny Table 3 on all cores, then its one-seed table (results/demo/)
#   make test   venv + install, the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first, pinned, and constraints.txt keeps every later install from replacing it (a bare
# `torch` requirement would pull a multi-GB CUDA build of a newer torch onto a CPU machine). On a machine
# without a local CPU wheel, pass your CPU package index: make test TORCH_PIP_ARGS="--index-url URL".
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

demo: install
	$(BIN)/tlit grid run ablations/table3.yaml --scale tiny --devices cpu:all
	$(BIN)/tlit table table3 --scale tiny --out results/demo

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,bench]"
	$(BIN)/python bench/train_throughput.py --quick
	$(BIN)/python bench/decode_speed.py --quick
	$(BIN)/python bench/batching.py --quick

clean:
	rm -rf $(VENV) results/runs results/cache
