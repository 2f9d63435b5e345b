"""`qcow2rs measure` must print what `qemu-img measure` prints: the same `required`, `fully-allocated`
and `bitmaps` figures (JSON compared parsed, human output compared as text), and the same first error
line and exit code for refused options."""

from __future__ import annotations

import pytest

from interop import parse_json, qemu_img

# Target options tried on every image of the interop matrix.
MATRIX_TARGETS = [
    ["-O", "qcow2"],
    ["-O", "raw"],
    ["-O", "qcow2", "-o", "cluster_size=512,refcount_bits=1"],
    ["-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on,refcount_bits=64"],
]

# Target options tried on a few images and with --size.
TARGETS = [
    [],
    ["-O", "qcow2"],
    ["-O", "qcow2", "-o", "cluster_size=512"],
    ["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=2"],
    ["-O", "qcow2", "-o", "cluster_size=16k,extended_l2=on"],
    ["-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=4"],
    ["-O", "qcow2", "-o", "refcount_bits=8,lazy_refcounts=on"],
    ["-O", "qcow2", "-o", "refcount_bits=32"],
    ["-O", "qcow2", "-o", "compat=0.10"],
    ["-O", "qcow2", "-o", "preallocation=metadata"],
    ["-O", "qcow2", "-o", "preallocation=falloc"],
    ["-O", "qcow2", "-o", "preallocation=full,cluster_size=1M"],
    ["-O", "qcow2", "-o", "backing_file=whatever.qcow2,backing_fmt=qcow2"],
    ["-O", "qcow2", "-o", "data_file=d.raw,data_file_raw=on"],
    ["-O", "qcow2", "-o", "compression_type=zstd"],
]

SIZES = ["0", "1", "512", "65536", "1000000", "1G", "1073741825", "3T", "1P", "2P"]


def both(cli, cwd, *args):
    ref = qemu_img("measure", *args, cwd=cwd)
    ours = cli("measure", *args, cwd=cwd)
    return ref, ours


def assert_same(ref, ours):
    assert ours.returncode == ref.returncode, (ours.returncode, ref.returncode, ours.stderr, ref.stderr)
    if ref.returncode == 0:
        assert ours.stdout == ref.stdout, (ours.stdout, ref.stdout)
    else:
        first = ref.stderr.strip().splitlines()[0].removeprefix("qemu-img: ")
        assert ours.stderr.strip() == f"qcow2rs: {first}", (ours.stderr, ref.stderr)


def assert_same_json(cli, cwd, *args):
    ref = parse_json(qemu_img("measure", "--output=json", *args, cwd=cwd), "qemu-img measure")
    ours = parse_json(cli("measure", "--output=json", *args, cwd=cwd), "qcow2rs measure")
    assert ours == ref
    assert list(ours) == list(ref), "key order"


@pytest.mark.parametrize("target", MATRIX_TARGETS, ids=lambda t: " ".join(t))
def test_measure_matrix_image(image, target, cli, workdir):
    """Every image of the interop matrix, as qemu-img measures it (JSON).

    `required` counts the clusters that qemu's block status reports as data, so it can only be
    right where our map is: where `map` differs from qemu-img's (see test_interop_map), a
    difference in `required` is expected (xfail), but only then."""
    try:
        assert_same_json(cli, workdir, *target, image.path)
    except AssertionError:
        ref = parse_json(qemu_img("map", "--output=json", image.path, cwd=workdir), "qemu-img map")
        ours = parse_json(cli("map", "--output=json", image.path, cwd=workdir), "qcow2rs map")
        if ours != ref:
            pytest.xfail("map differs from qemu-img's on this image (test_interop_map fails too)")
        raise


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: " ".join(t) or "default")
@pytest.mark.parametrize("size", SIZES)
def test_measure_size(size, target, cli, workdir, qemu):
    """--size, human output (and refusals: a size too large for the cluster size)."""
    assert_same(*both(cli, workdir, *target, "--size", size))


@pytest.fixture(scope="module")
def sources(qemu, tmp_path_factory):
    """Images made with qemu-img/qemu-io: empty, partly written, fully written (64K clusters and
    512 B clusters), compressed, an overlay with a backing file, raw files (sparse and odd-sized)."""
    d = tmp_path_factory.mktemp("measure")

    def img(*args):
        cp = qemu_img(*args, cwd=d)
        assert cp.returncode == 0, cp.stderr

    def io(path, *cmds, fmt="qcow2"):
        from qemu_tools import qemu_io

        qemu_io(d / path, *cmds, fmt=fmt, cwd=d)

    img("create", "-q", "-f", "qcow2", "empty.qcow2", "10M")
    img("create", "-q", "-f", "qcow2", "partial.qcow2", "10M")
    io(
        "partial.qcow2",
        "write -q -P 1 0 1M",
        "write -q -P 2 3000 100",
        "write -q -P 0 5M 64k",
        "write -q -z 6M 1M",
        "write -q -P 3 9437000 1000",
    )
    img("create", "-q", "-f", "qcow2", "full.qcow2", "5000000")
    io("full.qcow2", "write -q -P 7 0 5000000")
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "full512.qcow2", "1M")
    io("full512.qcow2", "write -q -P 8 0 1M")
    img("convert", "-c", "-O", "qcow2", "partial.qcow2", "compressed.qcow2")
    img("create", "-q", "-f", "qcow2", "-b", "partial.qcow2", "-F", "qcow2", "overlay.qcow2", "12M")
    io("overlay.qcow2", "write -q -P 9 8M 100k", "write -q -z 0 64k")
    img("convert", "-O", "raw", "partial.qcow2", "partial.raw")
    with open(d / "odd.raw", "wb") as f:
        f.write(b"\x5a" * 1000)
    return d


SOURCES = [
    "empty.qcow2",
    "partial.qcow2",
    "full.qcow2",
    "full512.qcow2",
    "compressed.qcow2",
    "overlay.qcow2",
    "partial.raw",
    "odd.raw",
]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: " ".join(t) or "default")
@pytest.mark.parametrize("source", SOURCES)
def test_measure_image(source, target, sources, cli):
    assert_same_json(cli, sources, *target, source)
    assert_same(*both(cli, sources, *target, source))


@pytest.mark.parametrize(
    "args",
    [
        ["-O", "qcow2", "-o", "cluster_size=1000", "--size", "1G"],
        ["-O", "qcow2", "-o", "cluster_size=4M", "--size", "1G"],
        ["-O", "qcow2", "-o", "compat=2", "--size", "1G"],
        ["-O", "qcow2", "-o", "compat=0.10,refcount_bits=8", "--size", "1G"],
        ["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"],
        ["-O", "qcow2", "-o", "refcount_bits=128", "--size", "1G"],
        ["-O", "qcow2", "-o", "refcount_bits=abc", "--size", "1G"],
        ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "--size", "1G"],
        ["-O", "qcow2", "-o", "extended_l2=maybe", "--size", "1G"],
        ["-O", "qcow2", "-o", "cluster_size=abc", "--size", "1G"],
        ["-O", "qcow2", "-o", "preallocation=bogus", "--size", "1G"],
        ["-O", "qcow2", "-o", "foo=bar", "--size", "1G"],
        ["-O", "raw", "-o", "cluster_size=4k", "--size", "1G"],
        ["-O", "qcow2", "--size", "64P", "-o", "cluster_size=512"],
        ["-O", "qcow2", "--size", "8E"],
        ["-O", "qcow2", "--size", "-1"],
        ["-O", "qcow2", "--size", "abc"],
        ["-O", "foo", "--size", "1G"],
        ["-O", "qcow2", "--size", "1G", "partial.qcow2"],
        ["-O", "qcow2"],
        ["--size", "1G", "-l", "snap"],
        ["--size", "1G", "--output=xml"],
        ["-O", "qcow2", "-o", "size=2G"],
        ["-O", "qcow2", "-o", "size=2G", "--size", "1G"],
    ],
    ids=lambda a: " ".join(a),
)
def test_measure_refusals(args, sources, cli):
    """Refused arguments: qemu-img's first error line and exit code (and the odd accepted ones)."""
    assert_same(*both(cli, sources, *args))
