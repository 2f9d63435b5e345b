"""A process killed with SIGKILL while it writes (4 threads, a flush every few writes) leaves
an image that `qemu-img check` finds without corruption, with every flushed write intact."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import qcow2rs
from helpers import MiB, qemu_check, to_raw

THREADS = 4
WRITE = 33 * 1024  # unaligned to clusters: partial clusters, copy-on-write
STRIDE = 37 * 1024
SIZE = 256 * MiB

WRITER = r"""
import json, random, sys, threading, time
import qcow2rs

path, threads, write, stride, size = sys.argv[1], *map(int, sys.argv[2:6])
n_slots = (size - write) // stride
img = qcow2rs.open(path, "r+")
done = [0] * threads          # writes completed by each thread, in order
lock = threading.Lock()

def data(i):
    return random.Random(i).randbytes(write)

def writer(t):
    i = t
    while i < n_slots:
        img.pwrite(data(i), i * stride)
        with lock:
            done[t] += 1
        i += threads

for t in range(threads):
    threading.Thread(target=writer, args=(t,), daemon=True).start()
while True:
    with lock:
        snap = list(done)
    img.flush()
    print(json.dumps(snap), flush=True)   # every write counted in snap is durable now
    time.sleep(0.005)
"""


def expected(i: int) -> bytes:
    return random.Random(i).randbytes(WRITE)


@pytest.mark.parametrize("variant", ["plain", "extended-l2", "backing"])
@pytest.mark.parametrize("kill_after", [2, 10])
def test_sigkill_during_writes(variant, kill_after, scratch, qemu):
    path = scratch / "crash.qcow2"
    if variant == "backing":
        base = scratch / "base.qcow2"
        qcow2rs.create(base, SIZE)
        with qcow2rs.open(base, "r+") as b:
            b.pwrite(b"\xbb" * (4 * MiB), 0)
        qcow2rs.create(path, None, backing_file="base.qcow2", backing_format="qcow2")
    else:
        qcow2rs.create(path, SIZE, extended_l2=variant == "extended-l2")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(THREADS), str(WRITE), str(STRIDE), str(SIZE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    durable = [0] * THREADS
    try:
        deadline = time.monotonic() + 60
        flushes = 0
        while flushes < kill_after and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            durable = json.loads(line)
            flushes += 1
        time.sleep(random.Random(kill_after).random() * 0.02)  # kill mid-write, mid-flush
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert sum(durable) > 0, "no flush completed before the kill"

    r = qemu_check(path)
    assert r.get("corruptions", 0) == 0 and r.get("check-errors", 0) == 0, f"qemu-img check: {r}"
    raw = to_raw(path, scratch / "after.raw")
    with open(raw, "rb") as f:
        for t in range(THREADS):
            for k in range(durable[t]):
                i = t + k * THREADS
                got = os.pread(f.fileno(), WRITE, i * STRIDE)
                assert got == expected(i), f"flushed write {i} (thread {t}) is not intact after the kill"
    # The image is usable afterwards (opening it writable repairs what needs repair).
    with qcow2rs.open(path, "r+") as img:
        img.pwrite(b"ok", 0)
    r = qemu_check(path)
    assert r.get("corruptions", 0) == 0
