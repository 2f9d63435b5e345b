# qcow2rs build and test entry points.
#
#   make build   release build of the whole workspace (CLI: target/release/qcow2rs)
#   make lint    rustfmt --check + clippy -D warnings
#   make venv    .venv with the Python test dependencies (tests/requirements.txt)
#   make test    venv + build + lint + cargo test + C tests + pytest interop suite + Python package
#   make python  build and install the Python package (bindings/python) into .venv
#   make demo    build, make demo images with qemu-img, run the CLI on them
#   make test-nbd  the NBD server (qcow2rs serve): its cargo tests, then tests/test_nbd.py
#                with qemu-img/qemu-io/qemu-nbd, nbdinfo/nbdcopy and python3-libnbd
#                (apt-get install libnbd-bin python3-libnbd qemu-utils openssl)
#   make test-c  the C library: exports, header, C tests and examples (plain, ASan+UBSan,
#                valgrind), install + pkg-config (tests/c/run.sh)
#   make install PREFIX=/usr/local   libqcow2rs.so (+ symlinks), libqcow2rs.a, qcow2rs.h,
#                qcow2rs.pc into PREFIX (DESTDIR, LIBDIR, INCLUDEDIR also honoured)
#   make header  regenerate include/qcow2rs.h with cbindgen (the pinned version)
#   make man     the man page doc/man/qcow2rs.1 (one section per command), from the CLI's own
#                definitions (`qcow2rs manpage`)
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
.PHONY: test-c install install-c header test-nbd nbd-deps man

all: build

# The Python extension (qcow2rs-python) is built by maturin (`make python`), not here: a plain
# cargo build of it would differ from maturin's (PYO3_* environment) and build it twice.
build:
	$(CARGO) build --release --workspace --exclude qcow2rs-python

man:
	$(CARGO) build --release -p qcow2-cli
	mkdir -p doc/man
	$(BIN) manpage > doc/man/qcow2rs.1

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
test-py: venv build nbd-deps
	$(VENV_PY) -m pytest tests -q $(PYTEST_ARGS)

# The Python package: `pip install ./bindings/python` (maturin, sharing target/ with the
# workspace) with its test extras, then its own pytest run.
python: venv
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check "./$(PY_PKG)[test]"

# The tools tests/test_nbd.py drives (installed with apt-get when missing).
nbd-deps:
	bash scripts/nbd-deps.sh

# The NBD tests also run inside test-cargo/test-py; this target runs only them.
test-nbd: venv build nbd-deps
	$(CARGO) test --release -p qcow2-nbd
	$(VENV_PY) -m pytest tests/test_nbd.py -q $(PYTEST_ARGS)

test-python: python build
	$(VENV_PY) -m pytest $(PY_PKG)/tests -q $(PYTEST_ARGS)

test: venv build lint test-cargo test-c test-py test-python

# The demo makes its own images with qcow2rs (no qemu needed; qemu-img double-checks if present).
demo: build
	BIN=$(BIN) DEMO=$(DEMO) bash scripts/demo.sh

clean-demo:
	rm -rf $(DEMO)

clean: clean-demo
	$(CARGO) clean
	rm -rf $(VENV)

# --- The C library (qcow2-capi) ------------------------------------------------------------
PREFIX      ?= /usr/local
LIBDIR      ?= $(PREFIX)/lib
INCLUDEDIR  ?= $(PREFIX)/include
DESTDIR     ?=
CAPI_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)

test-c: build
	bash tests/c/run.sh

header:
	QCOW2RS_UPDATE_HEADER=1 $(CARGO) test --release -p qcow2-capi header_is_current

install: install-c

install-c: build
	install -d $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(INCLUDEDIR)
	install -m 755 target/release/libqcow2rs.so $(DESTDIR)$(LIBDIR)/libqcow2rs.so.$(CAPI_VERSION)
	ln -sfn libqcow2rs.so.$(CAPI_VERSION) $(DESTDIR)$(LIBDIR)/libqcow2rs.so.0
	ln -sfn libqcow2rs.so.0 $(DESTDIR)$(LIBDIR)/libqcow2rs.so
	install -m 644 target/release/libqcow2rs.a $(DESTDIR)$(LIBDIR)/libqcow2rs.a
	install -m 644 include/qcow2rs.h $(DESTDIR)$(INCLUDEDIR)/qcow2rs.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' \
	    -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' -e 's|@VERSION@|$(CAPI_VERSION)|' \
	    qcow2-capi/qcow2rs.pc.in >$(DESTDIR)$(LIBDIR)/pkgconfig/qcow2rs.pc
