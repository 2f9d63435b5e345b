"""Fixtures for the tests of the Python package qcow2rs (installed in the venv by `make test`).

They reuse the interop harness of the repository's tests/ folder (on sys.path through the root
pytest.ini): the image matrix built with qemu-img/qemu-io, and the tool helpers. Tests needing
qemu-img skip without it, except with CI=true where they fail.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from imagematrix import IMAGE_NAMES, Matrix
from qemu_tools import require_qemu, run

import qcow2rs

MiB = 1 << 20


def pytest_report_header(config):
    return [f"qcow2rs package: {Path(qcow2rs.__file__).parent}  version {qcow2rs.__version__}"]


@pytest.fixture(scope="session")
def qemu():
    require_qemu()


@pytest.fixture(scope="session")
def matrix(qemu, tmp_path_factory):
    return Matrix(tmp_path_factory.mktemp("matrix"))


@pytest.fixture(params=IMAGE_NAMES)
def image(request, matrix):
    """One image of the interop matrix (an imagematrix.Image)."""
    return matrix[request.param]


@pytest.fixture
def scratch(tmp_path_factory):
    d = Path(tempfile.mkdtemp(prefix="scratch-", dir=tmp_path_factory.getbasetemp()))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def console_script():
    """The `qcow2rs` console script installed with the package (next to the venv's python)."""
    p = Path(sys.executable).parent / "qcow2rs"
    if not (p.is_file() and os.access(p, os.X_OK)):
        pytest.fail(f"console script not installed: {p}", pytrace=False)
    return p


@pytest.fixture(scope="session")
def cli(console_script):
    def _run(*args, timeout=120, cwd=None):
        return run([console_script, *args], timeout=timeout, cwd=cwd)

    return _run

