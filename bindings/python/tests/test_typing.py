"""The hand-written stubs match the module (mypy's stubtest), and code using the API
type-checks with `mypy --strict` (with misuse rejected)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def mypy(*args: str, cwd=HERE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_stubtest():
    cp = mypy("mypy.stubtest", "qcow2rs", "--concise")
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_package_type_checks():
    cp = mypy("mypy", "--strict", "--no-incremental", "-p", "qcow2rs")
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_example_type_checks():
    # numpy arrays are `Buffer`s for type checkers from Python 3.12 on (PEP 688's __buffer__).
    cp = mypy("mypy", "--strict", "--no-incremental", "--python-version", "3.12", str(HERE / "typing_example.py"))
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_misuse_is_rejected(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import qcow2rs\n"
        "img = qcow2rs.open('x')\n"
        "img.pread('a', 0)\n"  # wrong type
        "img.pwrite('text', 0)\n"  # str is not a buffer
        "img.write_zeroes(1, 2, 3)\n"  # unmap is keyword-only
        "qcow2rs.check('x', repair='some')\n"  # not a repair mode
    )
    cp = mypy("mypy", "--strict", "--no-incremental", str(bad))
    assert cp.returncode == 1
    for line in (3, 4, 5, 6):
        assert f"bad.py:{line}: error:" in cp.stdout, cp.stdout
