"""`convert -S SPARSE_SIZE`, `-n` and `--target-is-zero` against qemu-img 10: the same content
(`qemu-img compare`), the same allocation (`qemu-img map`: what -S leaves sparse), and the same
messages and exit codes for bad use."""

from __future__ import annotations

import json

import pytest

from interop import qemu_img
from qemu_tools import qemu_io

KIB = 1024
SIZE = 1024 * KIB
# (offset, length, byte) of the data; everything else is explicit zero bytes (allocated in
# the source file): zero runs of 8 KiB, 56 KiB, 128 KiB and the tail.
DATA = [(0, 64 * KIB, 0x11), (72 * KIB, 56 * KIB, 0x22), (184 * KIB, 72 * KIB, 0x33), (384 * KIB, 4 * KIB, 0x44)]


def source(d):
    b = bytearray(SIZE)
    for off, n, v in DATA:
        b[off : off + n] = bytes([v]) * n
    p = d / "src.raw"
    p.write_bytes(bytes(b))
    return p


def allocation(path, fmt):
    """(start, length, data) runs of `qemu-img map`, merged where neighbours agree."""
    cp = qemu_img("map", "--output=json", "-f", fmt, path)
    assert cp.returncode == 0, cp.stderr
    runs = []
    for e in json.loads(cp.stdout):
        data = e["data"] and not e["zero"]
        if runs and runs[-1][2] == data:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], data)
        else:
            runs.append((e["start"], e["length"], data))
    return runs


def same_content(a, b, fa="raw", fb="raw"):
    cp = qemu_img("compare", "-f", fa, "-F", fb, a, b)
    assert cp.returncode == 0, cp.stdout + cp.stderr


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("sparse", [None, "0", "512", "4k", "16k", "64k", "128k", "256k", "1M"])
def test_convert_sparse_size(fmt, sparse, cli, scratch, qemu):
    src = source(scratch)
    args = ["-f", "raw", "-O", fmt] + (["-S", sparse] if sparse is not None else [])
    ours, ref = scratch / f"ours.{fmt}", scratch / f"ref.{fmt}"
    cp = cli("convert", *args, src, ours)
    assert cp.returncode == 0, cp.stderr
    cp = qemu_img("convert", *args, src, ref)
    assert cp.returncode == 0, cp.stderr
    same_content(src, ours, "raw", fmt)
    assert allocation(ours, fmt) == allocation(ref, fmt)
    if fmt == "qcow2":
        assert qemu_img("check", ours).returncode == 0


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("zero_target", [False, True], ids=["filled-target", "target-is-zero"])
def test_convert_existing_target(fmt, zero_target, cli, scratch, qemu):
    """-n writes into the existing target (larger than the source: it keeps its size),
    zeros included; with --target-is-zero (on a target that is zero) zeros are skipped."""
    src = source(scratch)
    results = {}
    for who in ("ours", "ref"):
        t = scratch / f"{who}.{fmt}"
        assert qemu_img("create", "-q", "-f", fmt, t, "2M").returncode == 0
        if not zero_target:
            qemu_io(t, "write -q -P 0xee 0 2M", fmt=fmt)
        args = ["-n", "-f", "raw", "-O", fmt] + (["--target-is-zero"] if zero_target else [])
        run = cli if who == "ours" else qemu_img
        cp = run("convert", *args, src, t)
        assert cp.returncode == 0, cp.stderr
        results[who] = t
    same_content(results["ours"], results["ref"], fmt, fmt)
    info = json.loads(qemu_img("info", "--output=json", "-f", fmt, results["ours"]).stdout)
    assert info["virtual-size"] == 2 * SIZE
    # The source's part reads as the source, the rest kept what the target held.
    cp = qemu_img("compare", "-f", "raw", "-F", fmt, src, results["ours"])
    assert cp.returncode == (0 if zero_target else 1), cp.stdout
    if zero_target:
        assert allocation(results["ours"], fmt) == allocation(results["ref"], fmt)
    if fmt == "qcow2":
        assert qemu_img("check", results["ours"]).returncode == 0


ERRORS = [
    (["-S", "100"], "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512"),
    (["-S", "abc"], "Invalid buffer size for sparse output specified: 'abc'."),
    (["-S", "32M"], "Invalid buffer size for sparse output specified. Valid sizes"),
    (["--target-is-zero"], "--target-is-zero requires use of -n flag"),
    (["-n", "MISSING"], "Could not open"),
    (["-n", "SMALL"], "output file is smaller than input file"),
    (["-t", "bogus"], "Invalid cache option: bogus"),
    (["-T", "bogus"], "Invalid source cache option: bogus"),
]


@pytest.mark.parametrize("argv,msg", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_convert_option_errors(argv, msg, cli, scratch, qemu):
    src = source(scratch)
    small = scratch / "small.raw"
    small.write_bytes(b"\0" * 4096)
    dst = scratch / "dst.raw"
    target = {"MISSING": scratch / "missing.raw", "SMALL": small}
    opts = [a for a in argv if a not in target]
    out = next((target[a] for a in argv if a in target), dst)
    want = qemu_img("convert", "-O", "raw", *opts, src, out)
    got = cli("convert", "-O", "raw", *opts, src, out)
    assert want.returncode == got.returncode == 1, (want.stderr, got.stderr)
    assert msg in want.stderr and msg in got.stderr, (want.stderr, got.stderr)
    assert len(got.stderr.strip().splitlines()) == 1, got.stderr
    assert not (scratch / "missing.raw").exists()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("cache", ["unsafe", "writeback", "none", "writethrough", "directsync"])
def test_convert_cache_modes(fmt, cache, cli, scratch, qemu):
    """Every `-t` mode (`unsafe` ignores flushes, the others flush or write through) and `-T`
    give a complete target: `qemu-img check` clean, `qemu-img compare` identical."""
    src = source(scratch)
    out = scratch / f"out.{fmt}"
    cp = cli("convert", "-f", "raw", "-O", fmt, "-t", cache, "-T", cache, src, out)
    if cp.returncode != 0 and cache in ("none", "directsync") and "O_DIRECT" in cp.stderr:
        pytest.skip(f"the scratch file system refuses O_DIRECT: {cp.stderr.strip()}")
    assert cp.returncode == 0, cp.stderr
    same_content(src, out, "raw", fmt)
    if fmt == "qcow2":
        cp = qemu_img("check", out)
        assert cp.returncode == 0, cp.stdout + cp.stderr
