"""The `qcow2rs` console script of the wheel runs the same CLI code as the Rust binary."""

from __future__ import annotations

import json

import pytest

from qemu_tools import in_ci, qcow2rs_bin, run

import qcow2rs

COMMANDS = [
    ("info", "--output=json"),
    ("info", "--backing-chain"),
    ("map", "--output=json"),
    ("map",),
    ("check", "--output=json"),
    ("check",),
    ("snapshot", "-l"),
]


@pytest.fixture(scope="module")
def native():
    p = qcow2rs_bin()
    if not p.is_file():
        msg = f"Rust binary {p} not built (make build)"
        if in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return p


def test_version_and_usage(cli):
    cp = cli("--version")
    assert cp.returncode == 0 and cp.stdout.strip() == f"qcow2rs version {qcow2rs.__version__}"
    cp = cli()
    assert cp.returncode == 1 and "usage: qcow2rs" in cp.stderr
    cp = cli("frobnicate")
    assert cp.returncode == 1 and cp.stderr.startswith("qcow2rs: unknown command")


@pytest.mark.parametrize("name", ["v3", "chain-top", "snapshot", "dirty"])
def test_same_output_as_binary(name, matrix, cli, native):
    img = matrix[name]
    for args in COMMANDS:
        ours = cli(*args, img.path)
        ref = run([native, *args, img.path])
        assert (ours.returncode, ours.stdout, ours.stderr) == (ref.returncode, ref.stdout, ref.stderr), args


def test_convert_create_compare_and_errors(scratch, cli, native, qemu):
    src = scratch / "src.qcow2"
    cp = cli("create", "-f", "qcow2", "-o", "cluster_size=4096", src, "8M")
    assert cp.returncode == 0, cp.stderr
    with qcow2rs.open(src, "r+") as img:
        img.pwrite(b"\x42" * 100_000, 777)
    cp = cli("convert", "-O", "raw", src, scratch / "out.raw")
    assert cp.returncode == 0, cp.stderr
    assert cli("compare", src, scratch / "out.raw").returncode == 0
    with open(scratch / "out.raw", "r+b") as f:
        f.write(b"\x01")
    cp = cli("compare", src, scratch / "out.raw")
    assert cp.returncode == 1 and "Content mismatch at offset 0!" in cp.stdout
    cp = cli("info", scratch / "missing.qcow2")
    ref = run([native, "info", scratch / "missing.qcow2"])
    assert cp.returncode == ref.returncode == 1 and cp.stderr == ref.stderr
    assert json.loads(cli("info", "--output=json", src).stdout)["cluster-size"] == 4096

