"""Where `qcow2rs` and `qemu-img` offer the same function they must agree on exit codes, sizes and
messages (issue 10, "match qemu-img where it differs today"); qemu-img is run beside us each time."""

from __future__ import annotations

import json
import os

import pytest

from interop import qemu_img
from qemu_tools import qemu_io


@pytest.fixture
def small(qemu, scratch):
    img = scratch / "small.qcow2"
    cp = qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    assert cp.returncode == 0, cp.stderr
    return img


def virtual_size(path):
    cp = qemu_img("info", "--output=json", path)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)["virtual-size"]


@pytest.mark.parametrize("size", ["2000001", "+1", "1049088"])
def test_resize_size_not_multiple_of_512(size, small, cli, scratch):
    """qemu-img refuses a qcow2 size that is not a multiple of 512 (we used to round it up)."""
    ref_img = scratch / "ref.qcow2"
    ref_img.write_bytes(small.read_bytes())
    ref = qemu_img("resize", ref_img, size)
    ours = cli("resize", small, size)
    assert ours.returncode == ref.returncode, (ours.returncode, ref.returncode, ours.stderr, ref.stderr)
    assert virtual_size(small) == virtual_size(ref_img)
    if ref.returncode != 0:
        assert "multiple of 512" in ours.stderr, ours.stderr
        assert len(ours.stderr.strip().splitlines()) == 1, ours.stderr
        assert virtual_size(small) == 1 << 20
    chk = qemu_img("check", small)
    assert chk.returncode == 0, chk.stdout + chk.stderr


@pytest.mark.parametrize("argv", [[], ["A"], ["A", "B", "A"], ["--bogus", "A", "B"]], ids=["none", "one", "three", "bad-option"])
def test_compare_usage_errors(argv, small, cli):
    """A usage error of compare exits 1, as qemu-img's does (2 is reserved for errors while comparing)."""
    args = [str(small) if a in ("A", "B") else a for a in argv]
    ref = qemu_img("compare", *args)
    ours = cli("compare", *args)
    assert ref.returncode == 1, ref.stderr
    assert ours.returncode == ref.returncode, (ours.returncode, ours.stderr)
    assert ours.stderr.strip(), "a usage error must be reported"


@pytest.mark.parametrize("length", [1000, 512, 1, 1 << 20, (1 << 20) + 3])
def test_info_raw_size_as_qemu_reports_it(length, qemu, cli, scratch):
    """qemu-img reports a raw file's size rounded up to 512 bytes; so do we, in JSON and human output."""
    raw = scratch / "r.raw"
    with open(raw, "wb") as f:
        f.truncate(length)
    ref = json.loads(qemu_img("info", "--output=json", "-f", "raw", raw).stdout)
    ours = cli("info", "--output=json", "-f", "raw", raw)
    assert ours.returncode == 0, ours.stderr
    got = json.loads(ours.stdout)
    assert got["virtual-size"] == ref["virtual-size"]
    assert got["children"][0]["info"]["virtual-size"] == ref["children"][0]["info"]["virtual-size"]
    human = cli("info", "-f", "raw", raw)
    assert f"({ref['virtual-size']} bytes)" in human.stdout, human.stdout


@pytest.mark.parametrize(
    "cmd",
    [
        ["info", "{missing}"],
        ["check", "{missing}"],
        ["map", "{missing}"],
        ["convert", "-O", "raw", "{missing}", "{out}"],
        ["compare", "{missing}", "{missing}"],
    ],
    ids=lambda c: c[0],
)
def test_io_errors_read_as_strerror(cmd, qemu, cli, scratch):
    """An OS error is reported as strerror(3) gives it, as qemu-img does: no Rust "(os error N)"."""
    missing = scratch / "does-not-exist.qcow2"
    args = [a.format(missing=missing, out=scratch / "out.raw") for a in cmd]
    ours = cli(*args)
    assert ours.returncode != 0
    assert "No such file or directory" in ours.stderr, ours.stderr
    assert "os error" not in ours.stderr, ours.stderr
    assert str(missing) in ours.stderr, ours.stderr
    assert not os.path.exists(missing)


@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "plain"])
def test_human_map_of_compressed_clusters(compressed, qemu, cli, scratch):
    """qemu-img's human map stops with an error (exit 1) at data it cannot name a host offset for
    (compressed clusters); the JSON map lists them. Plain images map the same in both tools."""
    src = scratch / "src.qcow2"
    img = scratch / "img.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", src, "4M").returncode == 0
    qemu_io(src, "write -P 1 0 1M", "write -P 2 2M 64k")
    conv = ["convert", "-O", "qcow2"] + (["-c"] if compressed else []) + [src, img]
    cp = qemu_img(*conv)
    assert cp.returncode == 0, cp.stderr
    ref = qemu_img("map", img)
    ours = cli("map", img)
    assert ours.returncode == ref.returncode == (1 if compressed else 0), (ours.stderr, ref.stderr)
    assert ours.stdout == ref.stdout
    if compressed:
        assert "File contains external, encrypted or compressed clusters." in ours.stderr
    js = cli("map", "--output=json", img)
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout) == json.loads(qemu_img("map", "--output=json", img).stdout)


@pytest.mark.parametrize("mode", ["off", "bogus", "metadata", "falloc", "full"])
def test_resize_preallocation(mode, small, cli):
    """resize --preallocation: off works as qemu-img's, an unknown mode gets qemu-img's message,
    the modes we do not implement are refused by name (they were accepted and ignored)."""
    ours = cli("resize", f"--preallocation={mode}", small, "+1M")
    if mode == "off":
        assert ours.returncode == 0, ours.stderr
        assert virtual_size(small) == 2 << 20
        return
    assert ours.returncode == 1
    assert len(ours.stderr.strip().splitlines()) == 1, ours.stderr
    assert virtual_size(small) == 1 << 20
    if mode == "bogus":
        ref = qemu_img("resize", f"--preallocation={mode}", small, "+1M")
        assert ref.returncode == 1
        assert ours.stderr.split(":", 1)[1] == ref.stderr.split(":", 1)[1]
    else:
        assert f"--preallocation={mode} is not supported" in ours.stderr


MAP_RANGES = [
    ["--start-offset", "1536k", "--max-length", "3M"],
    ["--start-offset", "1000", "--max-length", "100000000000"],
    ["--start-offset", "1.5M", "--max-length", "1k"],
    ["--start-offset", "4100k"],
    ["--max-length", "6200k"],
    ["--start-offset", "1M", "--max-length", "0"],
    ["--start-offset", "9M"],
    ["--start-offset=-1"],
    ["--max-length=abc"],
    ["--start-offset", "abc"],
    ["--max-length=-5"],
]


@pytest.mark.parametrize("json_out", [True, False], ids=["json", "human"])
@pytest.mark.parametrize("rng", MAP_RANGES, ids=[" ".join(r) for r in MAP_RANGES])
def test_map_range_as_qemu_img(rng, json_out, qemu, cli, scratch):
    """map --start-offset/--max-length: the same entries (clipped to the range, host offsets moved
    into the cluster), the same zero-length entry for an empty range, the same errors."""
    base = scratch / "base.qcow2"
    img = scratch / "img.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", base, "8M").returncode == 0
    qemu_io(base, "write -P 1 0 3M")
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", img).returncode == 0
    qemu_io(img, "write -P 1 1M 1M", "write -z 4M 64k", "write -P 2 6M 100k")
    args = ["map"] + (["--output=json"] if json_out else []) + rng + [str(img)]
    ref = qemu_img(*args)
    ours = cli(*args)
    assert ours.returncode == ref.returncode, (ours.stderr, ref.stderr)
    assert ours.stdout == ref.stdout
    if ref.returncode:
        assert ours.stderr.split(":", 1)[1] == ref.stderr.split(":", 1)[1]


@pytest.mark.parametrize("cmd", ["info", "map", "check", "compare", "convert", "create", "resize", "rebase", "commit",
                                 "amend", "measure", "snapshot", "bitmap", "dd", "dump", "bench", "serve"])
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_command_help(cmd, flag, cli):
    """`qemu-img COMMAND --help` prints that command's usage and exits 0; so does qcow2rs."""
    ours = cli(cmd, flag)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.startswith(f"usage: qcow2rs {cmd} "), ours.stdout
    assert cli("help", cmd).stdout == ours.stdout


@pytest.mark.parametrize("argv", [["create", "-f", "qcow2", "-o", "help"], ["create", "-o", "?"],
                                  ["create", "-f", "raw", "-o", "help"], ["convert", "-O", "qcow2", "-o", "help"],
                                  ["convert", "-o", "size=1M,help"], ["amend", "-f", "qcow2", "-o", "help"]],
                         ids=["create-qcow2", "create-raw-?", "create-raw", "convert-qcow2", "convert-raw", "amend"])
def test_option_help_lists_what_qemu_img_lists(argv, qemu, cli):
    """`-o help` prints qemu-img's option list, less the encryption options (we do not create or
    amend encrypted images) and exits 0."""
    ref = qemu_img(*argv)
    ours = cli(*argv)
    assert ref.returncode == ours.returncode == 0, (ref.stderr, ours.stderr)
    want = [l for l in ref.stdout.splitlines() if not l.lstrip().startswith(("encrypt.", "encryption="))]
    assert ours.stdout.splitlines() == want


def test_option_errors_as_qemu_img(qemu, cli, scratch):
    """An unknown -o parameter is named as qemu-img names it; encryption options say they are not
    supported; a raw image has nothing to amend. All exit 1."""
    img = scratch / "x.qcow2"
    cases = [
        (["create", "-f", "qcow2", "-o", "bogus=1", img, "1M"], "Invalid parameter 'bogus'"),
        (["create", "-f", "raw", "-o", "cluster_size=4k", img, "1M"], "Invalid parameter 'cluster_size'"),
        (["create", "-f", "qcow2", "-o", "encrypt.format=luks", img, "1M"], "is not supported"),
        (["amend", "-f", "raw", "-o", "help"], "Format driver 'raw' does not support option amendment"),
    ]
    for argv, msg in cases:
        ours = cli(*argv)
        assert ours.returncode == 1, (argv, ours.stderr)
        assert msg in ours.stderr, (argv, ours.stderr)
        if "not supported" not in msg:
            ref = qemu_img(*argv)
            assert ref.returncode == 1 and msg in ref.stderr, (argv, ref.stderr)


CREATE_SIZES = ["0x100000", "0X10000", "0x1k", "  1M", "1M ", "1e3", "1.5M", "1.5", "-0", "-1", "1.k",
                "1.0", "0", "0x", "0x1.8", "1B", "1", "1000", "1EB", "1.25k", "08", "+1M", "16E", "15E",
                "99999999999999999999", "1.5.5k", "k", "", "0x1ffffffffffffffff"]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("size", CREATE_SIZES)
def test_create_size_as_qemu_img(size, fmt, qemu, cli, scratch):
    """`create FILE SIZE` reads the size as qemu-img does (hex, fractions, suffixes, white space,
    the range), refuses what it refuses with its message, and a raw image gets qemu-img's length
    (rounded up to 512 bytes)."""
    ref_img, our_img = scratch / "ref.img", scratch / "our.img"
    ref = qemu_img("create", "-q", "-f", fmt, ref_img, "--", size)
    ours = cli("create", "-q", "-f", fmt, our_img, "--", size)
    assert ours.returncode == ref.returncode, (size, ours.stderr, ref.stderr)
    if ref.returncode != 0:
        assert ours.stderr.replace("qcow2rs:", "qemu-img:") == ref.stderr, (ours.stderr, ref.stderr)
        return
    assert virtual_size(our_img) == virtual_size(ref_img)
    if fmt == "raw":
        assert our_img.stat().st_size == ref_img.stat().st_size
