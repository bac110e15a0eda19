/*
 * mk.h - the C interface of mkctl's kernels (link libmk.a or libmk.so).
 *
 * Distributed shared memory: a region mapped with mkdsm_map() on several
 * kernels is one memory. A page is copied to a kernel when it reads it and
 * taken from every other kernel when one writes it (single writer,
 * multiple readers, per 4 KiB page), so programs that use atomics or locks
 * on it behave as threads of one machine would.
 *
 * A process talks to the agent of the kernel it runs on, over a Unix
 * socket: $MK_AGENT if set and not empty, else /run/mk/agent.sock (a guest kernel), else
 * $MKCTL_RUN_DIR/agent.sock or /run/mkctl/agent.sock (the host, while the
 * mkctl daemon runs). The path is read when the connection is made: on the
 * process's first mkdsm_map(), and on each thread's first mk_migrate() or
 * mk_kernel_id(); a later change of MK_AGENT does not move a connection
 * already made. The process needs the right to create a userfaultfd:
 * root, CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd = 1.
 *
 * Build:  cc -static prog.c -I<dir>/include <dir>/libmk.a -lpthread
 *         (as the README and the tests build the examples)
 */
#ifndef MK_H
#define MK_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Maps region `name` ([A-Za-z0-9._-], 1 to 64 characters) of `size` bytes
 * (a non-zero multiple of 4096, at most 1 GiB), readable and writable,
 * shared with every process on every kernel that maps it. The first map
 * anywhere creates it, zero-filled; its home is the kernel that did.
 *
 * Returns the address, or NULL with errno set:
 *   EINVAL        a bad name or size, or the region exists with another size
 *   ENOENT,
 *   ECONNREFUSED  no agent answers at the socket (is the kernel booted by
 *                 mkctl, or the daemon running? is MK_AGENT right?)
 *   EPERM         this process may not create a userfaultfd
 *   ENOSYS        the kernel lacks userfaultfd write-protection on shared
 *                 memory (Linux 5.19 or later)
 *   ENOMEM        the region does not fit
 *   EHOSTUNREACH  the registry (the host's agent) did not answer
 *   EIO           any other failure of the agent (its log says why)
 *
 * An access that can never be served (the kernel holding the only copy of
 * a page went down) raises SIGBUS in the thread that made it.
 */
void *mkdsm_map(const char *name, size_t size);

/*
 * Unmaps what mkdsm_map() returned (the same address and size). Returns 0,
 * or -1 with errno set (EINVAL: not a mapping of mkdsm_map()).
 */
int mkdsm_unmap(void *addr, size_t size);

/*
 * Thread migration: the calling thread moves to kernel `kernel` (an
 * instance id as the topology gives it; 0 is the host) and the call
 * returns 0 there. Its process stays one: the threads left behind keep
 * running where they are, and all share one address space (the process's
 * private memory becomes DSM memory, homed on the kernel where the process
 * began). A thread can move back and move again any number of times.
 *
 * Returns 0 on `kernel`, or -1 with errno set where the thread was (it did
 * not move):
 *   EALREADY      it runs on `kernel` already
 *   EINVAL        `kernel` is not an endpoint id (0 to 65535)
 *   ENOENT        no kernel `kernel` is linked to this one
 *   ETIMEDOUT     the other kernel did not answer
 *   ECONNREFUSED  no agent answers at the socket, or there is none (see
 *                 mkdsm_map)
 *   EIO           any other failure (the agents' logs say why)
 *
 * What is shared and what is not, after a thread first left: private
 * memory mapped then is one memory; memory mapped, unmapped or re-protected
 * later is not (allocate what moving threads share before they move);
 * descriptors are copies taken at the move (files reopened at the same
 * offset; sockets and pipes stay with the process's kernel). Mutexes,
 * condition variables, semaphores and pthread_join work between threads
 * on different kernels: the process's futex calls are served by its
 * kernel's agent (FUTEX_WAIT/WAKE and their BITSET forms; the others fail
 * with ENOSYS), which sets no_new_privs on the process. A thread's exit
 * ends its twin at home; exit() or a fatal signal in a moved thread ends
 * the whole process; the process's end ends its threads everywhere.
 * Calls that would act on one kernel only fail with EOPNOTSUPP: in a
 * moved thread mmap, munmap, mprotect, mremap, brk (so malloc fails once
 * its arena must grow), fork, vfork, clone, execve, open, kill/tgkill and
 * sigaction with a new action; in the whole process, from the first move
 * on and for good, fork (threads and posix_spawn work). The kernel may
 * run another build or CPU than this one. A move refused before the
 * thread left (ENOENT, EALREADY, EINVAL; EIO for a kernel that could not
 * run it: a file of the process it cannot open, a CPU without an
 * extension the program's code was picked for) changes nothing; one that
 * failed after it left counts as a first move.
 */
int mk_migrate(int kernel);

/*
 * The id of the kernel the calling thread runs on (0 for the host), or -1
 * with errno set (as for mk_migrate's agent errors).
 */
int mk_kernel_id(void);

#ifdef __cplusplus
}
#endif

#endif /* MK_H */
