# qcow2rs build and test entry points.
#
#   make build   release build of the whole workspace (CLI: target/release/qcow2rs)
#   make lint    rustfmt --check + clippy -D warnings
#   make venv    .venv with the Python test dependencies (tests/requirements.txt)
#   make test    venv + build + lint + cargo test + pytest interop suite
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

.PHONY: all build lint venv test test-cargo test-py demo clean-demo clean

all: build

build:
	$(CARGO) build --release --workspace

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

test: venv build lint test-cargo test-py

# Demo images are made with qemu-img/qemu-io for now.
# TODO: once `qcow2rs create` exists, create demo/disk.qcow2 with it instead.
demo: build
	@command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || { \
	  echo "make demo: qemu-img and qemu-io are needed (Debian/Ubuntu: apt-get install qemu-utils)" >&2; exit 1; }
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	qemu-img create -q -f qcow2 $(DEMO)/disk.qcow2 1G
	qemu-io -f qcow2 -c 'write -q -P 0x11 0 1M' -c 'write -q -P 0x22 100M 256k' \
	  -c 'write -q -z 100M 64k' -c 'write -q -P 0x33 1023M 1M' $(DEMO)/disk.qcow2
	qemu-img convert -c -O qcow2 $(DEMO)/disk.qcow2 $(DEMO)/disk-compressed.qcow2
	@for img in $(DEMO)/disk.qcow2 $(DEMO)/disk-compressed.qcow2; do \
	  echo "== $(BIN) info $$img";   $(BIN) info "$$img"; \
	  echo "== $(BIN) map $$img";    $(BIN) map "$$img"; \
	  echo "== $(BIN) check $$img";  $(BIN) check "$$img"; \
	  raw="$${img%.qcow2}.raw"; \
	  echo "== $(BIN) convert -O raw $$img $$raw"; $(BIN) convert -O raw "$$img" "$$raw"; \
	  echo "== $(BIN) compare $$img $$raw"; $(BIN) compare "$$img" "$$raw"; \
	done

clean-demo:
	rm -rf $(DEMO)

clean: clean-demo
	$(CARGO) clean
	rm -rf $(VENV)
