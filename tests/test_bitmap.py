"""`qcow2rs bitmap` against `qemu-img bitmap`: the same command on copies of one image gives the
same exit code, the same error message (after the program name) and the same bitmap list in
`qemu-img info`, and leaves our copy clean for `qemu-img check`; `info` and `measure` report
bitmaps as qemu-img does; writes through `serve` are recorded in the enabled bitmaps as qemu
records the same writes, and a killed server leaves them in use."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest

from interop import qemu_img
from qemu_tools import in_ci, qcow2rs_bin, qemu_io, run


def make(d, name="img.qcow2", opts="", size="16M"):
    """An image with bitmaps made by qemu: `a` (64 KiB, disabled after some writes) and `big`
    (1 MiB, enabled)."""
    path = d / name
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    assert qemu_img(*args, path, size).returncode == 0
    if "compat=0.10" not in opts:
        assert qemu_img("bitmap", "--add", "-g", "64k", path, "a").returncode == 0
        assert qemu_img("bitmap", "--add", "-g", "1M", path, "big").returncode == 0
        qemu_io(path, "write -q 0 64k", "write -q 5M 100k", cwd=d)
        assert qemu_img("bitmap", "--disable", path, "a").returncode == 0
        qemu_io(path, "write -q 10M 4k", cwd=d)
    return path


def bitmaps(path):
    cp = qemu_img("info", "--output=json", path)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)["format-specific"]["data"].get("bitmaps")


def message(stderr, prog):
    first = stderr.strip().splitlines()[0] if stderr.strip() else ""
    assert first.startswith(prog + ": "), stderr
    return first[len(prog) + 2 :]


# Arguments after "bitmap" (IMG stands for the image); None: compare exit codes only (qemu's
# message names an internal node, "#block123").
SEQUENCES = [
    (["--add", "IMG", "new"], True),
    (["--add", "-g", "128k", "IMG", "new"], True),
    (["--add", "-g", "0", "IMG", "new"], True),
    (["--add", "-g", "2G", "IMG", "new"], True),
    (["--add", "IMG", "a"], True),
    (["--add", "-g", "256", "IMG", "new"], True),
    (["--add", "-g", "3000", "IMG", "new"], True),
    (["--add", "-g", "4G", "IMG", "new"], True),
    (["--add", "-g", "abc", "IMG", "new"], True),
    (["--add", "IMG", ""], True),
    (["--add", "IMG", "x" * 1024], False),
    (["--remove", "IMG", "a"], True),
    (["--remove", "IMG", "nope"], True),
    (["--clear", "IMG", "big"], True),
    (["--clear", "IMG", "nope"], True),
    (["--enable", "IMG", "a"], True),
    (["--disable", "IMG", "big"], True),
    (["--disable", "IMG", "a"], True),
    (["--merge", "big", "IMG", "a"], True),
    (["--merge", "a", "IMG", "a"], True),
    (["--merge", "nope", "IMG", "a"], True),
    (["--merge", "a", "IMG", "nope"], True),
    (["--add", "--disable", "IMG", "new"], True),
    (["--disable", "--add", "IMG", "a"], True),
    (["--remove", "--add", "IMG", "a"], True),
    (["--add", "-g", "512", "--merge", "a", "--merge", "big", "IMG", "new"], True),
    (["IMG", "a"], True),
    (["--add", "IMG"], True),
    (["--add", "IMG", "a", "b"], True),
    (["--clear", "-g", "1M", "IMG", "a"], True),
    (["--add", "-b", "IMG", "IMG", "new"], True),
    (["--add", "-F", "qcow2", "IMG", "new"], True),
    # The same file as source: locked by the target (qemu-img too); lock messages differ.
    (["--merge", "big", "-b", "IMG", "-F", "qcow2", "IMG", "a"], False),
    (["--add", "missing.qcow2", "new"], False),
]


@pytest.mark.parametrize("args,same_message", SEQUENCES, ids=[" ".join(a)[:60] for a, _ in SEQUENCES])
def test_bitmap_like_qemu_img(args, same_message, cli, scratch, qemu):
    img = make(scratch)
    ref = scratch / "ref.qcow2"
    shutil.copyfile(img, ref)
    theirs = qemu_img("bitmap", *[str(ref) if a == "IMG" else a for a in args], cwd=scratch)
    ours = cli("bitmap", *[str(img) if a == "IMG" else a for a in args], cwd=scratch)
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    if theirs.returncode != 0:
        assert len(ours.stderr.strip().splitlines()) == 1, ours.stderr
        if same_message:
            want = message(theirs.stderr, "qemu-img").replace(str(ref), str(img))
            assert message(ours.stderr, "qcow2rs") == want
    assert bitmaps(img) == bitmaps(ref)
    cp = qemu_img("check", img)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    # Our check counts the bitmaps' clusters as qemu's does.
    cp = cli("check", img)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_bitmap_refused_on_v2_and_raw(cli, scratch, qemu):
    v2 = make(scratch, "v2.qcow2", "compat=0.10")
    ours = cli("bitmap", "--add", v2, "x")
    assert ours.returncode == 1
    assert "Cannot store dirty bitmaps in qcow2 v2 files" in ours.stderr
    raw = scratch / "x.raw"
    raw.write_bytes(b"\0" * 65536)
    ours = cli("bitmap", "-f", "raw", "--add", raw, "x")
    assert ours.returncode == 1
    assert "Operation not supported" in ours.stderr


def test_bitmap_in_use_only_removed(cli, scratch, qemu):
    """A bitmap marked in use: every operation but remove is refused, as by qemu-img."""
    img = make(scratch)
    data = bytearray(img.read_bytes())
    hl = int.from_bytes(data[100:104], "big")
    o = hl
    while int.from_bytes(data[o : o + 4], "big") != 0x23852875:
        o += 8 + (int.from_bytes(data[o + 4 : o + 8], "big") + 7) // 8 * 8
    d = int.from_bytes(data[o + 24 : o + 32], "big")
    data[d + 12 : d + 16] = (3).to_bytes(4, "big")
    img.write_bytes(data)
    ref = scratch / "ref.qcow2"
    shutil.copyfile(img, ref)
    for args in (["--clear"], ["--enable"], ["--disable"], ["--merge", "big"]):
        theirs = qemu_img("bitmap", *args, ref, "a")
        ours = cli("bitmap", *args, img, "a")
        assert theirs.returncode == ours.returncode == 1
        assert message(ours.stderr, "qcow2rs").startswith(message(theirs.stderr, "qemu-img"))
    assert cli("bitmap", "--remove", img, "a").returncode == 0
    assert qemu_img("bitmap", "--remove", ref, "a").returncode == 0
    assert bitmaps(img) == bitmaps(ref)
    assert qemu_img("check", img).returncode == 0


def test_bitmap_info_and_measure(cli, scratch, qemu):
    """`info` (JSON and human) and `measure` report the bitmaps as qemu-img does, on an image
    made by qemu-img and on one made by us."""
    img = make(scratch)
    ours_img = scratch / "ours.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", ours_img, "16M").returncode == 0
    assert cli("bitmap", "--add", "-g", "64k", ours_img, "a").returncode == 0
    assert cli("bitmap", "--add", "-g", "1M", "--disable", ours_img, "big").returncode == 0
    for path in (img, ours_img):
        ours = json.loads(cli("info", "--output=json", path).stdout)
        assert ours["format-specific"]["data"]["bitmaps"] == bitmaps(path)
        human = cli("info", path).stdout
        ref = qemu_img("info", path).stdout
        section = lambda s: s[s.index("    bitmaps:") : s.index("    refcount bits:")]  # noqa: E731
        assert section(human) == section(ref)
        for fmt in ("qcow2", "raw"):
            o = json.loads(cli("measure", "--output=json", "-O", fmt, path).stdout)
            r = json.loads(qemu_img("measure", "--output=json", "-O", fmt, path).stdout)
            assert o == r, fmt


# ---- guest writes through `serve` recorded in the enabled bitmaps ----

WRITES = ["write -q -P 7 3M 5k", "write -q -z 7M 64k", "discard -q 12M 1M", "write -q 9M 512"]


def dirty_map(path, name):
    """The dirty extents of bitmap `name` as qemu reads them (qemu-nbd -B, nbdinfo --map)."""
    if shutil.which("nbdinfo") is None:
        if in_ci():
            pytest.fail("nbdinfo is missing (CI=true)")
        pytest.skip("nbdinfo is missing")
    cp = run(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}", "--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name, path, "]"])
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


def serve_and_write(tmp, path):
    """`qcow2rs serve` on `path`, the WRITES made through it by qemu-io over NBD."""
    sock = tmp / "s.sock"
    proc = subprocess.Popen(
        [str(qcow2rs_bin()), "serve", "-t", "-k", str(sock), str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    end = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < end, "server did not start"
        time.sleep(0.05)
    qemu_io(f"nbd+unix:///?socket={sock}", *WRITES, fmt="raw")
    return proc


def test_serve_records_writes_like_qemu(tmp_path):
    theirs = make(tmp_path, "theirs.qcow2")
    mine = tmp_path / "mine.qcow2"
    shutil.copy(theirs, mine)
    before_a = dirty_map(mine, "a")
    qemu_io(theirs, *WRITES)
    proc = serve_and_write(tmp_path, mine)
    # While served, the enabled bitmap is in use on disk, the disabled one untouched.
    cp = qemu_img("info", "-U", "--output=json", mine)
    flags = {b["name"]: b["flags"] for b in json.loads(cp.stdout)["format-specific"]["data"]["bitmaps"]}
    assert flags == {"a": [], "big": ["in-use", "auto"]}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert bitmaps(mine) == bitmaps(theirs)
    assert qemu_img("check", mine).returncode == 0
    assert dirty_map(mine, "big") == dirty_map(theirs, "big")
    assert "dirty" in dirty_map(mine, "big")
    assert dirty_map(mine, "a") == before_a


def test_serve_killed_leaves_bitmaps_in_use(tmp_path):
    path = make(tmp_path)
    proc = serve_and_write(tmp_path, path)
    proc.kill()
    proc.wait()
    assert bitmaps(path) == [
        {"flags": [], "name": "a", "granularity": 65536},
        {"flags": ["in-use", "auto"], "name": "big", "granularity": 1048576},
    ]
    cp = qemu_img("check", path)
    assert cp.returncode in (0, 3), cp.stdout + cp.stderr  # leaks at most
    # qemu refuses the inconsistent bitmap as it would after its own crash.
    cp = qemu_img("resize", path, "32M")
    assert cp.returncode == 1 and "Bitmap 'big' is inconsistent" in cp.stderr
