"""Image.bitmaps() and bitmap_add/remove/clear/enable/disable/merge against qemu-img: after each
change `qemu-img info --output=json` lists the same bitmaps and `qemu-img check` is clean;
bitmaps made by qemu-img are read and changed by us and ours by qemu-img; merged contents equal
what `qemu-img bitmap --merge` makes (dirty regions read through qemu-nbd); errors."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import time
import uuid

import pytest

from helpers import MiB, assert_clean, qemu_img
from qemu_tools import in_ci, qemu_io, run

import qcow2rs

KiB = 1 << 10


def qemu_bitmaps(path) -> list[dict]:
    cp = qemu_img("info", "--output=json", path)
    return json.loads(cp.stdout)["format-specific"]["data"].get("bitmaps", [])


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie has exited: its locks are gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def dirty(path, name) -> list[tuple[int, int]]:
    """The dirty ranges of bitmap `name` as QEMU reads them: qemu-nbd exports the image with the
    bitmap (-B) and `qemu-img map` with x-dirty-bitmap reports dirty ranges as data=false."""
    if shutil.which("qemu-nbd") is None:
        msg = "qemu-nbd not found (apt-get install qemu-utils)"
        if in_ci():
            pytest.fail(msg + " [CI=true: failing instead of skipping]", pytrace=False)
        pytest.skip(msg)
    tag = uuid.uuid4().hex[:8]
    sock, pidfile = path.parent / f"nbd-{tag}.sock", path.parent / f"nbd-{tag}.pid"
    # --fork returns once the socket listens; without -t the server exits after one client.
    cp = run(["qemu-nbd", "--fork", "--pid-file", pidfile, "-r", "-f", "qcow2", "-B", name, "-k", sock, path])
    assert cp.returncode == 0, cp.stderr
    pid = int(pidfile.read_text())
    opts = f"driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:{name}"
    try:
        cp = qemu_img("map", "--output=json", "--image-opts", opts)
    finally:
        # Its image lock goes with the process: wait for it before the next open.
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
    return [(e["start"], e["length"]) for e in json.loads(cp.stdout) if not e["data"]]


def make_qemu(d, name="q.qcow2", size="16M"):
    """An image with bitmaps made by qemu: `a` (64 KiB, disabled after writes at 0 and 5M) and
    `big` (1 MiB, enabled, also dirty at 10M)."""
    path = d / name
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    qemu_img("bitmap", "--add", "-g", "64k", path, "a")
    qemu_img("bitmap", "--add", "-g", "1M", path, "big")
    qemu_io(path, "write -q 0 64k", "write -q 5M 100k")
    qemu_img("bitmap", "--disable", path, "a")
    qemu_io(path, "write -q 10M 4k")
    return path


def change(path, op) -> list[dict]:
    """Apply `op(img)` on the image opened "r+", close it; qemu-img then lists the bitmaps we
    listed and finds the image clean. Returns the list."""
    with qcow2rs.open(str(path), "r+") as img:
        op(img)
        ours = img.bitmaps()
        assert ours == img.info()["format-specific"]["data"].get("bitmaps", [])
    assert qemu_bitmaps(path) == ours
    assert_clean(path)
    return ours


def bm(name, granularity, *flags):
    return {"name": name, "granularity": granularity, "flags": list(flags)}


def test_bitmap_cycle(tmp_path, qemu) -> None:
    p = tmp_path / "b.qcow2"
    qcow2rs.create(str(p), 16 * MiB)
    with qcow2rs.open(str(p)) as img:
        assert img.bitmaps() == []

    def add(img):
        img.bitmap_add("a")
        img.bitmap_add("b", granularity=512)
        img.bitmap_add("c", granularity=2 << 30)

    a, b, c = bm("a", 65536, "auto"), bm("b", 512, "auto"), bm("c", 2 << 30, "auto")
    assert change(p, add) == [a, b, c]
    assert change(p, lambda img: img.bitmap_disable("b")) == [a, bm("b", 512), c]
    assert change(p, lambda img: img.bitmap_disable("b")) == [a, bm("b", 512), c]  # no-op
    assert change(p, lambda img: img.bitmap_enable("b")) == [a, b, c]
    assert change(p, lambda img: img.bitmap_clear("a")) == [a, b, c]
    assert change(p, lambda img: img.bitmap_merge("a", "b")) == [a, b, c]
    assert change(p, lambda img: img.bitmap_remove("b")) == [a, c]

    def remove_all(img):
        img.bitmap_remove("a")
        img.bitmap_remove("c")

    assert change(p, remove_all) == []
    assert "bitmaps" not in json.loads(qemu_img("info", "--output=json", p).stdout)["format-specific"]["data"]


def test_default_granularity_follows_cluster_size(tmp_path, qemu) -> None:
    for cs, gran in ((512, 4096), (4096, 4096), (2 * MiB, 2 * MiB)):
        p = tmp_path / f"g{cs}.qcow2"
        qcow2rs.create(str(p), 16 * MiB, cluster_size=cs)
        assert change(p, lambda img: img.bitmap_add("x")) == [bm("x", gran, "auto")]


def test_qemu_bitmaps_read_and_changed(tmp_path, qemu) -> None:
    p = make_qemu(tmp_path)
    ref = tmp_path / "ref.qcow2"
    shutil.copyfile(p, ref)
    theirs = qemu_bitmaps(p)
    assert theirs == [bm("a", 64 * KiB), bm("big", MiB, "auto")]
    with qcow2rs.open(str(p)) as img:  # read-only is enough to list them
        assert img.bitmaps() == theirs
    a_bits, big_bits = dirty(p, "a"), dirty(p, "big")
    assert a_bits == [(0, 64 * KiB), (5 * MiB, 128 * KiB)]
    assert big_bits == [(0, MiB), (5 * MiB, MiB), (10 * MiB, MiB)]

    # Merge (granularities differ both ways), the same as qemu-img's on a copy.
    change(p, lambda img: img.bitmap_merge("a", "big"))
    qemu_img("bitmap", "--merge", "big", ref, "a")
    assert dirty(p, "a") == dirty(ref, "a") == [(0, MiB), (5 * MiB, MiB), (10 * MiB, MiB)]
    assert dirty(p, "big") == big_bits

    # Clear, enable; qemu-img then changes what we wrote.
    assert change(p, lambda img: img.bitmap_clear("a")) == theirs
    assert dirty(p, "a") == []
    assert dirty(p, "big") == big_bits
    assert change(p, lambda img: img.bitmap_enable("a")) == [bm("a", 64 * KiB, "auto"), bm("big", MiB, "auto")]
    qemu_io(p, "write -q 3M 4k")  # both bitmaps are enabled: qemu marks both
    assert dirty(p, "a") == [(3 * MiB, 64 * KiB)]
    assert dirty(p, "big") == [(0, MiB), (3 * MiB, MiB), (5 * MiB, MiB), (10 * MiB, MiB)]
    qemu_img("bitmap", "--remove", p, "big")
    qemu_img("bitmap", "--add", "-g", "128k", p, "q")
    assert_clean(p)
    assert change(p, lambda img: img.bitmap_remove("a")) == [bm("q", 128 * KiB, "auto")]
    assert qcow2rs.check(str(p)).get("corruptions", 0) == 0


def test_merge_from_another_image(tmp_path, qemu) -> None:
    src = make_qemu(tmp_path, "src.qcow2")
    p = tmp_path / "dst.qcow2"
    qcow2rs.create(str(p), 16 * MiB, cluster_size=4096)
    change(p, lambda img: img.bitmap_add("m", granularity=512))
    ref = tmp_path / "ref.qcow2"
    shutil.copyfile(p, ref)
    with qcow2rs.open(str(src)) as s:
        change(p, lambda img: img.bitmap_merge("m", "a", source=s))
        # The source may be the destination image itself (a no-op here: m into m).
        change(p, lambda img: img.bitmap_merge("m", "m", source=img))
    qemu_img("bitmap", "--merge", "a", "-b", src, "-F", "qcow2", ref, "m")
    assert dirty(p, "m") == dirty(ref, "m") == [(0, 64 * KiB), (5 * MiB, 128 * KiB)]
    assert_clean(src)

    # A source of another size, or without that bitmap: nothing changes.
    other = tmp_path / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", other, "8M")
    qemu_img("bitmap", "--add", other, "a")
    before = p.read_bytes()
    with qcow2rs.open(str(p), "r+") as img:
        with qcow2rs.open(str(other)) as o:
            with pytest.raises(qcow2rs.Error) as ei:
                img.bitmap_merge("m", "a", source=o)
            assert ei.value.errno == errno.EINVAL
            assert "different sizes" in ei.value.strerror
        with qcow2rs.open(str(src)) as s:
            with pytest.raises(FileNotFoundError) as nf:
                img.bitmap_merge("m", "nope", source=s)
            assert nf.value.filename == str(src)
            with pytest.raises(FileNotFoundError) as nf:
                img.bitmap_merge("nope", "a", source=s)
            assert nf.value.filename == str(p)
    assert p.read_bytes() == before


def test_bitmap_errors(tmp_path, qemu) -> None:
    p = make_qemu(tmp_path)
    before = p.read_bytes()
    with qcow2rs.open(str(p), "r+") as img:
        with pytest.raises(FileExistsError) as ex:
            img.bitmap_add("a")
        assert ex.value.errno == errno.EEXIST and ex.value.filename == str(p)
        assert ex.value.strerror == "Bitmap already exists: a"
        for call in (
            lambda: img.bitmap_remove("nope"),
            lambda: img.bitmap_clear("nope"),
            lambda: img.bitmap_enable("nope"),
            lambda: img.bitmap_disable("nope"),
            lambda: img.bitmap_merge("nope", "a"),
            lambda: img.bitmap_merge("a", "nope"),
        ):
            with pytest.raises(FileNotFoundError) as nf:
                call()
            assert nf.value.errno == errno.ENOENT and nf.value.filename == str(p)
            assert nf.value.strerror == "Dirty bitmap 'nope' not found"
        for g in (0, 256, 3000, 4 << 30):
            with pytest.raises(qcow2rs.Error) as bad:
                img.bitmap_add("new", granularity=g)
            assert bad.value.errno == errno.EINVAL
            assert bad.value.strerror == "Granularity must be power of 2 and at least 512"
        with pytest.raises(ValueError):
            img.bitmap_add("new", granularity=-1)
        with pytest.raises(qcow2rs.Error, match="cannot be empty"):
            img.bitmap_add("")
        with pytest.raises(TypeError):
            img.bitmap_add("new", 65536)  # type: ignore[misc]  # granularity is keyword-only
        with pytest.raises(TypeError):
            img.bitmap_merge("a", "big", p)  # type: ignore[misc]  # source is keyword-only
        with pytest.raises(TypeError):
            img.bitmap_merge("a", "big", source=str(p))  # type: ignore[arg-type]
        ours = img.bitmaps()
    assert ours == qemu_bitmaps(p)
    assert p.read_bytes() == before

    # Read-only image: OSError EBADF (the package's error for a write to a read-only image).
    with qcow2rs.open(str(p)) as img:
        for call in (
            lambda: img.bitmap_add("new"),
            lambda: img.bitmap_remove("a"),
            lambda: img.bitmap_clear("a"),
            lambda: img.bitmap_enable("a"),
            lambda: img.bitmap_disable("big"),
            lambda: img.bitmap_merge("a", "big"),
        ):
            with pytest.raises(OSError) as ro:
                call()
            assert ro.value.errno == errno.EBADF and not isinstance(ro.value, qcow2rs.Error)
    assert p.read_bytes() == before

    # Closed image.
    img = qcow2rs.open(str(p), "r+")
    img.close()
    with pytest.raises(ValueError):
        img.bitmaps()
    with pytest.raises(ValueError):
        img.bitmap_add("new")
    with qcow2rs.open(str(p)) as s:
        with pytest.raises(ValueError):
            s.bitmap_merge("a", "big", source=img)

    # qcow2 v2: no persistent bitmaps.
    v2 = tmp_path / "v2.qcow2"
    qcow2rs.create(str(v2), 16 * MiB, compat="0.10")
    with qcow2rs.open(str(v2), "r+") as img:
        assert img.bitmaps() == []
        with pytest.raises(qcow2rs.UnsupportedFeatureError) as un:
            img.bitmap_add("a")
        assert un.value.errno == errno.ENOTSUP
    assert_clean(v2)


def test_guest_writes_are_recorded(tmp_path, qemu) -> None:
    """Writes through the package are recorded in the enabled bitmaps as qemu records the same
    write: `big` is in use while the image is open, both are stored at close (same flags and
    dirty ranges as qemu's copy), the disabled `a` unchanged."""
    p = make_qemu(tmp_path)
    q = tmp_path / "theirs.qcow2"
    shutil.copy(p, q)
    qemu_io(q, "write -q 3M 4k")
    with qcow2rs.open(str(p), "r+") as img:
        assert img.bitmaps() == [bm("a", 65536), bm("big", MiB, "auto")]
        img.pwrite(b"x" * 4096, 3 * MiB)
        assert img.bitmaps() == [bm("a", 65536), bm("big", MiB, "in-use", "auto")]
    assert qemu_bitmaps(p) == qemu_bitmaps(q) == [bm("a", 65536), bm("big", MiB, "auto")]
    assert dirty(p, "big") == dirty(q, "big")
    assert (3 * MiB, MiB) in dirty(p, "big")
    assert dirty(p, "a") == dirty(q, "a")
    assert_clean(p)


def test_bitmap_extents_match_qemu(tmp_path, qemu) -> None:
    """Image.bitmap_extents gives the dirty ranges QEMU reports for the bitmap (qemu-nbd -B),
    after qemu's writes, after our merge, and after qemu's writes into a bitmap we enabled."""
    p = make_qemu(tmp_path, size="16000k")  # not a multiple of 1 MiB: the last range is clipped
    qemu_io(p, "write -q 15M 100k")
    with qcow2rs.open(str(p)) as img:  # read-only is enough
        assert img.bitmap_extents("a") == dirty(p, "a") == [(0, 64 * KiB), (5 * MiB, 128 * KiB)]
        big = img.bitmap_extents("big")
        assert big == dirty(p, "big") == [(0, MiB), (5 * MiB, MiB), (10 * MiB, MiB), (15 * MiB, 640 * KiB)]
        with pytest.raises(FileNotFoundError) as nf:
            img.bitmap_extents("nope")
        assert nf.value.filename == str(p) and nf.value.strerror == "Dirty bitmap 'nope' not found"
    change(p, lambda img: img.bitmap_merge("a", "big"))
    change(p, lambda img: img.bitmap_enable("a"))
    qemu_io(p, "write -q 3M 4k")
    with qcow2rs.open(str(p)) as img:
        assert img.bitmap_extents("a") == dirty(p, "a")
        assert img.bitmap_extents("a")[:2] == [(0, MiB), (3 * MiB, 64 * KiB)]
    change(p, lambda img: img.bitmap_add("empty"))
    with qcow2rs.open(str(p)) as img:
        assert img.bitmap_extents("empty") == [] == dirty(p, "empty")
    img = qcow2rs.open(str(p))
    img.close()
    with pytest.raises(ValueError):
        img.bitmap_extents("a")


def test_async_bitmaps(tmp_path, qemu) -> None:
    """AsyncImage's bitmap methods do what Image's do (same lists, same errors)."""
    p = make_qemu(tmp_path)
    other = make_qemu(tmp_path, "other.qcow2")
    theirs = qemu_bitmaps(p)

    async def main() -> None:
        async with qcow2rs.aio.open(str(p), "r+") as img, qcow2rs.aio.open(str(other)) as src:
            assert await img.bitmaps() == theirs
            assert await img.bitmap_extents("a") == [(0, 64 * KiB), (5 * MiB, 128 * KiB)]
            await img.bitmap_add("n", granularity=512)
            await img.bitmap_disable("n")
            await img.bitmap_enable("n")
            await img.bitmap_merge("n", "a")
            assert await img.bitmap_extents("n") == [(0, 64 * KiB), (5 * MiB, 128 * KiB)]
            await img.bitmap_merge("n", "big", source=src)
            await img.bitmap_merge("n", "big", source=src.image)
            assert await img.bitmap_extents("n") == [(0, MiB), (5 * MiB, MiB), (10 * MiB, MiB)]
            await img.bitmap_clear("a")
            assert await img.bitmap_extents("a") == []
            await img.bitmap_remove("n")
            with pytest.raises(FileExistsError):
                await img.bitmap_add("a")
            with pytest.raises(FileNotFoundError) as nf:
                await img.bitmap_remove("nope")
            assert nf.value.filename == str(p)
            with pytest.raises(FileNotFoundError) as nf:
                await img.bitmap_merge("a", "nope", source=src)
            assert nf.value.filename == str(other)
            with pytest.raises(ValueError):
                await img.bitmap_add("x", granularity=-1)
            with pytest.raises(OSError) as ro:
                await src.bitmap_clear("a")
            assert ro.value.errno == errno.EBADF
        with pytest.raises(ValueError):
            await img.bitmap_extents("a")

    asyncio.run(main())
    assert qemu_bitmaps(p) == [bm("a", 64 * KiB), bm("big", MiB, "auto")]
    assert dirty(p, "a") == []
    assert_clean(p)
