"""Small helpers shared by the test_interop_* files."""

from __future__ import annotations

import json

from qemu_tools import run


def qemu_img(*args, cwd=None, timeout=120):
    return run(["qemu-img", *args], cwd=cwd, timeout=timeout)


def parse_json(cp, who):
    assert cp.returncode == 0, f"{who} failed (exit {cp.returncode}): {cp.stderr.strip()}"
    try:
        return json.loads(cp.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{who} printed invalid JSON ({e}):\n{cp.stdout[:2000]}") from None

