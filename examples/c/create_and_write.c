/*
 * create_and_write: create a qcow2 image with options, write to it, make it durable.
 *
 *     create_and_write IMAGE SIZE_MIB
 *
 * The image gets 64 KiB clusters, lazy refcounts and zstd compression; the first MiB is
 * filled with the byte 0xab, the text "hello from C" is written at offset 1 MiB + 7, and the
 * last MiB is written and then zeroed. Check the result with
 *     qemu-io -c 'read -P 0xab 0 1M' IMAGE && qemu-img check IMAGE
 */
#include <qcow2rs.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what)
{
    fprintf(stderr, "%s: %s\n", what, qcow2rs_last_error());
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s IMAGE SIZE_MIB\n", argv[0]);
        return 2;
    }
    uint64_t size = strtoull(argv[2], NULL, 10) << 20;
    if (size < (2 << 20)) {
        fprintf(stderr, "SIZE_MIB must be at least 2\n");
        return 2;
    }
    struct qcow2rs_create_options co = QCOW2RS_CREATE_OPTIONS_INIT;
    co.cluster_size = 65536;
    co.flags = QCOW2RS_CREATE_LAZY_REFCOUNTS;
    co.compression_type = QCOW2RS_COMPRESSION_ZSTD;
    if (qcow2rs_create(argv[1], size, &co) < 0)
        return fail("create");

    struct qcow2rs_image *img;
    if (qcow2rs_open(argv[1], QCOW2RS_OPEN_RDWR, &img) < 0)
        return fail("open");
    static char buf[1 << 20];
    memset(buf, 0xab, sizeof buf);
    const char *msg = "hello from C";
    int r = qcow2rs_write(img, buf, sizeof buf, 0);
    if (r == 0)
        r = qcow2rs_write(img, msg, strlen(msg), (1 << 20) + 7);
    if (r == 0)
        r = qcow2rs_write(img, buf, sizeof buf, size - sizeof buf);
    if (r == 0)
        r = qcow2rs_write_zeroes(img, sizeof buf, size - sizeof buf, QCOW2RS_ZEROES_MAY_UNMAP);
    if (r == 0)
        r = qcow2rs_flush(img); /* everything above is now durable */
    if (r < 0) {
        fail("write");
        qcow2rs_close(img);
        return 1;
    }
    struct qcow2rs_info info = QCOW2RS_INFO_INIT;
    if (qcow2rs_get_info(img, &info) < 0)
        return fail("info");
    printf("%s: %llu bytes, cluster size %llu, version %u\n", argv[1],
           (unsigned long long)info.virtual_size, (unsigned long long)info.cluster_size,
           info.version);
    if (qcow2rs_close(img) < 0)
        return fail("close");

    char *report = NULL;
    r = qcow2rs_check(argv[1], QCOW2RS_REPAIR_NONE, &report);
    if (r < 0)
        return fail("check");
    printf("check: %s", r == QCOW2RS_CHECK_CLEAN ? "clean\n" : report);
    qcow2rs_free(report);
    return r == QCOW2RS_CHECK_CLEAN ? 0 : 1;
}
