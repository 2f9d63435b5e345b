/*
 * bench: `qcow2rs bench` / `qemu-img bench` through the C library's completion callbacks.
 *
 *     bench [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFFSET] [-t none|writeback]
 *           [-i io_uring|threads] [-w [--pattern=N]] [-f qcow2] [-q] IMAGE
 *
 * The same options, request order, output and timing as `qcow2rs bench`: request k goes to
 * o(k), with o(0) = OFFSET and o(k+1) = (o(k) + STEP) mod (image size - SIZE); DEPTH requests
 * are in flight, each with its own 4 KiB-aligned buffer; every completion callback submits
 * the next request. Writes are flushed after the clock stops.
 */
#define _GNU_SOURCE
#include <qcow2rs.h>

#include <getopt.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct bench {
    struct qcow2rs_image *img;
    uint64_t count, offset, step, bufsize, size;
    int write;
    uint64_t next;      /* next request number (atomic) */
    uint64_t completed; /* atomic */
    int failed;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int finished;
};

struct slot {
    struct bench *b;
    void *buf;
};

static uint64_t request_offset(const struct bench *b, uint64_t k)
{
    if (k == 0)
        return b->offset;
    if (b->size <= b->bufsize)
        return 0;
    unsigned __int128 m = b->size - b->bufsize;
    return (uint64_t)(((unsigned __int128)b->offset + (unsigned __int128)k * b->step) % m);
}

static void done(void *user_data, const struct qcow2rs_completion *c);

/* Submit the next request on `s`; returns 0 when there is none left. */
static int submit_next(struct slot *s)
{
    struct bench *b = s->b;
    uint64_t k = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED);
    if (k >= b->count)
        return 0;
    uint64_t off = request_offset(b, k);
    int r = b->write ? qcow2rs_aio_write(b->img, s->buf, b->bufsize, off, done, s, 0)
                     : qcow2rs_aio_read(b->img, s->buf, b->bufsize, off, done, s, 0);
    if (r < 0) {
        fprintf(stderr, "Failed request: %s\n", qcow2rs_last_error());
        __atomic_store_n(&b->failed, 1, __ATOMIC_RELAXED);
        return 0;
    }
    return 1;
}

static void finish(struct bench *b)
{
    pthread_mutex_lock(&b->mu);
    b->finished++;
    pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

static void done(void *user_data, const struct qcow2rs_completion *c)
{
    struct slot *s = user_data;
    struct bench *b = s->b;
    if (c->ret < 0) {
        fprintf(stderr, "Failed request: %s\n", c->error_msg);
        __atomic_store_n(&b->failed, 1, __ATOMIC_RELAXED);
    }
    if (__atomic_load_n(&b->failed, __ATOMIC_RELAXED) || !submit_next(s))
        finish(b); /* this slot is idle from now on */
}

/* qemu's cvtnum: a byte count with an optional suffix (k, M, G, T). */
static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 0);
    uint64_t mult = 1;
    switch (*end) {
    case '\0': break;
    case 'b': case 'B': mult = 1; end++; break;
    case 'k': case 'K': mult = 1ull << 10; end++; break;
    case 'm': case 'M': mult = 1ull << 20; end++; break;
    case 'g': case 'G': mult = 1ull << 30; end++; break;
    case 't': case 'T': mult = 1ull << 40; end++; break;
    default: return -1;
    }
    if (*end != '\0' || end == s)
        return -1;
    *out = v * mult;
    return 0;
}

int main(int argc, char **argv)
{
    struct bench b = { .count = 75000, .bufsize = 4096, .mu = PTHREAD_MUTEX_INITIALIZER,
                       .cv = PTHREAD_COND_INITIALIZER };
    uint64_t depth = 64, pattern = 0;
    struct qcow2rs_open_options o = QCOW2RS_OPEN_OPTIONS_INIT;
    static const struct option longopts[] = { { "pattern", required_argument, NULL, 'P' },
                                               { NULL, 0, NULL, 0 } };
    int opt;
    while ((opt = getopt_long(argc, argv, "c:d:s:S:o:t:i:wf:q", longopts, NULL)) != -1) {
        uint64_t v;
        switch (opt) {
        case 'c':
            if (parse_size(optarg, &b.count) < 0) { fprintf(stderr, "Invalid request count specified\n"); return 1; }
            break;
        case 'd':
            if (parse_size(optarg, &depth) < 0 || depth == 0) { fprintf(stderr, "Invalid queue depth specified\n"); return 1; }
            break;
        case 's':
            if (parse_size(optarg, &b.bufsize) < 0 || b.bufsize == 0) { fprintf(stderr, "Invalid buffer size specified\n"); return 1; }
            break;
        case 'S':
            if (parse_size(optarg, &b.step) < 0) { fprintf(stderr, "Invalid step size specified\n"); return 1; }
            break;
        case 'o':
            if (parse_size(optarg, &b.offset) < 0) { fprintf(stderr, "Invalid offset specified\n"); return 1; }
            break;
        case 't':
            if (strcmp(optarg, "none") == 0 || strcmp(optarg, "directsync") == 0)
                o.flags |= QCOW2RS_OPEN_DIRECT;
            else if (strcmp(optarg, "writeback") && strcmp(optarg, "unsafe") && strcmp(optarg, "writethrough")) {
                fprintf(stderr, "Invalid cache mode\n");
                return 1;
            }
            break;
        case 'i':
            if (strcmp(optarg, "io_uring") == 0 || strcmp(optarg, "native") == 0)
                o.engine = QCOW2RS_ENGINE_IO_URING;
            else if (strcmp(optarg, "threads") == 0)
                o.engine = QCOW2RS_ENGINE_THREADS;
            else {
                fprintf(stderr, "Invalid aio option provided\n");
                return 1;
            }
            break;
        case 'w': b.write = 1; break;
        case 'P':
            if (parse_size(optarg, &v) < 0 || v > 255) { fprintf(stderr, "Invalid pattern byte specified\n"); return 1; }
            pattern = v;
            break;
        case 'f':
            if (strcmp(optarg, "qcow2") != 0) { fprintf(stderr, "only -f qcow2 is supported\n"); return 1; }
            break;
        case 'q': break;
        default: return 1;
        }
    }
    if (argc - optind != 1) {
        fprintf(stderr, "Expecting one image file name\n");
        return 1;
    }
    if (b.step == 0)
        b.step = b.bufsize;
    if (b.write)
        o.flags |= QCOW2RS_OPEN_RDWR;
    if (qcow2rs_open_ext(argv[optind], &o, &b.img) < 0) {
        fprintf(stderr, "%s\n", qcow2rs_last_error());
        return 1;
    }
    b.size = qcow2rs_get_size(b.img);
    uint64_t nslots = depth < b.count ? depth : b.count;
    struct slot *slots = calloc(nslots ? nslots : 1, sizeof *slots);
    for (uint64_t i = 0; i < nslots; i++) {
        slots[i].b = &b;
        if (posix_memalign(&slots[i].buf, 4096, b.bufsize) != 0) {
            fprintf(stderr, "cannot allocate the request buffers\n");
            return 1;
        }
        memset(slots[i].buf, (int)pattern, b.bufsize);
    }
    printf("Sending %llu %s requests, %llu bytes each, %llu in parallel (starting at offset "
           "%llu, step size %llu)\n",
           (unsigned long long)b.count, b.write ? "write" : "read",
           (unsigned long long)b.bufsize, (unsigned long long)depth,
           (unsigned long long)b.offset, (unsigned long long)b.step);
    fflush(stdout);

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t started = 0;
    for (uint64_t i = 0; i < nslots; i++)
        started += (uint64_t)submit_next(&slots[i]);
    pthread_mutex_lock(&b.mu);
    while ((uint64_t)b.finished < started)
        pthread_cond_wait(&b.cv, &b.mu);
    pthread_mutex_unlock(&b.mu);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;

    int failed = b.failed;
    if (b.write && !failed && qcow2rs_flush(b.img) < 0) {
        fprintf(stderr, "Failed to flush the image: %s\n", qcow2rs_last_error());
        failed = 1;
    }
    if (qcow2rs_close(b.img) < 0) {
        fprintf(stderr, "%s\n", qcow2rs_last_error());
        failed = 1;
    }
    for (uint64_t i = 0; i < nslots; i++)
        free(slots[i].buf);
    free(slots);
    if (failed)
        return 1;
    printf("Run completed in %.3f seconds.\n", secs);
    return 0;
}
