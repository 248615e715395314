# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
# torch==2.13.0 is installed before anything else: on CPU machines that takes the local CPU wheel
# instead of pulling a multi-GB CUDA build through the `torch>=...` requirement.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/r3v: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/r3v

install: $(BIN)/r3v

demo: install
	$(BIN)/r3v train --iterations 3

test: install
	$(BIN)/python -m pytest -q

.PHONY: install demo test
