"""Helpers shared by the package tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from qemu_tools import run

MiB = 1 << 20


def qemu_img(*args, cwd=None, check=True, timeout=120):
    cp = run(["qemu-img", *args], cwd=cwd, timeout=timeout)
    if check and cp.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))} failed ({cp.returncode}): {cp.stderr}")
    return cp


def qemu_check(path) -> dict:
    """`qemu-img check --output=json` (exit 0: clean, 3: leaks only, 2: corruptions)."""
    cp = qemu_img("check", "--output=json", path, check=False)
    assert cp.returncode in (0, 2, 3), f"qemu-img check failed: {cp.stderr}"
    return json.loads(cp.stdout)


def assert_clean(path, leaks_ok=False):
    r = qemu_check(path)
    assert r.get("corruptions", 0) == 0, f"qemu-img check finds corruptions: {r}"
    assert r.get("check-errors", 0) == 0, f"qemu-img check errors: {r}"
    if not leaks_ok:
        assert r.get("leaks", 0) == 0, f"qemu-img check finds leaks: {r}"


def qemu_compare(a, b, fmt_a="qcow2", fmt_b="raw"):
    cp = qemu_img("compare", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    assert cp.returncode == 0, f"qemu-img compare: {cp.stdout}{cp.stderr}"


def to_raw(path, dst: Path) -> Path:
    """The guest content of `path` as qemu-img reads it, in a raw file."""
    qemu_img("convert", "-O", "raw", path, dst)
    return dst


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)
