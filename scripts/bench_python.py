#!/usr/bin/env python3
"""Benchmark of the Python package against the Rust tool, side by side in one run.

Usage (from the repository root, after `make build python`):

    .venv/bin/python scripts/bench_python.py [--quick] [--repeat N] [--dir DIR] [--pyqcow VENV]
                                             [--only TEXT]

Workloads, each run with the Python API and with `qcow2rs bench` / `qcow2rs convert` (the Rust
binary, target/release/qcow2rs) on the same image, alternating, best of N:

- 4 KiB reads spread over the image (the offsets of scripts/bench.sh: step 123457 * 4 KiB), page
  cache warm: Python `preadinto` from 1 and 4 threads, and from asyncio at 32 in flight, against
  `qcow2rs bench -s 4k` at depth 1, 4 and 32;
- 1 MiB sequential reads of the whole image: 1 and 4 threads and asyncio at 8 in flight against
  `qcow2rs bench -s 1M` at the same depths;
- `shutil.copyfileobj(img.fileobj(), file)` into a raw file against `qcow2rs convert -O raw`
  (both end with the data on disk: fsync / fdatasync);
- pyqcow (libqcow-python), if `--pyqcow VENV` names a venv where it is installed: 4 KiB spread
  reads and 1 MiB sequential reads from one thread (it has no asyncio API and is not
  thread-safe).

Besides the best wall time of each side, the table gives the CPU time per request (user +
system, all threads: the Python process itself, the `qcow2rs` child process with its start-up),
the least of the runs: on a machine shared with other work it varies much less than wall time.
`--only TEXT` runs only the rows whose label contains TEXT (e.g. `--only asyncio`).

The image (1 GiB, 64 KiB clusters, every cluster written, half random, half text) is made once
with qcow2rs in DIR (default target/bench/python) and reused.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import qcow2rs

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "qcow2rs"
SIZE = 1 << 30
STEP = 123457 * 4096
KiB, MiB = 1 << 10, 1 << 20


def make_image(path: Path) -> None:
    if path.exists() and path.stat().st_size > SIZE // 2:
        return
    print(f"== creating {path}", file=sys.stderr)
    line = b"qcow2rs benchmark data: the quick brown fox jumps over the lazy dog %08d\n"
    chunk = bytearray()
    for i in range(8 * MiB // 8192):
        chunk += os.urandom(4096)
        chunk += b"".join(line % (i * 64 + j) for j in range(64))[:4096].ljust(4096, b".")
    qcow2rs.create(path, SIZE)
    with qcow2rs.open(path, "r+") as img:
        for off in range(0, SIZE, len(chunk)):
            img.pwrite(chunk, off)


def offsets(count: int, bs: int, step: int) -> list[int]:
    """qemu-img bench's sequence (request_offset in qcow2-cli/src/bench.rs)."""
    m = SIZE - bs
    return [0] + [(k * step) % m for k in range(1, count)]


def rust_bench(img: Path, count: int, bs: int, step: int, depth: int) -> float:
    out = subprocess.run(
        [BIN, "bench", "-c", str(count), "-d", str(depth), "-s", str(bs), "-S", str(step),
         "-t", "writeback", "-i", "io_uring", img],
        capture_output=True, text=True, check=True,
    ).stdout
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    assert m, out
    return float(m.group(1))


def py_threads(img: qcow2rs.Image, offs: list[int], bs: int, threads: int) -> float:
    # Buffers are made before the clock starts, as the Rust bench's are.
    bufs = [bytearray(bs) for _ in range(threads)]

    def work(t: int) -> None:
        buf = bufs[t]
        pi = img.preadinto
        for off in offs[t::threads]:
            pi(buf, off)

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def py_asyncio(path: Path, offs: list[int], bs: int, depth: int) -> float:
    async def main() -> float:
        async with qcow2rs.aio.open(path) as img:

            bufs = [bytearray(bs) for _ in range(depth)]

            async def work(t: int) -> None:
                buf = bufs[t]
                pi = img.preadinto
                for off in offs[t::depth]:
                    await pi(buf, off)

            t0 = time.perf_counter()
            await asyncio.gather(*(work(t) for t in range(depth)))
            return time.perf_counter() - t0

    return asyncio.run(main())


PYQCOW = r"""
import sys, time, pyqcow
path, bs, offs = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.stdin.read().split()]
f = pyqcow.file()
f.open(path)
read = f.read_buffer_at_offset
t0 = time.perf_counter()
for off in offs:
    read(bs, off)
print(time.perf_counter() - t0)
f.close()
"""


def pyqcow_run(venv: Path, img: Path, offs: list[int], bs: int) -> float:
    out = subprocess.run(
        [venv / "bin" / "python", "-c", PYQCOW, img, str(bs)],
        input=" ".join(map(str, offs)), capture_output=True, text=True, check=True,
    ).stdout
    return float(out.strip())


def copy_python(img_path: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    with qcow2rs.open(img_path) as img, img.fileobj() as src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out)
        out.flush()
        os.fsync(out.fileno())
    t = time.perf_counter() - t0
    dst.unlink()
    return t


def convert_rust(img_path: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([BIN, "convert", "-O", "raw", img_path, dst], check=True)
    t = time.perf_counter() - t0
    dst.unlink()
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny counts: checks the script, measures nothing")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=ROOT / "target" / "bench" / "python")
    ap.add_argument("--pyqcow", type=Path, help="a venv with libqcow-python installed")
    ap.add_argument("--only", help="run only the rows whose label contains this text (e.g. asyncio)")
    a = ap.parse_args()
    if not BIN.is_file():
        print(f"{BIN} missing: run `make build`", file=sys.stderr)
        return 1
    a.dir.mkdir(parents=True, exist_ok=True)
    img = a.dir / "plain.qcow2"
    make_image(img)
    with open(img, "rb") as f:  # warm the page cache
        while f.read(8 * MiB):
            pass
    n4 = 4000 if a.quick else 200_000
    n1 = 64 if a.quick else 1024
    offs4 = offsets(n4, 4 * KiB, STEP)
    offs1 = offsets(n1, MiB, MiB)
    load0 = os.getloadavg()
    rows: list[tuple[str, str, float, float, str, float, float, int, int]] = []

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def pair(label: str, py_label: str, py_fn, rust_label: str, rust_fn, count: int, bs: int) -> None:
        """Best wall time of each side, and the least CPU time (all threads; for the other
        side the child process, start-up included) of any of its runs."""
        if a.only and a.only not in label:
            return
        print(f"== {label}", file=sys.stderr)
        py_t, rs_t, py_c, rs_c = [], [], [], []
        for _ in range(a.repeat):
            c0 = children_cpu()
            rs_t.append(rust_fn())
            rs_c.append(children_cpu() - c0)
            c0 = time.process_time()
            py_t.append(py_fn())
            py_c.append(time.process_time() - c0)
        rows.append((label, py_label, min(py_t), min(py_c), rust_label, min(rs_t), min(rs_c), count, bs))

    with qcow2rs.open(img) as im:
        for threads, depth in ((1, 1), (4, 4)):
            pair(f"4 KiB spread, {threads} thread{'s' if threads > 1 else ''}", f"preadinto, {threads} threads",
                 lambda: py_threads(im, offs4, 4 * KiB, threads), f"bench -d {depth}",
                 lambda: rust_bench(img, n4, 4 * KiB, STEP, depth), n4, 4 * KiB)
        pair("4 KiB spread, asyncio 32 in flight", "aio preadinto, 32 tasks",
             lambda: py_asyncio(img, offs4, 4 * KiB, 32), "bench -d 32",
             lambda: rust_bench(img, n4, 4 * KiB, STEP, 32), n4, 4 * KiB)
        for threads in (1, 4):
            pair(f"1 MiB sequential, {threads} thread{'s' if threads > 1 else ''}", f"preadinto, {threads} threads",
                 lambda: py_threads(im, offs1, MiB, threads), f"bench -d {threads}",
                 lambda: rust_bench(img, n1, MiB, MiB, threads), n1, MiB)
        pair("1 MiB sequential, asyncio 8 in flight", "aio preadinto, 8 tasks",
             lambda: py_asyncio(img, offs1, MiB, 8), "bench -d 8",
             lambda: rust_bench(img, n1, MiB, MiB, 8), n1, MiB)
    pair("whole image to a raw file", "shutil.copyfileobj(img.fileobj(), f)",
         lambda: copy_python(img, a.dir / "copy.raw"), "convert -O raw",
         lambda: convert_rust(img, a.dir / "convert.raw"), 1, SIZE)
    if a.pyqcow:
        pair("pyqcow: 4 KiB spread, 1 thread", "pyqcow read_buffer_at_offset",
             lambda: pyqcow_run(a.pyqcow, img, offs4, 4 * KiB), "qcow2rs preadinto, 1 thread",
             lambda: py_threads_open(img, offs4, 4 * KiB, 1), n4, 4 * KiB)
        pair("pyqcow: 1 MiB sequential, 1 thread", "pyqcow read_buffer_at_offset",
             lambda: pyqcow_run(a.pyqcow, img, offs1, MiB), "qcow2rs preadinto, 1 thread",
             lambda: py_threads_open(img, offs1, MiB, 1), n1, MiB)
    load1 = os.getloadavg()

    print(f"qcow2rs {qcow2rs.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"best of {a.repeat}, page cache warm")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load0)}, "
          f"after: {' '.join(f'{x:.2f}' for x in load1)}")
    print()
    print("| workload | Python | s | other | s | Python / other (rate) | Python rate "
          "| CPU µs per request: Python | other |")
    print("|---|---|---:|---|---:|---:|---|---:|---:|")
    for label, pl, pt, pc, rl, rt, rc, count, bs in rows:
        rate = f"{count / pt:.0f} IOPS, {count * bs / pt / MiB:.0f} MiB/s" if count > 1 else f"{bs / pt / MiB:.0f} MiB/s"
        cpu = "| - | - |" if label.startswith("pyqcow") else f"| {pc / count * 1e6:.2f} | {rc / count * 1e6:.2f} |"
        print(f"| {label} | {pl} | {pt:.3f} | {rl} | {rt:.3f} | {rt / pt:.2f} | {rate} {cpu}")
    return 0


def py_threads_open(path: Path, offs: list[int], bs: int, threads: int) -> float:
    with qcow2rs.open(path) as img:
        return py_threads(img, offs, bs, threads)


if __name__ == "__main__":
    sys.exit(main())
