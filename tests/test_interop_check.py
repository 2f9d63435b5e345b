"""`qcow2rs check --output=json` against `qemu-img check --output=json`: keys and exit code."""

from __future__ import annotations

import json

from interop import qemu_img

CHECK_KEYS = [
    "check-errors",
    "corruptions",
    "leaks",
    "image-end-offset",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
    "filename",
    "format",
]


def _project(stdout: str, who: str) -> dict:
    try:
        d = json.loads(stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{who} printed invalid JSON ({e}):\n{stdout[:2000]}") from None
    return {k: d[k] for k in CHECK_KEYS if k in d}


def test_check_json(image, cli, workdir):
    ref = qemu_img("check", "--output=json", image.path, cwd=workdir)
    ours = cli("check", "--output=json", image.path, cwd=workdir)
    # 0 clean, 1 check not completed, 2 corruptions, 3 leaks only (63: format without check support)
    rc, ref_rc = ours.returncode, ref.returncode
    assert rc == ref_rc, f"exit code {rc}, qemu-img {ref_rc}; stderr: {ours.stderr.strip()[:500]}"
    if ref.stdout.strip():
        assert _project(ours.stdout, "qcow2rs check") == _project(ref.stdout, "qemu-img check")
