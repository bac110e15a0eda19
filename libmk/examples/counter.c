/*
 * counter.c - the README's example: count together on several kernels.
 *
 *   counter NAME N     adds 1 to a shared counter N times, atomically
 *   counter NAME 0     prints the counter
 *
 * Build: cc -static counter.c -Iinclude libmk.a -lpthread
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "mk.h"

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s NAME N\n", argv[0]);
        return 2;
    }
    long n = atol(argv[2]);
    uint64_t *c = mkdsm_map(argv[1], 4096);
    if (c == NULL) {
        printf("mkdsm_map: %s (errno %d)\n", strerror(errno), errno);
        return 1;
    }
    for (long i = 0; i < n; i++)
        __atomic_fetch_add(c, 1, __ATOMIC_SEQ_CST);
    printf("counter=%llu\n", (unsigned long long)__atomic_load_n(c, __ATOMIC_SEQ_CST));
    if (mkdsm_unmap(c, 4096) != 0) {
        printf("mkdsm_unmap: %s\n", strerror(errno));
        return 1;
    }
    return 0;
}
