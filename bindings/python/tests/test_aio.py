"""The asyncio API: coroutines, many requests in flight, errors, and cancellation."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest

import qcow2rs
from helpers import MiB, assert_clean, pattern, qemu_compare, to_raw


@pytest.fixture
def img_path(scratch):
    p = scratch / "a.qcow2"
    qcow2rs.create(p, 64 * MiB)
    return p


class Buf(bytearray):
    """A bytearray that supports weak references."""


def test_open_forms_and_properties(img_path):
    async def main():
        img = await qcow2rs.aio.open(img_path)
        assert isinstance(img, qcow2rs.aio.AsyncImage)
        assert img.size == 64 * MiB and img.cluster_size == 65536 and img.read_only
        assert img.backing_file is None and img.mode == "r" and img.filename == str(img_path)
        assert isinstance(img.image, qcow2rs.Image)
        assert "a.qcow2" in repr(img)
        await img.close()
        assert img.closed
        await img.close()  # idempotent
        async with qcow2rs.aio.open(img_path, "r+") as img2:
            assert not img2.read_only
            async with img2 as same:
                assert same is img2
            assert img2.closed

    asyncio.run(main())


def test_io_and_results(img_path):
    async def main():
        async with qcow2rs.aio.open(img_path, "r+") as img:
            data = pattern(5, 200_000)
            assert await img.pwrite(data, 4321) == len(data)
            assert await img.pread(len(data), 4321) == data
            ba = bytearray(len(data))
            assert await img.preadinto(ba, 4321) == len(data)
            ba.append(0)  # released before the awaiting task resumes: resizable again
            buf = np.zeros(len(data), dtype=np.uint8)
            assert await img.preadinto(buf, 4321) == len(data)
            assert buf.tobytes() == data
            mv = memoryview(bytearray(300_000))
            assert await img.preadinto(mv[1000:201_000], 4321) == len(data)
            assert mv[1000:201_000] == data
            await img.write_zeroes(1000, 5000)
            await img.write_zeroes(65536, 1 << 20, unmap=True)
            await img.discard(65536, 2 << 20)
            assert await img.pread(1000, 5000) == bytes(1000)
            await img.flush()
            info = await img.info()
            assert info["virtual-size"] == 64 * MiB
            assert info == img.image.info()
            assert await img.map() == img.image.map()
            assert await img.pread(10, img.size - 5) == bytes(5)
            assert await img.pread(10, img.size) == b""

    asyncio.run(main())
    assert_clean(img_path)


def test_many_in_flight(img_path, scratch):
    """64 writes then 64 reads at once through asyncio.gather; one completion thread, no
    thread per request."""
    n = 64

    async def main():
        async with qcow2rs.aio.open(img_path, "r+") as img:
            before = threading.active_count()
            blocks = [pattern(i, 70_000) for i in range(n)]
            res = await asyncio.gather(*(img.pwrite(blocks[i], i * 100_000) for i in range(n)))
            assert res == [70_000] * n
            bufs = [bytearray(70_000) for _ in range(n)]
            res = await asyncio.gather(*(img.preadinto(bufs[i], i * 100_000) for i in range(n)))
            assert res == [70_000] * n
            assert bufs == blocks
            # The threads are the runtime's and the completion thread, started once.
            assert threading.active_count() <= before + 1
            return blocks

    blocks = asyncio.run(main())
    mirror = scratch / "mirror.raw"
    with open(mirror, "wb") as f:
        f.truncate(64 * MiB)
        for i, b in enumerate(blocks):
            f.seek(i * 100_000)
            f.write(b)
    qemu_compare(img_path, mirror)


def test_errors(img_path, scratch):
    async def main():
        with pytest.raises(FileNotFoundError):
            await qcow2rs.aio.open(scratch / "missing.qcow2")
        raw = scratch / "x.raw"
        raw.write_bytes(bytes(4096))
        with pytest.raises(qcow2rs.Error):
            async with qcow2rs.aio.open(raw):
                pass
        async with qcow2rs.aio.open(img_path) as img:
            with pytest.raises(OSError) as ei:
                await img.pwrite(b"x", 0)
            assert ei.value.errno == errno.EBADF
            with pytest.raises(ValueError):
                await img.pread(1, img.size + 1)
            with pytest.raises(TypeError):
                await img.preadinto(b"read-only", 0)
        with pytest.raises(ValueError, match="closed"):
            await img.pread(1, 0)
        with pytest.raises(ValueError):
            await qcow2rs.aio.open(img_path, "x")

    asyncio.run(main())


def test_cancelled_read_keeps_buffer_until_request_ends(scratch):
    """A cancelled task's buffer stays alive (held by the request) until the request has
    really finished, then it is released: no use after free, no leak."""
    p = scratch / "huge.qcow2"
    qcow2rs.create(p, 1 << 40)

    async def main():
        async with qcow2rs.aio.open(p) as img:
            buf = Buf(512 * MiB)  # reading 512 MiB of zeros takes tens of milliseconds
            ref = weakref.ref(buf)
            task = asyncio.create_task(img.preadinto(buf, 12345))
            await asyncio.sleep(0)  # the task submits its request
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            del buf
            gc.collect()
            alive_while_in_flight = ref() is not None
            # close() waits for the request; the buffer is released right after it.
        deadline = time.monotonic() + 10
        while ref() is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            gc.collect()
        return alive_while_in_flight, ref() is None

    held, released = asyncio.run(main())
    assert held, "the buffer of a cancelled request was released while the request ran"
    assert released, "the buffer of a cancelled request was never released"


def test_cancelled_requests_run_to_their_end(img_path, scratch):
    """Cancel tasks mid-request at random points: each request still completes (writes land),
    nothing crashes, and the image reads, writes and checks correctly afterwards."""
    import random

    rnd = random.Random(7)
    n = 200
    blocks = [pattern(100 + i, 30_000) for i in range(n)]

    async def main():
        async with qcow2rs.aio.open(img_path, "r+") as img:
            tasks = [asyncio.create_task(img.pwrite(blocks[i], i * 65_536 + 1000)) for i in range(n)]
            reads = [asyncio.create_task(img.preadinto(bytearray(50_000), i * 65_536)) for i in range(n)]
            for _ in range(3):
                await asyncio.sleep(0)
                for t in rnd.sample(tasks + reads, 60):
                    t.cancel()
            done = await asyncio.gather(*tasks, *reads, return_exceptions=True)
            assert any(isinstance(r, asyncio.CancelledError) for r in done)
            assert not [r for r in done if isinstance(r, Exception)]
        # Every write ran to its end, cancelled or not.
        async with qcow2rs.aio.open(img_path, "r+") as img:
            for i in range(n):
                assert await img.pread(30_000, i * 65_536 + 1000) == blocks[i]
            await img.pwrite(b"after", 0)
            assert await img.pread(5, 0) == b"after"

    asyncio.run(main())
    assert_clean(img_path)
    mirror = to_raw(img_path, scratch / "m.raw")
    with open(mirror, "rb") as f:
        for i in range(n):
            assert os.pread(f.fileno(), 30_000, i * 65_536 + 1000) == blocks[i]


def test_loop_closed_before_completion(img_path):
    """A loop that goes away with requests in flight: the results are dropped quietly."""
    loop = asyncio.new_event_loop()
    img = qcow2rs.open(img_path)

    class Owner:  # what AsyncImage gives the extension: the queue of "the running loop"
        q = qcow2rs._qcow2rs._Completions(loop)

        def _queue(self):
            return self.q

    fut = img._aio_pread(Owner(), 1 << 20, 0)
    assert isinstance(fut, asyncio.Future) and not fut.done()
    loop.close()
    time.sleep(0.2)
    assert img.pread(4, 0) == bytes(4)
    img.close()


def test_keyboard_interrupt_in_a_woken_task_leaves_the_loop(img_path, monkeypatch):
    """A task woken by a completion that raises KeyboardInterrupt stops the loop with it, as
    from any loop callback, and it is not reported as an unraisable error on the way."""
    qcow2rs.create(img_path, 64 * MiB)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    async def main():
        img = await qcow2rs.aio.open(img_path)
        try:
            await img.pread(MiB, 0)  # completes on a worker: resumed by the drain
            raise KeyboardInterrupt
        finally:
            img.image.close()

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(main())
    assert not unraisable, [u.exc_value for u in unraisable]


def test_two_loops_in_two_threads(img_path):
    qcow2rs.create(img_path, 64 * MiB)
    errors = []

    def run(k):
        async def main():
            async with qcow2rs.aio.open(img_path) as img:
                for _ in range(50):
                    rs = await asyncio.gather(*(img.pread(4096, i * 4096) for i in range(16)))
                    assert rs == [bytes(4096)] * 16

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def test_pending_request_without_a_loop(img_path):
    """A request still in flight after its first poll needs the running loop's queue; when
    there is none, the call raises, but the request still runs to its end and releases its
    buffer (on the completion thread)."""
    qcow2rs.create(img_path, 64 * MiB)
    img = qcow2rs.open(img_path, "r+")

    class NoLoop:
        def _queue(self):
            raise RuntimeError("no running event loop")

    data = bytearray(b"x" * 65536)  # a first write there allocates: pending after one poll
    # (mostly: now and then the allocation completes in that poll; then try the next cluster)
    for off in range(0, 64 * MiB, MiB):
        try:
            assert img._aio_pwrite(NoLoop(), data, off) == 65536
        except RuntimeError as e:
            assert "no running event loop" in str(e)
            break
    else:
        pytest.fail("no first write stayed in flight after its first poll")
    deadline = time.monotonic() + 10
    while True:
        try:
            data.append(0)  # BufferError while the request still holds the buffer
            break
        except BufferError:
            assert time.monotonic() < deadline, "buffer never released"
            time.sleep(0.01)
    img.close()
    with qcow2rs.open(img_path) as img:
        assert img.pread(65536, off) == b"x" * 65536


EXIT_SCRIPT = """
import asyncio, sys
import qcow2rs

async def main():
    async with qcow2rs.aio.open(sys.argv[1]) as img:
        async def work(t):
            buf = bytearray(1 << 20)
            for i in range(t, 256, 8):
                await img.preadinto(buf, (i % 64) << 20)
        await asyncio.gather(*(work(t) for t in range(8)))

asyncio.run(main())
"""


def test_exit_right_after_asyncio_requests(scratch):
    """A program that ends right after its asyncio requests (the close of `async with` is
    delivered by the completion thread through call_soon_threadsafe, which may still be
    going on as the interpreter finalizes) exits cleanly. Before the completion thread
    stopped calling into Python at exit, CPython ended that thread with pthread_exit while
    it waited for the GIL, and the unwinding through its Rust frames aborted the process
    (timing-dependent: 1 to 4 runs in 10 of this script, with the exit hook removed)."""
    p = scratch / "exit.qcow2"
    qcow2rs.create(p, 64 * MiB)
    with qcow2rs.open(p, "r+") as img:
        img.pwrite(pattern(7, 64 * MiB), 0)  # data, so that the reads take a while
    for _ in range(10):
        cp = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(p)], capture_output=True, timeout=120)
        assert cp.returncode == 0, (cp.returncode, cp.stderr.decode(errors="replace")[-2000:])
