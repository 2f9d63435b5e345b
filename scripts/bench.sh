#!/usr/bin/env bash
# Side-by-side read benchmark: qcow2rs vs qemu-img (bench and convert).
#
# Usage: scripts/bench.sh            (from anywhere in the repository)
#   BENCH_DIR=/path  put the images there (default target/bench; must not be tmpfs)
#   BENCH_QUICK=1    tiny request counts (a smoke test of the script, not a measurement)
#   BENCH_REPEAT=N   run every measurement N times and keep the best (default 3)
#
# What it does:
# 1. builds qcow2rs in release mode;
# 2. creates (once, then reuses) a 1 GiB qcow2 image with 64 KiB clusters, fully written
#    with qemu-io from a data file that is about half random and half text (so it
#    compresses about 2:1), and a compressed copy made with `qemu-img convert -c`;
# 3. runs `qcow2rs bench` and `qemu-img bench` with the same options:
#    - 4 KiB reads "spread" over the image at depth 32 and depth 1. qemu-img bench is
#      sequential-with-step, so a large step that is an odd number of 4 KiB blocks
#      (123457 * 4 KiB, coprime with the wrap modulus 2^18 - 1 blocks) visits the image
#      in a pseudo-random order without repeating an offset within a run;
#    - 64 KiB sequential reads at depth 32 (the whole image);
#    each with -t none (O_DIRECT) and -t writeback, engine io_uring (-i io_uring; qemu-img
#    supports it here), plus a threads-engine row and a compressed-image row;
# 4. times `qcow2rs convert -O raw` against `qemu-img convert -O raw` for the plain and the
#    compressed image, with a cold source (page cache dropped, when permitted) and a warm
#    one (the source read into the page cache first); the output file is new every time.
#    Times include a final `sync`: qemu-img convert's default destination cache mode is
#    "unsafe" (no flush), qcow2rs flushes its output, so only the time until the data is
#    on disk compares like with like;
# 5. prints a markdown table (also written to $BENCH_DIR/results.md).
# The whole run takes about 3-5 minutes on a 2-core machine.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${BENCH_DIR:-$ROOT/target/bench}
REPEAT=${BENCH_REPEAT:-3}
QUICK=${BENCH_QUICK:-0}

for t in qemu-img qemu-io python3; do
    command -v "$t" >/dev/null || { echo "bench.sh: $t is required" >&2; exit 1; }
done

echo "== building qcow2rs (release)" >&2
(cd "$ROOT" && cargo build --release -q -p qcow2-cli)
BIN=$ROOT/target/release/qcow2rs

mkdir -p "$DIR"
FSTYPE=$(df --output=fstype "$DIR" | tail -n1)
if [ "$FSTYPE" = tmpfs ] || [ "$FSTYPE" = ramfs ]; then
    echo "bench.sh: $DIR is on $FSTYPE; set BENCH_DIR to a directory on a disk" >&2
    exit 1
fi

PLAIN=$DIR/plain.qcow2
COMP=$DIR/compressed.qcow2
SIZE=$((1 << 30))

if [ ! -s "$PLAIN" ] || [ ! -s "$COMP" ]; then
    echo "== creating the images in $DIR" >&2
    python3 - "$DIR/data.bin" <<'EOF'
import os, sys
# 64 MiB: alternating 4 KiB of random bytes and 4 KiB of text (~2:1 compressible).
line = b"qcow2rs benchmark data: the quick brown fox jumps over the lazy dog %08d\n"
with open(sys.argv[1], "wb") as f:
    for i in range(64 * 1024 * 1024 // 8192):
        f.write(os.urandom(4096))
        text = b"".join(line % (i * 64 + j) for j in range(64))
        f.write(text[:4096].ljust(4096, b"."))
EOF
    rm -f "$PLAIN" "$COMP"
    qemu-img create -q -f qcow2 -o cluster_size=64k "$PLAIN" $SIZE
    cmds=()
    for ((off = 0; off < SIZE; off += 64 << 20)); do
        cmds+=(-c "write -q -s $DIR/data.bin $off 64M")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$PLAIN"
    qemu-img convert -c -f qcow2 -O qcow2 -o cluster_size=64k "$PLAIN" "$COMP"
    rm -f "$DIR/data.bin"
fi

# Try to start from a cold page cache (works only with the privilege to do so).
DROP=no
drop_caches() {
    sync
    if echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then DROP=yes; fi
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
STEP=$((123457 * 4096))
if [ "$QUICK" = 1 ]; then
    C4_32=2000 C4_1=500 C64=1000
else
    C4_32=50000 C4_1=10000 C64=16384
fi

TABLE=()
best() { # best (smallest) of the numbers on stdin
    sort -g | head -n1
}
bench_time() { # tool args... -> seconds (or "fail")
    local out
    if ! out=$("$@" 2>&1); then
        echo "bench.sh: failed: $* : $out" >&2
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
rate() { # seconds count bytes -> "N IOPS, M MiB/s" of the faster run
    [[ $1 == fail ]] && { echo "-"; return; }
    awk -v t="$1" -v n="$2" -v s="$3" 'BEGIN { if (t > 0) printf "%.0f IOPS, %.0f MiB/s", n / t, n * s / t / 1048576; else print "-" }'
}
row() { # label image count bufsize args...
    local label=$1 img=$2 count=$3 bs=$4
    shift 4
    local q=() r=() i
    echo "== bench: $label" >&2
    for ((i = 0; i < REPEAT; i++)); do
        q+=("$(bench_time qemu-img bench -f qcow2 -c "$count" -s "$bs" "$@" "$img")")
        r+=("$(bench_time "$BIN" bench -f qcow2 -c "$count" -s "$bs" "$@" "$img")")
    done
    local qb rb
    qb=$(printf '%s\n' "${q[@]}" | best)
    rb=$(printf '%s\n' "${r[@]}" | best)
    TABLE+=("| $label | \`$*\` | $qb | $rb | $(ratio "$rb" "$qb") | $(rate "$rb" "$count" "$bs") |")
}

# The page-cache rows measure reads from a warm cache.
cat "$PLAIN" "$COMP" >/dev/null
row "4 KiB spread, depth 32, O_DIRECT" "$PLAIN" $C4_32 4096 -d 32 -S $STEP -t none -i io_uring
row "4 KiB spread, depth 32, page cache" "$PLAIN" $C4_32 4096 -d 32 -S $STEP -t writeback -i io_uring
row "4 KiB spread, depth 1, O_DIRECT" "$PLAIN" $C4_1 4096 -d 1 -S $STEP -t none -i io_uring
row "4 KiB spread, depth 1, page cache" "$PLAIN" $C4_32 4096 -d 1 -S $STEP -t writeback -i io_uring
row "64 KiB sequential, depth 32, O_DIRECT" "$PLAIN" $C64 65536 -d 32 -t none -i io_uring
row "64 KiB sequential, depth 32, page cache" "$PLAIN" $C64 65536 -d 32 -t writeback -i io_uring
row "4 KiB spread, depth 32, O_DIRECT, threads" "$PLAIN" $C4_32 4096 -d 32 -S $STEP -t none -i threads
row "64 KiB sequential, depth 32, compressed, page cache" "$COMP" $C64 65536 -d 32 -t writeback -i io_uring

# Write side. Allocating writes go to a new empty image each run; overwrites to a copy of
# the plain image.
wrow() { # label count bufsize args...   (bench -w on a fresh empty 1 GiB image)
    local label=$1 count=$2 bs=$3
    shift 3
    local q=() r=() i tool t
    echo "== bench -w: $label" >&2
    for ((i = 0; i < REPEAT; i++)); do
        for tool in qemu-img "$BIN"; do
            rm -f "$DIR/w.qcow2"
            qemu-img create -q -f qcow2 -o cluster_size=64k "$DIR/w.qcow2" $SIZE
            t=$(bench_time "$tool" bench -w -f qcow2 -c "$count" -s "$bs" "$@" "$DIR/w.qcow2")
            qemu-img check -q "$DIR/w.qcow2" || { echo "bench.sh: $tool left a bad image" >&2; t=fail; }
            if [ "$tool" = qemu-img ]; then q+=("$t"); else r+=("$t"); fi
        done
    done
    rm -f "$DIR/w.qcow2"
    local qb rb
    qb=$(printf '%s\n' "${q[@]}" | best)
    rb=$(printf '%s\n' "${r[@]}" | best)
    TABLE+=("| $label | \`-w $*\` | $qb | $rb | $(ratio "$rb" "$qb") | $(rate "$rb" "$count" "$bs") |")
}
if [ "$QUICK" = 1 ]; then CW=2000; else CW=16384; fi
wrow "4 KiB allocating writes, a new cluster each, depth 32, O_DIRECT" $CW 4096 -d 32 -S 65536 -t none -i io_uring
wrow "4 KiB allocating writes, 8 per cluster, depth 32, O_DIRECT" $((CW * 3)) 4096 -d 32 -S 8192 -t none -i io_uring
cp "$PLAIN" "$DIR/over.qcow2"
row "64 KiB overwrites, depth 32, O_DIRECT" "$DIR/over.qcow2" $C64 65536 -w -d 32 -t none -i io_uring
rm -f "$DIR/over.qcow2"

CTABLE=()
convert_time() { # tool args... -> "total exit" seconds: total includes a final `sync`
    local t0 t1 t2
    t0=$(date +%s.%N)
    if ! "$@" >/dev/null 2>&1; then
        echo "fail fail"
        return
    fi
    t1=$(date +%s.%N)
    sync
    t2=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { printf "%.3f %.3f", c - a, b - a }'
}
convert_row() { # label src
    local label=$1 src=$2 out=$DIR/out.raw i mode tool
    for mode in cold warm; do
        local q=() r=() qe=()
        echo "== convert ($mode source): $label" >&2
        for ((i = 0; i < REPEAT; i++)); do
            for tool in qemu-img "$BIN"; do
                rm -f "$out"
                if [ $mode = cold ]; then
                    drop_caches
                else
                    cat "$src" >/dev/null # source in the page cache
                    sync
                fi
                local t
                t=$(convert_time "$tool" convert -f qcow2 -O raw "$src" "$out")
                if [ "$tool" = qemu-img ]; then
                    q+=("${t% *}")
                    qe+=("${t#* }")
                else
                    r+=("${t% *}")
                fi
            done
        done
        rm -f "$out"
        local qb rb qeb
        qb=$(printf '%s\n' "${q[@]}" | best)
        qeb=$(printf '%s\n' "${qe[@]}" | best)
        rb=$(printf '%s\n' "${r[@]}" | best)
        CTABLE+=("| $label | $mode | $qb ($qeb) | $rb | $(ratio "$rb" "$qb") |")
    done
}
if [ "$QUICK" != 1 ]; then
    convert_row "convert -O raw, plain 1 GiB" "$PLAIN"
    convert_row "convert -O raw, compressed 1 GiB" "$COMP"
fi

# convert from raw to qcow2: plain, and compressed with zlib and with zstd (warm source).
RAW=$DIR/source.raw
[ -s "$RAW" ] || qemu-img convert -f qcow2 -O raw "$PLAIN" "$RAW"
WTABLE=()
to_qcow2_row() { # label extra-args...
    local label=$1
    shift
    local q=() r=() i tool t out=$DIR/out.qcow2
    echo "== convert raw -> qcow2: $label" >&2
    for ((i = 0; i < REPEAT; i++)); do
        for tool in qemu-img "$BIN"; do
            rm -f "$out"
            cat "$RAW" >/dev/null
            t=$(convert_time "$tool" convert -f raw -O qcow2 "$@" "$RAW" "$out")
            qemu-img compare -q -f raw "$RAW" "$out" || { echo "bench.sh: $tool output differs" >&2; t="fail fail"; }
            if [ "$tool" = qemu-img ]; then q+=("${t% *}"); else r+=("${t% *}"); fi
        done
    done
    rm -f "$out"
    local qb rb
    qb=$(printf '%s\n' "${q[@]}" | best)
    rb=$(printf '%s\n' "${r[@]}" | best)
    WTABLE+=("| $label | \`$*\` | $qb | $rb | $(ratio "$rb" "$qb") |")
}
if [ "$QUICK" != 1 ]; then
    to_qcow2_row "raw -> qcow2"
    to_qcow2_row "raw -> qcow2, compressed, zlib" -c
    to_qcow2_row "raw -> qcow2, compressed, zstd" -c -o compression_type=zstd
fi

{
    echo "qcow2rs $("$BIN" --version | awk '{print $3}') vs $(qemu-img --version | head -n1)"
    echo "$(nproc) CPUs, kernel $(uname -r), $FSTYPE on $(df --output=source "$DIR" | tail -n1), best of $REPEAT, page cache dropped for cold runs: $DROP"
    echo "load average before: $LOAD_START, after: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine makes timings noisy)"
    if grep -q PLACEHOLDER "$ROOT/qcow2-core/src/io/uring.rs" 2>/dev/null; then
        echo "NOTE: the io_uring engine is still a placeholder"
    fi
    echo
    echo "| workload | options (both tools) | qemu-img (s) | qcow2rs (s) | qcow2rs / qemu-img | qcow2rs rate |"
    echo "|---|---|---:|---:|---:|---|"
    printf '%s\n' "${TABLE[@]}"
    if [ ${#CTABLE[@]} -gt 0 ]; then
        echo
        echo "Convert times include a final \`sync\` (qemu-img's default destination cache is"
        echo "\"unsafe\": it exits before its output is on disk; its time to exit is in parentheses)."
        echo
        echo "| convert | source cache | qemu-img (s) | qcow2rs (s) | qcow2rs / qemu-img |"
        echo "|---|---|---:|---:|---:|"
        printf '%s\n' "${CTABLE[@]}"
    fi
    if [ ${#WTABLE[@]} -gt 0 ]; then
        echo
        echo "| convert from raw (warm source, times include \`sync\`) | options | qemu-img (s) | qcow2rs (s) | qcow2rs / qemu-img |"
        echo "|---|---|---:|---:|---:|"
        printf '%s\n' "${WTABLE[@]}"
    fi
} | tee "$DIR/results.md"
