"""`qcow2rs map --output=json` must equal `qemu-img map --output=json` exactly (parsed)."""

from __future__ import annotations

from interop import parse_json, qemu_img


def first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"entry {i}: qcow2rs {x} != qemu-img {y}"
    return f"qcow2rs has {len(a)} entries, qemu-img {len(b)}"


def test_map_json(image, cli, workdir):
    ref = parse_json(qemu_img("map", "--output=json", image.path, cwd=workdir), "qemu-img map")
    ours = parse_json(cli("map", "--output=json", image.path, cwd=workdir), "qcow2rs map")
    assert isinstance(ref, list) and ref
    assert ours == ref, first_difference(ours, ref) if isinstance(ours, list) else "not a JSON array"
