/*
 * threads.c - thread migration with mk_migrate(): threads of one process
 * run on several kernels and share its memory.
 *
 *   threads sum KERNEL N MB      N workers sum disjoint slices of an MB MiB
 *                                array; the odd ones move to KERNEL first.
 *                                Prints "total=T expected=E moved=M" after
 *                                joining them all where the process began.
 *   threads bounce KERNEL ROUNDS one worker goes to KERNEL and back ROUNDS
 *                                times, checking mk_kernel_id() on each side
 *                                (and EALREADY for a move to where it is)
 *                                and counting in memory the main thread
 *                                reads. Prints "rounds=R home=H away=A".
 *   threads mutex KERNEL T K ROUNDS
 *                                T threads add 1 to a counter under one
 *                                pthread mutex, K times a round, moving
 *                                between here and KERNEL after each round.
 *                                Prints "count=C expected=E".
 *   threads watch STOPFILE       a worker counts; the main thread prints
 *                                "seen count=C worker_pid=P" every 50 ms
 *                                until STOPFILE exists (for a move from
 *                                outside: mkctl migrate PID/TID), then joins.
 *
 * Build: cc -static threads.c -Iinclude libmk.a -lpthread
 *
 * Everything the threads share is allocated before any of them moves
 * (memory mapped later is not shared; see mk.h).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include "mk.h"

static int target;

static void fail(const char *what) {
    printf("FAIL %s: %s (errno %d)\n", what, strerror(errno), errno);
    fflush(stdout);
    exit(1);
}

/* ---- sum ---- */

struct slice {
    const uint64_t *a;
    size_t n;
    int move;
    uint64_t sum;
    int ran_on;
    int failed;
};

static void *sum_worker(void *p) {
    struct slice *s = p;
    if (s->move && mk_migrate(target) != 0) {
        s->failed = errno;
        return NULL;
    }
    uint64_t t = 0;
    for (size_t i = 0; i < s->n; i++)
        t += s->a[i];
    s->sum = t;
    s->ran_on = mk_kernel_id();
    return NULL;
}

static int cmd_sum(int n, long mb) {
    size_t len = (size_t)mb << 20 >> 3;
    uint64_t *a = malloc(len * sizeof *a);
    struct slice *s = calloc(n, sizeof *s);
    pthread_t *t = calloc(n, sizeof *t);
    if (!a || !s || !t)
        fail("malloc");
    uint64_t expected = 0;
    for (size_t i = 0; i < len; i++) {
        a[i] = i * 2654435761u % 1000003;
        expected += a[i];
    }
    int home = mk_kernel_id();
    if (home < 0)
        fail("mk_kernel_id");
    size_t per = len / n;
    for (int i = 0; i < n; i++) {
        s[i].a = a + i * per;
        s[i].n = i == n - 1 ? len - i * per : per;
        s[i].move = i % 2;
        if (pthread_create(&t[i], NULL, sum_worker, &s[i]) != 0)
            fail("pthread_create");
    }
    uint64_t total = 0;
    int moved = 0;
    for (int i = 0; i < n; i++) {
        pthread_join(t[i], NULL);
        if (s[i].failed) {
            errno = s[i].failed;
            fail("mk_migrate");
        }
        total += s[i].sum;
        moved += s[i].ran_on == target;
    }
    printf("total=%llu expected=%llu moved=%d home=%d now=%d\n", (unsigned long long)total,
           (unsigned long long)expected, moved, home, mk_kernel_id());
    return total == expected ? 0 : 1;
}

/* ---- bounce ---- */

static uint64_t rounds, home_seen, away_seen;
static int bounce_failed;

static void *bounce_worker(void *p) {
    long n = (long)p;
    int home = mk_kernel_id();
    for (long i = 0; i < n; i++) {
        if (mk_migrate(target) != 0 || mk_kernel_id() != target) {
            bounce_failed = errno ? errno : -1;
            return NULL;
        }
        __atomic_fetch_add(&away_seen, 1, __ATOMIC_SEQ_CST);
        /* Where it is already, away as at home: EALREADY, and it stays. */
        if (mk_migrate(target) != -1 || errno != EALREADY || mk_kernel_id() != target) {
            bounce_failed = errno == EALREADY ? -1 : errno;
            return NULL;
        }
        if (mk_migrate(home) != 0 || mk_kernel_id() != home) {
            bounce_failed = errno ? errno : -1;
            return NULL;
        }
        __atomic_fetch_add(&home_seen, 1, __ATOMIC_SEQ_CST);
        __atomic_fetch_add(&rounds, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

static int cmd_bounce(long n) {
    pthread_t t;
    if (pthread_create(&t, NULL, bounce_worker, (void *)n) != 0)
        fail("pthread_create");
    pthread_join(t, NULL);
    if (bounce_failed) {
        errno = bounce_failed > 0 ? bounce_failed : 0;
        fail("bouncing");
    }
    printf("rounds=%llu home=%llu away=%llu\n", (unsigned long long)rounds,
           (unsigned long long)home_seen, (unsigned long long)away_seen);
    return rounds == (uint64_t)n ? 0 : 1;
}

/* ---- mutex ---- */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t locked_count;
static long per_round, nrounds;
static int mutex_failed;

static void *mutex_worker(void *p) {
    long i = (long)p;
    int home = mk_kernel_id(), away = 0;
    if (i % 2 && mk_migrate(target) == 0)
        away = 1;
    for (long r = 0; r < nrounds; r++) {
        for (long k = 0; k < per_round; k++) {
            pthread_mutex_lock(&lock);
            locked_count++;
            pthread_mutex_unlock(&lock);
        }
        if (mk_migrate(away ? home : target) != 0) {
            mutex_failed = errno;
            return NULL;
        }
        away = !away;
    }
    if (away && mk_migrate(home) != 0)
        mutex_failed = errno;
    return NULL;
}

static int cmd_mutex(int n, long k, long rounds) {
    pthread_t t[64];
    if (n < 1 || n > 64)
        return 2;
    per_round = k;
    nrounds = rounds;
    for (long i = 0; i < n; i++)
        if (pthread_create(&t[i], NULL, mutex_worker, (void *)i) != 0)
            fail("pthread_create");
    for (int i = 0; i < n; i++)
        pthread_join(t[i], NULL);
    if (mutex_failed) {
        errno = mutex_failed;
        fail("mk_migrate");
    }
    uint64_t expected = (uint64_t)n * k * rounds;
    printf("count=%llu expected=%llu\n", (unsigned long long)locked_count,
           (unsigned long long)expected);
    return locked_count == expected ? 0 : 1;
}

/* ---- watch ---- */

static uint64_t count;
static int64_t worker_pid, worker_tid;
static int stop;

static void *watch_worker(void *p) {
    (void)p;
    __atomic_store_n(&worker_tid, syscall(SYS_gettid), __ATOMIC_SEQ_CST);
    while (!__atomic_load_n(&stop, __ATOMIC_ACQUIRE)) {
        __atomic_fetch_add(&count, 1, __ATOMIC_ACQ_REL);
        __atomic_store_n(&worker_pid, syscall(SYS_getpid), __ATOMIC_RELEASE);
        for (volatile int i = 0; i < 2000; i++)
            ;
    }
    return NULL;
}

static int cmd_watch(const char *stopfile) {
    pthread_t t;
    if (pthread_create(&t, NULL, watch_worker, NULL) != 0)
        fail("pthread_create");
    while (!__atomic_load_n(&worker_tid, __ATOMIC_SEQ_CST))
        usleep(1000);
    printf("worker_tid=%lld\n", (long long)worker_tid);
    fflush(stdout);
    while (access(stopfile, F_OK) != 0) {
        usleep(50000);
        printf("seen count=%llu worker_pid=%lld pid=%d\n",
               (unsigned long long)__atomic_load_n(&count, __ATOMIC_ACQUIRE),
               (long long)__atomic_load_n(&worker_pid, __ATOMIC_ACQUIRE), getpid());
        fflush(stdout);
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
    pthread_join(t, NULL);
    printf("joined count=%llu\n", (unsigned long long)count);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "sum") == 0) {
        target = atoi(argv[2]);
        return cmd_sum(atoi(argv[3]), atol(argv[4]));
    }
    if (argc == 4 && strcmp(argv[1], "bounce") == 0) {
        target = atoi(argv[2]);
        return cmd_bounce(atol(argv[3]));
    }
    if (argc == 6 && strcmp(argv[1], "mutex") == 0) {
        target = atoi(argv[2]);
        return cmd_mutex(atoi(argv[3]), atol(argv[4]), atol(argv[5]));
    }
    if (argc == 3 && strcmp(argv[1], "watch") == 0)
        return cmd_watch(argv[2]);
    fprintf(stderr,
            "usage: %s sum KERNEL N MB | bounce KERNEL ROUNDS | mutex KERNEL T K ROUNDS | "
            "watch STOPFILE\n",
            argv[0]);
    return 2;
}
