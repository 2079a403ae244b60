/* membarrier: membarrier(2) registrations must survive checkpoint/restart.
 *
 * R (this process, with a second thread) registers for MEMBARRIER_CMD_PRIVATE_EXPEDITED,
 * ..._SYNC_CORE and, where the kernel has them, ..._RSEQ and GLOBAL_EXPEDITED; its
 * child C, forked before, registers for nothing. Prints `ready pid=R child=C
 * mask=M getreg=G` (M: the registrations made, as MEMBARRIER_CMD_GET_REGISTRATIONS
 * reports them; G: whether the kernel has that command), then `tick N` every ~20 ms
 * (a second thread counts too) until `go` exists (it answers `ping` with `pong`).
 * Then R issues the private expedited commands, which must succeed, and asks the
 * kernel for its registrations; C's commands must still fail with EPERM.
 * `OK ...` / `FAIL ...`. */
#include "util.h"
#include <linux/membarrier.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#ifndef MEMBARRIER_CMD_GET_REGISTRATIONS
#define MEMBARRIER_CMD_GET_REGISTRATIONS (1 << 9)
#endif

static int mb(int cmd) { return (int)syscall(SYS_membarrier, cmd, 0, 0); }

static volatile unsigned long counted;

static void *counter(void *arg) {
    (void)arg;
    for (;;) {
        __atomic_add_fetch(&counted, 1, __ATOMIC_RELAXED);
        sleep_ms(1);
    }
    return NULL;
}

/* The private expedited commands of `mask` (registrations) succeed, the others fail
 * with EPERM; with GET_REGISTRATIONS, the kernel reports exactly `mask`. */
static void check(const char *who, int mask, int supported, char *buf, size_t cap) {
    static const int cmds[][2] = {
        {MEMBARRIER_CMD_PRIVATE_EXPEDITED, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED},
        {MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE},
        {MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ},
    };
    size_t len = strlen(buf);
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
        if (!(supported & cmds[i][0])) continue;
        errno = 0;
        int r = mb(cmds[i][0]);
        int want_ok = (mask & cmds[i][1]) != 0;
        if (want_ok && r != 0)
            len += (size_t)snprintf(buf + len, cap - len, " %s: command %d failed (%s);", who, cmds[i][0],
                                    strerror(errno));
        if (!want_ok && !(r == -1 && errno == EPERM))
            len += (size_t)snprintf(buf + len, cap - len, " %s: command %d returned %d (%s), want EPERM;", who,
                                    cmds[i][0], r, strerror(errno));
    }
    if (supported & MEMBARRIER_CMD_GET_REGISTRATIONS) {
        int r = mb(MEMBARRIER_CMD_GET_REGISTRATIONS);
        if (r != mask) snprintf(buf + len, cap - len, " %s: registrations %#x, want %#x;", who, r, mask);
    }
}

int main(void) {
    setup();
    int supported = mb(MEMBARRIER_CMD_QUERY);
    if (supported < 0) die("membarrier(MEMBARRIER_CMD_QUERY)");
    if (!(supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED)) {
        out("FAIL the kernel has no MEMBARRIER_CMD_PRIVATE_EXPEDITED\n");
        return 1;
    }
    int rep[2];
    if (pipe(rep)) die("pipe");
    pid_t c = fork();
    if (c < 0) die("fork");
    if (c == 0) {
        close(rep[0]);
        while (!go_exists()) sleep_ms(10);
        char buf[1024] = "";
        check("C", 0, supported, buf, sizeof buf);
        char line[1100];
        int n = snprintf(line, sizeof line, "%s\n", buf);
        write_all(rep[1], line, (size_t)n);
        _exit(0);
    }
    close(rep[1]);
    int mask = 0;
    static const int regs[] = {
        MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
        MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE,
        MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ,
        MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED,
    };
    for (size_t i = 0; i < sizeof regs / sizeof regs[0]; i++) {
        if (!(supported & regs[i])) continue;
        /* Without GET_REGISTRATIONS, a GLOBAL_EXPEDITED registration cannot be seen
         * from outside: not made then. */
        if (regs[i] == MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED && !(supported & MEMBARRIER_CMD_GET_REGISTRATIONS))
            continue;
        if (mb(regs[i])) die("membarrier registration");
        mask |= regs[i];
    }
    pthread_t t;
    if (pthread_create(&t, NULL, counter, NULL)) die("pthread_create");
    if (mb(MEMBARRIER_CMD_PRIVATE_EXPEDITED)) die("MEMBARRIER_CMD_PRIVATE_EXPEDITED before the checkpoint");
    out("ready pid=%d child=%d mask=%d getreg=%d\n", (int)getpid(), (int)c, mask,
        (supported & MEMBARRIER_CMD_GET_REGISTRATIONS) != 0);

    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u count=%lu\n", n, __atomic_load_n(&counted, __ATOMIC_RELAXED));
        sleep_ms(20);
    }
    char buf[1024] = "";
    check("R", mask, supported, buf, sizeof buf);
    CHECK(buf[0] == 0, "%s", buf);
    char cl[1100] = "";
    ssize_t k = read(rep[0], cl, sizeof cl - 1);
    if (k <= 0) fail("no report from C");
    else if (cl[0] != '\n') fail("%.*s", (int)strcspn(cl, "\n"), cl);
    int st;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "C did not end well");
    finish("ticks=%u mask=%#x", n, (unsigned)mask);
}
