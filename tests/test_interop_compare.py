"""`qcow2rs compare` exit codes (0 identical, 1 different, 2 error) and messages vs `qemu-img compare`."""

from __future__ import annotations

import os

import pytest

from interop import qemu_img
from qemu_tools import qemu_io

CASES = ["raw-identical", "raw-modified", "raw-larger", "raw-larger-strict", "overlay-modified", "missing"]
EXPECTED_EXIT = {
    "raw-identical": 0,
    "raw-modified": 1,
    "raw-larger": 0,  # extra zeros are ignored without -s
    "raw-larger-strict": 1,  # -s: size mismatch
    "overlay-modified": 1,
    "missing": 2,
}


def make_pair(case, image, scratch, workdir):
    """Returns (options, path_a, path_b)."""
    if case == "missing":
        return [], image.path, scratch / "does-not-exist.qcow2"
    if case == "overlay-modified":
        ov = scratch / "overlay.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", image.path, "-F", "qcow2", ov, cwd=workdir)
        off = min(image.size - 512, 12 << 20)
        qemu_io(ov, f"write -q -P 0xee {off} 512", cwd=workdir)
        return [], image.path, ov
    raw = scratch / "copy.raw"
    cp = qemu_img("convert", "-O", "raw", image.path, raw, cwd=workdir)
    assert cp.returncode == 0, cp.stderr
    if case == "raw-modified":
        off = min(image.size - 1, (1 << 20) + 12345)
        with open(raw, "r+b") as f:
            b = os.pread(f.fileno(), 1, off)
            os.pwrite(f.fileno(), bytes([b[0] ^ 0xFF]), off)
    elif case.startswith("raw-larger"):
        os.truncate(raw, image.size + (1 << 20))
    return (["-s"] if case.endswith("-strict") else []), image.path, raw


@pytest.mark.parametrize("case", CASES)
def test_compare(case, image, cli, scratch, workdir):
    opts, a, b = make_pair(case, image, scratch, workdir)
    ref = qemu_img("compare", *opts, a, b, cwd=workdir)
    ref_rc = ref.returncode
    assert ref_rc == EXPECTED_EXIT[case], f"harness: qemu-img compare said {ref_rc}: {ref.stdout}{ref.stderr}"
    ours = cli("compare", *opts, a, b, cwd=workdir)
    rc = ours.returncode
    assert rc == ref_rc, f"exit {rc}, qemu-img {ref_rc}; stdout {ours.stdout!r} stderr {ours.stderr.strip()[:300]!r}"
    if ref_rc in (0, 1):
        # scripts parse e.g. "Content mismatch at offset 1060864!" (qemu reports the sector) / "Images are identical."
        assert ours.stdout == ref.stdout
    else:
        assert ours.stderr.strip(), "an error must be reported on stderr"
