"""The synchronous API: properties, buffers, the file-like view and every error."""

from __future__ import annotations

import array
import asyncio
import errno
import io
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import hostile
import qcow2rs
from helpers import MiB, assert_clean, pattern, qemu_img
from qemu_tools import in_ci


@pytest.fixture
def img_path(scratch):
    p = scratch / "a.qcow2"
    qcow2rs.create(p, 16 * MiB)
    return p


@pytest.fixture
def data_image(scratch, qemu):
    """A 16 MiB image with 0x11 at 0..64K and 0x22 at 1M..1M+64K (written by qemu-io)."""
    return hostile.small_image(scratch, "data.qcow2")


def test_properties_and_context_manager(img_path):
    with qcow2rs.open(img_path) as img:
        assert isinstance(img, qcow2rs.Image)
        assert img.size == 16 * MiB
        assert img.cluster_size == 65536
        assert img.backing_file is None
        assert img.read_only is True
        assert img.closed is False
        assert img.filename == str(img_path)
        assert img.mode == "r"
        assert "a.qcow2" in repr(img)
    assert img.closed is True
    img.close()  # idempotent
    with qcow2rs.open(img_path, "r+") as img:
        assert img.read_only is False and img.mode == "r+"


def test_pread_pwrite_roundtrip(img_path):
    data = pattern(1, 300_000)
    with qcow2rs.open(img_path, "r+") as img:
        assert img.pwrite(data, 12345) == len(data)
        assert img.pread(len(data), 12345) == data
        # any bytes-like: bytearray, memoryview slice, array, numpy
        img.pwrite(bytearray(b"ab"), 0)
        img.pwrite(memoryview(b"xxcdxx")[2:4], 2)
        img.pwrite(array.array("B", b"ef"), 4)
        img.pwrite(np.frombuffer(b"gh", dtype=np.uint8), 6)
        img.pwrite(np.array([0x6a69], dtype="<u2"), 8)  # wider items: written as their bytes
        assert img.pread(10, 0) == b"abcdefghij"
        img.flush()
    assert_clean(img_path)


def test_pread_returns_zeros_where_nothing_was_written(img_path):
    """`pread` fills a bytes object that is not zeroed first: every byte must come from the
    read. Memory of the same size is dirtied and freed right before, so that a byte the read
    left out would show as 0xff rather than as a zero by chance."""
    size = 3 * MiB
    with qcow2rs.open(img_path, "r+") as img:
        img.pwrite(b"\x5a" * 65536, 2 * MiB)  # one written cluster amid unallocated ones
        img.write_zeroes(65536, MiB)  # a zero cluster
        want = bytes(2 * MiB) + b"\x5a" * 65536 + bytes(MiB - 65536)
        for _ in range(3):
            dirty = [b"\xff" * size for _ in range(4)]
            del dirty
            assert img.pread(size, 0) == want
            assert img.pread(size, 13 * MiB) == bytes(size)  # the end of the image

    async def aio() -> None:
        async with qcow2rs.aio.open(img_path) as aimg:
            for _ in range(3):
                dirty = [b"\xff" * size for _ in range(4)]
                del dirty
                got = await asyncio.gather(aimg.pread(size, 0), aimg.pread(size, 13 * MiB))
                assert got == [want, bytes(size)]

    asyncio.run(aio())
    assert_clean(img_path)


def test_write_zeroes_and_discard(data_image):
    with qcow2rs.open(data_image, "r+") as img:
        img.write_zeroes(1000, 100)
        assert img.pread(1200, 0) == b"\x11" * 100 + bytes(1000) + b"\x11" * 100
        img.write_zeroes(65536, 1 << 20, unmap=True)
        assert img.pread(65536, 1 << 20) == bytes(65536)
        img.discard(65536, 0)
        assert img.pread(65536, 0) == bytes(65536)
        img.write_zeroes(0, 0)
        img.discard(0, img.size)
    assert_clean(data_image)


def test_byte_counts_returned(img_path):
    """preadinto and pwrite return the count as an int: for a power of two one shared int
    object (no int made per call), for other counts a new one; short reads at the end too."""
    size = 16 * MiB
    with qcow2rs.open(img_path, "r+") as img:
        for n in (1, 2, 512, 4096, 65536, 1 << 20, 3, 100, 4097, 65535):
            assert img.pwrite(bytes(n), 0) == n
            got = img.preadinto(bytearray(n), 0)
            assert type(got) is int and got == n
            assert img.preadinto(bytearray(n), size - n) == n
        # short reads at the end of the image: a power of two and not
        assert img.preadinto(bytearray(8192), size - 4096) == 4096
        assert img.preadinto(bytearray(8192), size - 4000) == 4000
        assert img.preadinto(bytearray(8192), size) == 0
        # big powers of two are shared objects, as the small ints are
        assert img.preadinto(bytearray(4096), 0) is img.preadinto(bytearray(4096), 8192)
        assert img.pwrite(bytes(65536), 0) is img.preadinto(bytearray(65536), 0)


def test_preadinto_buffers(data_image, scratch):
    with qcow2rs.open(data_image) as img:
        want = img.pread(8192, 65536 - 4096)
        # bytearray
        b = bytearray(8192)
        assert img.preadinto(b, 65536 - 4096) == 8192 and b == want
        # memoryview slices of a bytearray: only the slice is written
        big = bytearray(b"\xee" * 10000)
        assert img.preadinto(memoryview(big)[1000:9192], 65536 - 4096) == 8192
        assert big[:1000] == b"\xee" * 1000 and big[1000:9192] == want and big[9192:] == b"\xee" * 808
        # mmap (anonymous and of a file)
        m = mmap.mmap(-1, 8192)
        assert img.preadinto(m, 65536 - 4096) == 8192 and m[:] == want
        m.close()
        f = scratch / "mapped"
        f.write_bytes(bytes(8192))
        with open(f, "r+b") as fh, mmap.mmap(fh.fileno(), 8192) as fm:
            img.preadinto(fm, 65536 - 4096)
            fm.flush()
        assert f.read_bytes() == want
        # numpy: uint8, and wider dtypes (filled with the bytes), and a contiguous slice
        a = np.zeros(8192, dtype=np.uint8)
        assert img.preadinto(a, 65536 - 4096) == 8192 and a.tobytes() == want
        w = np.zeros(1024, dtype=np.uint64)
        assert img.preadinto(w, 65536 - 4096) == 8192 and w.tobytes() == want
        s = np.zeros((4, 4096), dtype=np.uint8)
        assert img.preadinto(s[1:3], 65536 - 4096) == 8192 and s[1:3].tobytes() == want
        assert not s[0].any() and not s[3].any()
        # array.array
        ar = array.array("B", bytes(100))
        assert img.preadinto(ar, 0) == 100 and ar.tobytes() == b"\x11" * 100
        # an empty buffer reads nothing
        assert img.preadinto(bytearray(), 0) == 0
        # read-only buffers are refused
        for ro in (b"x" * 10, memoryview(b"x" * 10), memoryview(bytearray(10)).toreadonly()):
            with pytest.raises(TypeError):
                img.preadinto(ro, 0)
        ro_np = np.zeros(10, dtype=np.uint8)
        ro_np.flags.writeable = False
        with pytest.raises(TypeError):
            img.preadinto(ro_np, 0)
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as rm:
            with pytest.raises(TypeError):
                img.preadinto(rm, 0)
        # non-contiguous buffers and non-buffers are refused
        with pytest.raises(TypeError):
            img.preadinto(memoryview(bytearray(100))[::2], 0)
        with pytest.raises(TypeError):
            img.preadinto(np.zeros((10, 10), dtype=np.uint8)[:, 1], 0)
        with pytest.raises(TypeError):
            img.preadinto([0] * 10, 0)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            img.preadinto("text", 0)  # type: ignore[arg-type]


def test_preadinto_holds_buffer_during_read(data_image):
    # While a read is in progress the exporter cannot be resized (the Py_buffer is held); after
    # it, it can.
    b = bytearray(1000)
    with qcow2rs.open(data_image) as img:
        img.preadinto(b, 0)
    b.append(1)
    assert len(b) == 1001


def test_small_reads_that_wait(data_image):
    # A read of at most a cluster is first polled without waiting; one that must wait (with
    # O_DIRECT every read goes to the kernel's queue) is then run to its end with the GIL
    # released. From 4 threads, aligned and unaligned, with preadinto and pread.
    try:
        img = qcow2rs.open(data_image, direct=True)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        pytest.skip("the file system has no O_DIRECT")
    errors: list[BaseException] = []

    def reader(t: int) -> None:
        try:
            for i in range(200):
                off = 1 * MiB + (i * 4096 + t * 512) % (64 * 1024 - 4096)
                b = bytearray(4096 - 512 * (i % 2))
                assert img.preadinto(b, off) == len(b) and b == b"\x22" * len(b)
                assert img.pread(512, 4096 * (i % 16) + 7) == b"\x11" * 512
                assert img.pread(4096, 4 * MiB + 4096 * i) == bytes(4096)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    with img:
        ts = [threading.Thread(target=reader, args=(t,)) for t in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=60)
            assert not t.is_alive()
    assert not errors, errors


def test_close_while_threads_read_and_write(data_image):
    # Threads read (preadinto, pread) and write (pwrite) while the main thread closes the
    # image: a blocking call in progress finishes before close goes on, every call after it
    # raises ValueError, and nothing else goes wrong (no other error, no hang). Blocking calls
    # hold the image open for their length with a lock that close takes (`Image::with_open`).
    img = qcow2rs.open(data_image, "r+")
    errors: list[BaseException] = []
    counts = [0] * 4
    started = threading.Barrier(5)

    def reader(t: int) -> None:
        b = bytearray(4096)
        started.wait()
        try:
            while True:
                if t == 3:
                    img.pwrite(b"\x33" * 4096, 8 * MiB + 4096 * (counts[t] % 16))
                elif t == 2:
                    assert img.pread(4096, 0) == b"\x11" * 4096
                else:
                    assert img.preadinto(b, 1 * MiB) == 4096 and b == b"\x22" * 4096
                counts[t] += 1
        except ValueError:
            pass
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    ts = [threading.Thread(target=reader, args=(t,)) for t in range(4)]
    for t in ts:
        t.start()
    started.wait()
    while min(counts) < 50:
        time.sleep(0.001)
    img.close()
    for t in ts:
        t.join(timeout=60)
        assert not t.is_alive()
    assert not errors, errors
    with pytest.raises(ValueError):
        img.preadinto(bytearray(10), 0)
    assert_clean(data_image)


def test_fileobj(data_image, scratch):
    with qcow2rs.open(data_image, "r+") as img:
        f = img.fileobj()
        assert isinstance(f, io.BufferedReader)
        assert f.readable() and f.seekable() and not f.writable()
        assert f.name == str(data_image)
        assert f.read(3) == b"\x11" * 3
        assert f.tell() == 3
        assert f.seek(-10, os.SEEK_END) == img.size - 10
        assert f.read() == bytes(10)
        assert f.read(5) == b""
        f.seek(65536 - 2)
        assert f.read(4) == b"\x11\x11\x00\x00"
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
        with pytest.raises(OSError):
            f.seek(-1)

        w = img.fileobj("r+b")
        assert isinstance(w, io.BufferedRandom)
        w.seek(5000)
        w.write(b"hello")
        w.seek(5000)
        assert w.read(5) == b"hello"
        w.flush()
        raw = w.raw  # the disk has a fixed size: short write at the end, then ENOSPC
        raw.seek(img.size - 2)
        assert raw.write(b"abcd") == 2
        with pytest.raises(OSError) as ei:
            raw.write(b"x")
        assert ei.value.errno == errno.ENOSPC
        w.close()
        assert img.pread(5, 5000) == b"hello"
        assert img.pread(2, img.size - 2) == b"ab"

        # shutil.copyfileobj both ways
        out = scratch / "copy.raw"
        with img.fileobj() as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        assert out.stat().st_size == img.size
        assert out.read_bytes()[5000:5005] == b"hello"
        with open(out, "rb") as src, img.fileobj("r+b") as dst:
            shutil.copyfileobj(src, dst)
        with pytest.raises(ValueError):
            img.fileobj("wb")  # type: ignore[call-overload]
        with pytest.raises(ValueError):
            img.fileobj(buffering=0)
    with qcow2rs.open(data_image) as ro:
        with pytest.raises(ValueError):
            ro.fileobj("r+b")
    assert_clean(data_image)


def test_errors_missing_file(scratch):
    p = scratch / "nope.qcow2"
    with pytest.raises(FileNotFoundError) as ei:
        qcow2rs.open(p)
    e = ei.value
    assert e.errno == errno.ENOENT and e.filename == str(p) and e.strerror
    with pytest.raises(FileNotFoundError):
        qcow2rs.info(p)
    with pytest.raises(FileNotFoundError):
        qcow2rs.check(p)


def test_errors_format(scratch, qemu):
    # not a qcow2 image
    raw = scratch / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    with pytest.raises(qcow2rs.Error) as ei:
        qcow2rs.open(raw)
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.EINVAL
    assert ei.value.filename == str(raw) and "qcow2" in ei.value.strerror
    # corrupt: the L1 table is not aligned
    bad = hostile.l1_offset_unaligned(scratch)
    with pytest.raises(qcow2rs.CorruptImageError) as ei:
        qcow2rs.open(bad)
    assert ei.value.errno == errno.EUCLEAN and ei.value.filename == str(bad)
    assert isinstance(ei.value, qcow2rs.Error)
    # corrupt: an L2 entry points past the end of the file (found when reading)
    bad = hostile.l2_past_eof(scratch)
    with qcow2rs.open(bad) as img:
        with pytest.raises(qcow2rs.CorruptImageError):
            img.pread(4096, 0)
        assert img.pread(4096, 1 << 20) == b"\x22" * 4096  # the rest still reads
    # unsupported: an unknown incompatible feature bit
    unk = hostile.unknown_incompat_bit(scratch)
    with pytest.raises(qcow2rs.UnsupportedFeatureError) as ei:
        qcow2rs.open(unk)
    assert ei.value.errno == errno.ENOTSUP and isinstance(ei.value, qcow2rs.Error)
    # untrusted: a backing file is refused
    base = hostile.small_image(scratch, "base.qcow2")
    top = hostile.small_image(scratch, "top.qcow2", backing=base.name)
    with pytest.raises(qcow2rs.Error):
        qcow2rs.open(top, untrusted=True)
    with qcow2rs.open(top, backing=False) as img:
        assert img.backing_file == "base.qcow2"


def test_errors_requests(img_path):
    with qcow2rs.open(img_path) as img:
        # writes to a read-only image: EBADF
        for call in (
            lambda: img.pwrite(b"x", 0),
            lambda: img.write_zeroes(512, 0),
            lambda: img.discard(512, 0),
        ):
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == errno.EBADF and ei.value.filename == str(img_path)
        # outside the image: ValueError
        with pytest.raises(ValueError):
            img.pread(1, img.size + 1)
        with pytest.raises(ValueError):
            img.preadinto(bytearray(1), img.size + 1)
        with pytest.raises(ValueError):
            img.pread(-1, 0)
        with pytest.raises(ValueError):
            img.pread(1, -1)
    with qcow2rs.open(img_path, "r+") as img:
        with pytest.raises(ValueError):
            img.pwrite(b"xx", img.size - 1)
        with pytest.raises(ValueError):
            img.write_zeroes(2, img.size - 1)
        with pytest.raises(ValueError):
            img.discard(1, img.size)
        with pytest.raises(ValueError):
            img.pwrite(b"x", -5)
        with pytest.raises(TypeError):
            img.pwrite("text", 0)  # type: ignore[arg-type]
    # use after close: ValueError
    for call in (
        lambda: img.pread(1, 0),
        lambda: img.preadinto(bytearray(1), 0),
        lambda: img.pwrite(b"x", 0),
        lambda: img.write_zeroes(1, 0),
        lambda: img.discard(1, 0),
        lambda: img.flush(),
        lambda: img.info(),
        lambda: img.map(),
    ):
        with pytest.raises(ValueError, match="closed"):
            call()
    with pytest.raises(ValueError):
        qcow2rs.open(img_path, "w")


def test_read_only_open_of_corrupt_marked_image(data_image):
    # An image marked corrupt opens read-only only.
    hostile.put(data_image, "incompatible_features", hostile.get(data_image, "incompatible_features") | 2)
    with qcow2rs.open(data_image) as img:
        assert img.pread(4, 0) == b"\x11" * 4
    with pytest.raises(OSError):
        qcow2rs.open(data_image, "r+")


def test_backing_chain_reads_and_info(scratch, qemu):
    base = hostile.small_image(scratch, "base.qcow2")
    top = scratch / "top.qcow2"
    qcow2rs.create(top, None, backing_file="base.qcow2", backing_format="qcow2")
    with qcow2rs.open(top, "r+") as img:
        assert img.size == 16 * MiB and img.backing_file == "base.qcow2"
        assert img.pread(4, 0) == b"\x11" * 4
        img.pwrite(b"\x99" * 100, 10)  # COW from the backing file
        assert img.pread(120, 0) == b"\x11" * 10 + b"\x99" * 100 + b"\x11" * 10
        assert img.info()["backing-filename"] == "base.qcow2"
        assert any(e["depth"] == 1 for e in img.map())
    assert_clean(top)
    assert qemu_img("compare", top, base, check=False).returncode == 1


def test_dropped_image_is_flushed_and_closed(img_path, scratch, qemu):
    img = qcow2rs.open(img_path, "r+")
    img.pwrite(b"\x77" * 200_000, 3 * MiB + 5)
    del img  # no close(): closed (flushed, reserved space given back) when dropped
    assert_clean(img_path)
    raw = scratch / "dropped.raw"
    qemu_img("convert", "-O", "raw", img_path, raw)
    with open(raw, "rb") as f:
        assert os.pread(f.fileno(), 200_000, 3 * MiB + 5) == b"\x77" * 200_000


# The syncs a child process makes, phase by phase: it opens `path` in `cache` mode with the
# threads engine (whose syncs are fdatasync calls strace sees; io_uring's are not), then
# writes 3 times and flushes, calling os.uname() after each step as a marker.
_SYNC_PHASES = r"""
import os, sys, qcow2rs
img = qcow2rs.open(sys.argv[1], "r+", cache=sys.argv[2])
assert img.cache == sys.argv[2], img.cache
os.uname()
for i in range(3):
    img.pwrite(b"\x5a" * 4096, i * 4 * 65536)   # an overwrite, then two new clusters
    os.uname()
img.flush()
os.uname()
img.close()
"""


def _syncs_per_phase(path, cache: str) -> list[int]:
    strace = shutil.which("strace")
    if strace is None:
        if in_ci():
            pytest.fail("strace not found (apt-get install strace) [CI=true: failing instead of skipping]")
        pytest.skip("strace not found")
    log = path.with_suffix(".strace")
    env = dict(os.environ, QCOW2RS_ENGINE="threads")
    subprocess.run(
        [strace, "-f", "-qq", "-e", "trace=fdatasync,fsync,uname", "-o", str(log),
         sys.executable, "-c", _SYNC_PHASES, str(path), cache],
        env=env, check=True, timeout=120,
    )
    phases = [0]
    for line in log.read_text().splitlines():
        if "uname(" in line:
            phases.append(0)
        elif "fdatasync(" in line or "fsync(" in line:
            phases[-1] += 1
    # open, write 1, write 2, write 3, flush (close's own syncs after the last marker)
    return phases[1:5]


@pytest.mark.parametrize(
    "cache,per_write,at_flush",
    [("writeback", False, True), ("writethrough", True, True), ("unsafe", False, False)],
)
def test_cache_mode_syncs(scratch, cache, per_write, at_flush):
    # writeback syncs at flush() only, writethrough before every write returns, unsafe never.
    p = scratch / "c.qcow2"
    qcow2rs.create(p, 4 * MiB)
    with qcow2rs.open(p, "r+") as img:
        img.pwrite(b"\x11" * 65536, 0)
    phases = _syncs_per_phase(p, cache)
    writes, flush = phases[:3], phases[3]
    assert [n > 0 for n in writes] == [per_write] * 3, (cache, writes)
    assert (flush > 0) == at_flush, (cache, flush)
    assert_clean(p)


def test_cache_mode_argument(scratch):
    p = scratch / "c.qcow2"
    qcow2rs.create(p, 4 * MiB)
    with qcow2rs.open(p) as img:
        assert img.cache == "writeback"
    for mode in ("writeback", "writethrough", "unsafe", "none", "directsync"):
        try:
            img = qcow2rs.open(p, "r+", cache=mode)
        except OSError as e:  # O_DIRECT refused (tmpfs)
            assert mode in ("none", "directsync") and e.errno == errno.EINVAL
            continue
        with img:
            assert img.cache == mode
            img.pwrite(b"\x33" * 4096, 0)
        assert img.cache == mode  # still known once closed
    try:
        with qcow2rs.open(p, direct=True) as img:
            assert img.cache == "none"
    except OSError as e:
        assert e.errno == errno.EINVAL
    with pytest.raises(ValueError, match="invalid cache mode 'bogus'"):
        qcow2rs.open(p, cache="bogus")
    with pytest.raises(ValueError, match="direct=True conflicts with cache='writeback'"):
        qcow2rs.open(p, direct=True, cache="writeback")

    async def aio() -> str:
        async with qcow2rs.aio.open(p, "r+", cache="unsafe") as aimg:
            await aimg.pwrite(b"\x44" * 512, 512)
            return aimg.cache

    assert asyncio.run(aio()) == "unsafe"
    with qcow2rs.open(p) as img:
        assert img.pread(1024, 0) == b"\x33" * 512 + b"\x44" * 512
