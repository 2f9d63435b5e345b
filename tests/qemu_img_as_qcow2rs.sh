#!/bin/sh
# Harness self-check only: stands in for qcow2rs by forwarding to qemu-img, so the interop tests
# compare qemu-img with itself and must pass.  Usage:
#   QCOW2RS_BIN=tests/qemu_img_as_qcow2rs.sh .venv/bin/python -m pytest tests -k interop
exec qemu-img "$@"
