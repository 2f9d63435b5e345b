#!/usr/bin/env python3
"""Scaling table of issue 9: `qcow2rs bench` beside `qemu-img bench` as the work grows.

Usage (from the repository root, after `cargo build --release`):

    python3 scripts/bench_scaling.py [--dir DIR] [--repeat N] [--quick] [--only TEXT]

Every row runs both tools on the same image with the same options, alternating, best of N
(default 3) by wall time; CPU (user + system) and peak RSS come from /usr/bin/time (GNU), the
least of the runs. Rows:

- cores: 4 KiB reads spread over a 1 GiB image at depth 32, page cache and O_DIRECT, under
  `taskset -c 0` and `taskset -c 0,1`;
- depth: 4 KiB spread reads, O_DIRECT, depth 1, 8, 32 and 128;
- 1 TiB sparse image: 4 KiB written every 16 MiB over the whole TiB (2048 L2 tables, 128 MiB of
  L2 metadata with 64 KiB clusters), then 4 KiB reads spread over it, page cache, depth 32, with
  a metadata cache of 1 MiB, the default (32 MiB for both tools) and 256 MiB (everything fits).
  qemu-img gets `l2-cache-size` through `--image-opts`, qcow2rs `--cache-size` (its cache holds
  L2 tables and refcount blocks together);
- backing chains of 1, 4 and 16 images (the data in the base, empty overlays above it), 4 KiB
  spread reads through the chain, page cache, depth 32.

Images live in DIR (default target/bench/scaling, which must not be tmpfs for the O_DIRECT
rows) and are made once with qemu-img and reused. The table is printed as Markdown; ratios are
qcow2rs / qemu-img, so below 1 means qcow2rs is faster or smaller.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("QCOW2RS_BIN", ROOT / "target" / "release" / "qcow2rs"))
GiB = 1 << 30
# Offsets as in scripts/bench.sh: a large step, taken modulo the image size by both tools.
SPREAD = "505679872"
TIME = "/usr/bin/time"


def sh(*args: str) -> None:
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL)


def make_images(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    imgs = {"1g": d / "1g.qcow2", "1t": d / "1t.qcow2"}
    if not imgs["1g"].exists():
        print("== creating 1 GiB image", file=sys.stderr)
        tmp = d / "1g.tmp"
        sh("qemu-img", "create", "-q", "-f", "qcow2", tmp, "1G")
        sh("qemu-img", "bench", "-w", "-q", "-c", "16384", "-s", "64k", "-d", "32", "--pattern=165", tmp)
        tmp.rename(imgs["1g"])
    if not imgs["1t"].exists():
        print("== creating 1 TiB sparse image (65536 writes)", file=sys.stderr)
        tmp = d / "1t.tmp"
        sh("qemu-img", "create", "-q", "-f", "qcow2", tmp, "1T")
        sh("qemu-img", "bench", "-w", "-q", "-c", "65536", "-s", "4k", "-S", "16M", "-d", "32", "--pattern=90", tmp)
        tmp.rename(imgs["1t"])
    for n in (4, 16):
        top = d / f"chain{n}.qcow2"
        imgs[f"chain{n}"] = top
        if top.exists():
            continue
        prev = imgs["1g"]
        for i in range(1, n):
            cur = d / (f"chain{n}.qcow2" if i == n - 1 else f"chain{n}-{i}.qcow2")
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", prev.name, "-F", "qcow2", cur)
            prev = cur
    imgs["chain1"] = imgs["1g"]
    return imgs


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS in KiB of one run."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        cp = subprocess.run([TIME, "-o", tf.name, "-f", "%e %U %S %M", *cmd],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if cp.returncode != 0:
            raise SystemExit(f"failed ({cp.returncode}): {' '.join(cmd)}\n{cp.stderr}")
        wall, user, system, rss = tf.read().split()[-4:]
    return float(wall), float(user) + float(system), int(rss)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=ROOT / "target" / "bench" / "scaling")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer requests per row")
    ap.add_argument("--only", default="", help="run only the rows whose label contains this")
    a = ap.parse_args()
    for tool in ("qemu-img", TIME, "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed")
    if not BIN.exists():
        raise SystemExit(f"{BIN} not found: run `cargo build --release` first")
    imgs = make_images(a.dir)
    div = 4 if a.quick else 1
    ncpu = os.cpu_count() or 1
    rows: list[tuple[str, str, list[str], list[str], int]] = []

    def row(label: str, opts: str, common: list[str], img: Path, count: int, *,
            cpus: str | None = None, qemu_opts: list[str] | None = None, ours_opts: list[str] | None = None,
            qemu_image: str | None = None) -> None:
        if a.only not in label:
            return
        pre = ["taskset", "-c", cpus] if cpus else []
        c = ["-c", str(count // div)]
        q = pre + ["qemu-img", "bench", *c, *common, *(qemu_opts or []), qemu_image or str(img)]
        o = pre + [str(BIN), "bench", *c, *common, *(ours_opts or []), str(img)]
        rows.append((label, opts, q, o, count // div))

    spread = ["-s", "4k", "-S", SPREAD]
    for cpus in ("0", "0,1"):
        if len(cpus.split(",")) > ncpu:
            continue
        n = len(cpus.split(","))
        row(f"1 GiB, 4 KiB spread, depth 32, page cache, {n} core(s)", f"taskset -c {cpus}; -d 32 -t writeback",
            [*spread, "-d", "32", "-t", "writeback", "-i", "io_uring"], imgs["1g"], 200000, cpus=cpus)
        row(f"1 GiB, 4 KiB spread, depth 32, O_DIRECT, {n} core(s)", f"taskset -c {cpus}; -d 32 -t none",
            [*spread, "-d", "32", "-t", "none", "-i", "io_uring"], imgs["1g"], 40000, cpus=cpus)
    for depth in (1, 8, 32, 128):
        row(f"1 GiB, 4 KiB spread, O_DIRECT, depth {depth}", f"-d {depth} -t none",
            [*spread, "-d", str(depth), "-t", "none", "-i", "io_uring"], imgs["1g"], 10000 if depth == 1 else 40000)
    big = imgs["1t"]
    for label, size in (("1 MiB", "1M"), ("default (32 MiB)", None), ("256 MiB", "256M")):
        # A step of 1.5 GiB + 192 KiB (qemu-img takes at most 2 GiB - 1) moves three L2 tables
        # on at every request; the offsets wrap modulo 1 TiB, as qemu-img bench does, and
        # land on other tables at each pass.
        common = ["-s", "4k", "-S", str(3 * GiB // 2 + 3 * 65536), "-d", "32", "-t", "writeback", "-i", "io_uring"]
        if size is None:
            row(f"1 TiB sparse, 4 KiB spread over all of it, metadata cache {label}", "-d 32 -t writeback",
                common, big, 100000)
        else:
            spec = f"driver=qcow2,file.driver=file,file.filename={big},l2-cache-size={size}"
            row(f"1 TiB sparse, 4 KiB spread over all of it, metadata cache {label}", "-d 32 -t writeback",
                common, big, 100000, qemu_opts=["--image-opts"], ours_opts=["--cache-size", size],
                qemu_image=spec)
    for n in (1, 4, 16):
        row(f"backing chain of {n}, 4 KiB spread, page cache, depth 32", "-d 32 -t writeback",
            [*spread, "-d", "32", "-t", "writeback", "-i", "io_uring"], imgs[f"chain{n}"], 200000)

    ver = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    print(f"qcow2rs vs {ver}; {ncpu} CPUs; best of {a.repeat}; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| workload | options (both tools) | requests | qemu-img (s) | qcow2rs (s) | wall ratio | "
          "qemu-img CPU (s) | qcow2rs CPU (s) | CPU ratio | qemu-img peak RSS (MiB) | qcow2rs peak RSS (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, opts, q, o, count in rows:
        best = {"q": [1e9, 1e9, 1 << 62], "o": [1e9, 1e9, 1 << 62]}
        for _ in range(a.repeat):
            for k, cmd in (("q", q), ("o", o)):
                w, c, r = timed(cmd)
                b = best[k]
                b[0], b[1], b[2] = min(b[0], w), min(b[1], c), min(b[2], r)
        (qw, qc, qr), (ow, oc, orss) = best["q"], best["o"]
        print(f"| {label} | `{opts}` | {count} | {qw:.3f} | {ow:.3f} | {ow / qw:.2f} | {qc:.3f} | {oc:.3f} | "
              f"{oc / max(qc, 1e-3):.2f} | {qr / 1024:.1f} | {orss / 1024:.1f} |", flush=True)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
