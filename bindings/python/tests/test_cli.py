"""The `qcow2rs` console script of the wheel runs the same CLI code as the Rust binary."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

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



def nbd_read(sock_path, length, offset):
    """Read over NBD with the oldest client dialect (EXPORT_NAME, simple replies)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        assert f.read(18)[:16] == b"NBDMAGICIHAVEOPT"
        f.write(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        f.write(struct.pack(">QII", 0x49484156454F5054, 1, 0))  # EXPORT_NAME ""
        f.flush()
        size, _flags = struct.unpack(">QH", f.read(10))
        f.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, offset, length))  # READ
        f.flush()
        magic, err, cookie = struct.unpack(">IIQ", f.read(16))
        assert (magic, err, cookie) == (0x67446698, 0, 1)
        data = f.read(length)
        f.write(struct.pack(">IHHQQI", 0x25609513, 0, 2, 2, 0, 0))  # DISC
        f.flush()
        return size, data


def test_serve_fork(scratch, cli):
    """`qcow2rs serve --fork` through the console script: the command returns once the socket
    listens (the background server is the venv's python running the script again, so it finds
    the package), a client connects at once; the server exits after it."""
    img = scratch / "img.qcow2"
    assert cli("create", "-f", "qcow2", img, "4M").returncode == 0
    with qcow2rs.open(img, "r+") as h:
        h.pwrite(b"\x5a" * 65536, 65536)
    sock, pidf, err = scratch / "s.sock", scratch / "s.pid", scratch / "s.err"
    script = Path(sys.executable).parent / "qcow2rs"
    # stderr to a file: the background server keeps it open.
    with open(err, "w") as e:
        cp = subprocess.run(
            [str(script), "serve", "--fork", "-r", "-k", str(sock), "--pid-file", str(pidf), str(img)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=e, timeout=60,
        )
    assert cp.returncode == 0, err.read_text()
    assert sock.exists() and pidf.exists(), err.read_text()
    pid = int(pidf.read_text())
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        assert argv[0] == os.fsencode(Path(sys.executable).parent / Path(argv[0].decode()).name)
        assert argv[1] == os.fsencode(script) and b"--fork" not in argv
        assert nbd_read(sock, 65536, 65536) == (4 << 20, b"\x5a" * 65536)
        end = time.monotonic() + 20
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}"), "the server did not exit after its client"
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
    assert not sock.exists()
    assert err.read_text() == ""
    # A server that cannot start: exit 1, its error on stderr.
    cp = cli("serve", "--fork", "-k", scratch / "t.sock", scratch / "missing.qcow2")
    assert cp.returncode == 1 and "missing.qcow2" in cp.stderr
