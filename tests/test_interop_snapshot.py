"""`qcow2rs snapshot -l` rows must equal `qemu-img snapshot -l` rows (column alignment may differ)."""

from __future__ import annotations

import re

from interop import qemu_img

ROW = re.compile(
    r"^(?P<id>\S+)\s+(?P<tag>.*?)\s+(?P<vm_size>\d+(?:\.\d+)? (?:[KMGTPE]i)?B)"
    r"\s+(?P<date>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\s+(?P<vm_clock>\d+:\d\d:\d\d\.\d+)(?:\s+(?P<icount>\d+))?\s*$"
)
HEADER = ["ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"]


def parse_snapshot_list(text: str, who: str) -> list[tuple]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    assert lines[0] == "Snapshot list:", f"{who}: first line {lines[0]!r}"
    assert lines[1].split() == HEADER, f"{who}: header {lines[1]!r}"
    rows = []
    for ln in lines[2:]:
        m = ROW.match(ln)
        assert m, f"{who}: cannot parse snapshot row {ln!r}"
        rows.append(tuple(m.group(k) or "" for k in ("id", "tag", "vm_size", "date", "vm_clock", "icount")))
    return rows


def test_snapshot_list(image, cli, workdir):
    ref = qemu_img("snapshot", "-l", image.path, cwd=workdir)
    assert ref.returncode == 0, ref.stderr
    ref_rows = parse_snapshot_list(ref.stdout, "qemu-img")
    if "snapshot" in image.tags:
        assert ref_rows, "harness: image should have snapshots"
    ours = cli("snapshot", "-l", image.path, cwd=workdir)
    assert ours.returncode == 0, f"exit {ours.returncode}: {ours.stderr.strip()}"
    assert parse_snapshot_list(ours.stdout, "qcow2rs") == ref_rows
