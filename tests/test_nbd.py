"""`qcow2rs serve` (NBD) against the real clients: qemu-img/qemu-io over nbd+unix://, nbdcopy and
nbdinfo (libnbd-bin), python3-libnbd (run with the system /usr/bin/python3), and qemu-nbd as the
reference server. With CI=true, missing tools fail instead of skipping.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from imagematrix import IMAGE_NAMES
from qemu_tools import in_ci, qemu_img, qemu_io, qcow2rs_bin, run

HERE = Path(__file__).resolve().parent
SYS_PY = "/usr/bin/python3"
CLIENT = HERE / "nbd_client.py"
MiB = 1024 * 1024


def require_nbd_tools():
    missing = [t for t in ("nbdinfo", "nbdcopy", "qemu-nbd", "qemu-img", "qemu-io") if shutil.which(t) is None]
    if not missing:
        cp = subprocess.run([SYS_PY, "-c", "import nbd"], capture_output=True)
        if cp.returncode != 0:
            missing.append("python3-libnbd (for /usr/bin/python3)")
    if missing:
        msg = f"missing {', '.join(missing)} (Debian: apt-get install libnbd-bin python3-libnbd qemu-utils)"
        if in_ci():
            pytest.fail(msg + " [CI=true: failing instead of skipping]", pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="module", autouse=True)
def nbd_tools():
    require_nbd_tools()


def uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


def wait_for_socket(sock: Path, proc, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sock.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"server exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"server did not create {sock}")


def wait_for_port(port, proc, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early ({proc.returncode}): {proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"server did not listen on port {port}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`qcow2rs serve -k SOCK ARGS IMAGE` (or qemu-nbd with qemu=True) as a context manager."""

    def __init__(self, image, tmp: Path, *args, qemu=False, name="s", tcp_port=None):
        self.sock = tmp / f"{name}.sock"
        where = ["-b", "127.0.0.1", "-p", str(tcp_port)] if tcp_port else ["-k", self.sock]
        if qemu:
            cmd = ["qemu-nbd", *where, *args, image]
        else:
            cmd = [qcow2rs_bin(), "serve", *where, *args, image]
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            if tcp_port:
                wait_for_port(tcp_port, self.proc)
            else:
                wait_for_socket(self.sock, self.proc)
        except BaseException:
            self.proc.kill()
            raise
        self.uri = f"nbds://localhost:{tcp_port}/" if tcp_port else uri(self.sock)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("server did not stop within the time limit after SIGTERM")
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def client(*args, timeout=120, check=True):
    cp = run([SYS_PY, CLIENT, *args], timeout=timeout)
    if check:
        assert cp.returncode == 0, f"libnbd client {args[0]} failed:\n{cp.stdout}\n{cp.stderr}"
    return cp


def same_files(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


READ_IMAGES = [n for n in IMAGE_NAMES if n != "huge-1t"]


@pytest.mark.parametrize("name", READ_IMAGES)
def test_read_matrix(name, matrix, scratch):
    """qemu-img convert and nbdcopy over our server give the bytes qemu-img convert gives from the file."""
    image = matrix[name]
    ref = scratch / "ref.raw"
    qemu_img("convert", "-O", "raw", image.path, ref)
    with Server(image.path, scratch, "-r", "-t", "-e", "0") as s:
        a = scratch / "via-qemu-img.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", s.uri, a)
        assert same_files(a, ref), "qemu-img convert over NBD differs from the file's content"
        b = scratch / "via-nbdcopy.raw"
        cp = run(["nbdcopy", s.uri, b])
        assert cp.returncode == 0, cp.stderr
        assert same_files(b, ref), "nbdcopy over NBD differs from the file's content"
        assert s.stop() == 0


def nbdinfo_map(u, ctx="base:allocation"):
    cp = run(["nbdinfo", "--json", f"--map={ctx}", u])
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_map_matches_qemu_nbd(name, matrix, scratch):
    """qemu-img map and nbdinfo --map (both contexts) over our server equal those over qemu-nbd."""
    image = matrix[name]
    with Server(image.path, scratch, "-r", "-t", "-e", "0") as ours, Server(
        image.path, scratch, "-r", "-t", "-e", "0", "-f", "qcow2", "-A", qemu=True, name="q"
    ) as ref:
        for ctx in ("base:allocation", "qemu:allocation-depth"):
            assert nbdinfo_map(ours.uri, ctx) == nbdinfo_map(ref.uri, ctx), f"nbdinfo --map={ctx} differs"
        m_ours = json.loads(qemu_img("map", "-f", "raw", "--output=json", ours.uri).stdout)
        m_ref = json.loads(qemu_img("map", "-f", "raw", "--output=json", ref.uri).stdout)
        assert m_ours == m_ref, "qemu-img map over NBD differs"
        ref.stop()
        assert ours.stop() == 0


def fresh(tmp: Path, size=64 * MiB, opts="cluster_size=65536"):
    img = tmp / "img.qcow2"
    mirror = tmp / "mirror.raw"
    qemu_img("create", "-f", "qcow2", "-o", opts, img, str(size))
    with open(mirror, "wb") as f:
        f.truncate(size)
    return img, mirror


def check_and_compare(img: Path, mirror: Path):
    cp = qemu_img("check", img, check=False)
    assert cp.returncode == 0, f"qemu-img check: {cp.stdout}{cp.stderr}"
    cp = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, mirror, check=False)
    assert cp.returncode == 0, f"qemu-img compare: {cp.stdout}{cp.stderr}"


def qemu_io_through(server, cmds):
    """Run qemu-io's commands `cmds` against `server`'s export; each must succeed."""
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    cp = run([*args, server.uri])
    assert cp.returncode == 0 and "failed" not in cp.stdout + cp.stderr, cp.stdout + cp.stderr


def test_writes_cache_unsafe(scratch):
    """--cache=unsafe (flushes acknowledged without reaching the disk, as qemu-nbd's): the
    writes and flushes of a client succeed, and after a clean stop the image is consistent
    and holds them."""
    img, mirror = fresh(scratch)
    cmds = ["write -P 0x11 0 1M", "write -z 2M 128k", "discard 4M 64k", "write -P 0x22 5000000 70000", "flush"]
    with Server(img, scratch, "--cache=unsafe") as s:
        qemu_io_through(s, cmds)
        assert s.stop() == 0
    qemu_io(mirror, *cmds, fmt="raw")
    check_and_compare(img, mirror)


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=32768,extended_l2=on", "compat=0.10"])
def test_writes_qemu_io(opts, scratch):
    img, mirror = fresh(scratch, opts=opts)
    cmds = [
        "write -P 0x11 0 1M",
        "write -P 0x22 4095 10000",
        "write -z 65536 131072",
        "write -z -u 1048576 65536",
        "discard 2097152 131072",
        "write -P 0x33 3000000 70000",
        "write -f -P 0x44 5000000 4096",  # FUA
        "aio_write -P 0x55 8388608 65536",
        "aio_write -P 0x56 8454144 65536",
        "aio_flush",
        "write -P 0x66 67043328 65536",  # the last 64 KiB
        "flush",
    ]
    with Server(img, scratch, "-t") as s:
        qemu_io_through(s, cmds)
        # Past the end: the protocol's error, the server goes on.
        cp = run(["qemu-io", "-f", "raw", "-c", "write 67108864 512", s.uri])
        assert "failed" in cp.stdout + cp.stderr or cp.returncode != 0
        assert s.stop() == 0
    qemu_io(mirror, *cmds, fmt="raw")
    check_and_compare(img, mirror)


def test_libnbd_multiconn(scratch):
    img, mirror = fresh(scratch)
    with Server(img, scratch, "-t", "-e", "8") as s:
        out = client("multiconn", s.uri, mirror, "1")
        assert "ok" in out.stdout
        assert s.stop() == 0
    check_and_compare(img, mirror)


def test_exits_after_last_client(scratch):
    img, _ = fresh(scratch)
    with Server(img, scratch) as s:
        cp = run(["nbdinfo", s.uri])
        assert cp.returncode == 0, cp.stderr
        s.proc.wait(timeout=20)
        assert s.proc.returncode == 0
        assert not s.sock.exists()


def read_opt_reply(f):
    hdr = f.read(20)
    magic, opt, typ, n = struct.unpack(">QIII", hdr)
    assert magic == 0x3E889045565A9
    return typ, f.read(n)


def handshake(sock_path, structured=True):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(sock_path))
    f = s.makefile("rwb")
    assert f.read(18)[:8] == b"NBDMAGIC"
    f.write(struct.pack(">I", 1))
    if structured:
        f.write(struct.pack(">QII", 0x49484156454F5054, 8, 0))
        f.flush()
        assert read_opt_reply(f)[0] == 1
    f.write(struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
    f.flush()
    while True:
        typ, _ = read_opt_reply(f)
        if typ == 1:
            return s, f
        assert typ == 3, f"reply {typ:#x}"


def test_garbage_and_truncated_packets(scratch):
    """Random and truncated packets cost only their own connection: no panic, no hang, the other client works."""
    img, _ = fresh(scratch)
    with Server(img, scratch, "-t", "-e", "0") as s:
        other = subprocess.Popen(
            [SYS_PY, str(CLIENT), "worker", s.uri, "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        rnd = random.Random(5)
        for i in range(60):
            try:
                kind = i % 6
                if kind == 0:  # random bytes instead of a handshake
                    c = socket.socket(socket.AF_UNIX)
                    c.settimeout(5)
                    c.connect(str(s.sock))
                    c.sendall(rnd.randbytes(rnd.randrange(1, 300)))
                    c.close()
                    continue
                c, f = handshake(s.sock, structured=bool(i & 1))
                if kind == 1:  # random request bytes
                    f.write(rnd.randbytes(rnd.randrange(1, 200)))
                elif kind == 2:  # truncated write payload
                    f.write(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 65536) + b"x" * 100)
                elif kind == 3:  # valid magic, random fields (errors are replied, then disconnect)
                    for _ in range(20):
                        flags, typ = rnd.randrange(0, 1 << 16), rnd.randrange(0, 12)
                        if typ == 1:
                            typ = 0
                        f.write(struct.pack(">IHHQQI", 0x25609513, flags, typ, i, rnd.getrandbits(64), rnd.getrandbits(32) & 0xFFFF))
                    f.flush()
                    time.sleep(0.01)
                elif kind == 4:  # past the end and a huge read: error replies, connection kept
                    f.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, 9, 1 << 40, 512))
                    f.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, 10, 0, 64 << 20))
                    f.flush()
                    for cookie in (9, 10):
                        hdr = f.read(4)
                        magic = struct.unpack(">I", hdr)[0]
                        if magic == 0x67446698:
                            err, ck = struct.unpack(">IQ", f.read(12))
                        else:
                            flags, typ, ck, n = struct.unpack(">HHQI", f.read(16))
                            body = f.read(n)
                            err = struct.unpack(">I", body[:4])[0]
                        assert ck == cookie and err in (22, 75), (ck, err)
                else:  # truncated header, then hang up
                    f.write(struct.pack(">IHH", 0x25609513, 0, 0))
                f.flush()
                c.close()
            except (BrokenPipeError, ConnectionResetError):
                pass
        out, err = other.communicate(timeout=60)
        assert other.returncode == 0, f"the other client failed: {out}{err}"
        assert s.proc.poll() is None, "the server died"
        cp = run(["nbdinfo", "--size", s.uri])
        assert cp.returncode == 0 and cp.stdout.strip() == str(64 * MiB)
        assert s.stop() == 0, s.proc.stderr.read()
    cp = qemu_img("check", img, check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def block_data(seed, off, n):
    return random.Random(seed * 1_000_003 + off).randbytes(n)


def test_sigkill_keeps_flushed_writes(scratch):
    img, _ = fresh(scratch, size=32 * MiB)
    journal = scratch / "journal"
    journal.touch()
    with Server(img, scratch, "-t") as s:
        writer = subprocess.Popen([SYS_PY, str(CLIENT), "killwrites", s.uri, str(journal)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        end = time.monotonic() + 20
        while time.monotonic() < end and len(journal.read_text().split()) < 64:
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(timeout=20)
        writer.wait(timeout=30)
    flushed = [int(x) for x in journal.read_text().split()]
    assert len(flushed) >= 64, "too few flushed writes before the kill"
    cp = qemu_img("check", img, check=False)
    # 0: clean, 3: leaked clusters only (allowed after a crash).
    assert cp.returncode in (0, 3), cp.stdout + cp.stderr
    assert "corrupt" not in cp.stdout.lower() or "0 errors" in cp.stdout
    raw = scratch / "after.raw"
    qemu_img("convert", "-O", "raw", img, raw)
    with open(raw, "rb") as f:
        for off in flushed:
            f.seek(off)
            assert f.read(65536) == block_data(1, off, 65536), f"flushed write at {off} lost"


def make_certs(d: Path, cn="localhost", ca="test CA"):
    d.mkdir(parents=True, exist_ok=True)

    def ssl(*a):
        cp = run(["openssl", *a], cwd=d)
        assert cp.returncode == 0, cp.stderr

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", "server-key.pem", "-out", "server.csr")
    (d / "ext.cnf").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "2",
        "-extfile", "ext.cnf", "-out", "server-cert.pem")


def require_openssl():
    """The TLS tests make their certificates with openssl: fail in CI without it, else skip."""
    if shutil.which("openssl") is None:
        if in_ci():
            pytest.fail("openssl not found [CI=true]")
        pytest.skip("openssl not found")


def test_tls(scratch):
    require_openssl()
    img, _ = fresh(scratch)
    qemu_io(img, "write -P 0x77 0 4096")
    creds = scratch / "creds"
    make_certs(creds)
    good = scratch / "client-good"
    good.mkdir()
    shutil.copy(creds / "ca-cert.pem", good / "ca-cert.pem")
    bad = scratch / "client-bad"
    make_certs(bad, ca="another CA")
    for f in ("server-cert.pem", "server-key.pem", "ca-key.pem"):
        (bad / f).unlink()
    want = __import__("hashlib").sha256(b"\x77" * 4096).hexdigest()
    # TCP: libnbd checks the certificate's host name (and so its CA) only for TCP.
    with Server(img, scratch, "-t", "-e", "0", "--tls-creds", creds, tcp_port=free_port()) as s:
        env = dict(os.environ, NBD_TLS_DIR=str(good))
        cp = subprocess.run([SYS_PY, CLIENT, "read", s.uri], capture_output=True, text=True, env=env, timeout=60)
        assert cp.returncode == 0 and cp.stdout.strip() == want, cp.stderr
        # Without TLS: refused, no data.
        plain = s.uri.replace("nbds://", "nbd://")
        cp = subprocess.run([SYS_PY, CLIENT, "read", plain], capture_output=True, text=True, timeout=60)
        assert cp.returncode != 0 and want not in cp.stdout
        # Wrong CA: the client rejects the server's certificate.
        env = dict(os.environ, NBD_TLS_DIR=str(bad))
        cp = subprocess.run([SYS_PY, CLIENT, "read", s.uri], capture_output=True, text=True, env=env, timeout=60)
        assert cp.returncode != 0 and want not in cp.stdout
        assert s.proc.poll() is None
        assert s.stop() == 0


def make_client_cert(d: Path, ca_dir: Path, cn="client"):
    """client-cert.pem and client-key.pem in `d`, signed by the CA of `ca_dir` (libnbd's layout)."""
    d.mkdir(parents=True, exist_ok=True)

    def ssl(*a):
        cp = run(["openssl", *a], cwd=d)
        assert cp.returncode == 0, cp.stderr

    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", "client-key.pem", "-out", "client.csr")
    (d / "cext.cnf").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n")
    ssl("x509", "-req", "-in", "client.csr", "-CA", ca_dir / "ca-cert.pem", "-CAkey", ca_dir / "ca-key.pem",
        "-CAcreateserial", "-days", "2", "-extfile", "cext.cnf", "-out", "client-cert.pem")


def test_tls_client_certificates(scratch):
    """--tls-verify-peer requires a client certificate signed by DIR/ca-cert.pem (libnbd sends
    client-cert.pem/client-key.pem from its certificates folder); without it a certificate is
    optional. (GnuTLS, under libnbd, sends no certificate whose issuer is not among the CAs the
    server names, so the "rogue" client connects as one without a certificate.)"""
    require_openssl()
    img, _ = fresh(scratch)
    qemu_io(img, "write -P 0x77 0 4096")
    creds = scratch / "creds"
    make_certs(creds)
    other = scratch / "other-ca"
    make_certs(other, ca="another CA")
    dirs = {}
    for name, signer in (("good", creds), ("none", None), ("rogue", other)):
        d = scratch / f"client-{name}"
        d.mkdir()
        shutil.copy(creds / "ca-cert.pem", d / "ca-cert.pem")
        if signer:
            make_client_cert(d, signer)
        dirs[name] = d
    want = __import__("hashlib").sha256(b"\x77" * 4096).hexdigest()

    def read(s, name):
        env = dict(os.environ, NBD_TLS_DIR=str(dirs[name]))
        cp = subprocess.run([SYS_PY, CLIENT, "read", s.uri], capture_output=True, text=True, env=env, timeout=60)
        return cp.returncode == 0 and cp.stdout.strip() == want

    for verify, expect in ((True, {"good": True, "none": False, "rogue": False}),
                           (False, {"good": True, "none": True, "rogue": True})):
        extra = ["--tls-verify-peer"] if verify else []
        with Server(img, scratch, "-t", "-e", "0", "--tls-creds", creds, *extra, tcp_port=free_port()) as s:
            got = {name: read(s, name) for name in dirs}
            assert got == expect, f"--tls-verify-peer={verify}: {got}"
            assert s.proc.poll() is None
            assert s.stop() == 0
    # --tls-verify-peer without a CA to verify with: refused at start.
    noca = scratch / "noca"
    noca.mkdir()
    for f in ("server-cert.pem", "server-key.pem"):
        shutil.copy(creds / f, noca / f)
    cp = run([qcow2rs_bin(), "serve", "--tls-creds", noca, "--tls-verify-peer", "-k", scratch / "x.sock", img])
    assert cp.returncode == 1 and "ca-cert.pem" in cp.stderr, cp.stderr


def serve_fork(tmp: Path, *args, name="f"):
    """`qcow2rs serve --fork -k SOCK ARGS`: returns (exit status, socket, pid file)."""
    sock, pid = tmp / f"{name}.sock", tmp / f"{name}.pid"
    # stderr to a file: the background server keeps it open.
    with open(tmp / f"{name}.err", "w") as err:
        cp = subprocess.run(
            [str(qcow2rs_bin()), "serve", "--fork", "-k", str(sock), "--pid-file", str(pid), *map(str, args)],
            stdin=subprocess.DEVNULL,
            stderr=err,
            timeout=60,
        )
    return cp.returncode, sock, pid


def wait_gone(pid: int, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"server {pid} did not exit")


def test_fork(scratch):
    """--fork returns once the socket listens (a client connects right away, no polling); the
    background server exits after its client; a server that cannot start makes it exit 1."""
    img, _ = fresh(scratch, size=4 * MiB)
    qemu_io(img, "write -P 0x5a 0 64k")
    rc, sock, pidf = serve_fork(scratch, img)
    assert rc == 0, (scratch / "f.err").read_text()
    assert sock.exists() and pidf.exists()
    pid = int(pidf.read_text())
    cp = run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 64k", uri(sock)])
    assert cp.returncode == 0 and "failed" not in cp.stdout + cp.stderr, cp.stdout + cp.stderr
    wait_gone(pid)
    assert not sock.exists()
    # A missing image: the error reaches the caller, exit 1, nothing listens.
    rc, sock, _ = serve_fork(scratch, scratch / "missing.qcow2", name="g")
    assert rc == 1
    assert "missing.qcow2" in (scratch / "g.err").read_text()
    assert not sock.exists()


def test_snapshot_overlay(scratch):
    """-s: the client reads and writes, the image is left as it was, no overlay file stays."""
    img, _ = fresh(scratch, size=4 * MiB)
    qemu_io(img, "write -P 0x11 0 1M")
    before = qemu_img("info", "--output=json", img).stdout
    tmp_before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    with Server(img, scratch, "-s", "-t") as s:
        cp = run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x22 4096 8192", "-c", "read -P 0x22 4096 8192",
             "-c", "read -P 0x11 0 4096", s.uri]
        )
        assert cp.returncode == 0 and "failed" not in cp.stdout + cp.stderr, cp.stdout + cp.stderr
        leftover = set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - tmp_before
        assert not [n for n in leftover if n.startswith("qcow2rs-serve-")], leftover
        assert s.stop() == 0
    qemu_io(img, "read -P 0x11 0 1M")
    assert qemu_img("info", "--output=json", img).stdout == before
    assert qemu_img("check", img, check=False).returncode == 0
    cp = run([qcow2rs_bin(), "serve", "-s", "--untrusted", "-k", scratch / "x.sock", img])
    assert cp.returncode == 1 and "--untrusted" in cp.stderr


def test_load_snapshot(scratch):
    """-l exports an internal snapshot read-only (by name, by ID, snapshot.name=); qemu-nbd -l as reference."""
    img, _ = fresh(scratch, size=4 * MiB)
    qemu_io(img, "write -P 0x11 0 64k")
    qemu_img("snapshot", "-c", "first", img)
    qemu_io(img, "write -P 0x22 0 64k", "write -P 0x23 1M 64k")
    for sel in ("first", "1", "snapshot.name=first", "snapshot.id=1"):
        with Server(img, scratch, "-l", sel, "-t") as s, Server(img, scratch, "-l", sel, "-t", qemu=True, name="q") as q:
            info = run(["nbdinfo", "--json", s.uri])
            assert info.returncode == 0, info.stderr
            assert json.loads(info.stdout)["exports"][0]["is_read_only"] is True
            cp = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x11 0 64k", "-c", "read -P 0 1M 64k", s.uri])
            assert cp.returncode == 0 and "failed" not in cp.stdout + cp.stderr, cp.stdout + cp.stderr
            a, b = scratch / "ours.raw", scratch / "ref.raw"
            qemu_img("convert", "-f", "raw", "-O", "raw", s.uri, a)
            qemu_img("convert", "-f", "raw", "-O", "raw", q.uri, b)
            assert same_files(a, b)
            assert nbdinfo_map(s.uri) == nbdinfo_map(q.uri)
            q.stop()
            assert s.stop() == 0
    cp = run([qcow2rs_bin(), "serve", "-l", "nope", "-k", scratch / "x.sock", img])
    assert cp.returncode == 1 and "nope" in cp.stderr


def test_image_opts_description_allocation_depth(scratch):
    """--image-opts, -D (NBD_INFO_DESCRIPTION), -A accepted (the depth context is always there)."""
    img, _ = fresh(scratch, size=4 * MiB)
    qemu_io(img, "write -P 0x11 0 64k")
    spec = f"driver=qcow2,file.filename={img},read-only=on"
    with Server(spec, scratch, "--image-opts", "-D", "a test disk", "-A", "-t") as s:
        cp = run(["nbdinfo", "--json", s.uri])
        assert cp.returncode == 0, cp.stderr
        e = json.loads(cp.stdout)["exports"][0]
        assert e["description"] == "a test disk"
        assert e["is_read_only"] is True
        assert "qemu:allocation-depth" in e["contexts"]
        assert s.stop() == 0
    cp = run([qcow2rs_bin(), "serve", "--image-opts", "-k", scratch / "x.sock", f"driver=qcow2,bogus=1,file={img}"])
    assert cp.returncode == 1 and "bogus" in cp.stderr


def bitmap_image(tmp: Path):
    """A backing file with bitmap 'old', and on top an image with bitmaps of granularity 512,
    64 KiB (the default), 1 MiB and a disabled one, dirtied by qemu-io writes (which mark the
    enabled ones); the virtual size is not a multiple of the granularities."""
    base = tmp / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, str(6 * MiB + 512))
    qemu_img("bitmap", "--add", base, "old")
    qemu_io(base, "write 1M 100k", "write 6143k 1k", "write 6M 512")
    top = tmp / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top, str(10 * MiB + 1536))
    qemu_img("bitmap", "--add", "-g", "512", top, "fine")
    qemu_img("bitmap", "--add", top, "b0")
    qemu_img("bitmap", "--add", "-g", "1M", top, "big")
    qemu_img("bitmap", "--add", top, "off")
    qemu_img("bitmap", "--disable", top, "off")
    qemu_io(top, "write 100k 10k", "write 3M 1", "write 4095k 2k", "write 9000k 1200k", "write 10M 1536",
            "write 5M 64k")
    return top


BITMAP_CTXS = ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:big", "qemu:dirty-bitmap:fine",
               "qemu:dirty-bitmap:off", "qemu:dirty-bitmap:old", "base:allocation"]


@pytest.mark.parametrize("mode", ["-r", "-s"])
def test_dirty_bitmaps_match_qemu_nbd(mode, scratch):
    """-B NAME (several, one from the backing file): the contexts listed, nbdinfo --map, qemu-img
    map with x-dirty-bitmap and libnbd block status over random ranges (with and without REQ_ONE)
    equal qemu-nbd's for the same options."""
    top = bitmap_image(scratch)
    bms = ["-B", "b0", "-B", "big", "-B", "fine", "-B", "off", "-B", "old"]
    with Server(top, scratch, mode, "-t", "-e", "0", *bms) as ours, Server(
        top, scratch, mode, "-t", "-e", "0", "-f", "qcow2", "-A", *bms, qemu=True, name="q"
    ) as ref:
        lists = [json.loads(run(["nbdinfo", "--json", "--list", s.uri]).stdout)["exports"][0]["contexts"] for s in (ours, ref)]
        assert lists[0] == lists[1]
        assert "qemu:dirty-bitmap:old" in lists[0]
        for ctx in BITMAP_CTXS:
            m = nbdinfo_map(ours.uri, ctx)
            assert m == nbdinfo_map(ref.uri, ctx), f"nbdinfo --map={ctx} differs"
        assert any(e["type"] == 1 for e in nbdinfo_map(ours.uri, "qemu:dirty-bitmap:fine"))
        for name in ("b0", "big", "old"):
            maps = []
            for s in (ours, ref):
                spec = f"driver=nbd,server.type=unix,server.path={s.sock},x-dirty-bitmap=qemu:dirty-bitmap:{name}"
                maps.append(json.loads(qemu_img("map", "--output=json", "--image-opts", spec).stdout))
            assert maps[0] == maps[1], f"qemu-img map with x-dirty-bitmap={name} differs"
        got = [json.loads(client("contexts", s.uri, "11", *BITMAP_CTXS).stdout) for s in (ours, ref)]
        assert got[0]["lists"] == got[1]["lists"]
        for a, b in zip(got[0]["status"], got[1]["status"]):
            assert a == b, f"block status of {a[:3]} differs"
        ref.stop()
        assert ours.stop() == 0


def dirty_maps(u):
    return {c: nbdinfo_map(u, c) for c in BITMAP_CTXS}


def test_dirty_bitmap_live_on_writable_export(scratch):
    """-B NAME of the image a writable export writes to: qemu-nbd 10 allows it and its context is
    live (enabled bitmaps show the writes, zeroings and trims made through the export at once;
    the disabled one and the backing file's do not change). Ours equals qemu-nbd (--discard=unmap,
    as our server always performs trims) serving a copy, before and after the same writes, with
    nbdinfo --map, qemu-img map x-dirty-bitmap and libnbd block status; at exit the bitmaps are
    stored in the image, equal to qemu-nbd's."""
    top = bitmap_image(scratch)
    copy = scratch / "ref.qcow2"
    shutil.copy(top, copy)
    bms = ["-B", "b0", "-B", "big", "-B", "fine", "-B", "off", "-B", "old"]
    writes = ["write -P 0x33 2M 3k", "write -z 7M 128k", "discard 8M 1M", "write -P 0x34 10M 100",
              "aio_write -P 0x35 6500k 70k", "aio_flush"]
    with Server(top, scratch, "-t", "-e", "0", *bms) as ours, Server(
        copy, scratch, "-t", "-e", "0", "-f", "qcow2", "--discard=unmap", *bms, qemu=True, name="q"
    ) as ref:
        before = dirty_maps(ours.uri)
        assert before == dirty_maps(ref.uri)
        for s in (ours, ref):
            cp = run(["qemu-io", "-f", "raw", *sum((["-c", w] for w in writes), []), s.uri])
            assert cp.returncode == 0 and "failed" not in cp.stdout + cp.stderr, cp.stdout + cp.stderr
        after = dirty_maps(ours.uri)
        assert after == dirty_maps(ref.uri)
        # The writes show in the enabled bitmaps (2M and 7M were clean), not in the others.
        for ctx in ("qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:fine", "qemu:dirty-bitmap:big"):
            assert after[ctx] != before[ctx], ctx
            for off in (2 * MiB, 7 * MiB):
                assert not any(e["offset"] <= off < e["offset"] + e["length"] and e["type"] == 1 for e in before[ctx])
                assert any(e["offset"] <= off < e["offset"] + e["length"] and e["type"] == 1 for e in after[ctx])
        for ctx in ("qemu:dirty-bitmap:off", "qemu:dirty-bitmap:old"):
            assert after[ctx] == before[ctx], ctx
        for name in ("b0", "fine"):
            maps = []
            for s in (ours, ref):
                spec = f"driver=nbd,server.type=unix,server.path={s.sock},x-dirty-bitmap=qemu:dirty-bitmap:{name}"
                maps.append(json.loads(qemu_img("map", "--output=json", "--image-opts", spec).stdout))
            assert maps[0] == maps[1], f"qemu-img map with x-dirty-bitmap={name} differs"
        got = [json.loads(client("contexts", s.uri, "12", *BITMAP_CTXS).stdout) for s in (ours, ref)]
        for a, b in zip(got[0]["status"], got[1]["status"]):
            assert a == b, f"block status of {a[:3]} differs"
        ref.stop()
        assert ours.stop() == 0
    for img in (top, copy):
        assert qemu_img("check", img, check=False).returncode == 0
    # Stored at exit, not in use: qemu-nbd -r exports the same bits from both files.
    stored = []
    for img, name in ((top, "p"), (copy, "pq")):
        with Server(img, scratch, "-r", "-t", *bms, qemu=True, name=name) as s:
            stored.append(dirty_maps(s.uri))
            s.stop()
    assert stored[0] == stored[1] == after


def test_dirty_bitmap_refusals(scratch):
    """-B: a missing bitmap and an inconsistent (in-use) one are refused at start, with
    qemu-nbd's messages."""
    top = bitmap_image(scratch)
    sock = scratch / "x.sock"
    cp = run([qcow2rs_bin(), "serve", "-r", "-B", "nope", "-k", sock, top])
    assert cp.returncode == 1 and "Bitmap 'nope' is not found" in cp.stderr, cp.stderr
    # A bitmap of the backing file is untouched by writes to the image: allowed, as qemu-nbd.
    with Server(top, scratch, "-B", "old", "-t") as s:
        assert "qemu:dirty-bitmap:old" in json.loads(run(["nbdinfo", "--json", s.uri]).stdout)["exports"][0]["contexts"]
        assert s.stop() == 0
    assert not sock.exists()
    assert qemu_img("check", top, check=False).returncode == 0
    # A write by a process that is then killed leaves the enabled bitmaps in use.
    run(["qemu-io", "-c", "write 0 4k", "-c", "sigraise 9", top])
    assert "in-use" in qemu_img("info", "--output=json", top).stdout
    for args in (["-r"], []):
        cp = run([qcow2rs_bin(), "serve", *args, "-B", "b0", "-k", sock, top])
        ref = run(["qemu-nbd", *args, "-B", "b0", "-k", sock, top])
        assert cp.returncode == ref.returncode == 1, cp.stderr
        assert cp.stderr.split(": ", 1)[1] == ref.stderr.split(": ", 1)[1], (cp.stderr, ref.stderr)
