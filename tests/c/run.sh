#!/usr/bin/env bash
# The C side of libqcow2rs: exports, header, tests, examples, install.
#
# Usage: tests/c/run.sh            (from anywhere; after `cargo build --release`)
#   QCOW2RS_C_SKIP_VALGRIND=1   skip the valgrind runs (they are the slow part)
#   QCOW2RS_C_ONLY=REGEX        run only the checks whose name matches
#
# What it checks:
#   - target/release/libqcow2rs.so exports only qcow2rs_* symbols (nm -D --defined-only), has
#     the SONAME libqcow2rs.so.0 and the NODELETE flag; libqcow2rs.so.0 and libqcow2rs.a exist;
#   - include/qcow2rs.h compiles as C11 and as C++17 with -Wall -Wextra -Werror -pedantic;
#   - tests/c/test_api.c and tests/c/test_stress.c, built with -Wall -Wextra -Werror, run
#     plain, under ASan+UBSan, and under valgrind --leak-check=full (smaller workloads);
#   - the examples (examples/c) built with their Makefile, run plain, under ASan+UBSan and
#     under valgrind, their output checked with qemu-img;
#   - `make install PREFIX=<temp>` and an example built with `pkg-config --cflags --libs
#     qcow2rs` against that prefix, which runs.
# Prints one line per check and "N passed, N failed" at the end; exits 1 if any failed.
# Needs: a C and a C++ compiler, valgrind, pkg-config, qemu-img and qemu-io. With CI=true a
# missing tool is a failure; otherwise the checks that need it are skipped.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LIB=$ROOT/target/release
OUT=$ROOT/target/c-tests
CC=${CC:-cc}
CXX=${CXX:-c++}
WARN="-Wall -Wextra -Werror"
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
# --child-silent-after-fork: a child of fork() inherits the parent's library threads' memory,
# which nothing in the child can free (those threads do not exist there); its leak report
# would be noise. The fork test checks the child's behaviour itself.
VALGRIND="valgrind -q --leak-check=full --errors-for-leak-kinds=definite,possible --error-exitcode=99 --child-silent-after-fork=yes"
ONLY=${QCOW2RS_C_ONLY:-}

PASSED=0
FAILED=0
SKIPPED=0
FAILED_NAMES=()

rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/logs"

# check NAME COMMAND...: run COMMAND with its output in a log; print the verdict.
check() {
    local name=$1
    shift
    if [ -n "$ONLY" ] && ! [[ $name =~ $ONLY ]]; then
        return 0
    fi
    local log="$OUT/logs/$name.log" t0=$SECONDS
    if "$@" >"$log" 2>&1; then
        echo "ok $name ($((SECONDS - t0)) s)"
        PASSED=$((PASSED + 1))
    else
        echo "FAIL $name ($((SECONDS - t0)) s); last lines of $log:"
        tail -n 25 "$log" | sed 's/^/    /'
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
    fi
}

skip() {
    echo "skip $1: $2"
    SKIPPED=$((SKIPPED + 1))
}

have() {
    if command -v "$1" >/dev/null 2>&1; then
        return 0
    fi
    if [ "${CI:-}" = true ]; then
        echo "FAIL: $1 is required (CI=true); .ci/run installs it" >&2
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("missing-$1")
    fi
    return 1
}

HAVE_QEMU=1
have qemu-img && have qemu-io || HAVE_QEMU=0
HAVE_VALGRIND=1
have valgrind || HAVE_VALGRIND=0
[ "${QCOW2RS_C_SKIP_VALGRIND:-0}" = 1 ] && HAVE_VALGRIND=0
HAVE_PKGCONFIG=1
have pkg-config || HAVE_PKGCONFIG=0

if [ ! -e "$LIB/libqcow2rs.so" ]; then
    echo "tests/c/run.sh: $LIB/libqcow2rs.so is missing; run cargo build --release first" >&2
    exit 1
fi
export LD_LIBRARY_PATH=$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# --- The library file ------------------------------------------------------------------------
exports_only_qcow2rs() {
    local syms others
    syms=$(nm -D --defined-only "$LIB/libqcow2rs.so" | awk '{print $3}')
    echo "$syms"
    others=$(grep -v '^qcow2rs_' <<<"$syms" || true)
    [ -n "$syms" ] && [ -z "$others" ] || { echo "exported symbols not named qcow2rs_*: $others"; return 1; }
    # Every function of the header is exported, and nothing else.
    local declared
    declared=$(grep -o '^[a-z_ 0-9*]*\bqcow2rs_[a-z_0-9]*(' "$ROOT/include/qcow2rs.h" \
        | grep -o 'qcow2rs_[a-z_0-9]*' | sort -u)
    diff <(echo "$declared") <(sort -u <<<"$syms")
}
soname_and_nodelete() {
    readelf -d "$LIB/libqcow2rs.so" | tee /dev/stderr | grep 'Library soname: \[libqcow2rs.so.0\]' &&
        readelf -d "$LIB/libqcow2rs.so" | grep 'NODELETE' &&
        [ "$(readlink "$LIB/libqcow2rs.so.0")" = libqcow2rs.so ] &&
        [ -s "$LIB/libqcow2rs.a" ]
}
check lib-exports exports_only_qcow2rs
check lib-soname soname_and_nodelete

# --- The header -------------------------------------------------------------------------------
header_c11() {
    printf '#include <qcow2rs.h>\nint main(void) { struct qcow2rs_open_options o = QCOW2RS_OPEN_OPTIONS_INIT; (void)o; return qcow2rs_version() == 0; }\n' >"$OUT/h.c"
    $CC -std=c11 -pedantic $WARN -I"$ROOT/include" -c "$OUT/h.c" -o "$OUT/h.o"
}
header_cxx17() {
    printf '#include <qcow2rs.h>\nint main() { qcow2rs_info i = QCOW2RS_INFO_INIT; qcow2rs_convert_options c = QCOW2RS_CONVERT_OPTIONS_INIT; qcow2rs_create_options k = QCOW2RS_CREATE_OPTIONS_INIT; (void)i; (void)c; (void)k; return qcow2rs_version() == nullptr; }\n' >"$OUT/h.cpp"
    $CXX -std=c++17 -pedantic $WARN -I"$ROOT/include" -c "$OUT/h.cpp" -o "$OUT/hpp.o"
}
check header-c11 header_c11
check header-c++17 header_cxx17

# --- Tests and examples: build ---------------------------------------------------------------
build_tests() { # VARIANT EXTRA-FLAGS...
    local v=$1
    shift
    for t in test_api test_stress; do
        $CC -std=c11 $WARN -O1 -g "$@" -I"$ROOT/include" -o "$OUT/bin/$t.$v" \
            "$ROOT/tests/c/$t.c" -L"$LIB" -lqcow2rs -lpthread || return 1
    done
}
build_examples() { # VARIANT EXTRA-FLAGS...
    local v=$1
    shift
    make -s -C "$ROOT/examples/c" O="$OUT/bin/examples.$v" CFLAGS="-O1 -g $*" \
        QCOW2RS_CFLAGS="-I$ROOT/include" QCOW2RS_LIBS="-L$LIB -lqcow2rs"
}
check build-plain eval 'build_tests plain && build_examples plain'
check build-asan eval "build_tests asan $SAN && build_examples asan $SAN"

# run_variant VARIANT PROGRAM ARGS...: the program as built for VARIANT, run accordingly.
run_variant() {
    local v=$1 prog=$2
    shift 2
    case $v in
    plain) "$prog" "$@" ;;
    asan) ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 "$prog" "$@" ;;
    valgrind) QCOW2RS_TEST_SMALL=1 $VALGRIND "$prog" "$@" ;;
    esac
}
bin_of() { # VARIANT NAME -> path of the binary (valgrind runs the plain build)
    local b=$1
    [ "$b" = valgrind ] && b=plain
    echo "$OUT/bin/$2.$b"
}
ex_of() {
    local b=$1
    [ "$b" = valgrind ] && b=plain
    echo "$OUT/bin/examples.$b/$2"
}

VARIANTS=(plain asan)
[ "$HAVE_VALGRIND" = 1 ] && VARIANTS+=(valgrind) || skip valgrind "valgrind runs skipped"

# --- Tests ------------------------------------------------------------------------------------
if [ "$HAVE_QEMU" = 1 ]; then
    for v in "${VARIANTS[@]}"; do
        check "test_api-$v" run_variant "$v" "$(bin_of "$v" test_api)" "$OUT/work-api-$v"
        check "test_stress-$v" run_variant "$v" "$(bin_of "$v" test_stress)" "$OUT/work-stress-$v"
    done
else
    skip tests "qemu-img/qemu-io not found (apt-get install qemu-utils)"
fi

# --- Examples ---------------------------------------------------------------------------------
# A source image with data, zeros, unallocated and compressed clusters (made by qemu-io),
# over a backing file.
make_example_image() {
    local d=$OUT/ex
    mkdir -p "$d"
    qemu-img create -q -f qcow2 "$d/base.qcow2" 6M &&
        qemu-io -f qcow2 -c 'write -P 0x11 0 2M' -c 'write -P 0x22 4M 1M' "$d/base.qcow2" &&
        qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$d/src.qcow2" &&
        qemu-io -f qcow2 -c 'write -P 0x33 512k 100k' -c 'write -z 1M 512k' \
            -c 'write -c -P 0x44 3M 64k' -c 'discard 4608k 64k' "$d/src.qcow2" &&
        qemu-img convert -f qcow2 -O raw "$d/src.qcow2" "$d/want.raw"
}
ex_read_image() {
    local v=$1 d=$OUT/ex
    run_variant "$v" "$(ex_of "$v" read_image)" "$d/src.qcow2" >"$d/read_image.$v.raw" &&
        cmp "$d/want.raw" "$d/read_image.$v.raw"
}
ex_aio_copy() {
    local v=$1 d=$OUT/ex
    run_variant "$v" "$(ex_of "$v" aio_copy)" -d 8 -s 64 "$d/src.qcow2" "$d/aio_copy.$v.raw" &&
        qemu-img compare -f qcow2 -F raw "$d/src.qcow2" "$d/aio_copy.$v.raw"
}
ex_event_loop() {
    local v=$1 d=$OUT/ex
    run_variant "$v" "$(ex_of "$v" event_loop)" -d 4 "$d/src.qcow2" "$d/event_loop.$v.raw" &&
        qemu-img compare -f qcow2 -F raw "$d/src.qcow2" "$d/event_loop.$v.raw"
}
ex_create_and_write() {
    local v=$1 d=$OUT/ex img=$OUT/ex/created.$v.qcow2
    run_variant "$v" "$(ex_of "$v" create_and_write)" "$img" 8 &&
        qemu-img check "$img" &&
        qemu-io -f qcow2 -c 'read -P 0xab 0 1M' -c 'read -P 0 7M 1M' "$img" >"$d/qemu-io.$v.out" &&
        cat "$d/qemu-io.$v.out" && ! grep -q 'failed' "$d/qemu-io.$v.out" &&
        qemu-io -f qcow2 -c 'read -v 1048583 12' "$img" | grep 'hello.from.C' &&
        qemu-img info "$img" | grep 'compression type: zstd'
}
ex_bench() {
    local v=$1 d=$OUT/ex n=2000
    [ "$v" = valgrind ] && n=200
    cp "$d/src.qcow2" "$d/bench.$v.qcow2"
    run_variant "$v" "$(ex_of "$v" bench)" -c $n -d 8 -s 4k -S 12k "$d/src.qcow2" | tee /dev/stderr |
        grep -q '^Run completed in [0-9.]* seconds\.$' &&
        run_variant "$v" "$(ex_of "$v" bench)" -w -c $n -d 8 -s 4k "$d/bench.$v.qcow2" | grep '^Run completed' &&
        qemu-img check "$d/bench.$v.qcow2"
}
if [ "$HAVE_QEMU" = 1 ]; then
    check example-image make_example_image
    for v in "${VARIANTS[@]}"; do
        for ex in read_image aio_copy event_loop create_and_write bench; do
            check "example-$ex-$v" "ex_$ex" "$v"
        done
    done
fi

# --- Install ----------------------------------------------------------------------------------
install_and_pkg_config() {
    local prefix=$OUT/prefix
    rm -rf "$prefix"
    make -s -C "$ROOT" install-c PREFIX="$prefix" &&
        ls -l "$prefix/lib" "$prefix/include" "$prefix/lib/pkgconfig" &&
        [ -f "$prefix/lib/libqcow2rs.so.0.1.0" ] &&
        [ "$(readlink "$prefix/lib/libqcow2rs.so.0")" = libqcow2rs.so.0.1.0 ] &&
        [ "$(readlink "$prefix/lib/libqcow2rs.so")" = libqcow2rs.so.0 ] &&
        [ -f "$prefix/lib/libqcow2rs.a" ] && [ -f "$prefix/include/qcow2rs.h" ] &&
        PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --cflags --libs qcow2rs &&
        PKG_CONFIG_PATH=$prefix/lib/pkgconfig make -s -C "$ROOT/examples/c" O="$OUT/bin/installed" &&
        readelf -d "$OUT/bin/installed/read_image" | grep 'NEEDED.*libqcow2rs.so.0' &&
        env LD_LIBRARY_PATH="$prefix/lib" "$OUT/bin/installed/create_and_write" "$OUT/inst.qcow2" 4 &&
        env LD_LIBRARY_PATH="$prefix/lib" ldd "$OUT/bin/installed/read_image" | grep "$prefix/lib/libqcow2rs.so.0" &&
        # The static library links too (with the libraries pkg-config --static names).
        $CC -std=c11 $WARN -o "$OUT/bin/read_image.static" "$ROOT/examples/c/read_image.c" \
            $(PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --cflags qcow2rs) \
            "$prefix/lib/libqcow2rs.a" $(PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --libs-only-l --static qcow2rs | sed 's/-lqcow2rs//') &&
        ! readelf -d "$OUT/bin/read_image.static" | grep 'libqcow2rs' &&
        "$OUT/bin/read_image.static" "$OUT/inst.qcow2" >"$OUT/inst.raw" &&
        cmp -n 1048576 "$OUT/inst.raw" <(head -c 1048576 /dev/zero | tr '\0' '\253')
}
if [ "$HAVE_PKGCONFIG" = 1 ]; then
    check install-pkg-config install_and_pkg_config
fi

echo
if [ ${#FAILED_NAMES[@]} -gt 0 ]; then
    echo "failed: ${FAILED_NAMES[*]}"
fi
echo "c tests: $PASSED passed, $FAILED failed, $SKIPPED skipped"
[ "$FAILED" = 0 ]
