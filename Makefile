# diffusion_lab: the two commands are `make run` and `make test`.
# On a CPU machine torch is pinned to the CPU build; GPU users: make install TORCH_SPEC=torch
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi),torch>=2.6,torch==2.13.0)
ARGS ?=

.PHONY: install run test test-all test-robust lint format experiments clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install  ## train DDPM on the embedded digits, sample, evaluate (extra Hydra overrides: ARGS="...")
	$(BIN)/python -m diffusion_lab.run $(ARGS)

test: install  ## the default suite (about 7 minutes on 2 cores)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-all: install  ## everything, including tests marked slow
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "slow or not slow"

PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile
test-robust: install  ## the default suite three times: other BLAS kernels (numpy: OpenBLAS Prescott, torch: MKL compatible), one thread, every core busy
	OPENBLAS_CORETYPE=Prescott MKL_CBWR=COMPATIBLE $(PYTEST)
	OMP_NUM_THREADS=1 $(PYTEST)
	tools/with-cpu-load $(PYTEST)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
