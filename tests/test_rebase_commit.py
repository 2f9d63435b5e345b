"""`qcow2rs rebase` and `qcow2rs commit` against qemu-img 10 (issue 10, "Backing files").

Chains are built with qemu-img create -b/-F and qemu-io writes (data, write-zeroes, partial
clusters, compressed clusters, different cluster sizes, a raw base). After a safe rebase the
guest content equals the content before (`qemu-img compare` with a raw copy taken before),
after a commit the base holds what the overlay showed; `qemu-img check` is clean on every qcow2
file touched; the backing file names qemu-img reports are the expected ones. Bad arguments
exit as qemu-img's do, with the same message, and leave the image untouched."""

from __future__ import annotations

import json
import shutil

import pytest

from qemu_tools import qemu_img as _qemu_img
from qemu_tools import qemu_io

MiB = 1 << 20

# Options of (base, mid, top); None for base means a raw base.
VARIANTS = {
    "v3": ("", "", ""),
    "v2": ("compat=0.10", "compat=0.10", "compat=0.10"),
    "mixed-clusters": ("cluster_size=4096", "cluster_size=65536", "cluster_size=16384"),
    "extended-l2": ("", "extended_l2=on", "extended_l2=on"),
    "raw-base": (None, "", "cluster_size=4096"),
    "big-clusters": ("cluster_size=2M", "", "cluster_size=1M"),
}


def qemu_img(*args, check=True, cwd=None):
    return _qemu_img(*args, check=check, cwd=cwd)


def ok(cp):
    assert cp.returncode == 0, f"exit {cp.returncode}: {cp.stdout}{cp.stderr.strip()}"
    return cp


def create(path, opts, backing=None, fmt="qcow2", size="4M"):
    args = ["create", "-q", "-f", fmt]
    if opts:
        args += ["-o", opts]
    if backing is not None:
        args += ["-b", backing.name, "-F", "raw" if backing.suffix == ".raw" else "qcow2"]
    qemu_img(*args, path, size)


def make_chain(d, variant):
    """base <- mid <- top, 4 MiB each, every layer writing over part of the one below."""
    bo, mo, to = VARIANTS[variant]
    if bo is None:
        base = d / "base.raw"
        create(base, "", fmt="raw")
        qemu_io(base, "write -P 1 0 1M", "write -P 8 2560k 64k", "write -P 9 3M 512k", fmt="raw")
    else:
        base = d / "base.qcow2"
        create(base, bo)
        qemu_io(base, "write -P 1 0 1M", "write -P 8 2560k 64k", "write -P 9 3M 512k")
    mid = d / "mid.qcow2"
    create(mid, mo, backing=base)
    qemu_io(mid, "write -P 2 512k 1M", "write -z 3M 64k", "write -P 6 3300k 5000", "write -P 6 2600k 4k")
    top = d / "top.qcow2"
    create(top, to, backing=mid)
    cmds = ["write -P 3 1M 1M", "write -z 0 64k", "write -P 4 3000 1000", "write -z 3200k 4k"]
    if "compat=0.10" not in to and "extended_l2" not in to and "=1M" not in to:
        cmds.append("write -c -P 5 2M 128k")
    qemu_io(top, *cmds)
    return base, mid, top


def content(img, d, name):
    """The guest content as a raw file (qemu-img convert)."""
    out = d / f"{name}.raw"
    qemu_img("convert", "-O", "raw", img, out)
    return out


def same(a, b, what):
    cp = qemu_img("compare", a, b, check=False)
    assert cp.returncode == 0, f"{what}: {cp.stdout}{cp.stderr}"


def clean(img, what):
    if img.suffix != ".qcow2":
        return
    cp = qemu_img("check", img, check=False)
    assert cp.returncode == 0, f"{what}: qemu-img check {img.name}: {cp.stdout}{cp.stderr}"


def info(img):
    return json.loads(qemu_img("info", "--output=json", "-U", img).stdout)


def backing_of(img):
    i = info(img)
    return i.get("backing-filename"), i.get("backing-filename-format")


def top_allocated(img):
    """The runs `qemu-img map` says the image itself decides (depth 0, present)."""
    m = json.loads(qemu_img("map", "--output=json", img).stdout)
    return [(e["start"], e["length"]) for e in m if e["depth"] == 0 and e["present"]]


# ---------------------------------------------------------------- rebase


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("onto", ["base", "other", "other-raw", "none"])
def test_rebase_safe_keeps_content(cli, scratch, variant, onto):
    base, mid, top = make_chain(scratch, variant)
    before = content(top, scratch, "before")
    if onto == "base":
        new, fmt = base, ("raw" if base.suffix == ".raw" else "qcow2")
    elif onto == "other":
        new, fmt = scratch / "other.qcow2", "qcow2"
        create(new, "cluster_size=8192", size="3M")  # shorter than the overlay
        qemu_io(new, "write -P 7 0 2M", "write -P 1 64k 64k", "write -P 2 700k 8k")
    elif onto == "other-raw":
        new, fmt = scratch / "other.raw", "raw"
        create(new, "", fmt="raw", size="5M")  # longer than the overlay
        qemu_io(new, "write -P 7 1500k 2M", "write -P 9 3M 100k", fmt="raw")
    else:
        new, fmt = None, None
    args = ["rebase", "-b", new.name if new else ""] + (["-F", fmt] if fmt else []) + [top]
    cp = ok(cli(*args))
    assert cp.stdout == "", cp.stdout
    same(top, before, "guest content after a safe rebase")
    clean(top, "after rebase")
    clean(mid, "old backing after rebase")
    assert backing_of(top) == ((new.name, fmt) if new else (None, None))


@pytest.mark.parametrize("variant", ["v3", "v2", "extended-l2"])
def test_rebase_unsafe_only_changes_header(cli, scratch, variant):
    base, mid, top = make_chain(scratch, variant)
    old = top.read_bytes()
    cs = info(top)["cluster-size"]
    ref = scratch / "ref.qcow2"
    shutil.copy(top, ref)
    fmt = "raw" if base.suffix == ".raw" else "qcow2"
    ok(qemu_img("rebase", "-u", "-b", base.name, "-F", fmt, ref))
    ok(cli("rebase", "-u", "-b", base.name, "-F", fmt, top))
    new = top.read_bytes()
    assert new[cs:] == old[cs:], "unsafe rebase changed more than the header cluster"
    assert backing_of(top) == (base.name, fmt)
    clean(top, "after rebase -u")
    same(top, ref, "content against qemu-img rebase -u")
    # -u without -b: no backing file at all (as qemu-img).
    ok(cli("rebase", "-u", top))
    assert backing_of(top) == (None, None)
    assert top.read_bytes()[cs:] == old[cs:]
    clean(top, "after rebase -u (standalone)")


def test_rebase_relative_name_is_relative_to_the_image(cli, scratch, workdir):
    d = scratch / "sub"
    d.mkdir()
    base, mid, top = make_chain(d, "v3")
    before = content(top, scratch, "before")
    # cwd elsewhere: "base.qcow2" names the file next to the image, as in qemu-img.
    ok(cli("rebase", "-b", "base.qcow2", "-F", "qcow2", top, cwd=workdir))
    assert backing_of(top) == ("base.qcow2", "qcow2")
    same(top, before, "after rebase with a relative name")
    clean(top, "after rebase")


def test_rebase_progress_and_quiet(cli, scratch):
    base, mid, top = make_chain(scratch, "v3")
    cp = ok(cli("rebase", "-p", "-b", base.name, "-F", "qcow2", top))
    assert "100.00/100%" in cp.stdout + cp.stderr
    cp = ok(cli("rebase", "-q", "-p", "-b", mid.name, "-F", "qcow2", top))
    assert cp.stdout == "" and cp.stderr == ""


REBASE_ERRORS = [
    (["T"], "Must specify backing file (-b) or use unsafe mode (-u)"),
    (["-b", "missing.qcow2", "-F", "qcow2", "T"], "Could not open new backing file 'missing.qcow2'"),
    (["-b", "B", "T"], "backing format must be specified"),
    (["-u", "-b", "B", "T"], "backing format must be specified"),
    (["-b", "B", "-F", "foo", "T"], "Invalid format name: 'foo'"),
    (["-b", "B", "-F", "qcow2", "T", "T"], "Expecting one image file name"),
    (["-b", "B", "-F", "qcow2", "-t", "foo", "T"], "Invalid cache option: foo"),
    (["-b", "B", "-F", "qcow2", "-T", "foo", "T"], "Invalid source cache option: foo"),
    (["-b", "B", "-F", "qcow2", "-x", "T"], None),
    (["-b", "B", "-F", "qcow2", "missing.qcow2"], "missing.qcow2"),
    (["-b", "T", "-F", "qcow2", "T"], None),
    (["-b", "B", "-F", "qcow2", "R"], "Operation not supported"),
]


@pytest.mark.parametrize("argv,msg", REBASE_ERRORS, ids=[" ".join(a) for a, _ in REBASE_ERRORS])
def test_rebase_errors_as_qemu_img(cli, scratch, argv, msg):
    base, mid, top = make_chain(scratch, "v3")
    ref = scratch / "ref"
    ref.mkdir()
    for f in (base, mid, top):
        shutil.copy(f, ref / f.name)
    for d in (scratch, ref):
        (d / "r.img").write_bytes(b"\x01" * 65536)

    def args(d):
        return [str(d / "top.qcow2") if a == "T" else "base.qcow2" if a == "B" else str(d / "r.img") if a == "R" else a for a in argv]

    want = qemu_img("rebase", *args(ref), check=False, cwd=ref)
    old = top.read_bytes()
    got = cli("rebase", *args(scratch), cwd=scratch)
    assert want.returncode == 1, want.stderr
    assert got.returncode == want.returncode, (got.returncode, got.stderr)
    assert got.stderr.strip() and len(got.stderr.strip().splitlines()) == 1, got.stderr
    if msg:
        assert msg in want.stderr, want.stderr
        assert msg in got.stderr, got.stderr
    assert top.read_bytes() == old, "a failed rebase changed the image"


def test_rebase_onto_itself_refused_even_unsafe(cli, scratch):
    """qemu-img -u writes a backing file that is the image itself (unusable afterwards); we refuse."""
    base, mid, top = make_chain(scratch, "v3")
    old = top.read_bytes()
    for extra in ([], ["-u"]):
        cp = cli("rebase", *extra, "-b", top.name, "-F", "qcow2", top, cwd=scratch)
        assert cp.returncode == 1, cp.stderr
        assert "cannot be the image itself" in cp.stderr, cp.stderr
    # A chain that leads back to the image is refused too (safe mode opens it).
    cp = cli("rebase", "-b", "top.qcow2", "-F", "qcow2", mid, cwd=scratch)
    assert cp.returncode == 1, cp.stderr
    assert top.read_bytes() == old
    clean(mid, "after a refused rebase")


# ---------------------------------------------------------------- commit


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_commit_into_backing_and_empty(cli, scratch, variant):
    base, mid, top = make_chain(scratch, variant)
    before = content(top, scratch, "before")
    base_before = base.read_bytes()
    cp = ok(cli("commit", top))
    assert cp.stdout == "Image committed.\n", cp.stdout
    same(mid, before, "backing file after commit")
    same(top, before, "image after commit (reads through)")
    clean(top, "image after commit")
    clean(mid, "backing file after commit")
    assert top_allocated(top) == [], "the image must be empty after commit without -d"
    assert base.read_bytes() == base_before, "commit wrote below the backing file"
    assert backing_of(top) == ("mid.qcow2", "qcow2")


@pytest.mark.parametrize("variant", ["v3", "mixed-clusters"])
def test_commit_drop_keeps_image(cli, scratch, variant):
    base, mid, top = make_chain(scratch, variant)
    before = content(top, scratch, "before")
    old = top.read_bytes()
    cp = ok(cli("commit", "-d", "-q", top))
    assert cp.stdout == ""
    same(mid, before, "backing file after commit -d")
    assert top.read_bytes() == old, "commit -d changed the image"
    clean(mid, "backing file after commit -d")


@pytest.mark.parametrize("variant", ["v3", "v2", "mixed-clusters", "raw-base", "extended-l2"])
def test_commit_base_down_the_chain(cli, scratch, workdir, variant):
    base, mid, top = make_chain(scratch, variant)
    before = content(top, scratch, "before")
    old_top, old_mid = top.read_bytes(), mid.read_bytes()
    # The name as the layer above stores it, from another cwd (qemu-img resolves it so).
    cp = ok(cli("commit", "-b", base.name, top, cwd=workdir))
    assert cp.stdout == "Image committed.\n"
    same(base, before, "base after commit -b")
    clean(base, "base after commit -b")
    # -b implies -d: the image and the layer between are left as they were.
    assert top.read_bytes() == old_top
    assert mid.read_bytes() == old_mid


def test_commit_grows_a_shorter_base(cli, scratch):
    for kind in ("qcow2", "raw"):
        d = scratch / kind
        d.mkdir()
        base = d / f"base.{kind}"
        create(base, "", fmt=kind, size="1M")
        qemu_io(base, "write -P 1 0 1M", fmt=kind)
        top = d / "top.qcow2"
        create(top, "", backing=base, size="2M")
        qemu_io(top, "write -P 5 1536k 64k", "write -P 6 1000k 100k")
        before = content(top, d, "before")
        ok(cli("commit", top))
        assert info(base)["virtual-size"] == 2 * MiB
        same(base, before, f"{kind} base after commit")
        clean(base, "grown base")
        clean(top, "image")


def test_commit_matches_qemu_img(cli, scratch):
    """The same commit by qemu-img and by us gives the same content and the same emptiness."""
    base, mid, top = make_chain(scratch, "v3")
    ref = scratch / "ref"
    ref.mkdir()
    for f in (base, mid, top):
        shutil.copy(f, ref / f.name)
    ok(qemu_img("commit", "-q", ref / "top.qcow2"))
    ok(cli("commit", "-q", top))
    same(mid, ref / "mid.qcow2", "backing files")
    assert top_allocated(top) == top_allocated(ref / "top.qcow2") == []


COMMIT_ERRORS = [
    (["B"], "Image does not have a backing file"),
    (["-f", "raw", "T"], "Image does not have a backing file"),
    (["-b", "nothere", "T"], "Did not find 'nothere' in the backing chain of"),
    (["-b", "top.qcow2", "T"], "in the backing chain of"),
    (["missing.qcow2"], "missing.qcow2"),
    (["T", "T"], "Expecting one image file name"),
    ([], "Expecting one image file name"),
    (["-x", "T"], None),
    (["-t", "foo", "T"], "Invalid cache option: foo"),
    (["R"], "Image does not have a backing file"),
]


@pytest.mark.parametrize("argv,msg", COMMIT_ERRORS, ids=[" ".join(a) or "none" for a, _ in COMMIT_ERRORS])
def test_commit_errors_as_qemu_img(cli, scratch, argv, msg):
    base, mid, top = make_chain(scratch, "v3")
    ref = scratch / "ref"
    ref.mkdir()
    for f in (base, mid, top):
        shutil.copy(f, ref / f.name)
    for d in (scratch, ref):
        (d / "r.img").write_bytes(b"\x01" * 65536)

    def args(d):
        return [
            str(d / "top.qcow2") if a == "T" else str(d / "base.qcow2") if a == "B" else str(d / "r.img") if a == "R" else a
            for a in argv
        ]

    want = qemu_img("commit", *args(ref), check=False, cwd=ref)
    olds = [f.read_bytes() for f in (base, mid, top)]
    got = cli("commit", *args(scratch), cwd=scratch)
    assert want.returncode == 1, want.stderr
    assert got.returncode == want.returncode, (got.returncode, got.stderr)
    assert got.stderr.strip() and len(got.stderr.strip().splitlines()) == 1, got.stderr
    if msg:
        assert msg in want.stderr, want.stderr
        assert msg in got.stderr, got.stderr
    assert [f.read_bytes() for f in (base, mid, top)] == olds, "a failed commit changed a file"


@pytest.mark.parametrize("unsafe", [False, True])
def test_rebase_name_that_does_not_fit_is_refused_before_any_change(cli, scratch, unsafe):
    """A name over 1023 bytes, or one the header cluster (512 B here) cannot hold, is refused
    before safe mode copies anything."""
    img = scratch / "small-clusters.qcow2"
    create(img, "cluster_size=512")
    qemu_io(img, "write -P 1 0 4k")
    raw = scratch / "base.raw"
    create(raw, "", fmt="raw")
    qemu_io(raw, "write -P 9 8k 4k", fmt="raw")
    old = img.read_bytes()
    # Both names reach base.raw, whose data safe mode would copy in.
    for name in ("./" * 546 + "base.raw", "./" * 200 + "base.raw"):
        cp = cli("rebase", *(["-u"] if unsafe else []), "-b", name, "-F", "raw", img)
        assert cp.returncode == 1, cp.stderr
        assert "Could not change the backing file" in cp.stderr, cp.stderr
        assert img.read_bytes() == old


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_rebase_where_the_old_chain_reads_zeros(cli, scratch, fmt):
    """Unallocated clusters that read as zeros (no backing file, or past the end of a shorter
    one) are compared with the new chain too: its data there must be hidden by zeros."""
    new = scratch / f"new.{fmt}"
    create(new, "", fmt=fmt, size="4M")
    qemu_io(new, "write -P 7 0 4M", fmt=fmt)
    short = scratch / "short.qcow2"
    create(short, "", size="1M")
    qemu_io(short, "write -P 2 0 1M")
    alone = scratch / "alone.qcow2"
    create(alone, "")
    qemu_io(alone, "write -P 1 64k 64k")
    over_short = scratch / "over-short.qcow2"
    create(over_short, "", backing=short, size="4M")
    qemu_io(over_short, "write -P 3 2M 64k")
    for img in (alone, over_short):
        before = content(img, scratch, "before-" + img.stem)
        ok(cli("rebase", "-b", new.name, "-F", fmt, img))
        same(img, before, f"{img.name} after a safe rebase")
        clean(img, "after rebase")
        assert backing_of(img) == (new.name, fmt)
