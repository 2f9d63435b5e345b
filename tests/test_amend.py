"""`qcow2rs amend -o ...` against qemu-img: after each change `qemu-img check` is clean, `qemu-img info`
shows the change, the guest content is unchanged (`qemu-img compare` with a copy made before) and
qemu-img can amend the image back; refused changes give one error line, exit 1 and leave the file
byte-identical."""

from __future__ import annotations

import json
import shutil

import pytest

from interop import qemu_img
from qemu_tools import qemu_io

WRITES = [
    "write -q -P 0x11 0 65536",
    "write -q -P 0x22 100000 300000",
    "write -q -z 1048576 131072",
    "write -q -P 0x33 2097152 4096",
]


def make(d, name, opts="", backing=None, writes=WRITES, snapshot=False):
    """A 4M image made by qemu-img/qemu-io; with `snapshot`, a snapshot s1 (holding a zero
    cluster) then more writes."""
    path = d / name
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    args += [path, "4M"]
    cp = qemu_img(*args, cwd=d)
    assert cp.returncode == 0, cp.stderr
    if writes:
        qemu_io(path, *writes, cwd=d)
    if snapshot:
        assert qemu_img("snapshot", "-c", "s1", path).returncode == 0
        qemu_io(path, "write -q -P 0x44 0 4096", "write -q -z 3145728 65536", cwd=d)
    return path


def info(path):
    cp = qemu_img("info", "--output=json", path)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def specific(path):
    return info(path)["format-specific"]["data"]


def assert_clean(path):
    cp = qemu_img("check", path)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def assert_same_content(a, b):
    cp = qemu_img("compare", a, b)
    assert cp.returncode == 0, cp.stdout + cp.stderr


@pytest.fixture
def base(qemu, scratch):
    return make(scratch, "base.qcow2", writes=["write -q -P 0x55 0 4M"])


CASES = [
    # (image options, backing?, snapshot?, amend options, check on info, amend back)
    ("compat=1.1", False, False, "compat=0.10", {"compat": "0.10"}, "compat=1.1"),
    ("compat=1.1", True, False, "compat=0.10", {"compat": "0.10"}, "compat=1.1"),
    ("compat=1.1", False, True, "compat=0.10", {"compat": "0.10"}, "compat=1.1"),
    ("compat=1.1,cluster_size=4096", False, False, "compat=0.10", {"compat": "0.10"}, "compat=1.1"),
    ("compat=0.10", False, False, "compat=1.1", {"compat": "1.1"}, "compat=0.10"),
    ("compat=0.10", False, True, "compat=1.1", {"compat": "1.1"}, "compat=0.10"),
    ("compat=1.1", False, False, "lazy_refcounts=on", {"lazy-refcounts": True}, "lazy_refcounts=off"),
    ("lazy_refcounts=on", False, False, "lazy_refcounts=off", {"lazy-refcounts": False}, "lazy_refcounts=on"),
    ("compat=1.1,lazy_refcounts=on", False, False, "compat=0.10", {"compat": "0.10"}, "compat=1.1"),
    ("compat=1.1", False, False, "size=8M", {}, "size=4M"),
    ("compat=1.1", False, False, "refcount_bits=1", {"refcount-bits": 1}, "refcount_bits=16"),
    ("compat=1.1", False, False, "refcount_bits=8", {"refcount-bits": 8}, "refcount_bits=16"),
    ("compat=1.1", True, False, "refcount_bits=64", {"refcount-bits": 64}, "refcount_bits=16"),
    ("compat=1.1,cluster_size=512", False, True, "refcount_bits=2", {"refcount-bits": 2}, "refcount_bits=16"),
    ("compat=1.1,refcount_bits=64,cluster_size=4096", False, True, "refcount_bits=4", {"refcount-bits": 4}, "refcount_bits=64"),
    ("compat=0.10", False, False, "compat=1.1,lazy_refcounts=on", {"compat": "1.1", "lazy-refcounts": True}, "lazy_refcounts=off,compat=0.10"),
]


@pytest.mark.parametrize("image_opts,backing,snapshot,amend,expect,back", CASES, ids=[f"{c[0]}{'+backing' if c[1] else ''}{'+snap' if c[2] else ''}:{c[3]}" for c in CASES])
def test_amend_change(image_opts, backing, snapshot, amend, expect, back, cli, scratch, base):
    img = make(scratch, "img.qcow2", image_opts, backing=base.name if backing else None, snapshot=snapshot)
    before = scratch / "before.qcow2"
    shutil.copyfile(img, before)
    snaps_before = qemu_img("snapshot", "-l", img).stdout
    cp = cli("amend", "-o", amend, img)
    assert cp.returncode == 0, cp.stderr
    assert_clean(img)
    spec = specific(img)
    for k, v in expect.items():
        assert spec.get(k) == v, (k, spec)
    if "size=" in amend:
        assert info(img)["virtual-size"] == 8 << 20
        cp = qemu_img("compare", before, img)  # the grown part reads as zeros
        assert cp.returncode == 0, cp.stdout + cp.stderr
    else:
        assert_same_content(img, before)
    assert qemu_img("snapshot", "-l", img).stdout == snaps_before
    if snapshot:
        for f in (img, before):
            cp = qemu_img("convert", "-l", "s1", "-O", "raw", f, scratch / f"{f.stem}-s1.raw")
            assert cp.returncode == 0, cp.stderr
        assert (scratch / "img-s1.raw").read_bytes() == (scratch / "before-s1.raw").read_bytes()
    # qemu-img can amend it back, and the content still holds.
    cp = qemu_img("amend", "-o", back, img)
    assert cp.returncode == 0, cp.stderr
    assert_clean(img)
    assert_same_content(img, before)


def test_amend_downgrade_zero_clusters(cli, scratch, qemu):
    """compat=0.10 cannot flag zero clusters: without a backing file they become unallocated
    (reading zeros all the same), as qemu-img does; no zero flag is left in the map."""
    img = make(scratch, "img.qcow2", "compat=1.1")
    ref = scratch / "ref.qcow2"
    shutil.copyfile(img, ref)
    assert cli("amend", "-o", "compat=0.10", img).returncode == 0
    assert qemu_img("amend", "-o", "compat=0.10", ref).returncode == 0
    ours = json.loads(qemu_img("map", "--output=json", img).stdout)
    theirs = json.loads(qemu_img("map", "--output=json", ref).stdout)
    strip = lambda m: [{k: v for k, v in e.items() if k != "offset"} for e in m]  # noqa: E731
    assert strip(ours) == strip(theirs)
    assert_clean(img)


REFUSALS = [
    ("compat=1.1", "cluster_size=4096"),
    ("compat=1.1", "extended_l2=on"),
    ("compat=1.1", "compression_type=zstd"),
    ("compat=1.1", "preallocation=full"),
    ("compat=1.1", "foo=bar"),
    ("compat=1.1", "compat=2"),
    ("compat=1.1", "backing_file=other.qcow2"),
    ("compat=1.1", "backing_fmt=raw"),
    ("compat=1.1", "data_file_raw=on"),
    ("compat=1.1", "data_file=x.raw"),
    ("compat=1.1", "refcount_bits=3"),
    ("compat=1.1", "lazy_refcounts=maybe"),
    ("compat=1.1,extended_l2=on", "compat=0.10"),
    ("compat=1.1,refcount_bits=8", "compat=0.10"),
    ("compat=0.10", "lazy_refcounts=on"),
    ("compat=0.10", "refcount_bits=8"),
    ("compat=1.1", "compat=0.10,refcount_bits=8"),
]


@pytest.mark.parametrize("image_opts,amend", REFUSALS, ids=[f"{a}:{b}" for a, b in REFUSALS])
def test_amend_refused(image_opts, amend, cli, scratch, qemu):
    """Refused as by qemu-img (exit 1, an error naming the problem) and the file is unchanged."""
    img = make(scratch, "img.qcow2", image_opts)
    ref = scratch / "ref.qcow2"
    shutil.copyfile(img, ref)
    before = img.read_bytes()
    theirs = qemu_img("amend", "-o", amend, ref)
    assert theirs.returncode == 1, theirs.stderr
    ours = cli("amend", "-o", amend, img)
    assert ours.returncode == 1, ours.stderr
    assert len(ours.stderr.strip().splitlines()) == 1, ours.stderr
    assert img.read_bytes() == before


def test_amend_usage(cli, scratch, qemu):
    img = make(scratch, "img.qcow2")
    for args in (["amend", img], ["amend", "-o", "compat=1.1"], ["amend", "-o", "compat=1.1", img, img]):
        ref = qemu_img(*args[1:] if False else args)
        ours = cli(*args)
        assert ref.returncode == ours.returncode == 1, (ours.stderr, ref.stderr)
    # -t: an unknown cache mode is refused as qemu-img refuses it, before the image is read.
    ref = qemu_img("amend", "-t", "bogus", "-o", "lazy_refcounts=on", img)
    ours = cli("amend", "-t", "bogus", "-o", "lazy_refcounts=on", img)
    assert ref.returncode == ours.returncode == 1, (ours.stderr, ref.stderr)
    assert "Invalid cache option: bogus" in ref.stderr and "Invalid cache option: bogus" in ours.stderr
    raw = scratch / "x.raw"
    raw.write_bytes(b"\0" * 4096)
    ours = cli("amend", "-f", "raw", "-o", "size=8192", raw)
    assert ours.returncode == 1
    assert "does not support option amendment" in ours.stderr


@pytest.mark.parametrize("cache", ["writeback", "writethrough", "none", "directsync", "unsafe"])
def test_amend_cache_modes(cache, cli, scratch, qemu):
    """`-t` opens the image in that cache mode (`none`/`directsync` with O_DIRECT); the amend
    is complete and clean in each."""
    img = make(scratch, "img.qcow2", "compat=1.1")
    cp = cli("amend", "-t", cache, "-o", "lazy_refcounts=on", img)
    if cp.returncode != 0 and cache in ("none", "directsync") and "O_DIRECT" in cp.stderr:
        pytest.skip(f"the scratch file system refuses O_DIRECT: {cp.stderr.strip()}")
    assert cp.returncode == 0, cp.stderr
    assert specific(img)["lazy-refcounts"] is True
    assert_clean(img)


def zero_flags(path):
    """Standard L2 entries with the zero flag (bit 0) in the active and every snapshot L1's
    tables, read straight from the file."""
    import struct

    b = path.read_bytes()
    be = lambda fmt, off: struct.unpack_from(">" + fmt, b, off)[0]  # noqa: E731
    cs = 1 << be("I", 20)
    l1s = [(be("Q", 40), be("I", 36))]
    off = be("Q", 64)
    for _ in range(be("I", 60)):
        l1s.append((be("Q", off), be("I", off + 8)))
        id_len, name_len, extra = be("H", off + 12), be("H", off + 14), be("I", off + 36)
        off += 40 + extra + id_len + name_len
        off = (off + 7) & ~7
    n = 0
    for l1_off, l1_size in l1s:
        for i in range(l1_size):
            t = be("Q", l1_off + 8 * i) & 0x00FFFFFFFFFFFE00
            if t:
                for j in range(cs // 8):
                    e = be("Q", t + 8 * j)
                    n += (e & (1 << 62)) == 0 and (e & 1) == 1
    return n


def snapshot_content(img, name, out):
    cp = qemu_img("convert", "-O", "raw", "-l", f"snapshot.name={name}", img, out)
    assert cp.returncode == 0, cp.stderr
    return out.read_bytes()


@pytest.mark.parametrize("backing", [False, True], ids=["standalone", "backing"])
def test_amend_downgrade_snapshot_zero_clusters(backing, cli, scratch, base):
    """Zero clusters inside internal snapshots (plain and preallocated, in L2 tables shared with
    the active state and between snapshots) are expanded as qemu-img does: v2 has no zero
    flag. Afterwards `qemu-img check` is clean, the active content and each snapshot's content
    (`qemu-img convert -l`) equal what they were and what qemu-img's own downgrade gives, and
    no zero flag is left in any snapshot (qemu-img map of each after applying it to a copy)."""
    img = make(scratch, "img.qcow2", "compat=1.1", backing=base.name if backing else None)
    assert qemu_img("snapshot", "-c", "s1", img).returncode == 0
    # s1 and the active state share L2 tables; a preallocated zero cluster (write -z without
    # unmap on allocated data) then s2; then the active state moves on.
    qemu_io(img, "write -q -z 0 65536", "write -q -z 2228224 65536", cwd=scratch)
    assert qemu_img("snapshot", "-c", "s2", img).returncode == 0
    qemu_io(img, "write -q -P 0x66 1048576 65536", "write -q -z 3145728 131072", cwd=scratch)
    ref = scratch / "ref.qcow2"
    shutil.copyfile(img, ref)
    before = {s: snapshot_content(img, s, scratch / f"{s}.before.raw") for s in ("s1", "s2")}
    active = scratch / "active.qcow2"
    shutil.copyfile(img, active)
    ours = cli("amend", "-o", "compat=0.10", img)
    assert ours.returncode == 0, ours.stderr
    theirs = qemu_img("amend", "-o", "compat=0.10", ref)
    assert theirs.returncode == 0, theirs.stderr
    assert info(img)["format-specific"]["data"]["compat"] == "0.10"
    assert_clean(img)
    assert_same_content(img, active)
    assert_same_content(img, ref)
    assert qemu_img("snapshot", "-l", img).stdout.splitlines()[2:] != []
    for s in ("s1", "s2"):
        got = snapshot_content(img, s, scratch / f"{s}.ours.raw")
        assert got == before[s], s
        if s == "s2":
            # Not s1: qemu-img 10 writes zeros into the data cluster that the active state's
            # preallocated zero cluster shares with s1 (write -z at 0 after s1), so its s1
            # then reads zeros there; ours keeps s1's content.
            assert got == snapshot_content(ref, s, scratch / f"{s}.ref.raw"), s
    # v2 has no zero flag: none is left, in any table (qemu's reader would still honour it).
    assert zero_flags(active) > 0
    assert zero_flags(ref) == 0
    assert zero_flags(img) == 0
    assert cli("check", img).returncode == 0


@pytest.mark.parametrize("amend", ["lazy_refcounts=off", "compat=0.10"])
def test_amend_dirty_image(amend, cli, scratch, qemu):
    """A lazy-refcounts image left dirty by a crash: its refcounts are repaired first (as
    qemu-img marks it clean first), then the change is made; check is clean, content kept."""
    img = make(scratch, "img.qcow2", "lazy_refcounts=on")
    cp = qemu_io(img, "write -q -P 0xd1 2097152 196608", "write -q -P 0xd2 0 4096", "abort", cwd=scratch, check=False)
    assert cp.returncode != 0
    assert info(img)["dirty-flag"] is True
    before = scratch / "before.raw"
    assert qemu_img("convert", "-O", "raw", img, before).returncode == 0
    cp = cli("amend", "-o", amend, img)
    assert cp.returncode == 0, cp.stderr
    assert_clean(img)
    i = info(img)
    assert i["dirty-flag"] is False
    assert i["format-specific"]["data"].get("lazy-refcounts", False) is False
    cp = qemu_img("compare", "-F", "raw", img, before)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_amend_backing_unchanged_accepted(cli, scratch, base):
    """backing_file/backing_fmt equal to the current ones: accepted (nothing changes), as
    qemu-img; any other value is refused (test_amend_refused)."""
    img = make(scratch, "img.qcow2", backing=base.name)
    ref = scratch / "ref.qcow2"
    shutil.copyfile(img, ref)
    opts = f"backing_file={base.name},backing_fmt=qcow2"
    assert qemu_img("amend", "-o", opts, ref).returncode == 0
    cp = cli("amend", "-o", opts, img)
    assert cp.returncode == 0, cp.stderr
    assert_clean(img)
    assert info(img)["backing-filename"] == base.name
    for bad in (f"backing_file={base.name}", "backing_fmt=qcow2"):
        before = img.read_bytes()
        assert qemu_img("amend", "-o", bad, ref).returncode == 1
        assert cli("amend", "-o", bad, img).returncode == 1
        assert img.read_bytes() == before


def test_amend_refcount_width_too_narrow(cli, scratch, qemu):
    """refcount_bits=1 while a snapshot shares clusters (refcount 2): refused as by qemu-img,
    the file byte-identical."""
    img = make(scratch, "img.qcow2", snapshot=True)
    ref = scratch / "ref.qcow2"
    shutil.copyfile(img, ref)
    before = img.read_bytes()
    theirs = qemu_img("amend", "-o", "refcount_bits=1", ref)
    ours = cli("amend", "-o", "refcount_bits=1", img)
    assert theirs.returncode == ours.returncode == 1, (ours.stderr, theirs.stderr)
    assert "Cannot decrease refcount entry width to 1 bits" in ours.stderr
    assert img.read_bytes() == before
