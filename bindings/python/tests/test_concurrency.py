"""Writes, zeroes and discards from 8 threads at once and from asyncio with 64 requests in
flight, on plain, compressed, extended-L2 and backing-chain images, mirrored into a raw file:
afterwards `qemu-img check` is clean and `qemu-img compare` finds the image equal to the mirror.

Workers own interleaved 20 KiB slots (so neighbouring requests of different workers share
clusters and subclusters: concurrent allocation, copy-on-write from compressed clusters and
from the backing file, zero and discard next to writes), and every worker checks its own
reads against the mirror as it goes.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import threading

import pytest

import qcow2rs
from helpers import MiB, assert_clean, qemu_compare, to_raw

SLOT = 20 * 1024
IMAGES = ["v3", "compressed-zlib", "extended-l2", "chain-top"]


def copy_image(image, dest):
    """Copy a matrix image and the files it depends on (same names, so relative backing
    names still resolve)."""
    for f in image.files:
        shutil.copy(f, dest / f.name)
    return dest / image.path.name


class Workload:
    """Random requests over slots; worker w owns the slots k with k % workers == w."""

    def __init__(self, size: int, workers: int, seed: int):
        self.workers = workers
        self.seed = seed
        regions = [(0, 6 * MiB), (size // 2 - MiB, 2 * MiB), (size - MiB, MiB)]
        self.slots = [s for start, n in regions for s in range(start, start + n - SLOT + 1, SLOT)]

    def ops(self, worker: int, count: int):
        rnd = random.Random(self.seed * 1000 + worker)
        mine = self.slots[worker :: self.workers]
        for i in range(count):
            base = rnd.choice(mine)
            a = rnd.randrange(SLOT)
            b = rnd.randrange(a + 1, SLOT + 1)
            off, n = base + a, b - a
            r = rnd.random()
            if r < 0.5:
                yield ("write", off, rnd.randbytes(n))
            elif r < 0.62:
                yield ("zero", off, n, False)
            elif r < 0.7:
                yield ("zero", off, n, True)
            elif r < 0.8:
                yield ("discard", off, n)
            elif r < 0.99:
                yield ("read", off, n)
            else:
                yield ("flush",)


def apply_mirror(fd: int, op) -> None:
    kind = op[0]
    if kind == "write":
        os.pwrite(fd, op[2], op[1])
    elif kind in ("zero", "discard"):
        os.pwrite(fd, bytes(op[2]), op[1])


def run_threads(img, fd, wl: Workload, count: int):
    errors = []

    def worker(w):
        try:
            for op in wl.ops(w, count):
                kind = op[0]
                if kind == "write":
                    assert img.pwrite(op[2], op[1]) == len(op[2])
                elif kind == "zero":
                    img.write_zeroes(op[2], op[1], unmap=op[3])
                elif kind == "discard":
                    img.discard(op[2], op[1])
                elif kind == "read":
                    buf = bytearray(op[2])
                    img.preadinto(buf, op[1])
                    want = os.pread(fd, op[2], op[1])
                    assert buf == want, f"read at {op[1]} length {op[2]} differs from the mirror"
                else:
                    img.flush()
                apply_mirror(fd, op)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(wl.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


async def run_asyncio(path, fd, wl: Workload, count: int):
    async with qcow2rs.aio.open(path, "r+") as img:

        async def worker(w):
            for op in wl.ops(w, count):
                kind = op[0]
                if kind == "write":
                    assert await img.pwrite(op[2], op[1]) == len(op[2])
                elif kind == "zero":
                    await img.write_zeroes(op[2], op[1], unmap=op[3])
                elif kind == "discard":
                    await img.discard(op[2], op[1])
                elif kind == "read":
                    buf = bytearray(op[2])
                    await img.preadinto(buf, op[1])
                    want = os.pread(fd, op[2], op[1])
                    assert buf == want, f"read at {op[1]} length {op[2]} differs from the mirror"
                else:
                    await img.flush()
                apply_mirror(fd, op)

        await asyncio.gather(*(worker(w) for w in range(wl.workers)))


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_concurrent_writes_mirrored(name, mode, matrix, scratch):
    path = copy_image(matrix[name], scratch)
    mirror = to_raw(path, scratch / "mirror.raw")
    fd = os.open(mirror, os.O_RDWR)
    try:
        if mode == "threads":
            wl = Workload(matrix[name].size, workers=8, seed=1)
            with qcow2rs.open(path, "r+") as img:
                run_threads(img, fd, wl, count=600)
        else:
            wl = Workload(matrix[name].size, workers=64, seed=2)
            asyncio.run(run_asyncio(path, fd, wl, count=80))
    finally:
        os.close(fd)
    assert_clean(path)
    qemu_compare(path, mirror)
