/* What the guest programs share: one line per check on the console, counted.
 *
 * A program defines CHECK_PREFIX (the prefix of its check names: "nvme-", or "" for none)
 * before including this; check() prints "GUEST-CHECK <prefix><name> PASS|FAIL <detail>"
 * and counts it in `passed` or `failed`. */
#ifndef UMDEV_GUEST_CHECK_H
#define UMDEV_GUEST_CHECK_H

#include <stdarg.h>
#include <stdio.h>

#ifndef CHECK_PREFIX
#error "define CHECK_PREFIX before including check.h"
#endif

static int passed, failed;

static void check(const char *name, int ok, const char *fmt, ...)
{
    char detail[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    printf("GUEST-CHECK " CHECK_PREFIX "%s %s %s\n", name, ok ? "PASS" : "FAIL", detail);
    fflush(stdout);
    if (ok)
        passed++;
    else
        failed++;
}

#endif
