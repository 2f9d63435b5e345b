/*
 * A small test harness for the C tests of libqcow2rs.
 *
 * A test is a `static void test_NAME(void)`; CHECK() records a failure and returns from it.
 * main() comes from TEST_MAIN(...): `prog WORKDIR [NAME...]` runs every test (or those
 * named), each in its own fresh folder under WORKDIR, prints "ok NAME" / "FAIL NAME", then
 * "N passed, N failed" and exits 1 if any failed. QCOW2RS_TEST_SMALL=1 (set under valgrind)
 * asks the tests for smaller workloads.
 */
#ifndef QCOW2RS_TEST_HARNESS_H
#define QCOW2RS_TEST_HARNESS_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <qcow2rs.h>

/* Not every test program uses every helper. */
#define H_UNUSED __attribute__((unused))

static int h_failed_checks;
static char h_dir[4096];

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n    (qcow2rs_last_error: %s)\n", \
                    __FILE__, __LINE__, #cond, qcow2rs_last_error());                    \
            h_failed_checks++;                                                           \
            return;                                                                      \
        }                                                                                \
    } while (0)

/* CHECK that a call returned `want` (an int), printing what it returned otherwise. */
#define CHECK_RET(call, want)                                                            \
    do {                                                                                 \
        int h_r = (call);                                                                \
        if (h_r != (want)) {                                                             \
            fprintf(stderr, "%s:%d: %s returned %d (%s), want %d\n    (last error: %s)\n", \
                    __FILE__, __LINE__, #call, h_r, h_r < 0 ? strerror(-h_r) : "-",      \
                    (int)(want), qcow2rs_last_error());                                  \
            h_failed_checks++;                                                           \
            return;                                                                      \
        }                                                                                \
    } while (0)

/* A path in the test's folder (rotating static buffers: up to 8 alive at once). */
static H_UNUSED const char *tpath(const char *name)
{
    static char bufs[8][4200];
    static int next;
    char *b = bufs[next++ % 8];
    snprintf(b, sizeof bufs[0], "%s/%s", h_dir, name);
    return b;
}

static H_UNUSED bool small_run(void)
{
    const char *s = getenv("QCOW2RS_TEST_SMALL");
    return s && *s && strcmp(s, "0") != 0;
}

/* Run a shell command (printf-style); returns its exit status, or -1. */
static H_UNUSED int shell(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    fflush(NULL);
    int st = system(cmd);
    if (st == -1 || !WIFEXITED(st))
        return -1;
    return WEXITSTATUS(st);
}

/* Deterministic bytes: byte i of a buffer made with `seed`. */
static H_UNUSED void fill_pattern(uint8_t *buf, size_t len, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < len; i++) {
        if (i % 8 == 0) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        buf[i] = (uint8_t)(x >> (8 * (i % 8)));
    }
}

static H_UNUSED bool all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

/* Patch `len` bytes at `off` of a file. */
static H_UNUSED int patch_file(const char *path, uint64_t off, const void *data,
                               size_t len)
{
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        return -1;
    ssize_t n = pwrite(fd, data, len, (off_t)off);
    close(fd);
    return n == (ssize_t)len ? 0 : -1;
}

static H_UNUSED int read_file_at(const char *path, uint64_t off, void *data, size_t len)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t n = pread(fd, data, len, (off_t)off);
    close(fd);
    return n == (ssize_t)len ? 0 : -1;
}

static H_UNUSED uint64_t be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static H_UNUSED void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

/* A counter that threads can wait on. */
struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    int errors;
    int last_ret;
};

#define WAITER_INIT { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0 }

static H_UNUSED void waiter_add(struct waiter *w, int ret)
{
    pthread_mutex_lock(&w->mu);
    w->done++;
    w->last_ret = ret;
    if (ret < 0)
        w->errors++;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static H_UNUSED void waiter_wait(struct waiter *w, int n)
{
    pthread_mutex_lock(&w->mu);
    while (w->done < n)
        pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

/* A completion callback whose user data is a struct waiter. */
static H_UNUSED void waiter_cb(void *ud, const struct qcow2rs_completion *c)
{
    waiter_add((struct waiter *)ud, c->ret);
}

struct h_test {
    const char *name;
    void (*fn)(void);
};

static int h_run(int argc, char **argv, const struct h_test *tests, size_t n)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s WORKDIR [TEST...]\n", argv[0]);
        return 2;
    }
    int passed = 0, failed = 0;
    for (size_t i = 0; i < n; i++) {
        bool wanted = argc == 2;
        for (int a = 2; a < argc; a++)
            if (strcmp(argv[a], tests[i].name) == 0)
                wanted = true;
        if (!wanted)
            continue;
        snprintf(h_dir, sizeof h_dir, "%s/%s", argv[1], tests[i].name);
        mkdir(argv[1], 0755);
        shell("rm -rf '%s' && mkdir -p '%s'", h_dir, h_dir);
        int before = h_failed_checks;
        tests[i].fn();
        if (h_failed_checks == before) {
            printf("ok %s\n", tests[i].name);
            passed++;
        } else {
            printf("FAIL %s\n", tests[i].name);
            failed++;
        }
        fflush(stdout);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}

#define TEST(name) { #name, test_##name }
#define TEST_MAIN(...)                                                    \
    int main(int argc, char **argv)                                       \
    {                                                                     \
        static const struct h_test tests[] = { __VA_ARGS__ };             \
        return h_run(argc, argv, tests, sizeof tests / sizeof tests[0]);  \
    }

#endif
