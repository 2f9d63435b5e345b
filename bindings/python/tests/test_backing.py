"""qcow2rs.rebase and qcow2rs.commit, checked against qemu-img."""

from __future__ import annotations

import json

import pytest

import qcow2rs
from helpers import assert_clean, qemu_img
from qemu_tools import qemu_io


def chain(d):
    base, mid, top = d / "base.qcow2", d / "mid.qcow2", d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "2M")
    qemu_io(base, "write -P 1 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid)
    qemu_io(mid, "write -P 2 512k 1M", "write -z 1536k 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 3 100k 200k", "write -z 0 64k")
    return base, mid, top


def raw_copy(img, d, name):
    out = d / f"{name}.raw"
    qemu_img("convert", "-O", "raw", img, out)
    return out


def same(a, b):
    cp = qemu_img("compare", a, b, check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def backing(img):
    i = json.loads(qemu_img("info", "--output=json", img).stdout)
    return i.get("backing-filename"), i.get("backing-filename-format")


def test_rebase_safe_unsafe_and_standalone(scratch, qemu):
    base, mid, top = chain(scratch)
    before = raw_copy(top, scratch, "before")
    seen = []
    qcow2rs.rebase(top, "base.qcow2", backing_format="qcow2", progress=seen.append)
    assert seen and seen[-1] == 1.0
    same(top, before)
    assert backing(top) == ("base.qcow2", "qcow2")
    assert_clean(top)
    qcow2rs.rebase(top, "")
    same(top, before)
    assert backing(top) == (None, None)
    qcow2rs.rebase(top, "mid.qcow2", backing_format="qcow2", unsafe=True)
    assert backing(top) == ("mid.qcow2", "qcow2")
    assert_clean(top)


def test_rebase_errors(scratch, qemu):
    base, mid, top = chain(scratch)
    with pytest.raises(FileNotFoundError):
        qcow2rs.rebase(top, "missing.qcow2", backing_format="qcow2")
    with pytest.raises(OSError, match="backing format must be specified"):
        qcow2rs.rebase(top, "base.qcow2")
    with pytest.raises(ValueError):
        qcow2rs.rebase(top, "base.qcow2", backing_format="vmdk-ish")
    assert backing(top) == ("mid.qcow2", "qcow2")


def test_commit(scratch, qemu):
    base, mid, top = chain(scratch)
    before = raw_copy(top, scratch, "before")
    qcow2rs.commit(top)
    same(mid, before)
    same(top, before)
    assert_clean(top)
    assert_clean(mid)
    m = json.loads(qemu_img("map", "--output=json", top).stdout)
    assert not [e for e in m if e["depth"] == 0 and e["present"]]


def test_commit_base_and_drop(scratch, qemu):
    base, mid, top = chain(scratch)
    before = raw_copy(top, scratch, "before")
    old = top.read_bytes()
    qcow2rs.commit(top, base="base.qcow2")
    same(base, before)
    assert top.read_bytes() == old
    assert_clean(base)
    with pytest.raises(OSError, match="Did not find 'nothere'"):
        qcow2rs.commit(top, base="nothere")
    with pytest.raises(OSError, match="Image does not have a backing file"):
        qcow2rs.commit(base)
