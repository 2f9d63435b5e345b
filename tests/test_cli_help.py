"""The command line's own surface (issue 10, "the rest of the surface"): every command's --help is
generated from the definitions that parse it, `help CMD` is `CMD --help`, shell completions and the
man page come from the same definitions, and a bad option is one line on stderr with exit 1 (as
qemu-img; clap's own default would be 2). qemu-img's spellings keep working."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from interop import qemu_img

# Every command with the options its --help must list (short or long spelling, as defined).
COMMANDS = {
    "info": ["--format", "--output", "--backing-chain", "--force-share", "--untrusted"],
    "map": ["--format", "--output", "--force-share"],
    "check": ["--format", "--output", "--repair", "--quiet", "--force-share"],
    "compare": ["--a-format", "--b-format", "--strict", "--quiet", "--force-share"],
    "convert": ["--format", "--target-format", "--options", "--backing", "--backing-format", "--compress",
                "--progress", "--parallel", "--cache", "-W", "-n", "-l", "-S", "--target-is-zero", "--aio"],
    "create": ["--format", "--options", "--backing", "--backing-format", "--unsafe", "--quiet"],
    "resize": ["--format", "--shrink", "--quiet"],
    "rebase": ["--format", "--backing", "--backing-format", "-u", "--progress", "--cache", "--backing-cache"],
    "commit": ["--format", "--base", "--drop", "--progress", "--cache"],
    "amend": ["--format", "--options", "--force", "--quiet"],
    "measure": ["--format", "--target-format", "--options", "--size", "--snapshot", "--output"],
    "snapshot": ["--list", "--create", "--apply", "--delete", "--force-share"],
    "bitmap": ["--add", "--remove", "--clear", "--enable", "--disable", "--merge", "--granularity",
               "--source-file", "--source-format"],
    "dd": ["--format", "--target-format", "if=", "of=", "bs=", "count=", "skip="],
    "dump": ["--format", "--output"],
    "bench": ["-c", "-d", "-s", "-S", "-t", "-w", "--pattern", "--flush-interval", "--cache-size"],
    "serve": ["--socket", "--read-only", "--export-name", "--tls-creds"],
    "completions": ["SHELL"],
}


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_help_lists_the_options(cmd, cli):
    for flag in ("--help", "-h"):
        cp = cli(cmd, flag)
        assert cp.returncode == 0, cp.stderr
        assert cp.stdout.startswith(f"usage: qcow2rs {cmd} "), cp.stdout
        assert cp.stderr == ""
        for opt in COMMANDS[cmd]:
            assert opt in cp.stdout, (cmd, opt, cp.stdout)
    assert cli("help", cmd).stdout == cp.stdout


def test_top_help_lists_every_command(cli):
    cp = cli("--help")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("usage: qcow2rs")
    for cmd in COMMANDS:
        assert f"\n  {cmd} " in cp.stdout, cmd
    assert "manpage" not in cp.stdout, "the man page writer is hidden"
    assert cli("help").stdout == cp.stdout
    nothing = cli()
    assert nothing.returncode == 1 and nothing.stdout == "" and "usage: qcow2rs" in nothing.stderr
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("qcow2rs version ")


@pytest.mark.parametrize(
    "argv",
    [
        ["info", "--bogus", "x"],
        ["info", "-z", "x"],
        ["convert", "-O"],
        ["info", "--backing-chain=yes", "x"],
        ["check", "--output"],
        ["bitmap", "--add=x", "img", "b"],
        ["completions", "tcsh"],
        ["completions"],
        ["no-such-command"],
        ["help", "no-such-command"],
        ["serve", "--bogus", "x"],
        ["serve", "-k"],
        ["serve", "--cache=bogus", "x"],
        ["serve", "--fork=yes", "x"],
        ["serve", "-k", "s", "-p", "1", "x"],
        ["serve", "x", "y"],
        ["serve"],
    ],
    ids=lambda a: " ".join(a),
)
def test_bad_arguments_exit_1_with_one_line(argv, cli, scratch):
    cp = cli(*argv, cwd=scratch)
    assert cp.returncode == 1, (cp.returncode, cp.stderr)
    assert cp.stdout == ""
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcow2rs: "), cp.stderr
    assert list(scratch.iterdir()) == [], "nothing may be created"
    if argv[-1] == "no-such-command":
        assert cp.stderr.startswith("qcow2rs: unknown command 'no-such-command'"), cp.stderr


def test_bad_option_exits_1_like_qemu_img(qemu, cli, scratch):
    img = scratch / "x.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", img, "1M").returncode == 0
    for cmd in ("info", "check", "map", "snapshot", "create", "resize", "convert"):
        ref = qemu_img(cmd, "--bogus-option", img)
        ours = cli(cmd, "--bogus-option", img)
        assert ref.returncode == ours.returncode == 1, (cmd, ours.stderr, ref.stderr)
        assert "--bogus-option" in ours.stderr, ours.stderr


def test_qemu_img_spellings(qemu, cli, scratch):
    """-ffmt, --output json, -o lists repeated, grouped flags, options after operands."""
    img = scratch / "a.qcow2"
    cp = cli("create", "-fqcow2", "-o", "cluster_size=4k", "-q", img, "-o", "lazy_refcounts=on", "1M")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == ""
    info = cli("info", img, "--output", "json", "-fqcow2")
    assert info.returncode == 0, info.stderr
    assert '"cluster-size": 4096' in info.stdout
    assert '"lazy-refcounts": true' in info.stdout
    out = scratch / "b.raw"
    cp = cli("convert", "-pq", "-Oraw", img, out)
    assert cp.returncode == 0 and cp.stdout == "" and cp.stderr == "", cp.stderr
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", img, out).returncode == 0
    # A negative size operand is a size, not an option.
    cp = cli("resize", "--shrink", "-q", img, "-512k")
    assert cp.returncode == 0, cp.stderr
    assert '"virtual-size": 524288' in cli("info", "--output=json", img).stdout
    # The last of a repeated option wins, as with getopt.
    assert cli("info", "-f", "raw", "-f", "qcow2", img).returncode == 0


def test_completions(cli, scratch):
    for shell in ("bash", "zsh", "fish"):
        cp = cli("completions", shell)
        assert cp.returncode == 0, cp.stderr
        for cmd in ("info", "convert", "bitmap", "serve"):
            assert cmd in cp.stdout, (shell, cmd)
        assert "target-is-zero" in cp.stdout, shell
    script = scratch / "qcow2rs.bash"
    script.write_text(cli("completions", "bash").stdout)
    if shutil.which("bash"):
        # The script loads, and completes a command name and an option.
        probe = (
            f"source {script}; COMP_WORDS=(qcow2rs con); COMP_CWORD=1; _qcow2rs qcow2rs con qcow2rs; "
            'echo "${COMPREPLY[@]}"; '
            "COMP_WORDS=(qcow2rs convert --target-i); COMP_CWORD=2; _qcow2rs qcow2rs --target-i convert; "
            'echo "${COMPREPLY[@]}"'
        )
        cp = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, cp.stderr
        first, second = cp.stdout.splitlines()
        assert "convert" in first.split(), cp.stdout
        assert second.split() == ["--target-is-zero"], cp.stdout


def test_man_page(cli, scratch):
    cp = cli("manpage")
    assert cp.returncode == 0, cp.stderr
    page = cp.stdout
    assert page.count(".TH ") == 1
    for cmd in COMMANDS:
        if cmd != "completions":
            assert f'.SH "COMMAND: {cmd.upper()}"' in page, cmd
    assert "target\\-is\\-zero" in page
    if shutil.which("groff"):
        r = subprocess.run(["groff", "-man", "-Tutf8", "-ww"], input=page, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stderr == "", r.stderr
        text = re.sub(r".\x08", "", r.stdout)  # overstrike bold and underline
        assert "COMMAND: CONVERT" in text and "--target-is-zero" in text, text
    cp = cli("manpage", scratch / "man")
    assert cp.returncode == 0, cp.stderr
    names = sorted(p.name for p in (scratch / "man").iterdir())
    assert "qcow2rs.1" in names and "qcow2rs-convert.1" in names and "qcow2rs-serve.1" in names
