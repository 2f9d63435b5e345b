#!/usr/bin/env bash
# Side-by-side benchmark of the C library: examples/c/bench.c (requests through libqcow2rs's
# completion callbacks) against `qcow2rs bench` (the Rust path) and `qemu-img bench`, on the
# same image with the same options, alternating between the three tools; best of N.
#
# Usage: scripts/bench-capi.sh       (from anywhere in the repository)
#   BENCH_DIR=/path  where the image goes (default target/bench; must not be tmpfs)
#   BENCH_REPEAT=N   runs per measurement, the best is kept (default 3)
#   BENCH_QUICK=1    tiny request counts: checks that the script works, measures nothing
#
# Rows: 4 KiB reads and writes "spread" over the image (qemu-img bench's step rule with a step
# of 123457 * 4 KiB, as scripts/bench.sh: a pseudo-random order, no offset repeated) at depth
# 32 and depth 1, and 64 KiB sequential reads at depth 32; O_DIRECT (-t none) and io_uring
# (-i io_uring) everywhere, plus one page-cache row. Writes overwrite allocated clusters of
# a copy of the image (no allocation), 64 KiB clusters, 1 GiB image fully written by qemu-io.
# Prints a markdown table (also written to $BENCH_DIR/capi-results.md). About 3 minutes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${BENCH_DIR:-$ROOT/target/bench}
REPEAT=${BENCH_REPEAT:-3}
QUICK=${BENCH_QUICK:-0}

for t in qemu-img qemu-io cc; do
    command -v "$t" >/dev/null || { echo "bench-capi.sh: $t is required" >&2; exit 1; }
done

echo "== building qcow2rs and libqcow2rs (release)" >&2
(cd "$ROOT" && cargo build --release -q -p qcow2-cli -p qcow2-capi)
BIN=$ROOT/target/release/qcow2rs
mkdir -p "$DIR"
CBENCH=$DIR/capi-bench
cc -std=c11 -O2 -Wall -Wextra -Werror -I"$ROOT/include" -o "$CBENCH" "$ROOT/examples/c/bench.c" \
    -L"$ROOT/target/release" -lqcow2rs -lpthread -Wl,-rpath,"$ROOT/target/release"

FSTYPE=$(df --output=fstype "$DIR" | tail -n1)
if [ "$FSTYPE" = tmpfs ] || [ "$FSTYPE" = ramfs ]; then
    echo "bench-capi.sh: $DIR is on $FSTYPE; set BENCH_DIR to a directory on a disk" >&2
    exit 1
fi

IMG=$DIR/capi.qcow2
WIMG=$DIR/capi-w.qcow2
SIZE=$((1 << 30))
if [ ! -s "$IMG" ]; then
    echo "== creating $IMG" >&2
    qemu-img create -q -f qcow2 -o cluster_size=64k "$IMG.tmp" $SIZE
    cmds=()
    for ((off = 0; off < SIZE; off += 64 << 20)); do
        cmds+=(-c "write -q -P $(((off >> 20) % 251 + 1)) $off 64M")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$IMG.tmp"
    mv "$IMG.tmp" "$IMG"
fi
cp "$IMG" "$WIMG"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
STEP=$((123457 * 4096))
if [ "$QUICK" = 1 ]; then
    N32=2000 N1=300 N64=500 W32=1000 W1=200
else
    N32=50000 N1=10000 N64=16384 W32=30000 W1=5000
fi

best() { sort -g | head -n1; }
bench_time() { # tool args... -> seconds (or "fail")
    local out
    if ! out=$("$@" 2>&1); then
        echo "bench-capi.sh: failed: $* : $out" >&2
        echo fail
        return
    fi
    sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p' <<<"$out"
}
ratio() {
    if [[ $1 == fail || $2 == fail ]]; then echo "-"; else
        awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'
    fi
}
rate() {
    [[ $1 == fail ]] && { echo "-"; return; }
    awk -v t="$1" -v n="$2" -v s="$3" 'BEGIN { if (t > 0) printf "%.0f IOPS, %.0f MiB/s", n / t, n * s / t / 1048576; else print "-" }'
}
TABLE=()
row() { # label image count bufsize args...
    local label=$1 img=$2 count=$3 bs=$4
    shift 4
    local q=() r=() c=() i
    echo "== $label" >&2
    for ((i = 0; i < REPEAT; i++)); do
        q+=("$(bench_time qemu-img bench -f qcow2 -c "$count" -s "$bs" "$@" "$img")")
        r+=("$(bench_time "$BIN" bench -f qcow2 -c "$count" -s "$bs" "$@" "$img")")
        c+=("$(bench_time "$CBENCH" -f qcow2 -c "$count" -s "$bs" "$@" "$img")")
    done
    local qb rb cb
    qb=$(printf '%s\n' "${q[@]}" | best)
    rb=$(printf '%s\n' "${r[@]}" | best)
    cb=$(printf '%s\n' "${c[@]}" | best)
    TABLE+=("| $label | \`$*\` | $qb | $rb | $cb | $(ratio "$cb" "$rb") | $(ratio "$cb" "$qb") | $(rate "$cb" "$count" "$bs") |")
}

row "4 KiB spread reads, depth 32, O_DIRECT" "$IMG" $N32 4096 -d 32 -S $STEP -t none -i io_uring
row "4 KiB spread reads, depth 1, O_DIRECT" "$IMG" $N1 4096 -d 1 -S $STEP -t none -i io_uring
row "4 KiB spread writes, depth 32, O_DIRECT" "$WIMG" $W32 4096 -w -d 32 -S $STEP -t none -i io_uring
row "4 KiB spread writes, depth 1, O_DIRECT" "$WIMG" $W1 4096 -w -d 1 -S $STEP -t none -i io_uring
row "64 KiB sequential reads, depth 32, O_DIRECT" "$IMG" $N64 65536 -d 32 -t none -i io_uring
cat "$IMG" >/dev/null
row "4 KiB spread reads, depth 32, page cache" "$IMG" $N32 4096 -d 32 -S $STEP -t writeback -i io_uring
qemu-img check -q "$WIMG" || { echo "bench-capi.sh: the write image does not check clean" >&2; exit 1; }
rm -f "$WIMG"

{
    echo "qcow2rs $("$BIN" --version | awk '{print $3}') vs $(qemu-img --version | head -n1)"
    echo "$(nproc) CPUs, kernel $(uname -r), $FSTYPE on $(df --output=source "$DIR" | tail -n1), best of $REPEAT"
    echo "load average before: $LOAD_START, after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "| workload | options (all three) | qemu-img (s) | qcow2rs bench (s) | C library (s) | C / Rust | C / qemu-img | C library rate |"
    echo "|---|---|---:|---:|---:|---:|---:|---|"
    printf '%s\n' "${TABLE[@]}"
} | tee "$DIR/capi-results.md"
