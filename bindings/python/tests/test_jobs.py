"""create, convert, check and compare, checked against qemu-img."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import hostile
import qcow2rs
from helpers import MiB, assert_clean, qemu_check, qemu_img, to_raw
from qemu_tools import qemu_io

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


def convert_source(scratch):
    """4 MiB: data at 0 (64 KiB), zeros written as data at 1M (512 KiB), data at 3M (4 KiB)."""
    src = scratch / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "4M")
    qemu_io(src, "write -q -P 1 0 64k", "write -q -P 0 1M 512k", "write -q -P 2 3M 4k")
    return src


def qemu_map(path) -> list[list]:
    """[start, length, data, zero] of `qemu-img map`, adjacent entries of the same kind merged
    (the host offsets, which depend on the order of parallel writes, are left out)."""
    out: list[list] = []
    for e in json.loads(qemu_img("map", "--output=json", path).stdout):
        if out and out[-1][2:] == [e["data"], e["zero"]] and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], e["data"], e["zero"]])
    return out


def test_convert_sparse_size(qemu, scratch):
    """sparse_size (qemu-img convert -S): 0 allocates everything; the qcow2 output is allocated
    as qemu-img's with the same -S; bad sizes are refused."""
    src = convert_source(scratch)
    dense, sparse = scratch / "dense.raw", scratch / "sparse.raw"
    qcow2rs.convert(src, dense, out_format="raw", sparse_size=0)
    qcow2rs.convert(src, sparse, out_format="raw")
    assert os.stat(dense).st_blocks * 512 >= 4 * MiB
    assert os.stat(sparse).st_blocks * 512 < 1 * MiB
    for out in (dense, sparse):
        assert qemu_img("compare", src, out, check=False).returncode == 0
    for s in (0, 4096, 65536):
        ours, theirs = scratch / f"ours-{s}.qcow2", scratch / f"theirs-{s}.qcow2"
        qcow2rs.convert(src, ours, sparse_size=s)
        qemu_img("convert", "-O", "qcow2", "-S", str(s), src, theirs)
        assert qemu_map(ours) == qemu_map(theirs), s
        assert qemu_img("compare", src, ours, check=False).returncode == 0
        assert_clean(ours)
    for bad in (-512, 100, 32 * MiB):
        with pytest.raises(ValueError, match="Invalid buffer size for sparse output"):
            qcow2rs.convert(src, scratch / "x.raw", out_format="raw", sparse_size=bad)


def test_convert_existing_target(qemu, scratch):
    """existing (qemu-img convert -n) writes into the target, zeros included, keeping its size;
    with target_is_zero (--target-is-zero) zeros are not written."""
    src = convert_source(scratch)
    dst = scratch / "dst.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", dst, "6M")
    qemu_io(dst, "write -q -P 9 0 6M")
    qcow2rs.convert(src, dst, existing=True)
    assert qemu_info(dst)["virtual-size"] == 6 * MiB
    assert qemu_img("compare", src, dst, check=False).returncode == 1  # 4M-6M still 9s
    qemu_io(dst, "read -q -P 0 1M 512k", "read -q -P 2 3M 4k", "read -q -P 0 2M 1M", "read -q -P 9 4M 2M")
    assert_clean(dst)
    raw = scratch / "dst.raw"
    raw.write_bytes(b"\x07" * (4 * MiB))
    qcow2rs.convert(src, raw, out_format="raw", existing=True)
    assert qemu_img("compare", src, raw, check=False).returncode == 0
    # target_is_zero on a fresh target: same content; on a dirty one, zeros are not written.
    fresh = scratch / "fresh.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", fresh, "4M")
    qcow2rs.convert(src, fresh, existing=True, target_is_zero=True)
    assert qemu_img("compare", src, fresh, check=False).returncode == 0
    raw.write_bytes(b"\x07" * (4 * MiB))
    qcow2rs.convert(src, raw, out_format="raw", existing=True, target_is_zero=True)
    qemu_io(raw, "read -q -P 1 0 64k", "read -q -P 7 1M 512k", "read -q -P 2 3M 4k", fmt="raw")
    with pytest.raises(ValueError, match="requires use of -n"):
        qcow2rs.convert(src, fresh, target_is_zero=True)
    with pytest.raises(OSError):
        qcow2rs.convert(src, scratch / "missing.qcow2", existing=True)
    small = scratch / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", small, "1M")
    with pytest.raises(ValueError, match="smaller"):
        qcow2rs.convert(src, small, existing=True)


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


@pytest.mark.parametrize(
    "kw,argv",
    [
        ({}, []),
        ({"bs": 65536, "count": 20}, ["bs=64k", "count=20"]),
        ({"bs": 4096, "skip": 100, "count": 300}, ["bs=4k", "skip=100", "count=300"]),
        ({"bs": 1000, "skip": 3}, ["bs=1000", "skip=3"]),
        ({"bs": 1 << 20, "skip": 100}, ["bs=1M", "skip=100"]),
        ({"out_format": "qcow2", "bs": 65536, "skip": 4}, ["-O", "qcow2", "bs=64k", "skip=4"]),
    ],
    ids=["whole", "count", "skip-count", "odd-bs", "skip-past-end", "qcow2"],
)
def test_dd_matches_qemu(kw, argv, qemu, scratch):
    """qcow2rs.dd(...) makes the file `qemu-img dd` makes with the same operands: same size and
    same content (qemu-img compare), a clean check for qcow2 output."""
    src = convert_source(scratch)
    ours, theirs = scratch / "ours.out", scratch / "theirs.out"
    qcow2rs.dd(src, ours, **kw)
    qemu_img("dd", "-f", "qcow2", *argv, f"if={src}", f"of={theirs}")
    fmt = kw.get("out_format", "raw")
    assert os.path.getsize(ours) == os.path.getsize(theirs) or fmt == "qcow2"
    assert json.loads(qemu_img("info", "--output=json", ours).stdout)["virtual-size"] == json.loads(
        qemu_img("info", "--output=json", theirs).stdout
    )["virtual-size"]
    assert qemu_img("compare", "-f", fmt, "-F", fmt, ours, theirs, check=False).returncode == 0
    if fmt == "qcow2":
        assert_clean(ours)


def test_dd_bad_arguments(scratch):
    src = scratch / "s.qcow2"
    qcow2rs.create(src, MiB)
    for kw, msg in [
        ({"bs": 0}, "Invalid bs"),
        ({"bs": 1 << 31}, "Invalid bs"),
        ({"count": -1}, "Invalid count"),
        ({"skip": -2}, "Invalid skip"),
        ({"out_format": "vmdk"}, "vmdk"),
    ]:
        with pytest.raises(ValueError, match=msg):
            qcow2rs.dd(src, scratch / "o.raw", **kw)
    with pytest.raises(FileNotFoundError):
        qcow2rs.dd(scratch / "missing.qcow2", scratch / "o.raw")
