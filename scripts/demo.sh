#!/usr/bin/env bash
# The demo behind `make demo`: make images with qcow2rs itself, then inspect, check, convert and
# compare them. Needs only the built binary and Python 3; qemu-img, when present, double-checks.
set -euo pipefail
BIN=${BIN:-target/release/qcow2rs}
D=${DEMO:-demo}
rm -rf "$D" && mkdir -p "$D"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "guest data: 64 MiB raw disk with text, patterns and holes ($D/guest.raw)"
python3 - "$D/guest.raw" <<'PY'
import sys
size = 64 << 20
with open(sys.argv[1], "wb") as f:
    f.truncate(size)
    for i, off in enumerate(range(0, size, 5 << 20)):
        f.seek(off)
        f.write((f"qcow2rs demo block {i}\n" * 3000).encode())
    f.seek(40 << 20)
    f.write(bytes(range(256)) * 4096)
PY

say "$BIN create -f qcow2 -o cluster_size=64k $D/empty.qcow2 1G"
"$BIN" create -f qcow2 -o cluster_size=64k "$D/empty.qcow2" 1G
say "$BIN convert -O qcow2 $D/guest.raw $D/disk.qcow2"
"$BIN" convert -p -O qcow2 "$D/guest.raw" "$D/disk.qcow2"
say "$BIN convert -c -O qcow2 -o compression_type=zstd $D/disk.qcow2 $D/disk-zstd.qcow2"
"$BIN" convert -c -O qcow2 -o compression_type=zstd "$D/disk.qcow2" "$D/disk-zstd.qcow2"
say "$BIN create -f qcow2 -b disk.qcow2 -F qcow2 $D/overlay.qcow2"
"$BIN" create -f qcow2 -b disk.qcow2 -F qcow2 "$D/overlay.qcow2"

say "$BIN info --backing-chain $D/overlay.qcow2"
"$BIN" info --backing-chain "$D/overlay.qcow2"
say "$BIN info --output=json $D/disk-zstd.qcow2"
"$BIN" info --output=json "$D/disk-zstd.qcow2"
say "$BIN map $D/disk.qcow2"
"$BIN" map "$D/disk.qcow2"
say "$BIN map --output=json $D/disk-zstd.qcow2 (first lines)"
"$BIN" map --output=json "$D/disk-zstd.qcow2" | head -5
say "$BIN check $D/disk-zstd.qcow2"
"$BIN" check "$D/disk-zstd.qcow2"
say "$BIN dump $D/disk-zstd.qcow2"
"$BIN" dump "$D/disk-zstd.qcow2"
say "$BIN convert -O raw $D/overlay.qcow2 $D/back.raw && $BIN compare $D/guest.raw $D/back.raw"
"$BIN" convert -O raw "$D/overlay.qcow2" "$D/back.raw"
"$BIN" compare -f raw -F raw "$D/guest.raw" "$D/back.raw"
"$BIN" compare "$D/disk-zstd.qcow2" "$D/guest.raw"
cmp "$D/guest.raw" "$D/back.raw" && echo "cmp: byte-identical"
du -h --apparent-size "$D"/*.qcow2 | sed 's/^/apparent /'
du -h "$D"/*.qcow2 | sed 's/^/on disk  /'
if command -v qemu-img >/dev/null 2>&1; then
    say "qemu-img check $D/disk-zstd.qcow2 (reference)"
    qemu-img check "$D/disk-zstd.qcow2"
    qemu-img compare "$D/guest.raw" "$D/disk-zstd.qcow2"
fi
say "demo done: images are in $D/"
