/*
 * bench-capi-sync: blocking 4 KiB qcow2rs_read/qcow2rs_write calls from THREADS threads (each
 * COUNT requests, spread as scripts/bench.sh's rows: a step of 123457 * 4 KiB), to measure
 * what a blocking call costs (scripts/bench-capi.sh measures the aio path). Prints the wall
 * time as `qemu-img bench` does; run it under `perf stat -e task-clock,context-switches`.
 *
 *     cc -O2 -Iinclude -o bench-capi-sync scripts/bench-capi-sync.c \
 *        -Ltarget/release -lqcow2rs -lpthread -Wl,-rpath,$PWD/target/release
 *     bench-capi-sync IMAGE THREADS COUNT WRITE(0|1) DIRECT(0|1)
 */
#define _GNU_SOURCE
#include <qcow2rs.h>

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static struct qcow2rs_image *img;
static uint64_t count, size;
static int write_mode;

static void *run(void *arg)
{
    uint64_t off = (uint64_t)(uintptr_t)arg * 7919 * 65536;
    void *buf;
    if (posix_memalign(&buf, 4096, 4096) != 0)
        abort();
    memset(buf, 0x5a, 4096);
    for (uint64_t i = 0; i < count; i++) {
        off = ((off + 123457ull * 4096) % (size - 4096)) & ~4095ull;
        int r = write_mode ? qcow2rs_write(img, buf, 4096, off) : qcow2rs_read(img, buf, 4096, off);
        if (r < 0) {
            fprintf(stderr, "%s\n", qcow2rs_last_error());
            exit(1);
        }
    }
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s IMAGE THREADS COUNT WRITE(0|1) DIRECT(0|1)\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[2]);
    if (n < 1 || n > 64) {
        fprintf(stderr, "THREADS: 1 to 64\n");
        return 2;
    }
    count = strtoull(argv[3], NULL, 0);
    write_mode = atoi(argv[4]);
    struct qcow2rs_open_options o = QCOW2RS_OPEN_OPTIONS_INIT;
    o.engine = QCOW2RS_ENGINE_IO_URING;
    if (atoi(argv[5]))
        o.flags |= QCOW2RS_OPEN_DIRECT;
    if (write_mode)
        o.flags |= QCOW2RS_OPEN_RDWR;
    if (qcow2rs_open_ext(argv[1], &o, &img) < 0) {
        fprintf(stderr, "%s\n", qcow2rs_last_error());
        return 1;
    }
    size = qcow2rs_get_size(img);
    if (size <= 4096) {
        fprintf(stderr, "the image is too small\n");
        return 1;
    }
    pthread_t th[64];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < n; i++)
        pthread_create(&th[i], NULL, run, (void *)(uintptr_t)i);
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("Run completed in %.3f seconds.\n",
           (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    return qcow2rs_close(img) < 0;
}
