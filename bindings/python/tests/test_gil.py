"""The GIL is released during I/O: a pure-Python counter thread keeps counting while the main
thread is inside a large read and inside a convert.

The counter's rate during the call is compared with its rate while the main thread sleeps. A
call that held the GIL would leave the counter at (nearly) zero for its whole duration; the
threshold (10 % of the idle rate) leaves room for CPU contention on a 2-core machine.
"""

from __future__ import annotations

import threading
import time

import pytest

import qcow2rs
from helpers import MiB, pattern

SIZE = 256 * MiB


class Counter:
    def __init__(self):
        self.n = 0
        self.stop = False
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop:
            self.n += 1

    def __enter__(self):
        self.t.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()

    def rate(self, fn) -> tuple[float, float]:
        c0, t0 = self.n, time.perf_counter()
        fn()
        c1, t1 = self.n, time.perf_counter()
        return (c1 - c0) / (t1 - t0), t1 - t0


@pytest.fixture(scope="module")
def data_image(tmp_path_factory):
    p = tmp_path_factory.mktemp("gil") / "data.qcow2"
    qcow2rs.create(p, SIZE)
    block = bytes(range(256)) * 4096  # 1 MiB
    with qcow2rs.open(p, "r+") as img:
        for off in range(0, SIZE, MiB):
            img.pwrite(block, off)
    return p


def assert_released(counter: Counter, fn, what: str):
    idle, _ = counter.rate(lambda: time.sleep(0.3))
    busy, secs = counter.rate(fn)
    assert secs > 0.05, f"{what} took only {secs:.3f}s: too short to tell"
    assert busy > 0.1 * idle, (
        f"counter thread ran at {busy:.0f}/s during {what} ({secs:.2f}s) against {idle:.0f}/s idle: "
        "the GIL was held"
    )


def test_gil_released_during_large_read(data_image):
    buf = bytearray(SIZE)
    with qcow2rs.open(data_image) as img, Counter() as c:

        def reads():
            for _ in range(3):
                img.preadinto(buf, 0)
            img.pread(SIZE, 0)

        assert_released(c, reads, "large reads")


def test_gil_released_during_convert(data_image, tmp_path):
    with Counter() as c:
        assert_released(c, lambda: qcow2rs.convert(data_image, tmp_path / "out.qcow2"), "convert")
        seen = []
        assert_released(
            c,
            lambda: qcow2rs.convert(data_image, tmp_path / "out.raw", out_format="raw", progress=seen.append),
            "convert with a progress callback",
        )
        assert seen and seen[-1] == 1.0


def test_gil_released_during_small_reads_from_threads(data_image):
    # 4 KiB reads from 4 threads: a thread coming back from one first waits (spinning, without
    # the GIL) while another thread just back from one holds the GIL (`gil.rs`). The counter,
    # which never makes such a call, must keep its share of the GIL all the same.
    with qcow2rs.open(data_image) as img, Counter() as c:

        def reads():
            def reader(t: int) -> None:
                b = bytearray(4096)
                for i in range(20000):
                    img.preadinto(b, (i * 4096 * (t + 1)) % (15 * MiB))

            ts = [threading.Thread(target=reader, args=(t,)) for t in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        assert_released(c, reads, "4 KiB reads from 4 threads")


def test_read_returns_while_a_reader_keeps_the_gil(tmp_path):
    # B starts a long read; meanwhile A makes a short one and, coming back from it, is marked
    # as holding the GIL after a call (`gil.rs`). A then runs Python code (holding the GIL but
    # for the switch interval) until B's read has returned. B, coming back, waits for A to
    # make its next call, which never comes: that wait must be bounded, or B and A wait for
    # each other forever.
    b_started = threading.Event()
    b_done = threading.Event()
    errors: list[BaseException] = []
    path = tmp_path / "data.qcow2"
    qcow2rs.create(path, 16 * MiB)
    with qcow2rs.open(path, "r+") as w:
        w.pwrite(pattern(5, 16 * MiB), 0)  # data: B's read copies 16 MiB, a few milliseconds
    img = qcow2rs.open(path)

    def a() -> None:
        try:
            b_started.wait()
            img.preadinto(bytearray(4096), 0)
            n = 0
            while not b_done.is_set():
                n += 1
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    def b() -> None:
        try:
            buf = bytearray(16 * MiB)
            b_started.set()
            img.preadinto(buf, 0)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
        b_done.set()

    ts = [threading.Thread(target=f, daemon=True) for f in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    b_done.set()
    # (Closing would wait for a read that never comes back.)
    assert not any(t.is_alive() for t in ts), "a reader never came back"
    img.close()
    assert not errors, errors
