/*
 * devcheck: run inside the test guest (static, from the initramfs) against umdev's test
 * device (PCI 5ead:0001), through the guest's own sysfs: it maps the device's BARs, makes
 * the device DMA both ways into a locked buffer whose physical address it takes from
 * /proc/self/pagemap, writes the mmap-able areas of BAR2 (QEMU maps them straight into the
 * guest: no access may reach the server there), uses the I/O BAR, walks the capability
 * list and, with uio_pci_generic, takes an INTx interrupt the device raises.
 *
 * If the hello sample (PCI 5ead:4e11, crates/umdev-hello) is attached too, it has it hash a
 * buffer of guest memory by DMA and compares with its own FNV-1a.
 *
 * Prints one "GUEST-CHECK <name> PASS|FAIL <details>" line per check and
 * "GUEST-DEVCHECK: <n> passed, <m> failed" at the end; exits 0 when all passed.
 *
 * The register map is the test device's (crates/umdev-tests/src/device.rs).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define VENDOR 0x5ead
#define DEVICE 0x0001
#define BAR0_SIZE 4096
#define BAR2_SIZE (64 * 1024)
#define REG_DMA_ADDR 0x100
#define REG_DMA_LEN 0x108
#define REG_DMA_SEED 0x10c
#define REG_DMA_CMD 0x110
#define REG_DMA_STATUS 0x114
#define REG_IRQ_CMD 0x120
#define REG_DMA_BUF 0x800
#define DMA_BUSY 0xffffffffu
#define DMA_LEN 2048
/* BAR2's sparse (mmap-able) areas and a trapped offset between them. */
#define SPARSE_A 0x1000
#define SPARSE_B 0x8000
#define TRAPPED 0x0

#define CHECK_PREFIX ""
#include "check.h"

static char dev[300];


static unsigned read_hex(const char *path)
{
    char buf[32] = {0};
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return 0;
    if (read(fd, buf, sizeof(buf) - 1) < 0)
        buf[0] = 0;
    close(fd);
    return (unsigned)strtoul(buf, NULL, 0);
}

static int find_device_of(unsigned vendor, unsigned device, char *out, size_t outlen)
{
    DIR *d = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    char p[300];
    if (!d)
        return -1;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/vendor", e->d_name);
        if (read_hex(p) != vendor)
            continue;
        snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/device", e->d_name);
        if (read_hex(p) != device)
            continue;
        snprintf(out, outlen, "/sys/bus/pci/devices/%s", e->d_name);
        closedir(d);
        return 0;
    }
    closedir(d);
    return -1;
}

static int find_device(void) { return find_device_of(VENDOR, DEVICE, dev, sizeof(dev)); }

static int enable(const char *d)
{
    char p[340];
    uint16_t cmd = 0;
    snprintf(p, sizeof(p), "%s/config", d);
    int fd = open(p, O_RDWR);
    if (fd >= 0 && pread(fd, &cmd, 2, 4) == 2) {
        cmd |= 0x7; /* I/O, memory, bus master */
        if (pwrite(fd, &cmd, 2, 4) != 2)
            cmd = 0;
    }
    if (fd >= 0)
        close(fd);
    return cmd;
}

static void *map_bar_of(const char *d, int n, size_t size)
{
    char p[340];
    snprintf(p, sizeof(p), "%s/resource%d", d, n);
    int fd = open(p, O_RDWR | O_SYNC);
    if (fd < 0)
        return NULL;
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return m == MAP_FAILED ? NULL : m;
}

static void *map_bar(int n, size_t size) { return map_bar_of(dev, n, size); }

static volatile uint8_t *bar0;

static uint32_t rd32(unsigned off) { return *(volatile uint32_t *)(bar0 + off); }
static void wr32(unsigned off, uint32_t v) { *(volatile uint32_t *)(bar0 + off) = v; }
static void wr64(unsigned off, uint64_t v)
{
    wr32(off, (uint32_t)v);
    wr32(off + 4, (uint32_t)(v >> 32));
}

/* Polls the DMA status until the command is done; DMA_BUSY after 60 s. */
static uint32_t wait_dma(void)
{
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        uint32_t s = rd32(REG_DMA_STATUS);
        if (s != DMA_BUSY)
            return s;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec > 60)
            return DMA_BUSY;
        usleep(1000);
    }
}

static uint64_t phys_of(void *va)
{
    int fd = open("/proc/self/pagemap", O_RDONLY);
    uint64_t entry = 0;
    if (fd < 0)
        return 0;
    off_t off = (off_t)((uintptr_t)va / 4096) * 8;
    if (pread(fd, &entry, 8, off) != 8)
        entry = 0;
    close(fd);
    if (!(entry >> 63))
        return 0;
    return (entry & ((1ull << 55) - 1)) * 4096 + ((uintptr_t)va & 4095);
}

static void dma_checks(void)
{
    uint8_t *buf = aligned_alloc(4096, 2 * 4096);
    if (!buf || mlock(buf, 2 * 4096)) {
        check("dma-buffer", 0, "cannot allocate and lock a buffer: %s", strerror(errno));
        return;
    }
    memset(buf, 0, 2 * 4096);
    uint64_t from = phys_of(buf), to = phys_of(buf + 4096);
    if (!from || !to) {
        check("dma-buffer", 0, "no physical address in /proc/self/pagemap");
        return;
    }
    /* Guest memory to the device: a pattern the device reads into its buffer. */
    for (int i = 0; i < DMA_LEN; i++)
        buf[i] = (uint8_t)(i * 7 + 3);
    wr64(REG_DMA_ADDR, from);
    wr32(REG_DMA_LEN, DMA_LEN);
    wr32(REG_DMA_CMD, 2);
    uint32_t s = wait_dma();
    int same = s == 0;
    for (int i = 0; same && i < DMA_LEN; i++)
        same = bar0[REG_DMA_BUF + i] == buf[i];
    check("dma-from-guest", same, "status %u, %d bytes read by the device from %#llx", s,
          DMA_LEN, (unsigned long long)from);

    /* The device into guest memory: seed + i. */
    wr64(REG_DMA_ADDR, to);
    wr32(REG_DMA_LEN, DMA_LEN);
    *(volatile uint8_t *)(bar0 + REG_DMA_SEED) = 0x37;
    wr32(REG_DMA_CMD, 1);
    s = wait_dma();
    int bad = -1;
    for (int i = 0; i < DMA_LEN; i++) {
        if (buf[4096 + i] != (uint8_t)(0x37 + i)) {
            bad = i;
            break;
        }
    }
    check("dma-to-guest", s == 0 && bad < 0, "status %u, first wrong byte %d (%#x)", s, bad,
          bad < 0 ? 0 : buf[4096 + bad]);
}

static void bar2_checks(void)
{
    volatile uint8_t *bar2 = map_bar(2, BAR2_SIZE);
    if (!bar2) {
        check("bar2-mmap", 0, "cannot mmap resource2: %s", strerror(errno));
        return;
    }
    for (int i = 0; i < 16; i++) {
        bar2[SPARSE_A + i] = (uint8_t)(0xa0 + i);
        bar2[SPARSE_B + i] = (uint8_t)(0xb0 + i);
    }
    int ok = 1;
    for (int i = 0; i < 16; i++)
        ok = ok && bar2[SPARSE_A + i] == (uint8_t)(0xa0 + i) &&
             bar2[SPARSE_B + i] == (uint8_t)(0xb0 + i);
    check("bar2-sparse", ok, "16 bytes written and read back in both sparse areas");
    *(volatile uint32_t *)(bar2 + TRAPPED) = 0x5eadbeef;
    uint32_t back = *(volatile uint32_t *)(bar2 + TRAPPED);
    check("bar2-trapped", back == 0x5eadbeef, "read back %#x outside the sparse areas", back);
}

static void io_bar_check(void)
{
    char p[340];
    snprintf(p, sizeof(p), "%s/resource1", dev);
    int fd = open(p, O_RDWR);
    uint32_t v = 0x1234abcd, back = 0;
    int ok = fd >= 0 && pwrite(fd, &v, 4, 4) == 4 && pread(fd, &back, 4, 4) == 4;
    check("io-bar", ok && back == v, "wrote %#x at 4, read %#x", v, back);
    if (fd >= 0)
        close(fd);
}

static void caps_check(void)
{
    char p[340];
    uint8_t cfg[256] = {0};
    snprintf(p, sizeof(p), "%s/config", dev);
    int fd = open(p, O_RDONLY);
    if (fd < 0 || pread(fd, cfg, 256, 0) != 256) {
        check("capabilities", 0, "cannot read config space");
        return;
    }
    close(fd);
    int pm = 0, msi = 0, pcie = 0, msix = 0, n = 0;
    for (uint8_t at = cfg[0x34] & 0xfc; at && n < 48; at = cfg[at + 1] & 0xfc, n++) {
        switch (cfg[at]) {
        case 0x01: pm = 1; break;
        case 0x05: msi = 1; break;
        case 0x10: pcie = 1; break;
        case 0x11: msix = 1; break;
        }
    }
    check("capabilities", pm && msi && pcie && msix, "PM %d MSI %d PCIe %d MSI-X %d", pm, msi,
          pcie, msix);
}

/* With uio_pci_generic bound, /dev/uio0 counts the device's INTx interrupts. */
static void intx_check(void)
{
    char p[340];
    snprintf(p, sizeof(p), "/sys/bus/pci/drivers/uio_pci_generic/new_id");
    int fd = open(p, O_WRONLY);
    if (fd < 0) {
        check("intx", 0, "uio_pci_generic is not loaded");
        return;
    }
    if (write(fd, "5ead 0001", 9) < 0 && errno != EEXIST) {
        check("intx", 0, "binding uio_pci_generic: %s", strerror(errno));
        close(fd);
        return;
    }
    close(fd);
    int uio = -1;
    for (int i = 0; i < 50 && uio < 0; i++) {
        uio = open("/dev/uio0", O_RDWR);
        if (uio < 0)
            usleep(100000);
    }
    if (uio < 0) {
        check("intx", 0, "no /dev/uio0");
        return;
    }
    /* uio_pci_generic leaves INTx enabled until the first interrupt, which it masks (the
     * command register's INTx disable bit); a read returns the count. */
    uint32_t count = 0;
    wr32(REG_IRQ_CMD, 1);
    struct pollfd pfd = {.fd = uio, .events = POLLIN};
    int r = poll(&pfd, 1, 20000);
    if (r == 1 && read(uio, &count, 4) == 4) {
        wr32(REG_IRQ_CMD, 0);
        check("intx", count >= 1, "uio counted %u interrupt(s)", count);
    } else {
        wr32(REG_IRQ_CMD, 0);
        check("intx", 0, "no interrupt within 20 s");
    }
    close(uio);
}

static uint32_t fnv1a(const uint8_t *p, size_t n)
{
    uint32_t h = 0x811c9dc5u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x01000193u;
    return h;
}

/* The hello sample: ADDR_LO 0x0, ADDR_HI 0x4, LEN 0x8, CMD 0xc, STATUS 0x10, RESULT 0x14. */
static void hello_check(void)
{
    char hello[300];
    if (find_device_of(0x5ead, 0x4e11, hello, sizeof(hello))) {
        check("hello", 0, "no PCI device 5ead:4e11");
        return;
    }
    enable(hello);
    volatile uint32_t *r = map_bar_of(hello, 0, 4096);
    uint8_t *buf = aligned_alloc(4096, 4096);
    if (!r || !buf || mlock(buf, 4096)) {
        check("hello", 0, "cannot map its BAR or lock a buffer");
        return;
    }
    for (int i = 0; i < 4096; i++)
        buf[i] = (uint8_t)(i * 13 + 1);
    uint64_t pa = phys_of(buf);
    r[0] = (uint32_t)pa;
    r[1] = (uint32_t)(pa >> 32);
    r[2] = 4096;
    r[3] = 1;
    uint32_t status = 1;
    for (int i = 0; i < 60000 && status == 1; i++) {
        status = r[4];
        if (status == 1)
            usleep(1000);
    }
    uint32_t got = r[5], want = fnv1a(buf, 4096);
    check("hello", status == 0 && got == want, "%s: status %u, hash %#x, expected %#x", hello,
          status, got, want);
}

int main(void)
{
    if (find_device()) {
        check("device", 0, "no PCI device %04x:%04x", VENDOR, DEVICE);
        printf("GUEST-DEVCHECK: %d passed, %d failed\n", passed, failed);
        return 1;
    }
    check("device", 1, "%s", dev);
    int cmd = enable(dev);
    check("enable", (cmd & 7) == 7, "command register %#x", cmd);
    bar0 = map_bar(0, BAR0_SIZE);
    if (!bar0) {
        check("bar0-mmap", 0, "cannot mmap resource0: %s", strerror(errno));
    } else {
        check("bar0-mmap", 1, "BAR0 mapped");
        dma_checks();
    }
    bar2_checks();
    io_bar_check();
    caps_check();
    if (bar0)
        intx_check();
    hello_check();
    printf("GUEST-DEVCHECK: %d passed, %d failed\n", passed, failed);
    fflush(stdout);
    return failed ? 1 : 0;
}
