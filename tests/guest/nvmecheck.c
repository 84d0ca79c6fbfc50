/*
 * nvmecheck: run inside the test guest (static, from the initramfs) against an mnvme
 * controller (crates/umdev-mnvme) that the guest's stock `nvme` driver has bound: it uses
 * only the block device /dev/nvme0n1 and what the driver shows in sysfs and
 * /proc/interrupts.
 *
 *   size       the namespace has the size given as argv[1] (bytes)
 *   identity   prints the controller's serial and subsystem NQN for the host to compare
 *   buffered   16 MiB pattern written through the page cache, fsync, caches dropped, read
 *              back and compared
 *   direct     16 threads of O_DIRECT writes then reads of 8 KiB to 128 KiB (PRP lists),
 *              some from buffers 512 bytes into a page (PRP1 with an offset); every block
 *              checked
 *   aio        64 O_DIRECT reads of 64 KiB in flight at once (Linux AIO), every block
 *              checked
 *   host-data  64 KiB the host wrote into the backing file before the boot, read back
 *   discard    BLKDISCARD (Dataset Management deallocate) and BLKZEROOUT (Write Zeroes)
 *              ranges read as zeroes, their neighbours untouched
 *   irqs       prints the nvme lines of /proc/interrupts ("GUEST-NVME-IRQ ...") for the
 *              host to judge; passes when some nvme interrupt counted
 *
 * The data pattern: the little-endian 64-bit word at byte offset o of the disk is
 * o * 0x9E3779B97F4A7C15 + seed (seed 1: buffered, 2: direct, 3: the host's block), so the
 * host finds the same bytes in the backing file. Regions (MiB): buffered 64..80, direct
 * 128..160, discard 200..202, host 900.
 *
 * Prints "GUEST-CHECK nvme-<name> PASS|FAIL <details>" per check and
 * "GUEST-NVMECHECK: <n> passed, <m> failed"; exits 0 when all passed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024ull * 1024)
#define DISK "/dev/nvme0n1"
#define GOLDEN 0x9E3779B97F4A7C15ull

#define CHECK_PREFIX "nvme-"
#include "check.h"



static void fill(uint8_t *buf, uint64_t off, size_t len, uint64_t seed)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t w = (off + i) * GOLDEN + seed;
        memcpy(buf + i, &w, 8);
    }
}

/* The first byte offset where buf differs from the pattern, or -1. */
static long long differs(const uint8_t *buf, uint64_t off, size_t len, uint64_t seed)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t w = (off + i) * GOLDEN + seed, got;
        memcpy(&got, buf + i, 8);
        if (got != w)
            return (long long)(off + i);
    }
    return -1;
}

static int read_text(const char *path, char *out, size_t n)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    if (!fgets(out, (int)n, f)) {
        fclose(f);
        return -1;
    }
    fclose(f);
    out[strcspn(out, "\n")] = 0;
    return 0;
}

static int full_pwrite(int fd, const void *b, size_t n, off_t off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = pwrite(fd, (const char *)b + done, n - done, off + (off_t)done);
        if (r <= 0)
            return -1;
        done += (size_t)r;
    }
    return 0;
}

static int full_pread(int fd, void *b, size_t n, off_t off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, (char *)b + done, n - done, off + (off_t)done);
        if (r <= 0)
            return -1;
        done += (size_t)r;
    }
    return 0;
}

static void buffered_check(void)
{
    const uint64_t off = 64 * MIB, len = 16 * MIB;
    uint8_t *b = malloc(len);
    int fd = open(DISK, O_RDWR);
    if (!b || fd < 0) {
        check("buffered", 0, "open: %s", strerror(errno));
        return;
    }
    fill(b, off, len, 1);
    int w = full_pwrite(fd, b, len, (off_t)off);
    int s = fsync(fd);
    close(fd);
    int dc = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (dc >= 0) {
        if (write(dc, "3\n", 2) != 2)
            dc = -1;
        else
            close(dc);
    }
    memset(b, 0, len);
    fd = open(DISK, O_RDONLY);
    int r = fd >= 0 ? full_pread(fd, b, len, (off_t)off) : -1;
    if (fd >= 0)
        close(fd);
    long long bad = differs(b, off, len, 1);
    check("buffered", w == 0 && s == 0 && dc >= 0 && r == 0 && bad < 0,
          "16 MiB at 64 MiB: write %d, fsync %d, drop_caches %s, read %d, first difference %lld", w,
          s, dc >= 0 ? "ok" : "failed", r, bad);
    free(b);
}

/* One O_DIRECT worker: its 2 MiB, in I/Os of a size and buffer skew of its own. */
struct worker {
    int id;
    uint64_t off, len;
    size_t io;
    size_t skew;
    long long bad;
    int err;
};

static void *direct_worker(void *arg)
{
    struct worker *w = arg;
    int fd = open(DISK, O_RDWR | O_DIRECT);
    uint8_t *mem = NULL;
    if (fd < 0 || posix_memalign((void **)&mem, 4096, w->io + 4096)) {
        w->err = errno ? errno : ENOMEM;
        return NULL;
    }
    uint8_t *b = mem + w->skew;
    for (uint64_t at = 0; at < w->len && !w->err; at += w->io) {
        fill(b, w->off + at, w->io, 2);
        if (full_pwrite(fd, b, w->io, (off_t)(w->off + at)))
            w->err = errno ? errno : EIO;
    }
    for (uint64_t at = 0; at < w->len && !w->err && w->bad < 0; at += w->io) {
        memset(b, 0xee, w->io);
        if (full_pread(fd, b, w->io, (off_t)(w->off + at)))
            w->err = errno ? errno : EIO;
        else
            w->bad = differs(b, w->off + at, w->io, 2);
    }
    close(fd);
    free(mem);
    return NULL;
}

static void direct_check(void)
{
    enum { THREADS = 16 };
    /* Sizes: one page plus, two pages, PRP lists up to MDTS (128 KiB). */
    static const size_t sizes[] = {8192, 65536, 131072, 16384, 4096, 36864, 65536, 131072};
    struct worker w[THREADS];
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) {
        w[i] = (struct worker){.id = i,
                               .off = 128 * MIB + (uint64_t)i * 2 * MIB,
                               .len = 2 * MIB - (2 * MIB) % sizes[i % 8],
                               .io = sizes[i % 8],
                               .skew = (i % 3 == 0) ? 512 : 0,
                               .bad = -1};
        pthread_create(&t[i], NULL, direct_worker, &w[i]);
    }
    int errs = 0;
    long long bad = -1;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        if (w[i].err) {
            errs++;
            printf("GUEST: direct worker %d: %s\n", i, strerror(w[i].err));
        }
        if (w[i].bad >= 0 && bad < 0)
            bad = w[i].bad;
    }
    check("direct", errs == 0 && bad < 0,
          "%d threads, O_DIRECT 4-128 KiB, buffers 512 B into a page for a third: %d errors, first "
          "difference %lld",
          THREADS, errs, bad);
}

static void aio_check(void)
{
    enum { N = 64, IO = 65536 };
    aio_context_t ctx = 0;
    int fd = open(DISK, O_RDONLY | O_DIRECT);
    uint8_t *mem = NULL;
    if (fd < 0 || posix_memalign((void **)&mem, 4096, (size_t)N * IO) ||
        syscall(SYS_io_setup, N, &ctx)) {
        check("aio", 0, "setup: %s", strerror(errno));
        return;
    }
    struct iocb cbs[N], *list[N];
    memset(cbs, 0, sizeof(cbs));
    for (int i = 0; i < N; i++) {
        cbs[i].aio_fildes = (uint32_t)fd;
        cbs[i].aio_lio_opcode = IOCB_CMD_PREAD;
        cbs[i].aio_buf = (uint64_t)(uintptr_t)(mem + (size_t)i * IO);
        cbs[i].aio_nbytes = IO;
        /* Spread over the region the direct check wrote. */
        cbs[i].aio_offset = (int64_t)(128 * MIB + (uint64_t)i * 512 * 1024);
        list[i] = &cbs[i];
    }
    memset(mem, 0xee, (size_t)N * IO);
    long sub = syscall(SYS_io_submit, ctx, N, list);
    struct io_event ev[N];
    long got = 0;
    while (sub == N && got < N) {
        long r = syscall(SYS_io_getevents, ctx, 1, N - got, ev + got, NULL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += r;
    }
    int errs = 0;
    for (long i = 0; i < got; i++)
        if (ev[i].res != IO)
            errs++;
    long long bad = -1;
    for (int i = 0; i < N && bad < 0; i++)
        bad = differs(mem + (size_t)i * IO, (uint64_t)cbs[i].aio_offset, IO, 2);
    syscall(SYS_io_destroy, ctx);
    close(fd);
    free(mem);
    check("aio", sub == N && got == N && errs == 0 && bad < 0,
          "%d reads of 64 KiB submitted at once: submitted %ld, completed %ld, %d failed, first "
          "difference %lld",
          N, sub, got, errs, bad);
}

static void host_data_check(void)
{
    const uint64_t off = 900 * MIB;
    const size_t len = 65536;
    uint8_t *b = NULL;
    int fd = open(DISK, O_RDONLY | O_DIRECT);
    if (fd < 0 || posix_memalign((void **)&b, 4096, len)) {
        check("host-data", 0, "open: %s", strerror(errno));
        return;
    }
    int r = full_pread(fd, b, len, (off_t)off);
    long long bad = differs(b, off, len, 3);
    close(fd);
    free(b);
    check("host-data", r == 0 && bad < 0, "64 KiB at 900 MiB the host wrote: read %d, first difference %lld",
          r, bad);
}

static int all_zero(const uint8_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (b[i])
            return 0;
    return 1;
}

static void discard_check(void)
{
    const uint64_t base = 200 * MIB;
    const size_t len = 2 * MIB;
    uint8_t *b = NULL;
    int fd = open(DISK, O_RDWR | O_DIRECT);
    if (fd < 0 || posix_memalign((void **)&b, 4096, len)) {
        check("discard", 0, "open: %s", strerror(errno));
        return;
    }
    fill(b, base, len, 4);
    int w = full_pwrite(fd, b, len, (off_t)base);
    /* Discard [200 MiB + 256 KiB, +256 KiB), zero out [200 MiB + 1 MiB, +64 KiB). */
    uint64_t d[2] = {base + 256 * 1024, 256 * 1024};
    uint64_t z[2] = {base + MIB, 65536};
    int rd = ioctl(fd, BLKDISCARD, d);
    int ed = rd ? errno : 0;
    int rz = ioctl(fd, BLKZEROOUT, z);
    int ez = rz ? errno : 0;
    memset(b, 0xee, len);
    int r = full_pread(fd, b, len, (off_t)base);
    int ok = w == 0 && rd == 0 && rz == 0 && r == 0;
    ok = ok && all_zero(b + 256 * 1024, 256 * 1024) && all_zero(b + MIB, 65536);
    ok = ok && differs(b, base, 256 * 1024, 4) < 0;
    ok = ok && differs(b + 512 * 1024, base + 512 * 1024, 512 * 1024, 4) < 0;
    ok = ok && differs(b + MIB + 65536, base + MIB + 65536, len - MIB - 65536, 4) < 0;
    close(fd);
    free(b);
    check("discard", ok, "BLKDISCARD %d (%s), BLKZEROOUT %d (%s), write %d, read %d", rd,
          strerror(ed), rz, strerror(ez), w, r);
}

static void irqs_check(void)
{
    FILE *f = fopen("/proc/interrupts", "r");
    char line[512];
    unsigned long long total = 0;
    int lines = 0;
    while (f && fgets(line, sizeof(line), f)) {
        if (!strstr(line, "nvme"))
            continue;
        line[strcspn(line, "\n")] = 0;
        printf("GUEST-NVME-IRQ %s\n", line);
        lines++;
        /* "  N:  c0  c1 ... type ... name": sum the numbers after the colon. */
        char *p = strchr(line, ':');
        while (p && *++p) {
            char *end;
            unsigned long long v = strtoull(p, &end, 10);
            if (end == p) {
                if (*p == ' ')
                    continue;
                break;
            }
            total += v;
            p = end - 1;
        }
    }
    if (f)
        fclose(f);
    check("irqs", lines > 0 && total > 0, "%d nvme interrupt lines, %llu interrupts", lines, total);
}

int main(int argc, char **argv)
{
    unsigned long long want = argc > 1 ? strtoull(argv[1], NULL, 0) : 0;
    char text[300];
    /* The driver probes asynchronously: wait for the namespace. */
    struct stat st;
    for (int i = 0; i < 600 && stat(DISK, &st); i++)
        usleep(100 * 1000);
    if (stat(DISK, &st)) {
        check("size", 0, "no %s after 60 s", DISK);
        printf("GUEST-NVMECHECK: %d passed, %d failed\n", passed, failed);
        return 1;
    }
    unsigned long long sectors = 0;
    if (read_text("/sys/block/nvme0n1/size", text, sizeof(text)) == 0)
        sectors = strtoull(text, NULL, 10);
    check("size", sectors * 512 == want, "%llu bytes, expected %llu", sectors * 512, want);
    char serial[100] = "", nqn[300] = "";
    read_text("/sys/class/nvme/nvme0/serial", serial, sizeof(serial));
    read_text("/sys/class/nvme/nvme0/subsysnqn", nqn, sizeof(nqn));
    printf("GUEST-NVME-ID serial=%s\nGUEST-NVME-ID subnqn=%s\n", serial, nqn);
    check("identity", serial[0] && nqn[0], "serial %s", serial);
    buffered_check();
    direct_check();
    aio_check();
    host_data_check();
    discard_check();
    irqs_check();
    printf("GUEST-NVMECHECK: %d passed, %d failed\n", passed, failed);
    fflush(stdout);
    return failed ? 1 : 0;
}
