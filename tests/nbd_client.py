"""libnbd client programs for tests/test_nbd.py.

Run with the SYSTEM python (/usr/bin/python3): Debian's python3-libnbd is installed for it, not for
the test venv. Usage: /usr/bin/python3 nbd_client.py COMMAND ARGS...

  multiconn URI MIRROR SEED   several connections (multi-conn), many requests in flight on each;
                              every change also applied to the raw file MIRROR; reads checked
  worker URI SECONDS          write/read/verify in a loop for SECONDS (the "other client")
  killwrites URI JOURNAL      write unique blocks forever, flushing every 16 writes; after each
                              flush, append the flushed blocks to JOURNAL (one "offset seed" line)
  read URI                    connect (TLS per the env), read 4 KiB, print its sha256
  contexts URI SEED CTX...    print (JSON) the LIST_META_CONTEXT answers to a few queries, then
                              block status of each CTX over random ranges (some with REQ_ONE)
"""

import hashlib
import os
import random
import sys
import time

import nbd

BLOCK = 64 * 1024


def connect(uri, tls_dir=None):
    h = nbd.NBD()
    if tls_dir:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(tls_dir)
    else:
        h.set_tls(nbd.TLS_DISABLE)
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def wait_all(handles, cookies):
    # cookies: list of (handle, cookie)
    pending = list(cookies)
    while pending:
        still = []
        for h, c in pending:
            if h.aio_command_completed(c):
                continue
            still.append((h, c))
        pending = still
        if pending:
            for h in handles:
                if h.aio_in_flight() > 0:
                    h.poll(0)
            time.sleep(0)


def block_data(seed, off, n):
    r = random.Random(seed * 1_000_003 + off)
    return r.randbytes(n)


def multiconn(uri, mirror, seed):
    rnd = random.Random(int(seed))
    conns = [connect(uri) for _ in range(4)]
    for h in conns:
        assert h.can_multi_conn(), "server does not advertise multi-conn"
    size = conns[0].get_size()
    nblocks = size // BLOCK
    fd = os.open(mirror, os.O_RDWR)
    try:
        for rnd_no in range(6):
            # One round: each block at most once, so concurrent requests never overlap.
            blocks = rnd.sample(range(nblocks), min(nblocks, 96))
            cookies = []
            bufs = []
            for i, b in enumerate(blocks):
                h = conns[i % len(conns)]
                kind = rnd.random()
                start = b * BLOCK + rnd.randrange(0, BLOCK // 2)
                n = rnd.randrange(1, BLOCK // 2)
                if kind < 0.7:
                    data = rnd.randbytes(n)
                    buf = nbd.Buffer.from_bytearray(bytearray(data))
                    bufs.append(buf)
                    flags = nbd.CMD_FLAG_FUA if rnd.random() < 0.1 else 0
                    cookies.append((h, h.aio_pwrite(buf, start, flags=flags)))
                    os.pwrite(fd, data, start)
                elif kind < 0.85:
                    flags = nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0
                    cookies.append((h, h.aio_zero(n, start, flags=flags)))
                    os.pwrite(fd, bytes(n), start)
                else:
                    # Whole aligned block: trimmed clusters read as zeros on this server.
                    cookies.append((h, h.aio_trim(BLOCK, b * BLOCK)))
                    os.pwrite(fd, bytes(BLOCK), b * BLOCK)
            wait_all(conns, cookies)
            # A flush on one connection covers the writes of all (multi-conn).
            conns[rnd_no % len(conns)].flush()
        # Read everything back over different connections.
        for i in range(0, size, 4 * BLOCK):
            h = conns[(i // BLOCK) % len(conns)]
            n = min(4 * BLOCK, size - i)
            got = h.pread(n, i)
            want = os.pread(fd, n, i)
            assert got == want, f"read back differs at {i}"
    finally:
        os.close(fd)
    for h in conns:
        h.shutdown()
    print("ok")


def worker(uri, seconds):
    h = connect(uri)
    size = h.get_size()
    end = time.monotonic() + float(seconds)
    rnd = random.Random(7)
    n = 0
    while time.monotonic() < end:
        off = rnd.randrange(0, size // 4096) * 4096
        data = rnd.randbytes(4096)
        h.pwrite(data, off)
        assert h.pread(4096, off) == data, f"read back differs at {off}"
        n += 1
    h.flush()
    h.shutdown()
    print(f"ok {n}")


def killwrites(uri, journal):
    h = connect(uri)
    size = h.get_size()
    nblocks = size // BLOCK
    order = list(range(nblocks))
    random.Random(3).shuffle(order)
    pending = []
    with open(journal, "a") as j:
        for i, b in enumerate(order):
            off = b * BLOCK
            h.pwrite(block_data(1, off, BLOCK), off)
            pending.append(off)
            if len(pending) == 16:
                h.flush()
                for o in pending:
                    j.write(f"{o}\n")
                j.flush()
                os.fsync(j.fileno())
                pending = []
    print("done")


def read(uri):
    tls_dir = os.environ.get("NBD_TLS_DIR")
    h = connect(uri, tls_dir)
    data = h.pread(4096, 0)
    print(hashlib.sha256(data).hexdigest())
    h.shutdown()


def contexts(uri, seed, *ctxs):
    import json

    out = {"lists": [], "status": []}
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    for queries in ([], ["qemu:dirty-bitmap:"], ["qemu:"], ["base:"], list(ctxs), ["qemu:dirty-bitmap:nope"]):
        h.clear_meta_contexts()
        for q in queries:
            h.add_meta_context(q)
        got = []
        h.opt_list_meta_context(lambda name, got=got: got.append(name) or 0)
        out["lists"].append([queries, got])
    h.clear_meta_contexts()
    for c in ctxs:
        h.add_meta_context(c)
    h.opt_go()
    for c in ctxs:
        assert h.can_meta_context(c), f"{c} not negotiated"
    size = h.get_size()
    rnd = random.Random(int(seed))
    for i in range(300):
        off = rnd.randrange(0, size)
        n = rnd.randrange(1, min(size - off, 8 << 20) + 1)
        flags = nbd.CMD_FLAG_REQ_ONE if i % 3 == 0 else 0
        got = []
        h.block_status(n, off, lambda ctx, o, entries, err, got=got: got.append([ctx, o, list(entries)]) or 0, flags)
        got.sort()
        out["status"].append([off, n, flags, got])
    h.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"multiconn": multiconn, "worker": worker, "killwrites": killwrites, "read": read, "contexts": contexts}[cmd](*args)
