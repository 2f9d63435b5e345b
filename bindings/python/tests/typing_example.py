"""Type-checked by test_typing.py with `mypy --strict` (never run): typical use of the API
must type-check against the stubs, and misuse must not."""

from __future__ import annotations

import asyncio
import io
import shutil
from typing import Any

import numpy as np

import qcow2rs


def sync_use(path: str) -> bytes:
    qcow2rs.create(path, 1 << 30, cluster_size=65536, extended_l2=True, compression_type="zstd")
    with qcow2rs.open(path, "r+", cache_size=1 << 20) as img:
        n: int = img.pwrite(b"data", 0)
        buf = bytearray(4096)
        n += img.preadinto(buf, 0)
        n += img.preadinto(np.zeros(16, dtype=np.uint8), 0)
        img.write_zeroes(4096, 0, unmap=True)
        img.discard(4096, 0)
        img.flush()
        info: dict[str, Any] = img.info()
        extents: list[dict[str, Any]] = img.map()
        size: int = img.size + img.cluster_size + len(info) + len(extents) + n
        backing: str | None = img.backing_file
        img.bitmap_add("b0", granularity=65536)
        img.bitmap_add("b1")
        img.bitmap_disable("b1")
        img.bitmap_merge("b1", "b0")
        with qcow2rs.open(path) as other:
            img.bitmap_merge("b1", "b0", source=other)
        img.bitmap_enable("b1")
        img.bitmap_clear("b1")
        img.bitmap_remove("b0")
        bitmaps: list[dict[str, Any]] = img.bitmaps()
        size += sum(b["granularity"] for b in bitmaps)
        reader: io.BufferedReader = img.fileobj()
        writer: io.BufferedRandom = img.fileobj("r+b")
        with open("/dev/null", "wb") as out:
            shutil.copyfileobj(reader, out)
        writer.write(b"x")
        assert size and (backing is None or backing) and not img.read_only and not img.closed
        return img.pread(4, 0)


def jobs(src: str, dst: str) -> bool:
    report: dict[str, Any] = qcow2rs.check(src, repair="leaks")
    qcow2rs.convert(src, dst, compress=True, progress=lambda f: print(f"{f:.0%}"))
    assert report and qcow2rs.info(dst)
    qcow2rs.amend(dst, {"compat": "1.1", "refcount_bits": 16}, lazy_refcounts=True)
    need: dict[str, int] = qcow2rs.measure(src, out_format="qcow2", cluster_size=65536)
    empty = qcow2rs.measure(size=1 << 30, preallocation="metadata")
    assert need["required"] <= need["fully-allocated"] and empty["required"] > 0
    return qcow2rs.compare(src, dst, strict=True)


async def async_use(path: str) -> int:
    async with qcow2rs.aio.open(path, "r+") as img:
        data: bytes = await img.pread(4096, 0)
        results: list[int] = await asyncio.gather(*(img.pwrite(data, i * 4096) for i in range(8)))
        await img.write_zeroes(4096, 0)
        await img.flush()
        return sum(results) + await img.preadinto(bytearray(10), 0)


def errors(path: str) -> None:
    try:
        qcow2rs.open(path)
    except qcow2rs.CorruptImageError as e:
        print(e.errno, e.strerror, e.filename)
    except qcow2rs.UnsupportedFeatureError:
        pass
    except qcow2rs.Error:
        pass
    except FileNotFoundError:
        pass
