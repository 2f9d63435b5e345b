"""Helpers shared by the test harness: locating tools and running them.

Kept free of pytest imports so that `python tests/imagematrix.py DIR` works on its own.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BIN = REPO_ROOT / "target" / "release" / "qcow2rs"

# Generous per-command limit: every image in the matrix is small or sparse.
CMD_TIMEOUT = 120


def in_ci() -> bool:
    """CI=true (as set by the CI runner) turns "skip: tool missing" into a failure."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def qcow2rs_bin() -> Path:
    """The binary under test: $QCOW2RS_BIN or <repo>/target/release/qcow2rs."""
    env = os.environ.get("QCOW2RS_BIN")
    if env:
        p = Path(env)
        if not p.is_absolute():
            p = (Path.cwd() / p) if (Path.cwd() / p).exists() else (REPO_ROOT / p)
        return p.resolve()
    return DEFAULT_BIN


def missing_qemu_tools() -> list[str]:
    return [t for t in ("qemu-img", "qemu-io") if shutil.which(t) is None]


class CommandError(RuntimeError):
    pass


def require_qemu() -> None:
    """Skip the calling test (or fail it under CI=true) when qemu-img / qemu-io are missing."""
    import pytest

    missing = missing_qemu_tools()
    if missing:
        msg = (
            f"{' and '.join(missing)} not found: qemu-img and qemu-io are needed for these tests "
            "(Debian/Ubuntu: apt-get install qemu-utils)"
        )
        if in_ci():
            pytest.fail(msg + " [CI=true: failing instead of skipping]", pytrace=False)
        pytest.skip(msg)


def _no_core_dumps():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(args, *, cwd=None, timeout=CMD_TIMEOUT, check=False, env=None) -> subprocess.CompletedProcess:
    """Run a command, capture text output, never dump core."""
    args = [str(a) for a in args]
    cp = subprocess.run(
        args,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        timeout=timeout,
        preexec_fn=_no_core_dumps,
        env=env,
    )
    if check and cp.returncode != 0:
        raise CommandError(
            f"command failed (exit {cp.returncode}): {' '.join(args)}\n"
            f"--- stdout\n{cp.stdout}--- stderr\n{cp.stderr}"
        )
    return cp


def qemu_img(*args, cwd=None, check=True, timeout=CMD_TIMEOUT):
    return run(["qemu-img", *args], cwd=cwd, check=check, timeout=timeout)


def qemu_io(path, *cmds, fmt="qcow2", cwd=None, check=True):
    """Run qemu-io commands in one process (each string is one -c command)."""
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    args.append(str(path))
    cp = run(args, cwd=cwd, check=False)
    if check and (cp.returncode != 0 or "failed" in cp.stdout or "failed" in cp.stderr):
        raise CommandError(
            f"qemu-io failed (exit {cp.returncode}): {' '.join(args)}\n"
            f"--- stdout\n{cp.stdout}--- stderr\n{cp.stderr}"
        )
    return cp


def qemu_json(*args, cwd=None):
    cp = qemu_img(*args, "--output=json", cwd=cwd)
    return json.loads(cp.stdout)
