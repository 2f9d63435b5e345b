"""Hostile images: qcow2rs must fail cleanly, never panic or hang.

For every case in CASES and every command, the rule is one of
  FAIL     the command must fail: non-zero exit, exactly one line on stderr naming the file and
           containing one of the case's keywords, no panic, done within TIMEOUT seconds;
  ANY      qemu-img succeeds here (e.g. `info` reads only the header), so success is allowed;
           a failure must follow the FAIL rules;
  CORRUPT  the image opens but its metadata is damaged: `check` must report corruption (exit 2,
           as `qemu-img check`), without panic or hang.
Commands are given `-f qcow2` (as with qemu-img) so that no format probing is involved.
Images are built by hostile.py (byte surgery on small qemu-img images).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

import pytest

import hostile

TIMEOUT = 20
FAIL, ANY, CORRUPT = "fail", "any", "corrupt"


@dataclass(frozen=True)
class Case:
    keywords: tuple  # the error line must contain one of these (case-insensitive)
    info: str = FAIL
    convert: str = FAIL
    check: str = FAIL
    info_chain: str | None = None  # rule for `info --backing-chain` (None: not run)
    names: tuple = ()  # other file names the error line may name instead of the image's


CASES = {
    "truncated-header": Case(("header", "truncat", "short", "end of file", "eof")),
    "truncated-l1": Case(("l1", "truncat", "end of file", "eof", "short"), info=ANY, check=CORRUPT),
    "garbage": Case(("magic", "not a qcow2", "qcow2 format")),
    "bad-magic": Case(("magic", "not a qcow2", "qcow2 format")),
    "bad-version": Case(("version",)),
    "cluster-bits-30": Case(("cluster",)),
    "cluster-bits-8": Case(("cluster",)),
    "l1-size-huge": Case(("l1",)),
    "l1-offset-unaligned": Case(("l1",)),
    "refcount-table-unaligned": Case(("refcount", "reference count")),
    "refcount-table-clusters-huge": Case(("refcount", "reference count")),
    "l2-entry-past-eof": Case(("l2", "end of file", "eof", "past the end", "beyond"), info=ANY, check=CORRUPT),
    "l2-entry-unaligned": Case(("l2", "align"), info=ANY, check=CORRUPT),
    "backing-loop": Case(("loop", "cycle", "circular", "recurs"), info=ANY, info_chain=FAIL, names=("loop-b.qcow2",)),
    "backing-self-loop": Case(("loop", "cycle", "circular", "recurs"), info=ANY, info_chain=FAIL),
    "backing-missing": Case(
        ("backing", "no such file", "not found"), info=ANY, info_chain=FAIL, names=("gone-base.qcow2",)
    ),
    "unknown-incompatible-bit": Case(("feature", "incompatible")),
    "named-unknown-feature": Case(("frobnicate",)),  # the name from the feature name table
    "encrypted": Case(("encrypt",), info=ANY),
    "backing-offset-outside-cluster0": Case(("backing",)),
    "header-length-not-multiple-of-8": Case(("header",)),  # qemu-img accepts this one; the spec does not
}
assert CASES.keys() == hostile.BUILDERS.keys()

COMMANDS = ["info", "info-chain", "convert", "check"]


def rule(case: Case, command: str):
    return {"info": case.info, "info-chain": case.info_chain, "convert": case.convert, "check": case.check}[command]


PARAMS = [
    pytest.param(name, cmd, id=f"{name}-{cmd}") for name in CASES for cmd in COMMANDS if rule(CASES[name], cmd)
]


@pytest.fixture(scope="module")
def hostile_images(qemu, tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    cache = {}

    def get(name):
        if name not in cache:
            sub = d / name
            sub.mkdir()
            cache[name] = hostile.BUILDERS[name](sub)
        return cache[name]

    return get


def argv(command, path, scratch):
    return {
        "info": ["info", "-f", "qcow2", path],
        "info-chain": ["info", "--backing-chain", "-f", "qcow2", path],
        "convert": ["convert", "-f", "qcow2", "-O", "raw", path, scratch / "out.raw"],
        "check": ["check", "-f", "qcow2", path],
    }[command]


@pytest.mark.parametrize("name,command", PARAMS)
def test_bad_input(name, command, hostile_images, qcow2rs, scratch):
    case = CASES[name]
    expect = rule(case, command)
    path = hostile_images(name)
    args = [str(a) for a in [qcow2rs, *argv(command, path, scratch)]]
    try:
        cp = subprocess.run(
            args, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=TIMEOUT,
            cwd=scratch,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args[1:])}: no result within {TIMEOUT}s (hang?)")

    stderr, rc = cp.stderr, cp.returncode
    assert "panicked" not in stderr and "RUST_BACKTRACE" not in stderr, f"panic:\n{stderr}"
    assert rc >= 0, f"killed by signal {-rc}\n{stderr}"

    if expect == CORRUPT:
        assert rc == 2, f"check must report corruption (exit 2), got {rc}:\n{stderr[-2000:]}"
        return
    if expect == ANY and rc == 0:
        return
    assert rc != 0, f"expected a failure, got exit 0\nstdout: {cp.stdout[:500]}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr[-2000:]}"
    line = lines[0]
    names = (path.name, *case.names)
    assert any(n in line for n in names), f"error line does not name the file ({' or '.join(names)}): {line!r}"
    assert any(k.lower() in line.lower() for k in case.keywords), (
        f"error line mentions none of {case.keywords}: {line!r}"
    )
