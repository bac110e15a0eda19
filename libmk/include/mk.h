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
 * mkctl daemon runs). The process needs the right to create a userfaultfd:
 * root, CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd = 1.
 *
 * Build:  cc -static prog.c -I<dir>/include <dir>/libmk.a -lpthread -lm -ldl
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

#ifdef __cplusplus
}
#endif

#endif /* MK_H */
