"""Image.snapshots(), snapshot_create/apply/delete against qemu-img (check, snapshot list, content)."""

from __future__ import annotations

import subprocess

import pytest

import qcow2rs


def qemu_img(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)


def test_snapshot_cycle(tmp_path) -> None:
    p = tmp_path / "s.qcow2"
    qcow2rs.create(str(p), 4 << 20)
    with qcow2rs.open(str(p), "r+") as img:
        img.pwrite(b"\x01" * 65536, 0)
        assert img.snapshots() == []
        assert img.snapshot_create("first") == "1"
        img.pwrite(b"\x02" * 65536, 0)
        assert img.snapshot_create("second") == "2"
        img.pwrite(b"\x03" * 65536, 0)
        snaps = img.snapshots()
        assert [(s["id"], s["name"]) for s in snaps] == [("1", "first"), ("2", "second")]
        assert snaps == img.info()["snapshots"]
        img.snapshot_apply("first")
        assert img.pread(65536, 0) == b"\x01" * 65536
        img.snapshot_apply("2")  # by ID
        assert img.pread(65536, 0) == b"\x02" * 65536
        with pytest.raises(FileNotFoundError):
            img.snapshot_apply("nope")
        with pytest.raises(FileNotFoundError):
            img.snapshot_delete("nope")
        img.snapshot_delete("first")
        assert [s["name"] for s in img.snapshots()] == ["second"]
    cp = qemu_img("check", p)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    lst = qemu_img("snapshot", "-l", p).stdout
    assert " second " in lst and " first " not in lst
    out = tmp_path / "s.raw"
    assert qemu_img("convert", "-l", "snapshot.name=second", "-O", "raw", p, out).returncode == 0
    assert out.read_bytes()[:65536] == b"\x02" * 65536


def test_snapshot_read_only(tmp_path) -> None:
    p = tmp_path / "r.qcow2"
    qcow2rs.create(str(p), 1 << 20)
    with qcow2rs.open(str(p)) as img:
        with pytest.raises(OSError):
            img.snapshot_create("x")
        assert img.snapshots() == []
