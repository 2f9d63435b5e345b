#!/usr/bin/env bash
# Side-by-side read benchmark: qcow2rs vs qemu-img (bench and convert).
#
# Usage: scripts/bench.sh            (from anywhere in the repository)
#   BENCH_MODE=device  (default) images on a disk, O_DIRECT and page-cache rows, cold converts
#   BENCH_MODE=cpu     CPU-bound: images on tmpfs (default /dev/shm/qcow2rs-bench), page-cache rows
#                      only (tmpfs has no O_DIRECT), warm converts: measures the CPU cost of the
#                      format and of the engine, not the disk
#   BENCH_DIR=/path  put the images there (default target/bench; device mode refuses tmpfs)
#   BENCH_QUICK=1    tiny request counts (a smoke test of the script, not a measurement)
#   BENCH_REPEAT=N   run every measurement N times and keep the best (default 3)
#   BENCH_ONLY=REGEX run only the rows whose label matches (grep -E)
#   BENCH_QCOW2RS=/path/to/qcow2rs  measure that binary instead of building one
#
# Every row gives wall time and CPU time (task-clock from `perf stat` when it works here, else
# user+sys from /usr/bin/time) for both tools; CPU time is much less disturbed by other work on
# a shared machine than wall time. fio rows are the physical limits: reads of the raw copy of
# the image, and in CPU-bound mode writes on tmpfs (overwrites of a copy of it with the
# overwrite row's requests, and a new 1 GiB file written in 2 MiB pieces, the floor of the
# converts' output); each is set beside the rows it is the limit of (fio is installed with
# apt-get when missing and permitted; else the rows are skipped).
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
#    supports it here), plus a threads-engine row and a compressed-image row; then writes:
#    4 KiB allocating writes on a fresh empty image (one per new cluster, and 8 per new
#    cluster; run only these with BENCH_ONLY=allocating) and 64 KiB overwrites;
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
MODE=${BENCH_MODE:-device}
case $MODE in
device) DIR=${BENCH_DIR:-$ROOT/target/bench} ;;
cpu) DIR=${BENCH_DIR:-/dev/shm/qcow2rs-bench} ;;
*)
    echo "bench.sh: BENCH_MODE must be device or cpu" >&2
    exit 1
    ;;
esac
REPEAT=${BENCH_REPEAT:-3}
QUICK=${BENCH_QUICK:-0}
ONLY=${BENCH_ONLY:-}
want() { [ -z "$ONLY" ] || grep -Eq -- "$ONLY" <<<"$1"; }

for t in qemu-img qemu-io python3; do
    command -v "$t" >/dev/null || { echo "bench.sh: $t is required" >&2; exit 1; }
done

if [ -n "${BENCH_QCOW2RS:-}" ]; then
    BIN=$BENCH_QCOW2RS
else
    echo "== building qcow2rs (release)" >&2
    (cd "$ROOT" && cargo build --release -q -p qcow2-cli)
    BIN=$ROOT/target/release/qcow2rs
fi

# CPU time of a command: perf stat's task-clock (and context switches) when perf works here,
# else user+sys of /usr/bin/time, else nothing.
if perf stat -x, -e task-clock,context-switches -o /dev/null true 2>/dev/null; then
    CPUTOOL=perf
elif [ -x /usr/bin/time ]; then
    CPUTOOL=time
else
    CPUTOOL=none
fi
CPUFILE=$(mktemp)
trap 'rm -f "$CPUFILE"' EXIT
timed() { # command... ; runs it, leaves "cpu_seconds context_switches" in $CPUFILE
    case $CPUTOOL in
    perf)
        local rc=0
        perf stat -x, -e task-clock,context-switches -o "$CPUFILE.raw" "$@" || rc=$?
        awk -F, '$3 == "task-clock" { cpu = $1 / 1000 } $3 == "context-switches" { cs = $1 }
                 END { printf "%.3f %s\n", cpu, cs }' "$CPUFILE.raw" >"$CPUFILE"
        rm -f "$CPUFILE.raw"
        return $rc
        ;;
    time)
        local rc=0
        /usr/bin/time -o "$CPUFILE.raw" -f "%U %S %c %w" "$@" || rc=$?
        awk '{ printf "%.3f %d\n", $1 + $2, $3 + $4 }' "$CPUFILE.raw" >"$CPUFILE"
        rm -f "$CPUFILE.raw"
        return $rc
        ;;
    *)
        echo "- -" >"$CPUFILE"
        "$@"
        ;;
    esac
}

mkdir -p "$DIR"
FSTYPE=$(df --output=fstype "$DIR" | tail -n1)
if [ "$MODE" = device ] && { [ "$FSTYPE" = tmpfs ] || [ "$FSTYPE" = ramfs ]; }; then
    echo "bench.sh: $DIR is on $FSTYPE; set BENCH_DIR to a directory on a disk (or BENCH_MODE=cpu)" >&2
    exit 1
fi
if [ "$MODE" = cpu ] && [ "$FSTYPE" != tmpfs ] && [ "$FSTYPE" != ramfs ]; then
    echo "bench.sh: note: BENCH_MODE=cpu with $DIR on $FSTYPE (not tmpfs): reads come from the page cache" >&2
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

# A measurement is "wall cpu switches" (seconds, seconds, count) or "fail".
TABLE=()
best() { # measurements on stdin -> smallest wall, smallest CPU, fewest switches
    awk '$1 != "fail" { n++; if (n == 1 || $1 < w) w = $1; if (n == 1 || $2 < c) c = $2; if (n == 1 || $3 < s) s = $3 }
         END { if (n) print w, c, s; else print "fail" }'
}
bench_time() { # tool args... -> measurement
    local out
    if ! out=$(timed "$@" 2>&1); then
        echo "bench.sh: failed: $* : $out" >&2
        echo fail
        return
    fi
    echo "$(sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p' <<<"$out") $(cat "$CPUFILE")"
}
wall() { echo "${1%% *}"; }
cpu() { # measurement -> CPU seconds
    [[ $1 == fail ]] && { echo "-"; return; }
    awk '{ print $2 }' <<<"$1"
}
switches() { # measurement count -> context switches per request
    [[ $1 == fail ]] && { echo "-"; return; }
    awk -v n="$2" '{ if ($3 == "-" || n == 0) print "-"; else printf "%.2f", $3 / n }' <<<"$1"
}
ratio() { # a b -> a / b
    if [[ $1 == fail || $2 == fail || $1 == - || $2 == - ]]; then echo "-"; else
        awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'
    fi
}
rate() { # seconds count bytes -> "N IOPS, M MiB/s" of the faster run
    [[ $1 == fail ]] && { echo "-"; return; }
    awk -v t="$1" -v n="$2" -v s="$3" 'BEGIN { if (t > 0) printf "%.0f IOPS, %.0f MiB/s", n / t, n * s / t / 1048576; else print "-" }'
}
cells() { # qemu-measurement ours-measurement count -> the common table cells
    local q=$1 r=$2 n=$3 qw rw
    qw=$(wall "$q")
    rw=$(wall "$r")
    echo "$qw | $rw | $(ratio "$rw" "$qw") | $(cpu "$q") | $(cpu "$r") | $(ratio "$(cpu "$r")" "$(cpu "$q")") | $(switches "$q" "$n") / $(switches "$r" "$n")"
}
row() { # label image count bufsize args...
    local label=$1 img=$2 count=$3 bs=$4
    shift 4
    want "$label" || return 0
    local q=() r=() i
    echo "== bench: $label" >&2
    for ((i = 0; i < REPEAT; i++)); do
        q+=("$(bench_time qemu-img bench -f qcow2 -c "$count" -s "$bs" "$@" "$img")")
        r+=("$(bench_time "$BIN" bench -f qcow2 -c "$count" -s "$bs" "$@" "$img")")
    done
    local qb rb
    qb=$(printf '%s\n' "${q[@]}" | best)
    rb=$(printf '%s\n' "${r[@]}" | best)
    measured "$label" "$qb" "$rb"
    TABLE+=("| $label | \`$*\` | $(cells "$qb" "$rb" "$count") | $(rate "$(wall "$rb")" "$count" "$bs") |")
}

# fio: the physical limit of a row (no format at all). Read rows read the raw copy of the
# image; write rows overwrite a copy of it, or write a new file (as a convert does).
RAW=$DIR/source.raw
FIOTABLE=()
have_fio() {
    command -v fio >/dev/null && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing fio (apt-get)" >&2
        apt-get install -y -q fio >/dev/null 2>&1 || true
    fi
    command -v fio >/dev/null
}
# The rows of ours a fio row is the floor of, with the results of both tools: "qemu-img-wall
# qemu-img-cpu qcow2rs-wall qcow2rs-cpu" by row label (convert rows: "label, cold|warm").
declare -A MEASURED
measured() { # label qemu-measurement ours-measurement
    MEASURED[$1]="$(wall "$2") $(cpu "$2") $(wall "$3") $(cpu "$3")"
}
FIOROWS=()
fio_row() { # label compared-rows(';'-separated) file(ro|over|new) count size fio-args...
    local label=$1 compared=$2 file=$3 count=$4 bs=$5
    shift 5
    want "$label" || return 0
    echo "== fio: $label" >&2
    local m=() i out f=$DIR/fio.raw args=()
    case $file in
    ro) f=$RAW args=(--readonly) ;;
    over) cp "$RAW" "$f" ;;
    new) args=(--fallocate=none) ;;
    esac
    # fio spends about 0.1 s of CPU starting (it calibrates its clock), and its job's own
    # CPU figures leave out io_uring's io-wq workers: the CPU of a row is the task-clock of
    # the whole run less that of the same command with one request (the smallest of each).
    local base=() nb
    for ((i = 0; i < REPEAT; i++)); do
        for nb in "$bs" ""; do
            [ "$file" = new ] && rm -f "$f"
            if out=$(timed fio --name=limit --filename="$f" "${args[@]}" "$@" ${nb:+--io_size=$nb} \
                --direct=${FIO_DIRECT:-0} --randrepeat=0 --norandommap --group_reporting \
                --output-format=terse --terse-version=3 2>&1); then
                # terse v3: field 9 is the read runtime (ms), 50 the write runtime
                out="$(awk -F';' 'NR == 1 { printf "%.3f", ($9 > $50 ? $9 : $50) / 1000 }' <<<"$out") $(cat "$CPUFILE")"
            else
                echo "bench.sh: fio failed: $out" >&2
                out=fail
            fi
            if [ -n "$nb" ]; then base+=("$out"); else m+=("$out"); fi
        done
    done
    [ "$file" = ro ] || rm -f "$f"
    local b
    b=$(printf '%s\n' "${m[@]}" | best)
    if [[ $b != fail && $CPUTOOL != none ]]; then
        b=$(printf '%s\n' "${base[@]}" | best | awk -v b="$b" '
            { split(b, m, " "); c = m[2] - $2; if (c < 0) c = 0; printf "%s %.3f %s\n", m[1], c, m[3] - $3 }')
    fi
    FIOROWS+=("$label|$*|$b|$count|$bs|$compared")
}
fio_table() { # FIOROWS -> FIOTABLE, one line per compared row (ratios: that row's time / fio's)
    local r label opts b count bs compared c q cs
    for r in "${FIOROWS[@]}"; do
        IFS='|' read -r label opts b count bs compared <<<"$r"
        IFS=';' read -ra cs <<<"$compared"
        for c in "${cs[@]}"; do
            q=(- - - -)
            [ -n "${MEASURED[$c]:-}" ] && read -ra q <<<"${MEASURED[$c]}"
            FIOTABLE+=("| $label | \`$opts\` | $(wall "$b") | $(cpu "$b") | $(rate "$(wall "$b")" "$count" "$bs") | $c | $(ratio "${q[0]}" "$(wall "$b")") / $(ratio "${q[1]}" "$(cpu "$b")") | $(ratio "${q[2]}" "$(wall "$b")") / $(ratio "${q[3]}" "$(cpu "$b")") |")
        done
    done
}

# The page-cache rows measure reads from a warm cache.
cat "$PLAIN" "$COMP" >/dev/null
if [ "$MODE" = device ]; then
    row "4 KiB spread, depth 32, O_DIRECT" "$PLAIN" $C4_32 4096 -d 32 -S $STEP -t none -i io_uring
fi
row "4 KiB spread, depth 32, page cache" "$PLAIN" $C4_32 4096 -d 32 -S $STEP -t writeback -i io_uring
if [ "$MODE" = device ]; then
    row "4 KiB spread, depth 1, O_DIRECT" "$PLAIN" $C4_1 4096 -d 1 -S $STEP -t none -i io_uring
fi
row "4 KiB spread, depth 1, page cache" "$PLAIN" $C4_32 4096 -d 1 -S $STEP -t writeback -i io_uring
if [ "$MODE" = device ]; then
    row "64 KiB sequential, depth 32, O_DIRECT" "$PLAIN" $C64 65536 -d 32 -t none -i io_uring
fi
row "64 KiB sequential, depth 32, page cache" "$PLAIN" $C64 65536 -d 32 -t writeback -i io_uring
if [ "$MODE" = device ]; then
    row "4 KiB spread, depth 32, O_DIRECT, threads" "$PLAIN" $C4_32 4096 -d 32 -S $STEP -t none -i threads
else
    row "4 KiB spread, depth 32, page cache, threads" "$PLAIN" $C4_32 4096 -d 32 -S $STEP -t writeback -i threads
fi
row "64 KiB sequential, depth 32, compressed, page cache" "$COMP" $C64 65536 -d 32 -t writeback -i io_uring

# Write side. Allocating writes go to a new empty image each run; overwrites to a copy of
# the plain image.
wrow() { # label count bufsize args...   (bench -w on a fresh empty 1 GiB image)
    local label=$1 count=$2 bs=$3
    shift 3
    want "$label" || return 0
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
    measured "$label" "$qb" "$rb"
    TABLE+=("| $label | \`-w $*\` | $(cells "$qb" "$rb" "$count") | $(rate "$(wall "$rb")" "$count" "$bs") |")
}
if [ "$QUICK" = 1 ]; then CW=2000; else CW=16384; fi
if [ "$MODE" = device ]; then WCACHE=none WNAME=O_DIRECT; else WCACHE=writeback WNAME="page cache"; fi
# Allocating writes: 4 KiB requests on the empty image, with a 64 KiB step (each request is
# the first write to a new 64 KiB cluster) and with an 8 KiB step (8 requests per new cluster,
# at 0, 8, ..., 56 KiB into it; at depth 32, four clusters are being written at a time). The
# data is a non-zero byte (--pattern 165): with the default pattern 0 a write into a new
# cluster needs no data written at all, which would not measure writes.
wrow "4 KiB allocating writes, a new cluster each, depth 32, $WNAME" $CW 4096 --pattern 165 -d 32 -S 65536 -t $WCACHE -i io_uring
wrow "4 KiB allocating writes, 8 per cluster, depth 32, $WNAME" $((CW * 3)) 4096 --pattern 165 -d 32 -S 8192 -t $WCACHE -i io_uring
if want "64 KiB overwrites"; then
    cp "$PLAIN" "$DIR/over.qcow2"
    row "64 KiB overwrites, depth 32, $WNAME" "$DIR/over.qcow2" $C64 65536 -w -d 32 -t $WCACHE -i io_uring
    rm -f "$DIR/over.qcow2"
fi

[ -s "$RAW" ] || qemu-img convert -f qcow2 -O raw "$PLAIN" "$RAW"
# The read rows' floors on the raw file, for one cache mode (the label's suffix): depth-1
# 4 KiB reads are $2 requests (fewer with O_DIRECT, where each waits for the device).
fio_read_rows() { # cache-label depth-1-count
    local c=$1 n1=$2
    fio_row "fio raw, 4 KiB random, depth 32, $c" "4 KiB spread, depth 32, $c" ro $C4_32 4096 \
        --ioengine=io_uring --rw=randread --bs=4096 --iodepth=32 --io_size=$((C4_32 * 4096))
    fio_row "fio raw, 4 KiB random, depth 1, $c" "4 KiB spread, depth 1, $c" ro "$n1" 4096 \
        --ioengine=io_uring --rw=randread --bs=4096 --iodepth=1 --io_size=$((n1 * 4096))
    fio_row "fio raw, 64 KiB sequential, depth 32, $c" "64 KiB sequential, depth 32, $c" ro $C64 65536 \
        --ioengine=io_uring --rw=read --bs=65536 --iodepth=32 --io_size=$((C64 * 65536))
}
if have_fio; then
    if [ "$MODE" = device ]; then
        FIO_DIRECT=1
        fio_read_rows O_DIRECT "$C4_1"
        FIO_DIRECT=0
    fi
    fio_read_rows "page cache" "$C4_32"
    if [ "$MODE" = cpu ]; then
        # Write floors on tmpfs. The overwrite row's pattern (bench -w without -S: 64 KiB
        # requests one after the other over the whole image), at depth 32 through io_uring,
        # and with plain pwrite on one thread (qemu-img's io_uring writes to a tmpfs file
        # run on one io-wq worker); then the same requests in a random order.
        OVER="64 KiB overwrites, depth 32, page cache"
        fio_row "fio tmpfs, 64 KiB overwrites, depth 32" "$OVER" over $C64 65536 \
            --ioengine=io_uring --rw=write --bs=65536 --iodepth=32 --io_size=$((C64 * 65536))
        fio_row "fio tmpfs, 64 KiB overwrites, pwrite, 1 thread" "$OVER" over $C64 65536 \
            --ioengine=psync --rw=write --bs=65536 --io_size=$((C64 * 65536))
        fio_row "fio tmpfs, 64 KiB random overwrites, depth 32" "$OVER" over $C64 65536 \
            --ioengine=io_uring --rw=randwrite --bs=65536 --iodepth=32 --io_size=$((C64 * 65536))
        # The output of a convert: a new 1 GiB file written in 2 MiB pieces, one at a time
        # (tmpfs writes one file one write at a time; the pages are allocated as it goes).
        fio_row "fio tmpfs, 1 GiB to a new file, 2 MiB pwrite" \
            "convert -O raw, plain 1 GiB, warm;raw -> qcow2" new 512 $((2 << 20)) \
            --ioengine=psync --rw=write --bs=2M --size=1G
    fi
else
    echo "bench.sh: fio is not installed (and could not be): no physical-limit rows" >&2
fi

CTABLE=()
convert_time() { # tool args... -> measurement; wall time includes a final `sync`, then the time to exit
    local t0 t1 t2
    t0=$(date +%s.%N)
    if ! timed "$@" >/dev/null 2>&1; then
        echo "fail"
        return
    fi
    t1=$(date +%s.%N)
    sync
    t2=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" -v c="$t2" -v m="$(cat "$CPUFILE")" 'BEGIN { printf "%.3f %s %.3f", c - a, m, b - a }'
}
exit_time() { # measurements on stdin -> smallest time to exit (4th field)
    awk '$1 != "fail" { n++; if (n == 1 || $4 < e) e = $4 } END { if (n) print e; else print "-" }'
}
convert_row() { # label src
    local label=$1 src=$2 out=$DIR/out.raw i mode tool modes=cold
    want "$label" || return 0
    [ "$MODE" = cpu ] && modes=warm || modes="cold warm"
    for mode in $modes; do
        local q=() r=()
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
                if [ "$tool" = qemu-img ]; then q+=("$t"); else r+=("$t"); fi
            done
        done
        rm -f "$out"
        local qb rb qeb
        qb=$(printf '%s\n' "${q[@]}" | best)
        qeb=$(printf '%s\n' "${q[@]}" | exit_time)
        rb=$(printf '%s\n' "${r[@]}" | best)
        measured "$label, $mode" "$qb" "$rb"
        CTABLE+=("| $label | $mode | $(wall "$qb") ($qeb) | $(wall "$rb") | $(ratio "$(wall "$rb")" "$(wall "$qb")") | $(cpu "$qb") | $(cpu "$rb") | $(ratio "$(cpu "$rb")" "$(cpu "$qb")") |")
    done
}
if [ "$QUICK" != 1 ]; then
    convert_row "convert -O raw, plain 1 GiB" "$PLAIN"
    convert_row "convert -O raw, compressed 1 GiB" "$COMP"
fi

# convert from raw to qcow2: plain, and compressed with zlib and with zstd (warm source).
WTABLE=()
to_qcow2_row() { # label extra-args...
    local label=$1
    shift
    want "$label" || return 0
    local q=() r=() i tool t out=$DIR/out.qcow2
    echo "== convert raw -> qcow2: $label" >&2
    for ((i = 0; i < REPEAT; i++)); do
        for tool in qemu-img "$BIN"; do
            rm -f "$out"
            cat "$RAW" >/dev/null
            t=$(convert_time "$tool" convert -f raw -O qcow2 "$@" "$RAW" "$out")
            qemu-img compare -q -f raw "$RAW" "$out" || { echo "bench.sh: $tool output differs" >&2; t=fail; }
            if [ "$tool" = qemu-img ]; then q+=("$t"); else r+=("$t"); fi
        done
    done
    rm -f "$out"
    local qb rb
    qb=$(printf '%s\n' "${q[@]}" | best)
    rb=$(printf '%s\n' "${r[@]}" | best)
    measured "$label" "$qb" "$rb"
    WTABLE+=("| $label | \`$*\` | $(wall "$qb") | $(wall "$rb") | $(ratio "$(wall "$rb")" "$(wall "$qb")") | $(cpu "$qb") | $(cpu "$rb") | $(ratio "$(cpu "$rb")" "$(cpu "$qb")") |")
}
if [ "$QUICK" != 1 ]; then
    to_qcow2_row "raw -> qcow2"
    to_qcow2_row "raw -> qcow2, compressed, zlib" -c
    to_qcow2_row "raw -> qcow2, compressed, zstd" -c -o compression_type=zstd
fi

if [ ${#FIOROWS[@]} -gt 0 ]; then fio_table; fi
{
    echo "qcow2rs $("$BIN" --version | awk '{print $3}') vs $(qemu-img --version | head -n1)"
    echo "mode $MODE: $(nproc) CPUs, kernel $(uname -r), $FSTYPE on $(df --output=source "$DIR" | tail -n1), best of $REPEAT, page cache dropped for cold runs: $DROP, CPU time from: $CPUTOOL"
    echo "load average before: $LOAD_START, after: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine makes timings noisy)"
    echo
    echo "Ratios are qcow2rs / qemu-img: below 1 means qcow2rs is faster (wall) or cheaper (CPU)."
    echo "CPU is the task-clock (or user+sys) of the whole process; \"switches\" are context switches per request."
    echo
    echo "| workload | options (both tools) | qemu-img (s) | qcow2rs (s) | wall ratio | qemu-img CPU (s) | qcow2rs CPU (s) | CPU ratio | switches/request qemu-img / qcow2rs | qcow2rs rate |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
    printf '%s\n' "${TABLE[@]}"
    if [ ${#FIOTABLE[@]} -gt 0 ]; then
        echo
        echo "Physical limit: fio on the raw copy of the same data (reads), on a copy of it (overwrites),"
        echo "or on a new file (a convert's output), same request count. Time: fio's runtime; CPU: the"
        echo "run's less that of the same run with one request (fio's start-up)."
        echo "Ratios: the time of the row compared with (each tool's) / fio's, wall / CPU: 1 is at the limit."
        echo
        echo "| fio | options | time (s) | CPU (s) | rate | compared with | qemu-img / fio | qcow2rs / fio |"
        echo "|---|---|---:|---:|---|---|---:|---:|"
        printf '%s\n' "${FIOTABLE[@]}"
    fi
    if [ ${#CTABLE[@]} -gt 0 ]; then
        echo
        echo "Convert times include a final \`sync\` (qemu-img's default destination cache is"
        echo "\"unsafe\": it exits before its output is on disk; its time to exit is in parentheses)."
        echo
        echo "| convert | source cache | qemu-img (s) | qcow2rs (s) | wall ratio | qemu-img CPU (s) | qcow2rs CPU (s) | CPU ratio |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|"
        printf '%s\n' "${CTABLE[@]}"
    fi
    if [ ${#WTABLE[@]} -gt 0 ]; then
        echo
        echo "| convert from raw (warm source, times include \`sync\`) | options | qemu-img (s) | qcow2rs (s) | wall ratio | qemu-img CPU (s) | qcow2rs CPU (s) | CPU ratio |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|"
        printf '%s\n' "${WTABLE[@]}"
    fi
} | tee "$DIR/results.md"
