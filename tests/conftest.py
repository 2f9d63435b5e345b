"""pytest fixtures for the qcow2rs <-> qemu-img interop suite.

- The binary under test is $QCOW2RS_BIN, default <repo>/target/release/qcow2rs.
- qemu-img and qemu-io are required: missing tools skip the tests, except with CI=true where they fail.
- `image` is parametrized over the image matrix (tests/imagematrix.py); images are built once per session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from imagematrix import IMAGE_NAMES, SPECS, Matrix
from qemu_tools import in_ci, qcow2rs_bin, require_qemu, run


def pytest_report_header(config):
    return [f"qcow2rs binary: {qcow2rs_bin()}  (override with QCOW2RS_BIN)", f"CI mode: {in_ci()}"]


@pytest.fixture(scope="session")
def qemu():
    require_qemu()


@pytest.fixture(scope="session")
def qcow2rs():
    """Path of the CLI under test; fails (never skips) when it is missing."""
    path = qcow2rs_bin()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"qcow2rs binary not found or not executable: {path} (run `make build` or set QCOW2RS_BIN)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def cli(qcow2rs):
    """cli(*args, timeout=...) runs the binary under test and returns the CompletedProcess."""

    def _run(*args, timeout=60, cwd=None):
        return run([qcow2rs, *args], timeout=timeout, cwd=cwd)

    return _run


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A neutral cwd for CLI runs (not the matrix dir, so relative backing names must be resolved)."""
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="session")
def matrix(qemu, tmp_path_factory):
    return Matrix(tmp_path_factory.mktemp("matrix"))


@pytest.fixture(params=IMAGE_NAMES)
def image(request, matrix):
    """One built image of the matrix (an imagematrix.Image); tests taking it run once per image."""
    return matrix[request.param]


@pytest.fixture
def scratch(tmp_path_factory):
    """A temporary directory removed right after the test (raw conversions can be large)."""
    d = Path(tempfile.mkdtemp(prefix="scratch-", dir=tmp_path_factory.getbasetemp()))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    # Tag tests by image spec, so e.g. `-m "not huge"` works.
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("image") if callspec else None
        if name in SPECS:
            for tag in SPECS[name].tags:
                item.add_marker(tag)
