"""create, convert, check and compare, checked against qemu-img."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import hostile
import qcow2rs
from helpers import MiB, assert_clean, qemu_check, qemu_img, to_raw

CHECK_KEYS = [
    "check-errors",
    "corruptions",
    "leaks",
    "image-end-offset",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
    "filename",
    "format",
]


def qemu_info(path) -> dict:
    return json.loads(qemu_img("info", "--output=json", path).stdout)


def data(info) -> dict:
    return info["format-specific"]["data"]


# (create keyword arguments, dotted qemu-img info keys -> expected)
CREATE_CASES = {
    "defaults": ({}, {"cluster-size": 65536, "d.compat": "1.1", "d.refcount-bits": 16,
                      "d.lazy-refcounts": False, "d.extended-l2": False, "d.compression-type": "zlib"}),
    "cluster-4k": ({"cluster_size": 4096}, {"cluster-size": 4096}),
    "cluster-2m": ({"cluster_size": 2 * MiB}, {"cluster-size": 2 * MiB}),
    "compat-0.10": ({"compat": "0.10"}, {"d.compat": "0.10"}),
    "refcount-1": ({"refcount_bits": 1}, {"d.refcount-bits": 1}),
    "refcount-64": ({"refcount_bits": 64}, {"d.refcount-bits": 64}),
    "lazy-refcounts": ({"lazy_refcounts": True}, {"d.lazy-refcounts": True}),
    "extended-l2": ({"extended_l2": True, "cluster_size": 32768}, {"d.extended-l2": True, "cluster-size": 32768}),
    "zstd": ({"compression_type": "zstd"}, {"d.compression-type": "zstd"}),
    "prealloc-metadata": ({"preallocation": "metadata"}, {}),
    "prealloc-falloc": ({"preallocation": "falloc"}, {}),
    "prealloc-full": ({"preallocation": "full"}, {}),
    "data-file": ({"data_file": "DATA"}, {"d.data-file": "DATA", "d.data-file-raw": False}),
    "data-file-raw": ({"data_file": "DATA", "data_file_raw": True}, {"d.data-file-raw": True}),
    "backing": ({"backing_file": "base.qcow2", "backing_format": "qcow2"},
                {"backing-filename": "base.qcow2", "backing-filename-format": "qcow2"}),
}


def lookup(info, key):
    if key.startswith("d."):
        return data(info).get(key[2:])
    return info.get(key)


@pytest.mark.parametrize("case", CREATE_CASES)
def test_create_options(case, scratch, qemu):
    kwargs, expect = CREATE_CASES[case]
    kwargs = dict(kwargs)
    path = scratch / "new.qcow2"
    size = 32 * MiB
    if kwargs.get("data_file") == "DATA":
        kwargs["data_file"] = str(scratch / "new.data")
        expect = {k: (str(scratch / "new.data") if v == "DATA" else v) for k, v in expect.items()}
    if "backing_file" in kwargs:
        qcow2rs.create(scratch / "base.qcow2", size)
        size = None
    qcow2rs.create(path, size, **kwargs)
    info = qemu_info(path)
    assert info["virtual-size"] == 32 * MiB
    for k, v in expect.items():
        assert lookup(info, k) == v, f"{k}: {lookup(info, k)!r} != {v!r}"
    if case.startswith("prealloc"):
        extents = json.loads(qemu_img("map", "--output=json", path).stdout)
        assert all(e["present"] for e in extents), "preallocated image has unallocated ranges"
        if case != "prealloc-metadata":
            assert path.stat().st_blocks * 512 >= 32 * MiB
    assert_clean(path)
    # qcow2rs reads and writes what it created; qemu-img still finds it clean.
    with qcow2rs.open(path, "r+") as img:
        img.pwrite(b"\x5a" * 100_000, 12345)
        assert img.pread(100_000, 12345) == b"\x5a" * 100_000
    assert_clean(path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cluster_size": 1000},
        {"compat": "2.0"},
        {"compat": "0.10", "lazy_refcounts": True},
        {"extended_l2": True, "cluster_size": 4096},
        {"refcount_bits": 3},
        {"compression_type": "lz4"},
        {"preallocation": "sometimes"},
        {"data_file_raw": True},
    ],
)
def test_create_invalid_options(kwargs, scratch):
    with pytest.raises(ValueError):
        qcow2rs.create(scratch / "bad.qcow2", MiB, **kwargs)


def test_create_needs_size_or_backing(scratch):
    with pytest.raises(ValueError):
        qcow2rs.create(scratch / "x.qcow2", None)
    with pytest.raises(ValueError):
        qcow2rs.create(scratch / "x.qcow2", -1)


CONVERT_IMAGES = ["v3", "compressed-zstd", "extended-l2-backing", "chain-top", "discard-zero", "odd-size"]


@pytest.mark.parametrize("name", CONVERT_IMAGES)
def test_convert_matches_qemu(name, matrix, scratch):
    src = matrix[name].path
    ref = to_raw(src, scratch / "ref.raw")
    # raw output: byte for byte what qemu-img convert writes
    ours_raw = scratch / "ours.raw"
    qcow2rs.convert(src, ours_raw, out_format="raw")
    assert ours_raw.read_bytes() == ref.read_bytes()
    # qcow2 output: same content, clean
    fractions = []
    out = scratch / "out.qcow2"
    qcow2rs.convert(src, out, progress=fractions.append)
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert_clean(out)
    assert qemu_img("compare", src, out, check=False).returncode == 0
    assert qcow2rs.compare(src, out)


def test_convert_options(matrix, scratch):
    src = matrix["v3"].path
    out = scratch / "c.qcow2"
    qcow2rs.convert(src, out, compress=True, compression_type="zstd", cluster_size=131072)
    info = qemu_info(out)
    assert info["cluster-size"] == 131072 and data(info)["compression-type"] == "zstd"
    extents = json.loads(qemu_img("map", "--output=json", out).stdout)
    assert any(e["compressed"] for e in extents)
    assert_clean(out)
    assert qemu_img("compare", src, out, check=False).returncode == 0
    # with a backing file: only what differs is written
    shutil.copy(src, scratch / "base.qcow2")
    top = scratch / "top.qcow2"
    qcow2rs.convert(src, top, backing_file="base.qcow2", backing_format="qcow2")
    info = qemu_info(top)
    assert info["backing-filename"] == "base.qcow2"
    assert not any(e["depth"] == 0 and e["data"] for e in json.loads(qemu_img("map", "--output=json", top).stdout))
    assert qemu_img("compare", src, top, check=False).returncode == 0
    with pytest.raises(ValueError):
        qcow2rs.convert(src, scratch / "x", out_format="vmdk")
    with pytest.raises(ValueError):
        qcow2rs.convert(src, scratch / "x", out_format="raw", compress=True)
    with pytest.raises(FileNotFoundError):
        qcow2rs.convert(scratch / "missing", scratch / "x")


def test_convert_progress_exception_is_raised(matrix, scratch):
    def boom(f):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        qcow2rs.convert(matrix["v3"].path, scratch / "p.qcow2", progress=boom)


def test_check_matches_qemu(image, cli):
    ref = qemu_img("check", "--output=json", image.path, check=False)
    ours = qcow2rs.check(image.path)
    assert ours == json.loads(cli("check", "--output=json", image.path).stdout)
    if ref.stdout.strip():
        want = json.loads(ref.stdout)
        assert {k: ours[k] for k in CHECK_KEYS if k in ours} == {k: want[k] for k in CHECK_KEYS if k in want}


def test_check_repair(matrix, scratch):
    # The dirty image (lazy refcounts, crashed) has stale refcounts: repair makes it clean.
    p = scratch / "dirty.qcow2"
    shutil.copy(matrix["dirty"].path, p)
    before = qemu_check(p)
    assert before.get("corruptions", 0) + before.get("leaks", 0) > 0
    r = qcow2rs.check(p, repair="all")
    assert r["check-errors"] == 0
    assert_clean(p)
    assert qcow2rs.check(p).get("corruptions", 0) == 0
    with pytest.raises(ValueError):
        qcow2rs.check(p, repair="some")  # type: ignore[arg-type]
    raw = scratch / "x.raw"
    raw.write_bytes(bytes(4096))
    with pytest.raises(qcow2rs.UnsupportedFeatureError):
        qcow2rs.check(raw)
    # a leak made by hand: a refcount raised on a free cluster... is repaired by "leaks"
    leaky = hostile.small_image(scratch, "leaky.qcow2")
    with qcow2rs.open(leaky, "r+") as img:
        img.discard(65536, 0)
    qcow2rs.check(leaky, repair="leaks")
    assert_clean(leaky)


def test_compare_matches_qemu(matrix, scratch):
    a = matrix["chain-top"].path
    raw = to_raw(a, scratch / "a.raw")
    assert qcow2rs.compare(a, raw) is True
    assert qemu_img("compare", a, raw, check=False).returncode == 0
    with open(raw, "r+b") as f:
        f.seek(5 * MiB + 3)
        f.write(b"\x01")
    assert qcow2rs.compare(a, raw) is False
    assert qemu_img("compare", a, raw, check=False).returncode == 1
    # sizes: a zero tail is equal unless strict
    small = scratch / "small.qcow2"
    big = scratch / "big.qcow2"
    qcow2rs.create(small, 16 * MiB)
    qcow2rs.create(big, 32 * MiB)
    assert qcow2rs.compare(small, big) is True
    assert qcow2rs.compare(small, big, strict=True) is False
    assert qemu_img("compare", "-s", small, big, check=False).returncode == 1
    assert qcow2rs.compare(matrix["v3"].path, matrix["v2"].path) is (
        qemu_img("compare", matrix["v3"].path, matrix["v2"].path, check=False).returncode == 0
    )
    with pytest.raises(FileNotFoundError):
        qcow2rs.compare(a, scratch / "nope")
    os.unlink(raw)
