/*
 * aio_copy: copy the guest disk of a qcow2 image into a raw file with DEPTH asynchronous
 * reads in flight. Each completion callback (on a library thread) writes its chunk to the
 * output and submits the next read; the main thread only waits.
 *
 *     aio_copy [-d DEPTH] [-s CHUNK_KIB] IMAGE OUT.raw
 */
#define _GNU_SOURCE
#include <qcow2rs.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct copy {
    struct qcow2rs_image *img;
    int out;
    uint64_t size, chunk, next; /* next: offset of the next chunk to read (under mu) */
    int in_flight, failed;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

struct req {
    struct copy *c;
    uint64_t off;
    size_t len;
    char *buf;
};

static void read_done(void *user_data, const struct qcow2rs_completion *comp);

/* Start the next chunk on `r`, or retire `r`. Called with c->mu held. */
static void start_next(struct req *r)
{
    struct copy *c = r->c;
    if (c->failed || c->next >= c->size) {
        c->in_flight--;
        pthread_cond_signal(&c->cv);
        return;
    }
    r->off = c->next;
    r->len = (size_t)(c->size - r->off < c->chunk ? c->size - r->off : c->chunk);
    c->next += r->len;
    int ret = qcow2rs_aio_read(c->img, r->buf, r->len, r->off, read_done, r, 0);
    if (ret < 0) {
        fprintf(stderr, "submit: %s\n", qcow2rs_last_error());
        c->failed = 1;
        c->in_flight--;
        pthread_cond_signal(&c->cv);
    }
}

static void read_done(void *user_data, const struct qcow2rs_completion *comp)
{
    struct req *r = user_data;
    struct copy *c = r->c;
    int bad = 0;
    if (comp->ret < 0) {
        fprintf(stderr, "read at %llu: %s\n", (unsigned long long)r->off, comp->error_msg);
        bad = 1;
    } else if (pwrite(c->out, r->buf, r->len, (off_t)r->off) != (ssize_t)r->len) {
        fprintf(stderr, "write at %llu: %s\n", (unsigned long long)r->off, strerror(errno));
        bad = 1;
    }
    pthread_mutex_lock(&c->mu);
    if (bad)
        c->failed = 1;
    start_next(r); /* submitting from a callback is allowed */
    pthread_mutex_unlock(&c->mu);
}

int main(int argc, char **argv)
{
    int depth = 16, opt;
    uint64_t chunk_kib = 256;
    while ((opt = getopt(argc, argv, "d:s:")) != -1) {
        if (opt == 'd')
            depth = atoi(optarg);
        else if (opt == 's')
            chunk_kib = strtoull(optarg, NULL, 10);
        else
            return 2;
    }
    if (argc - optind != 2 || depth < 1 || chunk_kib < 1) {
        fprintf(stderr, "usage: %s [-d DEPTH] [-s CHUNK_KIB] IMAGE OUT.raw\n", argv[0]);
        return 2;
    }
    struct copy c = { .chunk = chunk_kib * 1024, .mu = PTHREAD_MUTEX_INITIALIZER,
                      .cv = PTHREAD_COND_INITIALIZER };
    if (qcow2rs_open(argv[optind], QCOW2RS_OPEN_RDONLY, &c.img) < 0) {
        fprintf(stderr, "%s\n", qcow2rs_last_error());
        return 1;
    }
    c.size = qcow2rs_get_size(c.img);
    c.out = open(argv[optind + 1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (c.out < 0 || ftruncate(c.out, (off_t)c.size) < 0) {
        perror(argv[optind + 1]);
        qcow2rs_close(c.img);
        return 1;
    }
    struct req *reqs = calloc((size_t)depth, sizeof *reqs);
    pthread_mutex_lock(&c.mu);
    for (int i = 0; i < depth; i++) {
        reqs[i].c = &c;
        reqs[i].buf = malloc(c.chunk);
        c.in_flight++;
        start_next(&reqs[i]);
    }
    while (c.in_flight > 0)
        pthread_cond_wait(&c.cv, &c.mu);
    pthread_mutex_unlock(&c.mu);
    /* Every callback has returned or is about to: close waits for them to finish. */
    if (qcow2rs_close(c.img) < 0) {
        fprintf(stderr, "%s\n", qcow2rs_last_error());
        c.failed = 1;
    }
    for (int i = 0; i < depth; i++)
        free(reqs[i].buf);
    free(reqs);
    if (close(c.out) < 0)
        c.failed = 1;
    return c.failed ? 1 : 0;
}
