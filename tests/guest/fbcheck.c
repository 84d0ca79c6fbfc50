/*
 * fbcheck: run inside the test guest (static, from the initramfs) against an mbochs display
 * (crates/umdev-mbochs, PCI 1234:1111) that the guest's stock `bochs` DRM driver has bound.
 * It draws; the host takes screenshots through `umdevctl screenshot` and compares them.
 *
 *   bound   /dev/dri/card0 appears (the bochs driver bound the display)
 *   fbcon   writes lines of text to /dev/tty1 (the framebuffer console), then waits
 *   drm32   KMS with a dumb buffer: 1024x1536 XRGB8888 drawn with the test picture, shown
 *           as 1024x768 from line 100 (SETCRTC with y = 100), then waits
 *   raw16   unbinds the driver and programs the Bochs registers itself through BAR2:
 *           800x600 RGB565 shown from line 37 of an 800x1200 framebuffer in BAR0, then
 *           waits
 *
 * Before each wait it prints "GUEST-SCREEN <name> <details>" so that the host takes its
 * screenshot then; each wait lasts argv[1] seconds. The test picture's RGB at (x, y) of the
 * framebuffer for generation g is (x*3 + g, y*5 + 7g, (x ^ y) + 13g), each mod 256 (the
 * host computes the same).
 *
 * Prints "GUEST-CHECK display-<name> PASS|FAIL <details>" for what the guest itself can
 * tell and "GUEST-FBCHECK: <n> passed, <m> failed"; exits 0 when all passed.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/ioctl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The DRM uapi structures used here (include/uapi/drm/drm_mode.h). */
struct mode_info {
    uint32_t clock;
    uint16_t hdisplay, hsync_start, hsync_end, htotal, hskew;
    uint16_t vdisplay, vsync_start, vsync_end, vtotal, vscan;
    uint32_t vrefresh, flags, type;
    char name[32];
};
struct card_res {
    uint64_t fb_id_ptr, crtc_id_ptr, connector_id_ptr, encoder_id_ptr;
    uint32_t count_fbs, count_crtcs, count_connectors, count_encoders;
    uint32_t min_width, max_width, min_height, max_height;
};
struct get_connector {
    uint64_t encoders_ptr, modes_ptr, props_ptr, prop_values_ptr;
    uint32_t count_modes, count_props, count_encoders, encoder_id, connector_id;
    uint32_t connector_type, connector_type_id, connection, mm_width, mm_height, subpixel, pad;
};
struct create_dumb {
    uint32_t height, width, bpp, flags, handle, pitch;
    uint64_t size;
};
struct map_dumb {
    uint32_t handle, pad;
    uint64_t offset;
};
struct fb_cmd {
    uint32_t fb_id, width, height, pitch, bpp, depth, handle;
};
struct mode_crtc {
    uint64_t set_connectors_ptr;
    uint32_t count_connectors, crtc_id, fb_id, x, y, gamma_size, mode_valid;
    struct mode_info mode;
};
#define DRM_BASE 'd'
#define IOCTL_GETRESOURCES _IOWR(DRM_BASE, 0xA0, struct card_res)
#define IOCTL_SETCRTC _IOWR(DRM_BASE, 0xA2, struct mode_crtc)
#define IOCTL_GETCONNECTOR _IOWR(DRM_BASE, 0xA7, struct get_connector)
#define IOCTL_ADDFB _IOWR(DRM_BASE, 0xAE, struct fb_cmd)
#define IOCTL_CREATE_DUMB _IOWR(DRM_BASE, 0xB2, struct create_dumb)
#define IOCTL_MAP_DUMB _IOWR(DRM_BASE, 0xB3, struct map_dumb)

#define CHECK_PREFIX "display-"
#include "check.h"

static int hold = 8;


static void screen(const char *fmt, ...)
{
    char detail[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    printf("GUEST-SCREEN %s\n", detail);
    fflush(stdout);
    sleep((unsigned)hold);
}

static void pixel(uint32_t x, uint32_t y, uint32_t g, uint8_t rgb[3])
{
    rgb[0] = (uint8_t)(x * 3 + g);
    rgb[1] = (uint8_t)(y * 5 + g * 7);
    rgb[2] = (uint8_t)((x ^ y) + g * 13);
}

/* The display's PCI address (vendor 1234, device 1111), or -1. */
static int find_display(char *bdf, size_t n)
{
    DIR *d = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    int found = -1;
    while (d && (e = readdir(d))) {
        char p[300], v[16] = "", dv[16] = "";
        FILE *f;
        snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/vendor", e->d_name);
        if ((f = fopen(p, "r"))) {
            if (!fgets(v, sizeof(v), f))
                v[0] = 0;
            fclose(f);
        }
        snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/device", e->d_name);
        if ((f = fopen(p, "r"))) {
            if (!fgets(dv, sizeof(dv), f))
                dv[0] = 0;
            fclose(f);
        }
        if (!strncmp(v, "0x1234", 6) && !strncmp(dv, "0x1111", 6) && strlen(e->d_name) < n) {
            memcpy(bdf, e->d_name, strlen(e->d_name) + 1);
            found = 0;
        }
    }
    if (d)
        closedir(d);
    return found;
}

static void fbcon_step(void)
{
    int t = open("/dev/tty1", O_WRONLY);
    if (t < 0) {
        check("fbcon", 0, "open /dev/tty1: %s", strerror(errno));
        return;
    }
    for (int i = 0; i < 20; i++)
        dprintf(t, "umdev mbochs: fbcon line %d ##########################\n", i);
    close(t);
    check("fbcon", 1, "20 lines written to tty1");
    screen("fbcon");
}

static void drm_step(void)
{
    int fd = open("/dev/dri/card0", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        check("drm32", 0, "open card0: %s", strerror(errno));
        return;
    }
    uint32_t crtcs[8], conns[8];
    struct card_res res = {0};
    if (ioctl(fd, IOCTL_GETRESOURCES, &res) || res.count_crtcs == 0 || res.count_connectors == 0) {
        check("drm32", 0, "GETRESOURCES: %s, %u crtcs", strerror(errno), res.count_crtcs);
        close(fd);
        return;
    }
    res.count_crtcs = res.count_crtcs > 8 ? 8 : res.count_crtcs;
    res.count_connectors = res.count_connectors > 8 ? 8 : res.count_connectors;
    res.count_fbs = res.count_encoders = 0;
    res.crtc_id_ptr = (uintptr_t)crtcs;
    res.connector_id_ptr = (uintptr_t)conns;
    res.fb_id_ptr = res.encoder_id_ptr = 0;
    if (ioctl(fd, IOCTL_GETRESOURCES, &res)) {
        check("drm32", 0, "GETRESOURCES (ids): %s", strerror(errno));
        close(fd);
        return;
    }
    struct get_connector c = {.connector_id = conns[0]};
    if (ioctl(fd, IOCTL_GETCONNECTOR, &c) || c.count_modes == 0) {
        check("drm32", 0, "GETCONNECTOR: %s, %u modes", strerror(errno), c.count_modes);
        close(fd);
        return;
    }
    struct mode_info *modes = calloc(c.count_modes, sizeof(*modes));
    uint32_t n = c.count_modes;
    memset(&c, 0, sizeof(c));
    c.connector_id = conns[0];
    c.count_modes = n;
    c.modes_ptr = (uintptr_t)modes;
    if (ioctl(fd, IOCTL_GETCONNECTOR, &c)) {
        check("drm32", 0, "GETCONNECTOR (modes): %s", strerror(errno));
        close(fd);
        return;
    }
    struct mode_info *m = NULL;
    for (uint32_t i = 0; i < n; i++)
        if (modes[i].hdisplay == 1024 && modes[i].vdisplay == 768)
            m = &modes[i];
    if (!m) {
        check("drm32", 0, "no 1024x768 among %u modes (first %ux%u)", n, modes[0].hdisplay,
              modes[0].vdisplay);
        close(fd);
        return;
    }
    const uint32_t w = 1024, h = 1536, yoff = 100, g = 5;
    struct create_dumb cd = {.height = h, .width = w, .bpp = 32};
    struct map_dumb md = {0};
    struct fb_cmd fb = {0};
    if (ioctl(fd, IOCTL_CREATE_DUMB, &cd)) {
        check("drm32", 0, "CREATE_DUMB: %s", strerror(errno));
        close(fd);
        return;
    }
    md.handle = cd.handle;
    fb = (struct fb_cmd){.width = w, .height = h, .pitch = cd.pitch, .bpp = 32, .depth = 24,
                         .handle = cd.handle};
    if (ioctl(fd, IOCTL_MAP_DUMB, &md) || ioctl(fd, IOCTL_ADDFB, &fb)) {
        check("drm32", 0, "MAP_DUMB/ADDFB: %s", strerror(errno));
        close(fd);
        return;
    }
    uint8_t *p = mmap(NULL, cd.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)md.offset);
    if (p == MAP_FAILED) {
        check("drm32", 0, "mmap: %s", strerror(errno));
        close(fd);
        return;
    }
    for (uint32_t y = 0; y < h; y++) {
        uint32_t *row = (uint32_t *)(p + (size_t)y * cd.pitch);
        for (uint32_t x = 0; x < w; x++) {
            uint8_t rgb[3];
            pixel(x, y, g, rgb);
            row[x] = ((uint32_t)rgb[0] << 16) | ((uint32_t)rgb[1] << 8) | rgb[2];
        }
    }
    struct mode_crtc sc = {.set_connectors_ptr = (uintptr_t)&conns[0],
                           .count_connectors = 1,
                           .crtc_id = crtcs[0],
                           .fb_id = fb.fb_id,
                           .x = 0,
                           .y = yoff,
                           .mode_valid = 1,
                           .mode = *m};
    if (ioctl(fd, IOCTL_SETCRTC, &sc)) {
        check("drm32", 0, "SETCRTC: %s", strerror(errno));
        close(fd);
        return;
    }
    check("drm32", 1, "dumb buffer %ux%u pitch %u shown from line %u", w, h, cd.pitch, yoff);
    screen("drm32 width=1024 height=768 yoffset=%u g=%u", yoff, g);
    munmap(p, cd.size);
    close(fd);
}

static void *map_resource(const char *bdf, int n, size_t size)
{
    char p[400];
    snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/resource%d", bdf, n);
    int fd = open(p, O_RDWR | O_SYNC);
    if (fd < 0)
        return NULL;
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return m == MAP_FAILED ? NULL : m;
}

static void write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY);
    if (fd >= 0) {
        if (write(fd, text, strlen(text)) < 0)
            printf("GUEST: write %s: %s\n", path, strerror(errno));
        close(fd);
    } else {
        printf("GUEST: open %s: %s\n", path, strerror(errno));
    }
}

static void raw_step(const char *bdf)
{
    char p[400];
    snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/driver/unbind", bdf);
    write_file(p, bdf);
    snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/enable", bdf);
    write_file(p, "1");
    volatile uint16_t *dispi;
    uint8_t *mmio = map_resource(bdf, 2, 4096);
    uint8_t *vram = map_resource(bdf, 0, 16 << 20);
    if (!mmio || !vram) {
        check("raw16", 0, "mapping BAR2/BAR0: %s", strerror(errno));
        return;
    }
    dispi = (volatile uint16_t *)(mmio + 0x500);
    const uint16_t w = 800, h = 1200, yoff = 37, g = 6;
    dispi[4] = 0;    /* ENABLE */
    dispi[3] = 16;   /* BPP */
    dispi[1] = w;    /* XRES */
    dispi[2] = 600;  /* YRES */
    dispi[5] = 0;    /* BANK */
    dispi[6] = w;    /* VIRT_WIDTH */
    dispi[7] = h;    /* VIRT_HEIGHT */
    dispi[8] = 0;    /* X_OFFSET */
    dispi[9] = yoff; /* Y_OFFSET */
    dispi[4] = 0x41; /* ENABLED | LFB_ENABLED */
    uint16_t back = dispi[9], bpp = dispi[3];
    for (uint32_t y = 0; y < h; y++) {
        uint16_t *row = (uint16_t *)(vram + (size_t)y * w * 2);
        for (uint32_t x = 0; x < w; x++) {
            uint8_t rgb[3];
            pixel(x, y, g, rgb);
            row[x] = (uint16_t)(((rgb[0] >> 3) << 11) | ((rgb[1] >> 2) << 5) | (rgb[2] >> 3));
        }
    }
    check("raw16", back == yoff && bpp == 16, "registers read back y offset %u, bpp %u", back, bpp);
    screen("raw16 width=800 height=600 yoffset=%u g=%u", yoff, g);
}

int main(int argc, char **argv)
{
    char bdf[64];
    if (argc > 1)
        hold = atoi(argv[1]);
    struct stat st;
    for (int i = 0; i < 600 && stat("/dev/dri/card0", &st); i++)
        usleep(100 * 1000);
    int bound = stat("/dev/dri/card0", &st) == 0 && find_display(bdf, sizeof(bdf)) == 0;
    check("bound", bound, "/dev/dri/card0 %s", bound ? bdf : "missing after 60 s");
    if (bound) {
        fbcon_step();
        drm_step();
        raw_step(bdf);
    }
    printf("GUEST-FBCHECK: %d passed, %d failed\n", passed, failed);
    fflush(stdout);
    return failed ? 1 : 0;
}
