#!/usr/bin/env bash
# Installs what the NBD server's tests (tests/test_nbd.py) need, when missing: the real clients
# nbdinfo and nbdcopy (libnbd-bin), python3-libnbd for the system /usr/bin/python3, qemu-nbd
# (qemu-utils) as the reference server, and openssl to make TLS certificates.
# Used by .ci/run and by `make test` (target nbd-deps).
set -euo pipefail
missing=()
command -v nbdinfo >/dev/null 2>&1 || missing+=(libnbd-bin)
command -v nbdcopy >/dev/null 2>&1 || missing+=(libnbd-bin)
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || missing+=(python3-libnbd)
command -v qemu-nbd >/dev/null 2>&1 || missing+=(qemu-utils)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
echo "nbd-deps: installing $pkgs for the NBD tests" >&2
if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
$SUDO apt-get update
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y $pkgs
