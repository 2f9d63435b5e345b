"""Reading: `qcow2rs convert -O raw` must produce exactly the bytes of `qemu-img convert -O raw`."""

from __future__ import annotations

import os

from interop import qemu_img

CHUNK = 1 << 20


def first_mismatch(a, b) -> int | None:
    """Offset of the first differing byte of two files (or of the shorter length), None if equal."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(CHUNK), fb.read(CHUNK)
            if x != y:
                n = min(len(x), len(y))
                i = next((i for i in range(n) if x[i] != y[i]), n)
                return off + i
            if not x:
                return None
            off += len(x)


def test_convert_raw(image, cli, scratch, workdir):
    ours = scratch / "ours.raw"
    cp = cli("convert", "-O", "raw", image.path, ours, cwd=workdir)
    assert cp.returncode == 0, f"qcow2rs convert failed (exit {cp.returncode}): {cp.stderr.strip()}"
    assert ours.stat().st_size == image.size

    if "huge" in image.tags:
        # 1 TiB: no byte-for-byte read; qemu-img compares by block status, and the output must be sparse.
        allocated = ours.stat().st_blocks * 512
        assert allocated < 64 << 20, f"raw output of a sparse 1 TiB image uses {allocated} bytes on disk"
    else:
        ref = scratch / "ref.raw"
        qemu_img("convert", "-O", "raw", image.path, ref, cwd=workdir)
        off = first_mismatch(ours, ref)
        assert off is None, f"raw output differs from qemu-img's at byte offset {off} ({off:#x})"

    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", image.path, ours, cwd=workdir)
    assert cmp.returncode == 0, f"qemu-img compare IMG ours.raw: exit {cmp.returncode}: {cmp.stdout}{cmp.stderr}"
    os.unlink(ours)
