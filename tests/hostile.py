"""Hostile images made by byte surgery on small qemu-img images (used by test_bad_input.py).

Each builder takes a directory and returns the path of the image to open (plus it may create other
files). Header offsets follow docs/interop/qcow2.txt; all integers are big-endian.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

from qemu_tools import qemu_img, qemu_io

# header field -> (offset, struct format)
HDR = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
}
EXT_FEATURE_TABLE = 0x6803F857


def get(path, field):
    off, fmt = HDR[field]
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def put(path, field, value):
    off, fmt = HDR[field]
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


def read_u64(path, off):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def write_u64(path, off, value):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">Q", value))


def small_image(d: Path, name: str, opts=None, backing=None) -> Path:
    """A 16 MiB qcow2 with data in its first cluster and at 1 MiB (so L1[0] and L2 entries exist)."""
    args = ["create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    if opts:
        args += ["-o", opts]
    qemu_img(*args, name, "16M", cwd=d)
    qemu_io(d / name, "write -q -P 0x11 0 65536", "write -q -P 0x22 1048576 65536", cwd=d)
    return d / name


def first_l2_entry_offset(path) -> int:
    """File offset of the L2 entry for guest offset 0."""
    l1 = get(path, "l1_table_offset")
    l2 = read_u64(path, l1) & 0x00FFFFFFFFFFFE00
    assert l2, "L1[0] unallocated"
    return l2


# --------------------------------------------------------------------------------------------------
# Builders: (dir) -> path


def truncated_header(d):
    p = small_image(d, "truncated-header.qcow2")
    os.truncate(p, 50)
    return p


def truncated_l1(d):
    p = small_image(d, "truncated-l1.qcow2")
    os.truncate(p, get(p, "l1_table_offset") + 4)
    return p


def garbage(d):
    p = d / "garbage.qcow2"
    p.write_bytes(random.Random(1234).randbytes(256 * 1024))
    return p


def bad_magic(d):
    p = small_image(d, "bad-magic.qcow2")
    put(p, "magic", get(p, "magic") ^ 0x00000100)  # one bit flipped
    return p


def bad_version(d):
    p = small_image(d, "bad-version.qcow2")
    put(p, "version", 3 ^ 0x4)  # 7
    return p


def cluster_bits(value):
    def build(d):
        p = small_image(d, f"cluster-bits-{value}.qcow2")
        put(p, "cluster_bits", value)
        return p

    return build


def l1_size_huge(d):
    p = small_image(d, "l1-size-huge.qcow2")
    put(p, "l1_size", 0x7FFFFFFF)
    return p


def l1_offset_unaligned(d):
    p = small_image(d, "l1-offset-unaligned.qcow2")
    put(p, "l1_table_offset", get(p, "l1_table_offset") + 8)
    return p


def refcount_table_unaligned(d):
    p = small_image(d, "refcount-table-unaligned.qcow2")
    put(p, "refcount_table_offset", get(p, "refcount_table_offset") + 8)
    return p


def refcount_table_clusters_huge(d):
    p = small_image(d, "refcount-table-huge.qcow2")
    put(p, "refcount_table_clusters", 0x7FFFFFFF)
    return p


def l2_past_eof(d):
    p = small_image(d, "l2-past-eof.qcow2")
    off = first_l2_entry_offset(p)
    write_u64(p, off, (1 << 63) | (1 << 40))  # 1 TiB: far past EOF, cluster aligned
    return p


def l2_unaligned(d):
    p = small_image(d, "l2-unaligned.qcow2")
    off = first_l2_entry_offset(p)
    write_u64(p, off, read_u64(p, off) + 0x200)  # host offset no longer cluster aligned
    return p


def backing_loop(d):
    a = small_image(d, "loop-a.qcow2")
    small_image(d, "loop-b.qcow2", backing="loop-a.qcow2")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "loop-b.qcow2", "-F", "qcow2", "loop-a.qcow2", cwd=d)
    return a


def backing_self_loop(d):
    p = small_image(d, "self-loop.qcow2")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "self-loop.qcow2", "-F", "qcow2", "self-loop.qcow2", cwd=d)
    return p


def backing_missing(d):
    small_image(d, "gone-base.qcow2")
    p = small_image(d, "missing-backing.qcow2", backing="gone-base.qcow2")
    (d / "gone-base.qcow2").unlink()
    return p


def unknown_incompat_bit(d):
    p = small_image(d, "unknown-feature.qcow2")
    put(p, "incompatible_features", get(p, "incompatible_features") | (1 << 60))
    return p


def read_extensions(p):
    """[(type, data)] of the header extensions, and the offset where they start."""
    start = get(p, "header_length")
    exts, off = [], start
    with open(p, "rb") as f:
        while True:
            f.seek(off)
            typ, length = struct.unpack(">II", f.read(8))
            if typ == 0:
                break
            exts.append((typ, f.read(length)))
            off += 8 + (length + 7) // 8 * 8
    return exts, start


def write_extensions(p, exts, start):
    blob = b""
    for typ, data in exts:
        blob += struct.pack(">II", typ, len(data)) + data + b"\0" * ((-len(data)) % 8)
    blob += b"\0" * 8
    assert start + len(blob) <= 1 << get(p, "cluster_bits"), "extensions must fit in cluster 0"
    assert start + len(blob) <= 512 or get(p, "backing_file_offset") == 0
    with open(p, "r+b") as f:
        f.seek(start)
        f.write(blob)


def named_unknown_feature(d):
    """Unknown incompatible bit 60, named "frobnicate" in the feature name table."""
    p = small_image(d, "named-feature.qcow2")
    exts, start = read_extensions(p)
    entry = struct.pack(">BB46s", 0, 60, b"frobnicate")
    exts = [(t, data + entry if t == EXT_FEATURE_TABLE else data) for t, data in exts]
    if not any(t == EXT_FEATURE_TABLE for t, _ in exts):
        exts.append((EXT_FEATURE_TABLE, entry))
    write_extensions(p, exts, start)
    put(p, "incompatible_features", get(p, "incompatible_features") | (1 << 60))
    return p


def encrypted(d):
    qemu_img(
        "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=abc",
        "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", "encrypted.qcow2", "16M", cwd=d,
    )  # fmt: skip
    return d / "encrypted.qcow2"


def backing_offset_outside(d):
    """backing_file_offset beyond cluster 0 (the name must lie inside the first cluster)."""
    p = small_image(d, "backing-outside.qcow2")
    cluster = 1 << get(p, "cluster_bits")
    with open(p, "r+b") as f:  # put a plausible name there so only the position is wrong
        f.seek(cluster + 100)
        f.write(b"base.qcow2")
    put(p, "backing_file_offset", cluster + 100)
    put(p, "backing_file_size", 10)
    return p


def header_length_odd(d):
    p = small_image(d, "header-length-odd.qcow2")
    put(p, "header_length", get(p, "header_length") + 4)  # 108: not a multiple of 8
    return p


BUILDERS = {
    "truncated-header": truncated_header,
    "truncated-l1": truncated_l1,
    "garbage": garbage,
    "bad-magic": bad_magic,
    "bad-version": bad_version,
    "cluster-bits-30": cluster_bits(30),
    "cluster-bits-8": cluster_bits(8),
    "l1-size-huge": l1_size_huge,
    "l1-offset-unaligned": l1_offset_unaligned,
    "refcount-table-unaligned": refcount_table_unaligned,
    "refcount-table-clusters-huge": refcount_table_clusters_huge,
    "l2-entry-past-eof": l2_past_eof,
    "l2-entry-unaligned": l2_unaligned,
    "backing-loop": backing_loop,
    "backing-self-loop": backing_self_loop,
    "backing-missing": backing_missing,
    "unknown-incompatible-bit": unknown_incompat_bit,
    "named-unknown-feature": named_unknown_feature,
    "encrypted": encrypted,
    "backing-offset-outside-cluster0": backing_offset_outside,
    "header-length-not-multiple-of-8": header_length_odd,
}
