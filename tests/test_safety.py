"""Safety around the file, against qemu-img: converting or creating onto a file the source (or
the new image) reads is refused with one line and exit 1, leaving the source intact; images
that qemu-io holds open for writing are refused (and opened with -U) exactly where qemu-img
refuses them; and `check` reports on images with damaged tables as `qemu-img check` does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time

import pytest

import hostile
from qemu_tools import qemu_img, qemu_io


@pytest.fixture
def src(qemu, scratch):
    p = scratch / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "16M")
    qemu_io(p, "write -q -P 0x5a 0 1M")
    shutil.copy(p, scratch / "keep.qcow2")
    os.symlink("src.qcow2", scratch / "link.qcow2")
    os.link(p, scratch / "hard.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", scratch / "top.qcow2")
    return p


def intact(scratch):
    cp = qemu_img("compare", "-U", scratch / "keep.qcow2", scratch / "src.qcow2", check=False)
    assert cp.returncode == 0, f"the source was damaged: {cp.stdout}{cp.stderr}"


def one_line_failure(cp, code=1):
    assert cp.returncode == code, f"exit {cp.returncode}, expected {code}: {cp.stderr}"
    assert len(cp.stderr.strip().splitlines()) == 1, cp.stderr
    assert "panicked" not in cp.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "-O", "raw", "src.qcow2", "src.qcow2"],
        ["convert", "-O", "qcow2", "src.qcow2", "./src.qcow2"],
        ["convert", "-O", "qcow2", "src.qcow2", "link.qcow2"],
        ["convert", "-O", "raw", "src.qcow2", "hard.qcow2"],
        ["convert", "-U", "-O", "raw", "src.qcow2", "src.qcow2"],
        ["convert", "-O", "raw", "top.qcow2", "src.qcow2"],
        ["convert", "-O", "qcow2", "-B", "src.qcow2", "-F", "qcow2", "keep.qcow2", "./src.qcow2"],
        ["create", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", "./src.qcow2"],
        ["create", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", "src.qcow2"],
        ["create", "-f", "qcow2", "-o", "data_file=src.qcow2", "src.qcow2", "1M"],
    ],
    ids=lambda a: " ".join(a),
)
def test_never_overwrites_what_it_reads(args, src, cli, scratch):
    cp = cli(*args, cwd=scratch)
    one_line_failure(cp)
    intact(scratch)
    # qemu-img refuses plain converts too (by its locks), with the same exit code; with -U,
    # with -B naming the destination, and for some create spellings it destroys the image
    # instead (we refuse).
    if args[0] == "convert" and "-U" not in args and "-B" not in args:
        ref = qemu_img(*args, cwd=scratch, check=False)
        assert ref.returncode == cp.returncode, ref.stderr
        intact(scratch)


@pytest.fixture
def held(qemu, scratch):
    """An image held open for writing by qemu-io (its stdin kept open)."""
    p = scratch / "held.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "16M")
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", p], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    # Wait until qemu-io has opened the image (and holds its locks) by having it answer a
    # command. Probing with `qemu-img info` meanwhile raced with qemu-io's own lock check at
    # open (qemu-io then exited 1: "Failed to get write lock").
    proc.stdin.write(b"read 0 512\n")
    proc.stdin.flush()
    answer = []
    reader = threading.Thread(target=lambda: answer.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(30)
    assert answer and b"read 512/512" in answer[0], f"qemu-io did not open the image: {answer}"
    assert qemu_img("info", p, check=False).returncode != 0, "qemu-io took no lock"
    yield p
    proc.kill()
    proc.wait()


@pytest.mark.parametrize(
    "args",
    [
        ["resize", "{img}", "+1M"],
        ["info", "{img}"],
        ["info", "-U", "{img}"],
        ["check", "{img}"],
        ["check", "-U", "{img}"],
        ["check", "-r", "all", "-U", "{img}"],
        ["map", "{img}"],
        ["map", "-U", "{img}"],
        ["compare", "{img}", "{img}"],
        ["compare", "-U", "{img}", "{img}"],
        ["snapshot", "-l", "{img}"],
        ["snapshot", "-l", "-U", "{img}"],
        ["convert", "-O", "raw", "{img}", "{out}"],
        ["convert", "-U", "-O", "raw", "{img}", "{out}"],
        ["convert", "-O", "raw", "{other}", "{img}"],
        ["create", "-f", "qcow2", "{img}", "1M"],
        ["bench", "-c", "1", "{img}"],
        ["bench", "-c", "1", "-U", "{img}"],
        ["bench", "-w", "-c", "1", "{img}"],
    ],
    ids=lambda a: " ".join(a),
)
def test_locks_as_qemu_img(args, held, cli, scratch):
    other = scratch / "other.raw"
    qemu_img("create", "-q", "-f", "raw", other, "1M")
    argv = [a.format(img=held, out=scratch / "out.raw", other=other) for a in args]
    ref = qemu_img(*argv, cwd=scratch, check=False)
    ours = cli(*argv, cwd=scratch)
    assert ours.returncode == ref.returncode, f"ours {ours.returncode} {ours.stderr} / qemu-img {ref.stderr}"
    if ref.returncode != 0:
        assert "lock" in ref.stderr or "force-share" in ref.stderr
        one_line_failure(ours, ref.returncode)
        # The same reason: the permission qemu-img names.
        for what in ('"write" lock', 'shared "write" lock', "force-share"):
            if what in ref.stderr:
                assert what in ours.stderr, ours.stderr
                break


def test_qemu_refuses_what_we_write(qemu, cli, qcow2rs, scratch):
    p = scratch / "ours.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "64M")
    bench = subprocess.Popen([str(a) for a in [qcow2rs, "bench", "-w", "-c", "100000000", "-d", "1", "-s", "512", "-S", "0", p]],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        # Probe only once it has opened the image (it prints its first line then): a probe
        # during its open can hold qemu's transient lock bytes just when it takes its own,
        # and its open then fails as qemu-img's would (CI failure: "qcow2rs took no lock").
        first = bench.stdout.readline()
        assert first.startswith("Sending"), (first, bench.poll(), bench.stderr.read() if bench.poll() is not None else "")
        deadline = time.time() + 10
        while qemu_img("info", p, check=False).returncode == 0:
            assert time.time() < deadline, "qcow2rs took no lock"
            time.sleep(0.05)
        ref = qemu_img("info", p, check=False)
        assert 'Failed to get shared "write" lock' in ref.stderr
        assert qemu_img("info", "-U", p, check=False).returncode == 0
        io = subprocess.run(["qemu-io", "-c", "read 0 512", p], capture_output=True, text=True)
        assert 'Failed to get "write" lock' in io.stderr
        ours = cli("resize", p, "+1M")
        one_line_failure(ours)
        assert '"write" lock' in ours.stderr
    finally:
        bench.kill()
        bench.wait()
    assert qemu_img("check", p, check=False).returncode in (0, 3)


CHECK_CASES = {
    "l1-entry-past-eof": lambda p: hostile.write_u64(p, hostile.get(p, "l1_table_offset"), (1 << 63) | (1 << 30)),
    "l1-entry-unaligned": lambda p: hostile.write_u64(
        p, hostile.get(p, "l1_table_offset"), hostile.read_u64(p, hostile.get(p, "l1_table_offset")) + 512
    ),
    "reftable-entry-unaligned": lambda p: hostile.write_u64(
        p, hostile.get(p, "refcount_table_offset"), hostile.read_u64(p, hostile.get(p, "refcount_table_offset")) + 512
    ),
    "l1-table-past-eof": lambda p: hostile.put(p, "l1_table_offset", 1 << 30),
    "refcount-table-past-eof": lambda p: hostile.put(p, "refcount_table_offset", 1 << 30),
    "snapshot-table-past-eof": lambda p: hostile.put(p, "snapshots_offset", 1 << 30),
    "snapshot-l1-unaligned": lambda p: hostile.write_u64(
        p, hostile.get(p, "snapshots_offset"), hostile.read_u64(p, hostile.get(p, "snapshots_offset")) + 8
    ),
}


@pytest.mark.parametrize("name", list(CHECK_CASES))
def test_check_reports_damage_like_qemu(name, qemu, cli, scratch):
    p = hostile.small_image(scratch, f"{name}.qcow2")
    if "snapshot" in name:
        qemu_img("snapshot", "-c", "s1", p)
    CHECK_CASES[name](p)
    for out in ("json", "human"):
        ref = qemu_img("check", f"--output={out}", p, check=False)
        ours = cli("check", f"--output={out}", p)
        assert ours.returncode == ref.returncode != 0, f"{ours.stdout}{ours.stderr} / {ref.stderr}"
        if out == "json":
            assert json.loads(ours.stdout) == json.loads(ref.stdout)
        else:
            # qemu-img prints the diagnostic lines on stderr, the summary on stdout.
            diag = "".join(ln for ln in ref.stderr.splitlines(True) if not ln.startswith("qemu-img:"))
            assert ours.stdout == diag + ref.stdout
    # Other commands still refuse the damaged image.
    assert cli("convert", "-O", "raw", p, scratch / "out.raw").returncode == 1
