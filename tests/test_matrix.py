"""Guards the harness itself: each matrix image has the properties its name promises (per qemu-img)."""

from __future__ import annotations

import json

import pytest

from imagematrix import IMAGE_NAMES, MiB, TiB
from interop import parse_json, qemu_img

# dotted path in `qemu-img info --output=json` -> expected value
EXPECT = {
    "v2": {"format-specific.data.compat": "0.10", "format-specific.data.refcount-bits": 16},
    "v3": {"format-specific.data.compat": "1.1"},
    "cluster-512": {"cluster-size": 512},
    "cluster-4k": {"cluster-size": 4096},
    "cluster-64k": {"cluster-size": 65536},
    "cluster-2m": {"cluster-size": 2 * MiB},
    "refcount-1": {"format-specific.data.refcount-bits": 1},
    "refcount-8": {"format-specific.data.refcount-bits": 8},
    "refcount-16": {"format-specific.data.refcount-bits": 16},
    "refcount-64": {"format-specific.data.refcount-bits": 64},
    "refcount-1-c512": {"format-specific.data.refcount-bits": 1, "cluster-size": 512},
    "extended-l2": {"format-specific.data.extended-l2": True},
    "extended-l2-backing": {"format-specific.data.extended-l2": True, "backing-filename": "extl2-base.qcow2"},
    "lazy-refcounts": {"format-specific.data.lazy-refcounts": True, "dirty-flag": False},
    "dirty": {"format-specific.data.lazy-refcounts": True, "dirty-flag": True},
    "compressed-zlib": {"format-specific.data.compression-type": "zlib"},
    "compressed-zstd": {"format-specific.data.compression-type": "zstd"},
    "compressed-overwritten": {"format-specific.data.compression-type": "zlib"},
    "chain-mid": {"virtual-size": 48 * MiB, "backing-filename-format": "raw"},
    "chain-top": {"virtual-size": 64 * MiB, "backing-filename": "chain-mid.qcow2"},
    "datafile-raw": {"format-specific.data.data-file-raw": True},
    "datafile": {"format-specific.data.data-file-raw": False},
    "odd-size": {"virtual-size": 1000448},
    "huge-1t": {"virtual-size": 1 * TiB},
}
# images whose map must contain an extent with this property
MAP_EXPECT = {
    "compressed-zlib": {"compressed": True},
    "compressed-zstd": {"compressed": True},
    "compressed-overwritten": {"compressed": True},
    "discard-zero": {"zero": True, "present": True},
    "chain-top": {"depth": 2},
    "extended-l2-backing": {"depth": 1},
}


def lookup(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_matrix_image(name, matrix):
    img = matrix[name]
    info = parse_json(qemu_img("info", "--output=json", img.path), "qemu-img info")
    assert info["virtual-size"] == img.size
    for key, want in EXPECT.get(name, {}).items():
        assert lookup(info, key) == want, key
    if "snapshot" in img.tags:
        assert len(info["snapshots"]) >= 1
    if name == "bitmap":
        assert {b["name"] for b in info["format-specific"]["data"]["bitmaps"]} == {"bm0", "bm-disabled"}
    extents = json.loads(qemu_img("map", "--output=json", img.path).stdout)
    for key, want in MAP_EXPECT.get(name, {}).items():
        assert any(e.get(key) == want for e in extents), f"no extent with {key}={want}"
    if name != "empty":
        assert any(e["data"] for e in extents), "image has no data"
