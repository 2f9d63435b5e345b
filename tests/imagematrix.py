"""The image matrix: qcow2 images made with qemu-img/qemu-io, used by every interop test.

Each entry of IMAGES is a spec (name, description, tags, builder). `Matrix(dir)[name]` builds an image on
first use (and whatever it depends on), then caches it, so a pytest session builds each image once and
`pytest -k chain` only builds what it needs. Data is written with `qemu-io -c 'write -P 0xNN ...'`
patterns (and seeded pseudo-random data for the compressed images) so every read is non-trivial.

Run `python tests/imagematrix.py DIR` to build the whole matrix into DIR and print timings.

Files are created with cwd = the matrix directory and *relative* backing file names, so the CLI
(run from elsewhere) must resolve backing names against the image's directory. External data files use
absolute names because qemu resolves a relative data-file name against the process's cwd.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

try:  # imported as a module by pytest, or run as a script
    from qemu_tools import qemu_img, qemu_io
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from qemu_tools import qemu_img, qemu_io

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

SIZE = 64 * MiB  # default virtual size: small, but large enough for several L2 tables at 512 B clusters


@dataclass
class Image:
    name: str
    path: Path  # the image to hand to the CLI
    size: int  # virtual size in bytes
    tags: frozenset = frozenset()
    files: list = field(default_factory=list)  # every file belonging to it (backing, data file)

    def __str__(self):
        return str(self.path)


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    build: Callable  # build(ctx: BuildCtx) -> Image
    tags: frozenset = frozenset()


# --------------------------------------------------------------------------------------------------
# Write patterns


def std_writes(size: int) -> list[str]:
    """Writes used by most images: aligned, unaligned, cross-cluster, at the end, zero writes."""
    cmds = [
        "write -q -P 0x11 0 65536",  # first cluster (64K)
        "write -q -P 0x22 1048576 307200",  # 1 MiB, 300 KiB: partial last cluster
        "write -q -P 0x33 5000 3000",  # unaligned, inside cluster 0 (read-modify-write)
        "write -q -P 0x66 3145728 262144",  # 3 MiB, 256 KiB ...
        "write -q -z 3211264 65536",  # ... with a zeroed cluster in the middle
        "write -q -P 0x77 8389842 70000",  # unaligned, crosses a 64K boundary
        f"write -q -P 0x44 {size - 131072} 131072",  # last 128 KiB
    ]
    if size >= 32 * MiB:
        cmds.append(f"write -q -P 0x55 {size // 2 + 512} {MiB}")  # crosses L2 boundary at small clusters
    return cmds


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------------------------------
# Build context


class BuildCtx:
    def __init__(self, matrix: "Matrix", spec: Spec):
        self.matrix = matrix
        self.spec = spec
        self.dir = matrix.dir

    def p(self, filename: str) -> Path:
        return self.dir / filename

    def create(self, filename, size, fmt="qcow2", opts=None, backing=None, backing_fmt=None, extra=()):
        args = ["create", "-q", "-f", fmt]
        if backing is not None:
            args += ["-b", backing, "-F", backing_fmt or "qcow2"]
        if opts:
            args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
        args += [*extra, filename, str(size)]
        qemu_img(*args, cwd=self.dir)
        return self.p(filename)

    def io(self, path, *cmds, fmt="qcow2", check=True):
        return qemu_io(path, *cmds, fmt=fmt, cwd=self.dir, check=check)

    def img(self, cmd, *args):
        return qemu_img(cmd, *args, cwd=self.dir)

    def info(self, path):
        return json.loads(qemu_img("info", "--output=json", path, cwd=self.dir).stdout)

    def image(self, path, size, files=()):
        files = [Path(path), *files]
        for f in files:
            settle_page_cache(f)
        return Image(self.spec.name, Path(path), size, self.spec.tags, files)


def settle_page_cache(path: Path) -> None:
    """Read a built file once, so every tool sees it in the same state.

    qemu-io leaves the unwritten parts of new clusters as unwritten extents (fallocate). On
    ext4, SEEK_HOLE reports such a range as a hole until its pages are in the page cache, and as
    data afterwards; reading metadata pulls neighbouring pages in (readahead). `qemu-img map`
    and NBD block status report those holes as zeros when QEMU's metadata-preallocation
    heuristic applies, so without this the answer would depend on which tool read the file
    first. Real holes (punched, never written) stay holes.
    """
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


# --------------------------------------------------------------------------------------------------
# Builders


def simple(opts=None, size=SIZE, extra_cmds=(), create_extra=()):
    """A qcow2 image with `opts`, the standard writes and optional extra qemu-io commands."""

    def build(ctx: BuildCtx) -> Image:
        path = ctx.create(f"{ctx.spec.name}.qcow2", size, opts=opts, extra=create_extra)
        ctx.io(path, *std_writes(size), *extra_cmds)
        return ctx.image(path, size)

    return build


def build_empty(ctx):
    path = ctx.create("empty.qcow2", SIZE)
    return ctx.image(path, SIZE)


def build_v2(ctx):
    path = ctx.create("v2.qcow2", SIZE, opts={"compat": "0.10"})
    ctx.io(path, *std_writes(SIZE))
    ctx.img("snapshot", "-c", "v2-snap", path)
    ctx.io(path, "write -q -P 0x99 0 4096", "write -q -z 1048576 65536")
    return ctx.image(path, SIZE)


def build_extended_l2(ctx):
    # 64K clusters -> 2K subclusters
    path = ctx.create("extended-l2.qcow2", SIZE, opts={"extended_l2": "on"})
    ctx.io(
        path,
        *std_writes(SIZE),
        "write -q -P 0x88 10491004 5000",  # 10 MiB + 3*2K + 100: partial subclusters
        "write -q -P 0x89 10551296 4096",  # two whole subclusters in a fresh cluster
        "write -q -z 3147776 2048",  # zero one subcluster inside allocated data
        "write -q -z -u 3153920 4096",  # zero+unmap two subclusters
        "discard -q 1114112 65536",  # whole cluster discard
    )
    return ctx.image(path, SIZE)


def build_extended_l2_backing(ctx):
    base = ctx.create("extl2-base.qcow2", SIZE)
    ctx.io(base, "write -q -P 0xa1 0 4194304", "write -q -P 0xa2 10485760 2097152")
    path = ctx.create(
        "extended-l2-backing.qcow2", SIZE, opts={"extended_l2": "on"}, backing="extl2-base.qcow2"
    )
    ctx.io(
        path,
        "write -q -P 0xb1 2560 1024",  # inside subcluster 1 of cluster 0: COW of that subcluster only
        "write -q -P 0xb2 206848 6144",  # cluster 3, subclusters 5..7, aligned
        "write -q -P 0xb3 10486760 3000",  # unaligned over subcluster boundary, backing data around
        "write -q -z 1052672 4096",  # zero subclusters over backing data
        "write -q -P 0xb4 20971520 1000",  # beyond backing data: backing reads as zeros
        "discard -q 11534336 65536",  # discard a full cluster that has backing data
        "write -q -P 0xb5 30000000 100000",  # spans several clusters, partial at both ends
    )
    return ctx.image(path, SIZE, files=[base])


def build_dirty(ctx):
    path = ctx.create("dirty.qcow2", SIZE, opts={"lazy_refcounts": "on"})
    ctx.io(path, *std_writes(SIZE))  # clean part first
    # A crash in the middle of a lazy-refcounts session leaves the dirty bit set, refcounts stale.
    cp = ctx.io(path, "write -q -P 0xd1 20971520 196608", "write -q -P 0xd2 0 4096", "abort", check=False)
    if cp.returncode == 0:
        raise RuntimeError("qemu-io abort did not abort")
    if ctx.info(path).get("dirty-flag") is not True:
        raise RuntimeError("dirty image is not marked dirty")
    return ctx.image(path, SIZE)


def _compressible_source(ctx, name, seed):
    """A raw file mixing pattern data (compresses), random data (does not) and holes."""
    src = ctx.p(name)
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for off, n, fill in [
            (0, 256 * KiB, b"\x11"),
            (1 * MiB, 64 * KiB, None),  # incompressible: stored uncompressed by qemu
            (1 * MiB + 64 * KiB, 200 * KiB, b"\x22"),
            (5 * MiB + 4096, 5000, b"\x33"),
            (16 * MiB, 1 * MiB, b"\x00"),  # written zeros: qemu-img convert skips them
            (SIZE - 192 * KiB, 192 * KiB, None),
        ]:
            f.seek(off)
            f.write(fill * n if fill else random_bytes(seed + off, n))
        # half text-like data so the compressed size varies between clusters
        f.seek(30 * MiB)
        f.write(b"".join(b"qcow2rs line %08d\n" % i for i in range(20000)))
    return src


def compressed(ctype, extra_cmds=()):
    def build(ctx):
        name = ctx.spec.name
        src = _compressible_source(ctx, f"{name}-src.raw", seed=7)
        path = ctx.p(f"{name}.qcow2")
        ctx.img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={ctype}", src, path)
        src.unlink()
        if extra_cmds:
            ctx.io(path, *extra_cmds)
        return ctx.image(path, SIZE)

    return build


def build_chain(ctx):
    """raw base (32M) <- qcow2 mid (48M) <- qcow2 top (64M): each layer larger than its backing."""
    base = ctx.create("chain-base.raw", 32 * MiB, fmt="raw")
    ctx.io(base, "write -q -P 0xc1 0 2097152", "write -q -P 0xc2 31457280 1048576", fmt="raw")
    mid = ctx.create("chain-mid.qcow2", 48 * MiB, backing="chain-base.raw", backing_fmt="raw")
    ctx.io(
        mid,
        "write -q -P 0xc3 524288 1048576",  # over base data
        "write -q -P 0xc4 33488896 131072",  # straddles base EOF (32 MiB)
        "write -q -z 1835008 65536",  # zero over base data
    )
    top = ctx.create("chain-top.qcow2", 64 * MiB, backing="chain-mid.qcow2", backing_fmt="qcow2")
    ctx.io(
        top,
        "write -q -P 0xc5 1000 2000",  # partial cluster: COW from base
        "write -q -P 0xc6 589824 4096",  # partial cluster: COW from mid
        "discard -q 196608 65536",  # discard over backing data: must read as zeros
        "write -q -z 1572864 65536",
        "write -q -P 0xc7 52428800 65536",  # beyond mid's size
        "write -q -P 0xc8 50266112 131072",  # straddles mid EOF (48 MiB)
    )
    return base, mid, top


def build_chain_mid(ctx):
    base, mid, top = ctx.matrix.shared("chain", build_chain, ctx)
    return ctx.image(mid, 48 * MiB, files=[base])


def build_chain_top(ctx):
    base, mid, top = ctx.matrix.shared("chain", build_chain, ctx)
    return ctx.image(top, 64 * MiB, files=[base, mid])


def datafile(raw: bool):
    def build(ctx):
        name = ctx.spec.name
        data = ctx.p(f"{name}.data")  # absolute: qemu resolves relative data-file names against cwd
        path = ctx.create(
            f"{name}.qcow2", SIZE, opts={"data_file": str(data), "data_file_raw": "on" if raw else "off"}
        )
        ctx.io(path, *std_writes(SIZE), "discard -q 1048576 65536", "write -q -z -u 3276800 65536")
        return ctx.image(path, SIZE, files=[data])

    return build


def build_snapshot(ctx):
    path = ctx.create("snapshot.qcow2", SIZE)
    ctx.io(path, *std_writes(SIZE))
    ctx.img("snapshot", "-c", "snap1", path)
    ctx.io(
        path,
        "write -q -P 0xe1 0 4096",  # COW of a shared cluster
        "write -q -P 0xe2 40000000 65536",  # fresh allocation
        "discard -q 1048576 65536",
    )
    ctx.img("snapshot", "-c", "second snap", path)  # a tag with a space
    ctx.io(path, "write -q -P 0xe3 65536 65536", "write -q -z 0 65536")
    return ctx.image(path, SIZE)


def build_bitmap(ctx):
    path = ctx.create("bitmap.qcow2", SIZE)
    ctx.io(path, *std_writes(SIZE))
    ctx.img("bitmap", "--add", path, "bm0")
    ctx.img("bitmap", "--add", "-g", "1M", path, "bm-disabled")
    ctx.img("bitmap", "--disable", path, "bm-disabled")
    ctx.io(path, "write -q -P 0xf1 2097152 131072")  # recorded in bm0
    return ctx.image(path, SIZE)


def build_discard_zero(ctx):
    path = ctx.create("discard-zero.qcow2", SIZE)
    ctx.io(
        path,
        *std_writes(SIZE),
        "write -q -P 0x5a 12582912 1048576",
        "discard -q 12582912 131072",  # whole clusters
        "discard -q 12779520 1000",  # partial cluster: qemu keeps the data
        "write -q -z 12845056 65536",  # zero flag, cluster stays allocated
        "write -q -z -u 12910592 131072",  # zero + unmap
        "write -q -z 13000000 5000",  # unaligned zero write
        "write -q -z 40000000 65536",  # zero write on unallocated area
    )
    return ctx.image(path, SIZE)


def build_odd_size(ctx):
    # qemu-img rounds 1000000 up to a multiple of 512: 1000448 (not a multiple of 64K).
    path = ctx.create("odd-size.qcow2", 1000000)
    size = ctx.info(path)["virtual-size"]
    ctx.io(path, "write -q -P 0x12 0 1000", f"write -q -P 0x13 {size - 70000} 70000")
    return ctx.image(path, size)


def build_huge(ctx):
    size = 1 * TiB
    path = ctx.create("huge-1t.qcow2", size)
    ctx.io(
        path,
        "write -q -P 0x11 0 65536",
        f"write -q -P 0x22 {4 * GiB + 12345} 100000",
        f"write -q -P 0x33 {512 * GiB} 65536",
        f"write -q -P 0x44 {size - 65536} 65536",
    )
    return ctx.image(path, size)


def build_prealloc(mode):
    def build(ctx):
        path = ctx.create(f"prealloc-{mode}.qcow2", SIZE, opts={"preallocation": mode})
        ctx.io(path, *std_writes(SIZE), "discard -q 20971520 131072")
        return ctx.image(path, SIZE)

    return build


def _spec(name, description, build, *tags):
    return Spec(name, description, build, frozenset(tags))


IMAGES: list[Spec] = [
    _spec("empty", "fresh v3 image, nothing written", build_empty),
    _spec("v2", "compat=0.10, standard writes, a snapshot, more writes", build_v2, "snapshot"),
    _spec("v3", "compat=1.1 defaults, standard writes", simple()),
    _spec("cluster-512", "512 B clusters", simple({"cluster_size": 512})),
    _spec("cluster-4k", "4 KiB clusters", simple({"cluster_size": 4096})),
    _spec("cluster-64k", "64 KiB clusters (explicit)", simple({"cluster_size": 65536})),
    _spec("cluster-2m", "2 MiB clusters", simple({"cluster_size": 2 * MiB})),
    _spec("refcount-1", "refcount_bits=1", simple({"refcount_bits": 1})),
    _spec("refcount-8", "refcount_bits=8", simple({"refcount_bits": 8})),
    _spec("refcount-16", "refcount_bits=16 (explicit)", simple({"refcount_bits": 16})),
    _spec("refcount-64", "refcount_bits=64", simple({"refcount_bits": 64})),
    _spec("refcount-1-c512", "refcount_bits=1 with 512 B clusters", simple({"refcount_bits": 1, "cluster_size": 512})),
    _spec("extended-l2", "extended_l2=on, partial subcluster writes", build_extended_l2),
    _spec("extended-l2-backing", "extended_l2=on over a qcow2 backing file", build_extended_l2_backing, "backing"),
    _spec("lazy-refcounts", "lazy_refcounts=on, closed cleanly", simple({"lazy_refcounts": "on"})),
    _spec("dirty", "lazy_refcounts=on, qemu-io aborted mid-session (dirty bit set)", build_dirty, "dirty"),
    _spec("compressed-zlib", "qemu-img convert -c, compression_type=zlib", compressed("zlib")),
    _spec(
        "compressed-zstd",
        "qemu-img convert -c, compression_type=zstd, plus qemu-io write -c",
        compressed("zstd", ["write -q -c -P 0x5c 41943040 131072"]),
    ),
    _spec(
        "compressed-overwritten",
        "zlib-compressed image partly overwritten, zeroed and discarded",
        compressed(
            "zlib",
            [
                "write -q -P 0xd1 4096 512",  # inside a compressed cluster
                "write -q -P 0xd2 200000 100000",  # across compressed clusters
                "write -q -z 1114112 65536",
                "discard -q 1179648 65536",
                "write -q -c -P 0xd3 41943040 65536",  # qemu-io write -c (only into unallocated clusters)
            ],
        ),
    ),
    _spec("chain-mid", "qcow2 48M over raw base 32M", build_chain_mid, "backing", "chain"),
    _spec("chain-top", "qcow2 64M <- qcow2 48M <- raw 32M", build_chain_top, "backing", "chain"),
    _spec("datafile-raw", "external data file, data_file_raw=on", datafile(True), "datafile"),
    _spec("datafile", "external data file, data_file_raw=off", datafile(False), "datafile"),
    _spec("prealloc-metadata", "preallocation=metadata", build_prealloc("metadata")),
    _spec("prealloc-falloc", "preallocation=falloc", build_prealloc("falloc")),
    _spec("prealloc-full", "preallocation=full", build_prealloc("full")),
    _spec("snapshot", "two internal snapshots with writes after each", build_snapshot, "snapshot"),
    _spec("bitmap", "two persistent bitmaps (one disabled), writes after", build_bitmap),
    _spec("discard-zero", "discards (full/partial), write -z, write -z -u", build_discard_zero),
    _spec("odd-size", "virtual size 1000000 (rounded to 1000448), not a cluster multiple", build_odd_size),
    _spec("huge-1t", "1 TiB sparse image with writes far apart", build_huge, "huge"),
]

IMAGE_NAMES = [s.name for s in IMAGES]
SPECS = {s.name: s for s in IMAGES}
assert len(SPECS) == len(IMAGES), "duplicate image names"


class Matrix:
    """Builds images on demand into `dir` and caches them (and build failures) for the session."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._built: dict[str, Image | BaseException] = {}
        self._shared: dict[str, object] = {}
        self.timings: dict[str, float] = {}

    def __getitem__(self, name: str) -> Image:
        if name not in self._built:
            spec = SPECS[name]
            t0 = time.monotonic()
            try:
                self._built[name] = spec.build(BuildCtx(self, spec))
            except BaseException as e:  # noqa: BLE001 - cached and re-raised for every user
                self._built[name] = e
            self.timings[name] = time.monotonic() - t0
        result = self._built[name]
        if isinstance(result, BaseException):
            raise RuntimeError(f"building matrix image {name!r} failed: {result}") from result
        return result

    def shared(self, key, fn, ctx):
        """Build something several specs use (e.g. the backing chain) once."""
        if key not in self._shared:
            self._shared[key] = fn(ctx)
        return self._shared[key]

    def build_all(self) -> list[Image]:
        return [self[n] for n in IMAGE_NAMES]


def main(argv):
    if len(argv) != 2:
        print(f"usage: {argv[0]} DIR", file=sys.stderr)
        return 2
    m = Matrix(Path(argv[1]).resolve())
    t0 = time.monotonic()
    failed = 0
    for name in IMAGE_NAMES:
        try:
            img = m[name]
            print(f"{name:24} {m.timings[name]:6.2f}s  {img.path}")
        except RuntimeError as e:
            failed += 1
            print(f"{name:24} FAILED: {e.__cause__}")
    print(f"total {time.monotonic() - t0:.2f}s, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
