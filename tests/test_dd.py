"""`qcow2rs dd` against `qemu-img dd`: the same output (size and content, `qemu-img compare`
and byte comparison of raw outputs) for bs/count/skip combinations, raw and qcow2 inputs and
outputs; the same messages and exit codes for bad operands."""

from __future__ import annotations

import json

import pytest

from interop import qemu_img
from qemu_tools import qemu_io


@pytest.fixture
def src(scratch, qemu):
    p = scratch / "in.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", p, "1M").returncode == 0
    qemu_io(p, "write -q -P 0x11 0 300k", "write -q -P 0x22 512k 100k", "write -q -z 600k 64k")
    return p


CASES = [
    [],
    ["bs=4k"],
    ["bs=64k", "count=3"],
    ["bs=64k", "count=3", "skip=2"],
    ["bs=1000", "count=3"],
    ["bs=1000", "skip=1", "count=3"],
    ["bs=512", "skip=1000"],
    ["bs=4k", "skip=300"],
    ["bs=1M", "count=0"],
    ["bs=3", "count=1"],
]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("ops", CASES, ids=[" ".join(c) or "plain" for c in CASES])
def test_dd_as_qemu_img(fmt, ops, src, cli, scratch):
    outs = {}
    for who, run in (("ours", cli), ("ref", qemu_img)):
        out = scratch / f"{who}.{fmt}"
        cp = run("dd", "-O", fmt, *ops, f"if={src}", f"of={out}")
        outs[who] = (cp, out)
    (ours, o), (ref, r) = outs["ours"], outs["ref"]
    assert ours.returncode == ref.returncode == 0, (ours.stderr, ref.stderr)
    assert ("cannot skip" in ours.stderr) == ("cannot skip" in ref.stderr), (ours.stderr, ref.stderr)
    size = lambda p: json.loads(qemu_img("info", "--output=json", "-f", fmt, p).stdout)["virtual-size"]  # noqa: E731
    assert size(o) == size(r)
    if fmt == "raw":
        assert o.read_bytes() == r.read_bytes()
    else:
        cp = qemu_img("compare", "-f", fmt, "-F", fmt, o, r)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert qemu_img("check", o).returncode == 0


ERRORS = [
    [],
    ["if=IN"],
    ["of=OUT"],
    ["bs=0", "if=IN", "of=OUT"],
    ["bs=abc", "if=IN", "of=OUT"],
    ["count=-1", "if=IN", "of=OUT"],
    ["count=1k", "if=IN", "of=OUT"],
    ["skip=x", "if=IN", "of=OUT"],
    ["foo=1", "if=IN", "of=OUT"],
    ["if=IN", "of=OUT", "extra"],
]


@pytest.mark.parametrize("ops", ERRORS, ids=[" ".join(c) or "none" for c in ERRORS])
def test_dd_errors_as_qemu_img(ops, src, cli, scratch):
    out = scratch / "out.raw"
    argv = [a.replace("IN", str(src)).replace("OUT", str(out)) for a in ops]
    ref = qemu_img("dd", *argv)
    ours = cli("dd", *argv)
    assert ref.returncode == ours.returncode == 1, (ours.stderr, ref.stderr)
    msg = ref.stderr.strip().splitlines()[0].removeprefix("qemu-img: ")
    assert ours.stderr.strip() == f"qcow2rs: {msg}", (ours.stderr, ref.stderr)
    assert not out.exists()
