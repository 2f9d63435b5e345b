"""`qcow2rs snapshot -c/-a/-d` and `convert -l` against qemu-img: after every operation
`qemu-img check` is clean and `qemu-img snapshot -l` lists what `qcow2rs snapshot -l` lists;
`qemu-img convert -l` of each snapshot equals the guest content when it was taken; snapshots
made by either tool are applied and deleted by the other; errors and exit codes as qemu-img's."""

from __future__ import annotations

import shutil

import pytest

from interop import qemu_img
from qemu_tools import qemu_io
from test_interop_snapshot import parse_snapshot_list

VARIANTS = {
    "v3": "",
    "v2": "compat=0.10",
    "extended-l2": "extended_l2=on",
    "refcount-bits-16": "refcount_bits=16",
    "refcount-bits-64": "refcount_bits=64",
    "clusters-4k": "cluster_size=4096",
    "backing": None,
}


def make(d, variant):
    opts = VARIANTS[variant]
    img = d / "img.qcow2"
    if opts is None:
        base = d / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, "4M")
        qemu_io(base, "write -P 0x33 0 4M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", img, "4M")
    else:
        qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), img, "4M")
    qemu_io(img, "write -P 1 0 1M", "write -z 1M 64k")
    if variant not in ("backing", "extended-l2"):
        qemu_io(img, "write -c -P 5 2M 128k")
    return img


def content(img, d, snap=None):
    out = d / "content.raw"
    args = ["convert", "-O", "raw"] + (["-l", f"snapshot.name={snap}"] if snap else []) + [img, out]
    cp = qemu_img(*args)
    assert cp.returncode == 0, cp.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def check_clean(img, what):
    cp = qemu_img("check", img)
    assert cp.returncode == 0, f"{what}: qemu-img check: {cp.stdout}{cp.stderr}"


def same_list(cli, img, what):
    ref = qemu_img("snapshot", "-l", img)
    ours = cli("snapshot", "-l", img)
    assert ours.returncode == 0, ours.stderr
    assert parse_snapshot_list(ours.stdout, "qcow2rs") == parse_snapshot_list(ref.stdout, "qemu-img"), what
    return [r[1] for r in parse_snapshot_list(ref.stdout, "qemu-img")]


def ok(cp):
    assert cp.returncode == 0, f"exit {cp.returncode}: {cp.stderr.strip()}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_create_apply_delete(cli, scratch, variant):
    img = make(scratch, variant)
    c0 = content(img, scratch)
    ok(cli("snapshot", "-c", "first", img))
    check_clean(img, "create first")
    assert same_list(cli, img, "create") == ["first"]
    qemu_io(img, "write -P 7 100k 300k", "write -P 8 3M 64k")
    c1 = content(img, scratch)
    ok(cli("snapshot", "-c", "second one", img))
    check_clean(img, "create second")
    qemu_io(img, "write -P 9 0 2M")
    assert content(img, scratch, "first") == c0
    assert content(img, scratch, "second one") == c1
    # convert -l: every spelling, compared with qemu-img's output.
    for spec in ("snapshot.name=first", "1", "first", "snapshot.id=1"):
        out = scratch / "ours.raw"
        ok(cli("convert", "-l", spec, "-O", "raw", img, out))
        assert out.read_bytes() == c0, spec
        out.unlink()
    ok(cli("snapshot", "-a", "first", img))
    check_clean(img, "apply first")
    assert content(img, scratch) == c0
    ok(cli("snapshot", "-a", "2", img))  # by id
    check_clean(img, "apply 2")
    assert content(img, scratch) == c1
    ok(cli("snapshot", "-d", "first", img))
    check_clean(img, "delete first")
    assert same_list(cli, img, "delete") == ["second one"]
    assert content(img, scratch, "second one") == c1
    ok(cli("snapshot", "-d", "second one", img))
    check_clean(img, "delete second")
    assert same_list(cli, img, "delete all") == []
    assert content(img, scratch) == c1


@pytest.mark.parametrize("variant", ["v3", "v2", "extended-l2"])
def test_other_tool_applies_and_deletes(cli, scratch, variant):
    img = make(scratch, variant)
    c0 = content(img, scratch)
    qemu_img("snapshot", "-c", "theirs", img)
    qemu_io(img, "write -P 4 0 512k")
    c1 = content(img, scratch)
    ok(cli("snapshot", "-c", "ours", img))
    qemu_io(img, "write -P 5 0 1M")
    # qemu-img applies ours, we apply theirs, then each deletes the other's.
    qemu_img("snapshot", "-a", "ours", img)
    check_clean(img, "qemu applied ours")
    assert content(img, scratch) == c1
    ok(cli("snapshot", "-a", "theirs", img))
    check_clean(img, "we applied theirs")
    assert content(img, scratch) == c0
    qemu_img("snapshot", "-d", "ours", img)
    check_clean(img, "qemu deleted ours")
    ok(cli("snapshot", "-d", "theirs", img))
    check_clean(img, "we deleted theirs")
    assert same_list(cli, img, "end") == []


def test_apply_resized(cli, scratch):
    """A snapshot taken before a resize brings its size back, as qemu-img's apply does."""
    img = make(scratch, "v3")
    ok(cli("snapshot", "-c", "small", img))
    qemu_img("resize", img, "600M")
    qemu_io(img, "write -P 2 500M 1M")
    ref = scratch / "ref.qcow2"
    shutil.copy(img, ref)
    qemu_img("snapshot", "-a", "small", ref)
    ok(cli("snapshot", "-a", "small", img))
    check_clean(img, "apply")
    assert qemu_img("info", "--output=json", img).stdout.count('"virtual-size": 4194304') == 1
    cp = qemu_img("compare", img, ref)
    assert cp.returncode == 0, cp.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["-a", "nope"],
        ["-d", "nope"],
        ["-c", "a", "-d", "b"],
        ["-l", "-a", "x"],
    ],
)
def test_errors_like_qemu(cli, scratch, args):
    img = make(scratch, "v3")
    ref = qemu_img("snapshot", *args, img)
    ours = cli("snapshot", *args, img)
    assert ours.returncode == ref.returncode
    want = ref.stderr.splitlines()[0].removeprefix("qemu-img: ")
    assert ours.stderr.strip().endswith(want), (ours.stderr, ref.stderr)
    check_clean(img, "after error")


def test_refcount_bits_1_refused(cli, scratch):
    img = scratch / "r1.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", img, "1M")
    qemu_io(img, "write -P 1 0 64k")
    ref = scratch / "ref.qcow2"
    shutil.copy(img, ref)
    r = qemu_img("snapshot", "-c", "x", ref)
    ours = cli("snapshot", "-c", "x", img)
    assert ours.returncode == r.returncode == 1
    assert "Could not create snapshot 'x': Invalid argument" in ours.stderr
    check_clean(img, "refused")  # unlike qemu-img, nothing leaks


def test_convert_missing_snapshot(cli, scratch):
    img = make(scratch, "v3")
    ok(cli("snapshot", "-c", "s", img))
    for spec in ("nope", "snapshot.name=nope", "snapshot.id=7"):
        ref = qemu_img("convert", "-l", spec, "-O", "raw", img, scratch / "a.raw")
        ours = cli("convert", "-l", spec, "-O", "raw", img, scratch / "b.raw")
        assert ours.returncode == ref.returncode == 1, spec
        assert ref.stderr.strip().removeprefix("qemu-img: ") in ours.stderr, (spec, ours.stderr)
