/*
 * event_loop: copy the guest disk of a qcow2 image into a raw file from a single-threaded
 * poll(2) loop, with the image in event-loop mode (QCOW2RS_OPEN_POLL): completions are
 * queued, the image's eventfd wakes the loop, and qcow2rs_process_completions() runs the
 * callbacks here, on the loop's thread. This is how a VMM's main loop would use the library.
 *
 *     event_loop [-d DEPTH] IMAGE OUT.raw
 */
#define _GNU_SOURCE
#include <qcow2rs.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK (128 * 1024)

struct loop {
    struct qcow2rs_image *img;
    int out;
    uint64_t size, next;
    int in_flight, failed;
    unsigned long completions;
};

struct req {
    struct loop *l;
    uint64_t off;
    size_t len;
    char buf[CHUNK];
};

static void done(void *user_data, const struct qcow2rs_completion *c);

static void start(struct req *r)
{
    struct loop *l = r->l;
    if (l->failed || l->next >= l->size)
        return;
    r->off = l->next;
    r->len = l->size - r->off < CHUNK ? (size_t)(l->size - r->off) : CHUNK;
    l->next += r->len;
    if (qcow2rs_aio_read(l->img, r->buf, r->len, r->off, done, r, 0) < 0) {
        fprintf(stderr, "submit: %s\n", qcow2rs_last_error());
        l->failed = 1;
        return;
    }
    l->in_flight++;
}

/* Runs inside qcow2rs_process_completions(), on the loop's thread: no locking needed. */
static void done(void *user_data, const struct qcow2rs_completion *c)
{
    struct req *r = user_data;
    struct loop *l = r->l;
    l->in_flight--;
    l->completions++;
    if (c->ret < 0) {
        fprintf(stderr, "read at %llu: %s\n", (unsigned long long)r->off, c->error_msg);
        l->failed = 1;
    } else if (pwrite(l->out, r->buf, r->len, (off_t)r->off) != (ssize_t)r->len) {
        fprintf(stderr, "write: %s\n", strerror(errno));
        l->failed = 1;
    }
    start(r);
}

int main(int argc, char **argv)
{
    int depth = 8, opt;
    while ((opt = getopt(argc, argv, "d:")) != -1) {
        if (opt == 'd')
            depth = atoi(optarg);
        else
            return 2;
    }
    if (argc - optind != 2 || depth < 1) {
        fprintf(stderr, "usage: %s [-d DEPTH] IMAGE OUT.raw\n", argv[0]);
        return 2;
    }
    struct loop l = { 0 };
    if (qcow2rs_open(argv[optind], QCOW2RS_OPEN_RDONLY | QCOW2RS_OPEN_POLL, &l.img) < 0) {
        fprintf(stderr, "%s\n", qcow2rs_last_error());
        return 1;
    }
    l.size = qcow2rs_get_size(l.img);
    l.out = open(argv[optind + 1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (l.out < 0 || ftruncate(l.out, (off_t)l.size) < 0) {
        perror(argv[optind + 1]);
        qcow2rs_close(l.img);
        return 1;
    }
    struct req *reqs = calloc((size_t)depth, sizeof *reqs);
    for (int i = 0; i < depth; i++) {
        reqs[i].l = &l;
        start(&reqs[i]);
    }
    struct pollfd pfd = { .fd = qcow2rs_get_completion_fd(l.img), .events = POLLIN };
    while (l.in_flight > 0) {
        /* A real loop would poll its other descriptors here too. */
        int n = poll(&pfd, 1, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            perror("poll");
            l.failed = 1;
            break;
        }
        if (qcow2rs_process_completions(l.img, 0) < 0) {
            fprintf(stderr, "%s\n", qcow2rs_last_error());
            l.failed = 1;
            break;
        }
    }
    /* close() runs any callbacks still due, here. */
    if (qcow2rs_close(l.img) < 0) {
        fprintf(stderr, "%s\n", qcow2rs_last_error());
        l.failed = 1;
    }
    free(reqs);
    if (close(l.out) < 0)
        l.failed = 1;
    fprintf(stderr, "%lu completions\n", l.completions);
    return l.failed ? 1 : 0;
}
