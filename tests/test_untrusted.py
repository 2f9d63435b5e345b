"""--untrusted: an image may not make us open any other file (backing file, external data file)."""

import pytest


@pytest.mark.parametrize("name,what", [("chain-top", "backing"), ("datafile", "data file"), ("datafile-raw", "data file")])
def test_untrusted_refuses_named_files(matrix, cli, workdir, name, what):
    img = matrix[name]
    for cmd in (["info"], ["map", "--output=json"], ["convert", "-O", "raw"], ["check"]):
        args = [*cmd, "--untrusted", str(img.path)]
        if cmd[0] == "convert":
            args.append(str(workdir / "untrusted-out.raw"))
        cp = cli(*args, cwd=workdir)
        assert cp.returncode != 0, f"{' '.join(cmd)} --untrusted opened {name}: {cp.stdout[:300]}"
        lines = cp.stderr.strip().splitlines()
        assert len(lines) == 1, cp.stderr
        assert what in lines[0] and "refused" in lines[0], lines[0]
        assert str(img.path.name) in lines[0], lines[0]


@pytest.mark.parametrize("name", ["v3", "compressed-zstd", "snapshot"])
def test_untrusted_allows_self_contained_images(matrix, cli, workdir, name):
    img = matrix[name]
    cp = cli("info", "--untrusted", "--output=json", str(img.path), cwd=workdir)
    assert cp.returncode == 0, cp.stderr
