#!/bin/sh
# Build the seed corpus of the cargo-fuzz targets from images made by qemu-img/qemu-io.
# Usage: fuzz/seeds.sh [corpus-dir]   (default: fuzz/corpus)
set -eu
out=${1:-$(dirname "$0")/corpus}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
n=0
img() { # name create-options size qemu-io-commands...
    name=$1 o=$2 size=$3
    shift 3
    qemu-img create -q -f qcow2 -o "$o" "$tmp/$name.qcow2" "$size"
    for c in "$@"; do qemu-io -f qcow2 -c "$c" "$tmp/$name.qcow2" >/dev/null; done
    n=$((n + 1))
}
img empty64k cluster_size=65536 1M
img v2 compat=0.10,cluster_size=4096 1M "write -P 0x11 0 8k"
img c512 cluster_size=512 256k "write -P 0xaa 0 3k" "write -z 4k 2k"
img c4k_rc1 cluster_size=4096,refcount_bits=1 1M "write -P 0x22 4k 12k"
img c4k_rc64 cluster_size=4096,refcount_bits=64 1M "write -P 0x33 0 4k"
img extl2 cluster_size=16384,extended_l2=on 1M "write -P 0x44 512 1k" "write -z 8k 1k"
img lazy cluster_size=4096,lazy_refcounts=on 1M "write -P 0x55 0 16k"
img zlib cluster_size=4096 1M "write -c -P 0x66 0 4k" "write -c -P 0x67 8k 4k"
img zstd cluster_size=4096,compression_type=zstd 1M "write -c -P 0x77 0 4k"
img big cluster_size=65536 1T "write -P 0x88 1G 4k"
img snap cluster_size=4096 1M "write -P 0x99 0 8k"
qemu-img snapshot -c s1 "$tmp/snap.qcow2"
qemu-io -f qcow2 -c "write -P 0x9a 0 4k" "$tmp/snap.qcow2" >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4096 "$tmp/base.qcow2" 1M
img overlay cluster_size=4096,backing_file=base.qcow2,backing_fmt=qcow2 1M "write -P 0xbb 0 4k"
qemu-img bitmap --add "$tmp/lazy.qcow2" b0 2>/dev/null || true
for t in open_read open_write; do
    mkdir -p "$out/$t"
    cp "$tmp"/*.qcow2 "$out/$t/"
done
mkdir -p "$out/header" "$out/tables" "$out/snapshot_table"
for f in "$tmp"/*.qcow2; do
    b=$(basename "$f" .qcow2)
    head -c 4096 "$f" > "$out/header/$b"
    # An L2 table / refcount block: cluster size selector byte, then the bytes.
    { printf '\003'; dd if="$f" bs=4096 skip=3 count=1 2>/dev/null; } > "$out/tables/$b"
done
# A snapshot table: count (2 bytes), cluster-size selector, then the table as stored.
off=$(od -An -tu8 -j64 -N8 --endian=big "$tmp/snap.qcow2" | tr -d ' ')
{ printf '\000\001\003'; dd if="$tmp/snap.qcow2" bs=1 skip="$off" count=256 2>/dev/null; } > "$out/snapshot_table/snap"
echo "seed corpus in $out ($n images)"
