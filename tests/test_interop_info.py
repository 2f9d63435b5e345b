"""`qcow2rs info --output=json` against `qemu-img info --output=json`, key by key."""

from __future__ import annotations

from interop import parse_json, qemu_img

# Compared keys. A key qemu-img omits must be omitted by qcow2rs too; values must be equal.
TOP_KEYS = [
    "filename",
    "virtual-size",
    "cluster-size",
    "format",
    "backing-filename",
    "backing-filename-format",
    "full-backing-filename",
    "dirty-flag",
    "actual-size",
]
SNAPSHOT_KEYS = ["id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec", "icount"]
QCOW2_DATA_KEYS = [
    "compat",
    "compression-type",
    "lazy-refcounts",
    "refcount-bits",
    "corrupt",
    "extended-l2",
    "data-file",
    "data-file-raw",
]


def _pick(d, keys):
    return {k: d[k] for k in keys if k in d}


def project_info(d: dict) -> dict:
    """The compared subset of one `info` JSON object."""
    out = _pick(d, TOP_KEYS)
    if "snapshots" in d:
        snaps = d["snapshots"]
        out["snapshots"] = [_pick(s, SNAPSHOT_KEYS) for s in snaps] if isinstance(snaps, list) else snaps
    if "format-specific" in d:
        fs = d["format-specific"]
        out["format-specific.type"] = fs.get("type")
        if fs.get("type") == "qcow2":
            out["format-specific.data"] = _pick(fs.get("data", {}), QCOW2_DATA_KEYS)
    return out


def assert_info_equal(ours, ref: dict, what: str):
    assert isinstance(ours, dict), f"{what}: expected a JSON object, got {type(ours).__name__}"
    assert project_info(ours) == project_info(ref), f"{what}: info differs from qemu-img"


def test_info_json(image, cli, workdir):
    ref = parse_json(qemu_img("info", "--output=json", image.path, cwd=workdir), "qemu-img info")
    ours = parse_json(cli("info", "--output=json", image.path, cwd=workdir), "qcow2rs info")
    assert_info_equal(ours, ref, image.name)


def test_info_backing_chain(image, cli, workdir):
    ref = parse_json(qemu_img("info", "--backing-chain", "--output=json", image.path, cwd=workdir), "qemu-img")
    ours = parse_json(cli("info", "--backing-chain", "--output=json", image.path, cwd=workdir), "qcow2rs")
    assert isinstance(ref, list) and len(ref) >= 1
    assert isinstance(ours, list), f"--backing-chain must print a JSON array, got {type(ours).__name__}"
    assert len(ours) == len(ref), f"{len(ours)} layers, qemu-img has {len(ref)}"
    for depth, (o, r) in enumerate(zip(ours, ref)):
        assert_info_equal(o, r, f"{image.name} layer {depth} ({r.get('filename')})")
