#!/usr/bin/env python3
"""The floor of the Python rows of bench_python.py: the same loops with no qcow2 and no qcow2rs
(`os.preadv` on a raw copy of the bench image: from 4 threads; inside coroutines at 32 in
flight, the cheapest asyncio loop there is; `loop.run_in_executor` with 4 threads for 1 MiB),
beside qcow2rs's Python rows and `qcow2rs bench` on the qcow2 image, alternating, best of N.

Usage (from the repository root, after `make build python` and one run of bench_python.py,
which makes the image): .venv/bin/python scripts/bench_python_floor.py [N]
"""
import asyncio, os, sys, threading, time, subprocess
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_python as bp
import qcow2rs
img = bp.ROOT / "target" / "bench" / "python" / "plain.qcow2"
raw = bp.ROOT / "target" / "bench" / "python" / "floor.raw"
if not raw.exists():
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True)
for f in (img, raw):  # both in the page cache, as bench_python.py's rows assume
    with open(f, "rb") as fh:
        while fh.read(1 << 24):
            pass
KiB, MiB = 1024, 1 << 20
n4 = 200000
offs4 = bp.offsets(n4, 4 * KiB, bp.STEP)
offs1 = [i * MiB for i in range(1024)]

def os_threads(offs, bs, threads):
    fd = os.open(raw, os.O_RDONLY)
    bufs = [bytearray(bs) for _ in range(threads)]
    def work(t):
        buf = bufs[t]; p = os.preadv
        for off in offs[t::threads]:
            p(fd, [buf], off)
    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for t in ts: t.start()
    for t in ts: t.join()
    dt = time.perf_counter() - t0
    os.close(fd); return dt

def os_asyncio(offs, bs, depth):
    async def main():
        fd = os.open(raw, os.O_RDONLY)
        async def rd(buf, off):
            return os.preadv(fd, [buf], off)
        bufs = [bytearray(bs) for _ in range(depth)]
        async def work(t):
            buf = bufs[t]
            for off in offs[t::depth]:
                await rd(buf, off)
        t0 = time.perf_counter()
        await asyncio.gather(*(work(t) for t in range(depth)))
        dt = time.perf_counter() - t0
        os.close(fd); return dt
    return asyncio.run(main())

def os_executor(offs, bs, depth):
    import concurrent.futures as cf
    async def main():
        fd = os.open(raw, os.O_RDONLY)
        loop = asyncio.get_running_loop()
        ex = cf.ThreadPoolExecutor(4)
        bufs = [bytearray(bs) for _ in range(depth)]
        async def work(t):
            buf = bufs[t]
            for off in offs[t::depth]:
                await loop.run_in_executor(ex, os.preadv, fd, [buf], off)
        t0 = time.perf_counter()
        await asyncio.gather(*(work(t) for t in range(depth)))
        dt = time.perf_counter() - t0
        ex.shutdown(); os.close(fd); return dt
    return asyncio.run(main())

def best(f, r=3):
    return min(f() for _ in range(r))

def ours_threads(offs, bs, threads):
    with qcow2rs.open(img) as im:
        return bp.py_threads(im, offs, bs, threads)

rows = [
    ("4K 4 threads", lambda: os_threads(offs4, 4 * KiB, 4), lambda: ours_threads(offs4, 4 * KiB, 4), lambda: bp.rust_bench(img, n4, 4 * KiB, bp.STEP, 4)),
    ("4K asyncio 32", lambda: os_asyncio(offs4, 4 * KiB, 32), lambda: bp.py_asyncio(img, offs4, 4 * KiB, 32), lambda: bp.rust_bench(img, n4, 4 * KiB, bp.STEP, 32)),
    ("1M 4 threads", lambda: os_threads(offs1, MiB, 4), lambda: ours_threads(offs1, MiB, 4), lambda: bp.rust_bench(img, 1024, MiB, MiB, 4)),
    ("1M asyncio 8 executor(4)", lambda: os_executor(offs1, MiB, 8), lambda: bp.py_asyncio(img, offs1, MiB, 8), lambda: bp.rust_bench(img, 1024, MiB, MiB, 8)),
]
R = int(sys.argv[1]) if len(sys.argv) > 1 else 3
for label, fl, ours, rust in rows:
    t = {"floor": [], "ours": [], "rust": []}
    for _ in range(R):
        t["floor"].append(fl()); t["ours"].append(ours()); t["rust"].append(rust())
    f, o, r = (min(t[k]) for k in ("floor", "ours", "rust"))
    print(f"{label:26s} rust/os.preadv-on-raw {r/f:.2f}   rust/qcow2rs-python {r/o:.2f}   os/ours {f/o:.2f}", flush=True)
