"""qcow2rs.amend and qcow2rs.measure, checked against qemu-img amend / measure."""

from __future__ import annotations

import json
import shutil

import pytest

import qcow2rs
from helpers import MiB, assert_clean, qemu_compare, qemu_img, to_raw
from qemu_tools import qemu_io


def qemu_info(path) -> dict:
    return json.loads(qemu_img("info", "--output=json", path).stdout)


def qemu_measure(*args) -> dict:
    return json.loads(qemu_img("measure", "--output=json", *args).stdout)


def o_arg(opts: dict) -> list[str]:
    """The same options as qemu-img's `-o`."""
    if not opts:
        return []
    conv = {True: "on", False: "off"}
    return ["-o", ",".join(f"{k}={conv.get(v, v) if isinstance(v, bool) else v}" for k, v in opts.items())]


def make_image(path, *extra, size="64M"):
    qemu_img("create", "-q", "-f", "qcow2", *extra, path, size)
    qemu_io(path, "write -P 0x11 0 3M")
    qemu_io(path, "write -z 8M 2M")
    qemu_io(path, "write -P 0x22 40M 100k")


# --- measure ---------------------------------------------------------------------------------

MEASURE_OPTS = {
    "defaults": {},
    "cluster-4k": {"cluster_size": 4096},
    "cluster-2m": {"cluster_size": 2 * MiB},
    "compat-0.10": {"compat": "0.10"},
    "refcount-1": {"refcount_bits": 1},
    "refcount-64": {"refcount_bits": 64},
    "extended-l2": {"extended_l2": True},
    "prealloc-metadata": {"preallocation": "metadata"},
    "prealloc-full": {"preallocation": "full"},
}


@pytest.mark.parametrize("name", MEASURE_OPTS)
@pytest.mark.parametrize("size", [0, 1, 100 * MiB, 3 * 1024**4 + 512])
def test_measure_size(qemu, name, size):
    opts = MEASURE_OPTS[name]
    want = qemu_measure("-O", "qcow2", *o_arg(opts), "--size", str(size))
    assert qcow2rs.measure(size=size, **opts) == want
    # The options as a mapping give the same.
    assert qcow2rs.measure(None, opts, size=size) == want


def test_measure_size_raw(qemu):
    for size in (0, 1, 1000, 64 * MiB):
        want = qemu_measure("-O", "raw", "--size", str(size))
        assert qcow2rs.measure(size=size, out_format="raw") == want


@pytest.mark.parametrize("name", ["defaults", "cluster-4k", "compat-0.10", "prealloc-metadata", "extended-l2"])
def test_measure_image(qemu, scratch, name):
    src = scratch / "src.qcow2"
    make_image(src)
    opts = MEASURE_OPTS[name]
    want = qemu_measure("-O", "qcow2", *o_arg(opts), src)
    got = qcow2rs.measure(src, **opts)
    assert got == want
    # A v3 source and a v3 target: qemu-img reports the bitmaps (0 here) too.
    keys = {"required", "fully-allocated"} | ({"bitmaps"} if opts.get("compat") != "0.10" else set())
    assert set(got) == keys
    assert qcow2rs.measure(src, out_format="raw") == qemu_measure("-O", "raw", src)
    # A raw source, format given.
    raw = to_raw(src, scratch / "src.raw")
    assert qcow2rs.measure(raw, format="raw", **opts) == qemu_measure(
        "-f", "raw", "-O", "qcow2", *o_arg(opts), raw
    )


def test_measure_bitmaps(qemu, scratch):
    src = scratch / "bm.qcow2"
    make_image(src)
    qemu_img("bitmap", "--add", src, "b0")
    qemu_img("bitmap", "--add", "-g", "4096", src, "b1")
    want = qemu_measure("-O", "qcow2", src)
    got = qcow2rs.measure(src)
    assert got == want
    assert got["bitmaps"] > 0
    # A v2 target cannot keep bitmaps: no key, as qemu-img.
    v2 = qcow2rs.measure(src, compat="0.10")
    assert v2 == qemu_measure("-O", "qcow2", "-o", "compat=0.10", src)
    assert "bitmaps" not in v2


def test_measure_errors(qemu, scratch):
    src = scratch / "e.qcow2"
    make_image(src)
    with pytest.raises(ValueError, match="together"):
        qcow2rs.measure(src, size=MiB)
    with pytest.raises(ValueError, match="either"):
        qcow2rs.measure()
    with pytest.raises(ValueError, match="negative"):
        qcow2rs.measure(size=-1)
    with pytest.raises(ValueError, match="Invalid parameter 'bogus'"):
        qcow2rs.measure(size=MiB, bogus="1")
    with pytest.raises(ValueError, match="Cluster size must be a power of two"):
        qcow2rs.measure(size=MiB, cluster_size=1000)
    with pytest.raises(ValueError):
        qcow2rs.measure(size=MiB, out_format="vmdk")
    with pytest.raises(TypeError, match="str, int or bool"):
        qcow2rs.measure(size=MiB, cluster_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError) as ei:
        qcow2rs.measure(scratch / "missing.qcow2")
    assert ei.value.filename == str(scratch / "missing.qcow2")


# --- amend -----------------------------------------------------------------------------------

AMEND_CASES = {
    "compat-0.10": {"compat": "0.10"},
    "lazy-refcounts": {"lazy_refcounts": True},
    "refcount-64": {"refcount_bits": 64},
    "refcount-1-grow": {"refcount_bits": 1, "size": 128 * MiB},
    "size-str": {"size": "96M"},
}


def comparable(info: dict) -> dict:
    d = dict(info["format-specific"]["data"])
    return {"virtual-size": info["virtual-size"], "cluster-size": info["cluster-size"], **d}


@pytest.mark.parametrize("name", AMEND_CASES)
def test_amend_like_qemu_img(qemu, scratch, name):
    opts = AMEND_CASES[name]
    ours, theirs = scratch / "ours.qcow2", scratch / "theirs.qcow2"
    make_image(ours)
    shutil.copyfile(ours, theirs)
    before = to_raw(ours, scratch / "before.raw")
    qcow2rs.amend(ours, **opts)
    qemu_img("amend", *o_arg(opts), theirs)
    assert comparable(qemu_info(ours)) == comparable(qemu_info(theirs))
    assert_clean(ours)
    # The guest content is unchanged (a grown image reads zeros past the old end).
    cp = qemu_img("compare", "-f", "qcow2", "-F", "raw", ours, before, check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_amend_mapping_and_kwargs(qemu, scratch):
    img = scratch / "m.qcow2"
    make_image(img, "-o", "compat=0.10")
    assert qemu_info(img)["format-specific"]["data"]["compat"] == "0.10"
    qcow2rs.amend(img, {"compat": "1.1"}, lazy_refcounts=True)
    data = qemu_info(img)["format-specific"]["data"]
    assert data["compat"] == "1.1" and data["lazy-refcounts"] is True
    # A later value for the same key wins (as repeated -o).
    qcow2rs.amend(img, {"lazy_refcounts": True}, lazy_refcounts=False)
    assert qemu_info(img)["format-specific"]["data"]["lazy-refcounts"] is False
    assert_clean(img)
    raw = to_raw(img, scratch / "m.raw")
    qemu_compare(img, raw)


def test_amend_errors_leave_image_alone(qemu, scratch):
    img = scratch / "e.qcow2"
    make_image(img)
    before = img.read_bytes()
    with pytest.raises(ValueError, match="Must specify options"):
        qcow2rs.amend(img)
    with pytest.raises(ValueError, match="Invalid parameter 'bogus'"):
        qcow2rs.amend(img, bogus="on")
    with pytest.raises(ValueError, match="expects 'on' or 'off'"):
        qcow2rs.amend(img, lazy_refcounts="maybe")
    with pytest.raises(qcow2rs.UnsupportedFeatureError, match="only supported for image creation"):
        qcow2rs.amend(img, cluster_size=4096)
    with pytest.raises(ValueError, match="rebase"):
        qcow2rs.amend(img, backing_file="other.qcow2")
    with pytest.raises(ValueError, match="multiple of 512"):
        qcow2rs.amend(img, size=MiB + 1)
    with pytest.raises(TypeError):
        qcow2rs.amend(img, size=None)  # type: ignore[arg-type]
    assert img.read_bytes() == before
    raw = scratch / "r.raw"
    raw.write_bytes(bytes(MiB))
    with pytest.raises(qcow2rs.UnsupportedFeatureError, match="raw") as ei:
        qcow2rs.amend(raw, compat="1.1")
    assert ei.value.filename == str(raw)
    with pytest.raises(FileNotFoundError):
        qcow2rs.amend(scratch / "missing.qcow2", compat="1.1")
