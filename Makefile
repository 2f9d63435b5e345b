# qcow2rs build and test entry points.
#
#   make build   release build of the whole workspace (CLI: target/release/qcow2rs)
#   make lint    rustfmt --check + clippy -D warnings
#   make venv    .venv with the Python test dependencies (tests/requirements.txt)
#   make test    venv + build + lint + cargo test + pytest interop suite + Python package
#   make python  build and install the Python package (bindings/python) into .venv
#   make demo    build, make demo images with qemu-img, run the CLI on them
#
# Everything uses the release profile so the workspace compiles once.

SHELL        := /bin/bash
.SHELLFLAGS  := -euo pipefail -c
.DEFAULT_GOAL := build

CARGO        ?= cargo
PYTHON       ?= python3
VENV         := .venv
VENV_STAMP   := $(VENV)/.stamp
VENV_PY      := $(VENV)/bin/python
BIN          := target/release/qcow2rs
DEMO         := demo
PYTEST_ARGS  ?=
PY_PKG       := bindings/python

.PHONY: all build lint venv test test-cargo test-py python test-python demo clean-demo clean

all: build

# The Python extension (qcow2rs-python) is built by maturin (`make python`), not here: a plain
# cargo build of it would differ from maturin's (PYO3_* environment) and build it twice.
build:
	$(CARGO) build --release --workspace --exclude qcow2rs-python

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

# Re-created when requirements change; otherwise a no-op.
$(VENV_STAMP): tests/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

venv: $(VENV_STAMP)

test-cargo: build
	$(CARGO) test --release --workspace

# pytest's exit code is not masked: 5 (no tests collected) fails the run.
test-py: venv build
	$(VENV_PY) -m pytest tests -q $(PYTEST_ARGS)

# The Python package: `pip install ./bindings/python` (maturin, sharing target/ with the
# workspace) with its test extras, then its own pytest run.
python: venv
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check "./$(PY_PKG)[test]"

test-python: python build
	$(VENV_PY) -m pytest $(PY_PKG)/tests -q $(PYTEST_ARGS)

test: venv build lint test-cargo test-py test-python

# The demo makes its own images with qcow2rs (no qemu needed; qemu-img double-checks if present).
demo: build
	BIN=$(BIN) DEMO=$(DEMO) bash scripts/demo.sh

clean-demo:
	rm -rf $(DEMO)

clean: clean-demo
	$(CARGO) clean
	rm -rf $(VENV)
