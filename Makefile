# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
# torch==2.13.0 is installed before anything else: on CPU machines that takes the local CPU wheel
# instead of pulling a multi-GB CUDA build through the `torch>=...` requirement.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# requirements/lmms-lean.txt lists this version's requirements; the two change together.
LMMS_EVAL := lmms-eval==0.7.3
LMMS_STAMP := $(VENV)/.lmms-eval-lean

$(BIN)/r3v: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/r3v

install: $(BIN)/r3v

# The lean lmms-eval install of docs/gpu.md, into the same venv: lmms-eval's own requirements
# except torchvision and timm, under constraints that pin the torch already installed and refuse
# torchvision and timm, then lmms-eval itself without dependencies. torch stays what it was.
$(LMMS_STAMP): $(BIN)/r3v requirements/lmms-lean.txt requirements/lmms-lean-constraints.txt
	$(BIN)/python -c "from importlib.metadata import version; print('torch==' + version('torch'))" \
	  > $(VENV)/torch-pin.txt
	$(BIN)/pip install -q -r requirements/lmms-lean.txt \
	  -c requirements/lmms-lean-constraints.txt -c $(VENV)/torch-pin.txt
	$(BIN)/pip install -q --no-deps $(LMMS_EVAL)
	touch $(LMMS_STAMP)

lmms: $(LMMS_STAMP)

# MiniWoB++ online (`r3v bench --online`, docs/tasks.md): the `miniwob` extra into the same venv
# (miniwob, gymnasium, selenium; torch stays what it was), then Chromium and its driver from
# Debian's packages when they are missing and this is root with apt-get, as on a fresh CI machine.
# Elsewhere it prints the one line to run.
MINIWOB_STAMP := $(VENV)/.miniwob-extra
CHROMIUM_PACKAGES := chromium chromium-driver

$(MINIWOB_STAMP): $(BIN)/r3v pyproject.toml
	$(BIN)/pip install -q -e ".[miniwob]"
	touch $(MINIWOB_STAMP)

miniwob: $(MINIWOB_STAMP)
	@if command -v chromedriver >/dev/null 2>&1 && \
	    { command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CHROMIUM_PACKAGES); \
	else \
	  echo "MiniWoB++ online needs Chromium and its driver: apt-get install -y $(CHROMIUM_PACKAGES)" >&2; \
	fi

demo: install
	$(BIN)/r3v train --iterations 3

# R3V_REQUIRE_MINIWOB=1: the MiniWoB++ online tests fail instead of skipping without the browser.
test: export R3V_REQUIRE_MINIWOB := 1
# R3V_REQUIRE_LMMS=1: the lmms-eval tests fail instead of skipping when lmms-eval is missing.
test: install lmms miniwob
	R3V_REQUIRE_LMMS=1 $(BIN)/python -m pytest -q

.PHONY: install lmms miniwob demo test
