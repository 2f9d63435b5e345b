/*
 * 8 threads submit at once on one image: reads, writes, write-zeroes (with and without
 * unmap), discards and flushes, asynchronous and blocking, each also applied to a raw
 * mirror file. Afterwards `qemu-img check` must find no corruption and `qemu-img compare`
 * must find the image equal to the mirror.
 *
 * Every thread owns its part of the disk, so that the mirror is well defined: in the first
 * half, whole clusters (cluster c belongs to thread c % 8: cluster-sized zeroes and discards);
 * in the second half, 4 KiB blocks (block b belongs to thread b % 8: every cluster there is
 * written by all 8 threads at once, which exercises allocation and copy-on-write of shared
 * clusters). A thread never has two requests in flight on the same unit.
 *
 * Usage: test_stress WORKDIR [TEST...]; QCOW2RS_TEST_SMALL=1 for a short run.
 */
#include "harness.h"

#define THREADS 8
#define DEPTH 4
#define CLUSTER 65536
#define BLOCK 4096

static uint64_t disk_size;
static int ops_per_thread;
static int mirror_fd;
static struct qcow2rs_image *img;

enum op { OP_WRITE, OP_READ, OP_ZERO, OP_ZERO_UNMAP, OP_DISCARD, OP_FLUSH };

struct slot {
    bool busy;     /* submitted, not yet processed by the owner */
    bool done;     /* completed: ret is valid */
    int ret;
    enum op op;
    uint64_t unit; /* start of the owned unit */
    uint64_t off;
    uint64_t len;
    uint8_t *buf;
    struct worker *w;
};

struct worker {
    int id;
    uint64_t rng;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct slot slots[DEPTH];
    int failures;
    int ops[6];
};

static uint64_t rnd(struct worker *w)
{
    w->rng ^= w->rng << 13;
    w->rng ^= w->rng >> 7;
    w->rng ^= w->rng << 17;
    return w->rng;
}

static void fail(struct worker *w, const char *what, struct slot *s, const char *msg)
{
    fprintf(stderr, "thread %d: %s at %" PRIu64 " len %" PRIu64 " failed: %s\n", w->id, what,
            s->off, s->len, msg);
    w->failures++;
}

static void complete_cb(void *ud, const struct qcow2rs_completion *c)
{
    struct slot *s = ud;
    pthread_mutex_lock(&s->w->mu);
    s->ret = c->ret;
    s->done = true;
    if (c->ret < 0)
        fprintf(stderr, "request failed: %s\n", c->error_msg ? c->error_msg : "?");
    pthread_cond_broadcast(&s->w->cv);
    pthread_mutex_unlock(&s->w->mu);
}

static bool unit_busy(struct worker *w, uint64_t unit)
{
    for (int i = 0; i < DEPTH; i++)
        if (w->slots[i].busy && w->slots[i].op != OP_FLUSH && w->slots[i].unit == unit)
            return true;
    return false;
}

/* Pick a unit owned by this worker that has no request in flight; sets the range. */
static void pick(struct worker *w, struct slot *s, bool whole)
{
    uint64_t half = disk_size / 2;
    for (;;) {
        if (rnd(w) % 2 == 0) {
            uint64_t nclusters = half / CLUSTER / THREADS;
            uint64_t c = (rnd(w) % nclusters) * THREADS + (uint64_t)w->id;
            s->unit = c * CLUSTER;
            s->off = s->unit;
            s->len = CLUSTER;
            if (!whole && rnd(w) % 2) {
                s->off += rnd(w) % CLUSTER;
                s->len = 1 + rnd(w) % (s->unit + CLUSTER - s->off);
            }
        } else {
            uint64_t nblocks = half / BLOCK / THREADS;
            uint64_t b = (rnd(w) % nblocks) * THREADS + (uint64_t)w->id;
            s->unit = half + b * BLOCK;
            s->off = s->unit;
            s->len = BLOCK;
            if (!whole && rnd(w) % 2) {
                s->off += rnd(w) % BLOCK;
                s->len = 1 + rnd(w) % (s->unit + BLOCK - s->off);
            }
        }
        if (!unit_busy(w, s->unit))
            return;
    }
}

static void mirror_write(struct worker *w, struct slot *s, const uint8_t *data)
{
    if (pwrite(mirror_fd, data, s->len, (off_t)s->off) != (ssize_t)s->len)
        fail(w, "mirror pwrite", s, strerror(errno));
}

static void check_read(struct worker *w, struct slot *s)
{
    static __thread uint8_t want[CLUSTER];
    if (pread(mirror_fd, want, s->len, (off_t)s->off) != (ssize_t)s->len)
        fail(w, "mirror pread", s, strerror(errno));
    else if (memcmp(want, s->buf, s->len) != 0)
        fail(w, "read", s, "data differs from the mirror");
}

/* The owner's processing of a completed request. */
static void finish(struct worker *w, struct slot *s)
{
    static __thread uint8_t zeros[CLUSTER];
    if (s->ret < 0) {
        fail(w, "request", s, strerror(-s->ret));
    } else {
        switch (s->op) {
        case OP_WRITE: mirror_write(w, s, s->buf); break;
        case OP_READ: check_read(w, s); break;
        case OP_ZERO:
        case OP_ZERO_UNMAP:
        case OP_DISCARD: mirror_write(w, s, zeros); break;
        case OP_FLUSH: break;
        }
    }
    s->busy = false;
    s->done = false;
}

static void submit(struct worker *w, struct slot *s)
{
    uint64_t r = rnd(w) % 100;
    int ret;
    bool blocking = rnd(w) % 8 == 0;
    if (r < 40) {
        s->op = OP_WRITE;
        pick(w, s, false);
        fill_pattern(s->buf, s->len, rnd(w));
    } else if (r < 70) {
        s->op = OP_READ;
        pick(w, s, false);
    } else if (r < 80) {
        s->op = OP_ZERO;
        pick(w, s, rnd(w) % 2);
    } else if (r < 87) {
        s->op = OP_ZERO_UNMAP;
        pick(w, s, rnd(w) % 2);
    } else if (r < 96) {
        s->op = OP_DISCARD;
        pick(w, s, rnd(w) % 2);
    } else {
        s->op = OP_FLUSH;
        s->off = s->len = 0;
    }
    w->ops[s->op]++;
    s->busy = true;
    s->done = false;
    if (blocking) {
        switch (s->op) {
        case OP_WRITE: ret = qcow2rs_write(img, s->buf, s->len, s->off); break;
        case OP_READ: ret = qcow2rs_read(img, s->buf, s->len, s->off); break;
        case OP_ZERO: ret = qcow2rs_write_zeroes(img, s->len, s->off, 0); break;
        case OP_ZERO_UNMAP:
            ret = qcow2rs_write_zeroes(img, s->len, s->off, QCOW2RS_ZEROES_MAY_UNMAP);
            break;
        case OP_DISCARD: ret = qcow2rs_discard(img, s->len, s->off, 0); break;
        default: ret = qcow2rs_flush(img); break;
        }
        s->ret = ret;
        finish(w, s);
        return;
    }
    switch (s->op) {
    case OP_WRITE:
        ret = qcow2rs_aio_write(img, s->buf, s->len, s->off, complete_cb, s, 0);
        break;
    case OP_READ:
        ret = qcow2rs_aio_read(img, s->buf, s->len, s->off, complete_cb, s, 0);
        break;
    case OP_ZERO:
        ret = qcow2rs_aio_write_zeroes(img, s->len, s->off, complete_cb, s, 0);
        break;
    case OP_ZERO_UNMAP:
        ret = qcow2rs_aio_write_zeroes(img, s->len, s->off, complete_cb, s,
                                       QCOW2RS_ZEROES_MAY_UNMAP);
        break;
    case OP_DISCARD:
        ret = qcow2rs_aio_discard(img, s->len, s->off, complete_cb, s, 0);
        break;
    default: ret = qcow2rs_aio_flush(img, complete_cb, s, 0); break;
    }
    if (ret < 0) {
        s->ret = ret;
        finish(w, s);
    }
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    int submitted = 0;
    for (int i = 0; i < DEPTH; i++) {
        w->slots[i].w = w;
        w->slots[i].buf = malloc(CLUSTER);
    }
    for (;;) {
        /* Submit into free slots. */
        for (int i = 0; i < DEPTH && submitted < ops_per_thread; i++) {
            pthread_mutex_lock(&w->mu);
            bool free_slot = !w->slots[i].busy;
            pthread_mutex_unlock(&w->mu);
            if (free_slot) {
                submit(w, &w->slots[i]);
                submitted++;
            }
        }
        /* Wait for a completion (or for everything, at the end). */
        pthread_mutex_lock(&w->mu);
        int busy = 0, done = -1;
        for (;;) {
            busy = 0;
            done = -1;
            for (int i = 0; i < DEPTH; i++) {
                busy += w->slots[i].busy;
                if (w->slots[i].busy && w->slots[i].done)
                    done = i;
            }
            if (done >= 0 || busy == 0)
                break;
            pthread_cond_wait(&w->cv, &w->mu);
        }
        pthread_mutex_unlock(&w->mu);
        if (done >= 0)
            finish(w, &w->slots[done]);
        else if (submitted >= ops_per_thread)
            break;
    }
    for (int i = 0; i < DEPTH; i++)
        free(w->slots[i].buf);
    return NULL;
}

static void run_stress(bool with_backing, uint32_t open_flags)
{
    const char *p = tpath("stress.qcow2"), *mirror = tpath("mirror.raw");
    disk_size = (small_run() ? 8 : 64) * 1024 * 1024ull;
    ops_per_thread = small_run() ? 60 : 3000;

    if (with_backing) {
        /* A base with data in most clusters; the mirror starts as its content. */
        const char *base = tpath("base.qcow2");
        CHECK_RET(qcow2rs_create(base, disk_size, NULL), 0);
        struct qcow2rs_image *b;
        CHECK_RET(qcow2rs_open(base, QCOW2RS_OPEN_RDWR, &b), 0);
        uint8_t *buf = malloc(CLUSTER);
        for (uint64_t off = 0; off < disk_size; off += CLUSTER) {
            if ((off / CLUSTER) % 5 == 4)
                continue; /* some clusters unallocated in the base too */
            fill_pattern(buf, CLUSTER, off);
            CHECK_RET(qcow2rs_write(b, buf, CLUSTER, off), 0);
        }
        free(buf);
        CHECK_RET(qcow2rs_close(b), 0);
        struct qcow2rs_create_options co = QCOW2RS_CREATE_OPTIONS_INIT;
        co.backing_file = "base.qcow2";
        co.backing_format = "qcow2";
        CHECK_RET(qcow2rs_create(p, 0, &co), 0);
        CHECK_RET(qcow2rs_convert(base, mirror, NULL), 0);
    } else {
        CHECK_RET(qcow2rs_create(p, disk_size, NULL), 0);
        CHECK_RET(shell("truncate -s %" PRIu64 " '%s'", disk_size, mirror), 0);
    }
    mirror_fd = open(mirror, O_RDWR);
    CHECK(mirror_fd >= 0);
    CHECK_RET(qcow2rs_open(p, QCOW2RS_OPEN_RDWR | open_flags, &img), 0);

    /* QCOW2RS_TEST_SEED varies the request mix; the default one is fixed. */
    const char *seed_env = getenv("QCOW2RS_TEST_SEED");
    uint64_t seed = seed_env ? strtoull(seed_env, NULL, 0) : 0x12345678ull;
    if (seed == 0)
        seed = 1;
    printf("# seed %" PRIu64 "\n", seed);
    static struct worker workers[THREADS];
    pthread_t th[THREADS];
    memset(workers, 0, sizeof workers);
    for (int i = 0; i < THREADS; i++) {
        workers[i].id = i;
        workers[i].rng = seed * (uint64_t)(i + 1) + (with_backing ? 77 : 0);
        pthread_mutex_init(&workers[i].mu, NULL);
        pthread_cond_init(&workers[i].cv, NULL);
        CHECK(pthread_create(&th[i], NULL, worker_main, &workers[i]) == 0);
    }
    int failures = 0, ops[6] = { 0 };
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        failures += workers[i].failures;
        for (int k = 0; k < 6; k++)
            ops[k] += workers[i].ops[k];
    }
    CHECK_RET(qcow2rs_close(img), 0);
    close(mirror_fd);
    printf("# %d threads: %d writes, %d reads, %d zeroes, %d zeroes+unmap, %d discards, "
           "%d flushes\n",
           THREADS, ops[OP_WRITE], ops[OP_READ], ops[OP_ZERO], ops[OP_ZERO_UNMAP],
           ops[OP_DISCARD], ops[OP_FLUSH]);
    CHECK(failures == 0);
    CHECK_RET(shell("qemu-img check '%s' >'%s' 2>&1 || { cat '%s'; exit 1; }", p,
                    tpath("check.out"), tpath("check.out")),
              0);
    CHECK_RET(shell("qemu-img compare -f qcow2 -F raw '%s' '%s'", p, mirror), 0);
}

static void test_stress(void)
{
    run_stress(false, 0);
}

static void test_stress_backing(void)
{
    run_stress(true, 0);
}

/*
 * The same mix with O_DIRECT, so that nearly every request waits for the device in an
 * io_uring ring: the blocking calls of 8 threads wait in (and reap) their own threads' rings
 * while the library's request workers wait in theirs for the asynchronous requests and run
 * their callbacks, more threads than rings. A lost wake-up hangs: the alarm makes that a
 * failure instead.
 */
static void test_stress_direct(void)
{
    alarm(small_run() ? 600 : 300);
    run_stress(false, QCOW2RS_OPEN_DIRECT);
    alarm(0);
}

TEST_MAIN(TEST(stress), TEST(stress_backing), TEST(stress_direct))
