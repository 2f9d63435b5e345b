#!/usr/bin/env bash
# `qcow2rs serve` vs `qemu-nbd` serving the same 1 GiB qcow2 image, in one run, over a Unix socket:
# qemu-img bench -f raw nbd+unix://... (4 KiB strided reads and writes, 64 KiB sequential reads) and
# nbdcopy of the whole image to /dev/null. Prints wall time, the server's CPU time (user+sys from
# /proc) and the ratio ours/qemu-nbd for each row. Usage: scripts/bench-nbd.sh [COUNT]
# ROWS=REGEX runs only the rows whose name matches (e.g. ROWS=nbdcopy); REPEAT=N runs each N times.
# The server's context switches (all its threads, voluntary + involuntary) are counted too.
# Images go in a directory made by mktemp -d: set TMPDIR to choose the file system (/tmp may be tmpfs).
# SERVER_CPUS=LIST / CLIENT_CPUS=LIST pin the servers / the clients with taskset (e.g. 0 and 1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${BIN:-target/release/qcow2rs}
COUNT=${1:-40000}
D=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$D"' EXIT
TICK=$(getconf CLK_TCK)

qemu-img create -q -f qcow2 "$D/img.qcow2" 1G
qemu-io -f qcow2 -c "write -q -P 0x5a 0 1G" "$D/img.qcow2"

cpu() { awk -v t="$TICK" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$1/stat"; }
# Context switches (voluntary + involuntary) of all the server's threads so far.
csw() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { print s + 0 }'; }

start() { # name -> pid
    local sock="$D/$1.sock"
    rm -f "$sock"
    if [ "$1" = ours ]; then
        $SPIN "$BIN" serve -t -e 0 -k "$sock" "$D/img.qcow2" &
    else
        $SPIN qemu-nbd -t -e 0 -f qcow2 -k "$sock" "$D/img.qcow2" &
    fi
    PID=$!
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
}

SPIN=${SERVER_CPUS:+taskset -c $SERVER_CPUS}
CPIN=${CLIENT_CPUS:+taskset -c $CLIENT_CPUS}
declare -A WALL CPU CSW
run_row() { # row name, command (with URI placeholder)
    local row=$1; shift
    [[ $row =~ ${ROWS:-.} ]] || return 0
    for _ in $(seq "${REPEAT:-1}"); do run_one "$row" "$@"; done
}
run_one() {
    local row=$1; shift
    for s in ours qemu; do
        start "$s"
        local uri="nbd+unix:///?socket=$D/$s.sock"
        local c0; c0=$(cpu "$PID")
        local s0; s0=$(csw "$PID")
        local t0; t0=$(date +%s.%N)
        eval "$CPIN ${*//URI/$uri}" >/dev/null
        local t1; t1=$(date +%s.%N)
        local c1; c1=$(cpu "$PID")
        local s1; s1=$(csw "$PID")
        CSW[$row,$s]=$((s1 - s0))
        WALL[$row,$s]=$(echo "$t1 - $t0" | bc)
        CPU[$row,$s]=$(echo "$c1 - $c0" | bc)
        kill "$PID"; wait "$PID" 2>/dev/null || true
    done
    printf '%-28s ours %6.2fs (cpu %5.2fs, %6d csw)  qemu-nbd %6.2fs (cpu %5.2fs, %6d csw)  wall ratio %.2f  cpu ratio %.2f\n' \
        "$row" "${WALL[$row,ours]}" "${CPU[$row,ours]}" "${CSW[$row,ours]}" "${WALL[$row,qemu]}" "${CPU[$row,qemu]}" "${CSW[$row,qemu]}" \
        "$(echo "${WALL[$row,ours]} / ${WALL[$row,qemu]}" | bc -l)" \
        "$(echo "(${CPU[$row,ours]} + 0.01) / (${CPU[$row,qemu]} + 0.01)" | bc -l)"
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
# qemu-img bench has no random mode: a 1 MiB + 4 KiB stride scatters the requests over the image.
run_row "4k strided read qd32"  qemu-img bench -f raw -c "$COUNT" -d 32 -s 4k -S 1052672 URI
run_row "4k strided write qd32" qemu-img bench -f raw -w -c "$COUNT" -d 32 -s 4k -S 1052672 URI
run_row "64k sequential read qd16" qemu-img bench -f raw -c $((COUNT / 4)) -d 16 -s 64k URI
run_row "64k sequential write qd16" qemu-img bench -f raw -w -c $((COUNT / 4)) -d 16 -s 64k URI
run_row "nbdcopy 1 GiB to null" nbdcopy URI null:
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
