/*
 * read_image: write the guest disk of a qcow2 image to standard output, with blocking reads.
 *
 *     read_image IMAGE > disk.raw
 *
 * The output equals `qemu-img convert -O raw IMAGE disk.raw` (without its holes).
 */
#include <qcow2rs.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s IMAGE > disk.raw\n", argv[0]);
        return 2;
    }
    struct qcow2rs_image *img;
    int r = qcow2rs_open(argv[1], QCOW2RS_OPEN_RDONLY, &img);
    if (r < 0) {
        fprintf(stderr, "%s\n", qcow2rs_last_error());
        return 1;
    }
    uint64_t size = qcow2rs_get_size(img);
    size_t chunk = 1 << 20;
    char *buf = malloc(chunk);
    if (!buf) {
        perror("malloc");
        qcow2rs_close(img);
        return 1;
    }
    for (uint64_t off = 0; off < size; off += chunk) {
        size_t n = size - off < chunk ? (size_t)(size - off) : chunk;
        r = qcow2rs_read(img, buf, n, off);
        if (r < 0) {
            fprintf(stderr, "read at %llu: %s\n", (unsigned long long)off,
                    qcow2rs_last_error());
            break;
        }
        if (fwrite(buf, 1, n, stdout) != n) {
            perror("write");
            r = -1;
            break;
        }
    }
    free(buf);
    if (fflush(stdout) != 0) {
        perror("write");
        r = -1;
    }
    if (qcow2rs_close(img) < 0) {
        fprintf(stderr, "%s\n", qcow2rs_last_error());
        r = -1;
    }
    return r < 0 ? 1 : 0;
}
