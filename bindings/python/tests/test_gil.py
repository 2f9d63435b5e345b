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
from helpers import MiB

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
