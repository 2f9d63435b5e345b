"""Every image of the interop matrix read through pread, preadinto and the file-like view,
compared with qemu-img's reading; info() and map() compared with the CLI's JSON."""

from __future__ import annotations

import io
import json
import os
import shutil

import qcow2rs
from helpers import MiB, qemu_img, to_raw

WINDOW = 1 * MiB


def first_mismatch(a: bytes, b: bytes) -> int | None:
    if a == b:
        return None
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def regions(image) -> list[tuple[int, int]]:
    """The whole disk for the small images; for the 1 TiB one, windows around every extent
    qemu-img reports (its start and end) and the last MiB."""
    if image.size <= 256 * MiB:
        return [(0, image.size)]
    extents = json.loads(qemu_img("map", "--output=json", image.path).stdout)
    out = set()
    for e in extents:
        n = min(e["length"], WINDOW)
        out.add((e["start"], n))
        out.add((e["start"] + e["length"] - n, n))
        if e["start"] >= 1000:
            out.add((e["start"] - 1000, min(2000, image.size - e["start"] + 1000)))
    out.add((image.size - WINDOW, WINDOW))
    return sorted(out)


def check_equal(got: bytes, want: bytes, how: str, off: int):
    i = first_mismatch(got, want)
    assert i is None, f"{how}: differs from qemu-img's reading at guest offset {off + i} ({off + i:#x})"


def test_read_three_ways(image, scratch):
    ref = to_raw(image.path, scratch / "ref.raw")
    with qcow2rs.open(image.path) as img, open(ref, "rb") as rf:
        assert img.size == image.size
        view = img.fileobj()
        for off, n in regions(image):
            want = os.pread(rf.fileno(), n, off)
            assert len(want) == n

            check_equal(img.pread(n, off), want, "pread", off)

            buf = bytearray(n)
            mv = memoryview(buf)
            pos = 0
            step = 1_000_003  # odd-sized pieces: unaligned to sectors and clusters
            while pos < n:
                k = img.preadinto(mv[pos : pos + step], off + pos)
                assert k == min(step, n - pos)
                pos += k
            mv.release()
            check_equal(bytes(buf), want, "preadinto", off)

            view.seek(off)
            if n == image.size:
                out = io.BytesIO()
                shutil.copyfileobj(view, out)
                got = out.getvalue()
            else:
                got = view.read(n)
            check_equal(got, want, "fileobj", off)
        # Reads stop at the end of the disk.
        assert img.pread(100, img.size - 10) == os.pread(rf.fileno(), 10, img.size - 10)
        assert img.pread(100, img.size) == b""
        view.seek(0, os.SEEK_END)
        assert view.read(10) == b""
        view.close()


def test_info_and_map_match_cli(image, cli):
    cli_info = json.loads(cli("info", "--output=json", image.path).stdout)
    cli_map = json.loads(cli("map", "--output=json", image.path).stdout)
    with qcow2rs.open(image.path) as img:
        assert img.info() == cli_info
        assert img.map() == cli_map
        assert img.backing_file == cli_info.get("backing-filename")
        assert img.cluster_size == cli_info["cluster-size"]
    assert qcow2rs.info(image.path) == cli_info
