/* pidfds: pidfds of children and of the process itself come back.
 *
 * The parent P forks child A (pidfd_open(A, PIDFD_NONBLOCK) -> fa, and a dup of
 * it, fa2) and creates child B with clone(CLONE_PIDFD) (-> fb, blocking), and opens
 * a pidfd of itself (fs). Both children wait (pause) for a signal: SIGUSR1 makes A
 * exit 7; B dies of SIGTERM. Child Z exits 5 at once and stays a zombie, P holding
 * a pidfd of it (fz). With the argument `parent`, P also holds a pidfd of its
 * own parent (outside the job: the checkpoint must be refused).
 *
 * Prints `ready pid=P a=A b=B z=Z fa=N fb=N fs=N fz=N`, then `tick N` every 20 ms. At `go`
 * checks: fa and fa2 are O_NONBLOCK and share their description, fb and fs are not
 * O_NONBLOCK; fdinfo of each shows the right Pid; waitid(P_PIDFD, fa, WEXITED)
 * fails with EAGAIN while A runs (non-blocking pidfd) and WNOHANG reports nothing;
 * pidfd_send_signal(fs, SIGUSR2) reaches P itself; pidfd_send_signal(fa, SIGUSR1)
 * ends A: poll on fa reports POLLIN, waitid(P_PIDFD, fa) reports A exited 7;
 * pidfd_send_signal(fb, SIGTERM) ends B: waitid(P_PIDFD, fb) reports B killed by
 * SIGTERM; poll on fz reports POLLIN and waitid(P_PIDFD, fz) reaps Z's exit 5.
 * Output `OK ticks=N` / `FAIL ...`. */
#include "util.h"
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#ifndef PIDFD_NONBLOCK
#define PIDFD_NONBLOCK O_NONBLOCK
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

static int pidfd_open(pid_t pid, unsigned flags) { return (int)syscall(SYS_pidfd_open, pid, flags); }
static int pidfd_send(int fd, int sig) { return (int)syscall(SYS_pidfd_send_signal, fd, sig, NULL, 0); }

static volatile sig_atomic_t got_usr2;
static void on_usr2(int s) { (void)s; got_usr2 = 1; }
static void on_usr1(int s) { (void)s; _exit(7); }

static int waiter(void *arg) {
    (void)arg;
    for (;;) pause();
    return 0;
}

static pid_t fdinfo_pid(int fd) {
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
    int f = open(path, O_RDONLY);
    if (f < 0) return -2;
    ssize_t n = read(f, buf, sizeof buf - 1);
    close(f);
    if (n <= 0) return -2;
    buf[n] = 0;
    char *p = strstr(buf, "\nPid:");
    return p ? (pid_t)atoi(p + 5) : -3;
}

int main(int argc, char **argv) {
    setup();
    signal(SIGUSR2, on_usr2);
    pid_t a = fork();
    if (a < 0) die("fork");
    if (a == 0) {
        signal(SIGUSR1, on_usr1);
        for (;;) pause();
    }
    int fa = pidfd_open(a, PIDFD_NONBLOCK);
    if (fa < 0) die("pidfd_open(A)");
    int fa2 = dup(fa);
    static char stack[64 * 1024];
    int fb = -1;
    pid_t b = clone(waiter, stack + sizeof stack, CLONE_PIDFD | SIGCHLD, NULL, &fb);
    if (b < 0) die("clone(CLONE_PIDFD)");
    int fs = pidfd_open(getpid(), 0);
    if (fs < 0) die("pidfd_open(self)");
    pid_t z = fork();
    if (z < 0) die("fork");
    if (z == 0) _exit(5);
    int fz = pidfd_open(z, 0);
    if (fz < 0) die("pidfd_open(Z)");
    siginfo_t zi;
    if (waitid(P_PID, (id_t)z, &zi, WEXITED | WNOWAIT)) die("waitid(Z, WNOWAIT)");
    if (argc > 1 && strcmp(argv[1], "parent") == 0) {
        if (pidfd_open(getppid(), 0) < 0) die("pidfd_open(parent)");
    }
    out("ready pid=%d a=%d b=%d z=%d fa=%d fb=%d fs=%d fz=%d\n", (int)getpid(), (int)a, (int)b, (int)z, fa, fb,
        fs, fz);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }
    CHECK(fcntl(fa, F_GETFL) & O_NONBLOCK, "fa lost O_NONBLOCK");
    CHECK(fcntl(fa2, F_GETFL) & O_NONBLOCK, "fa2 lost O_NONBLOCK");
    CHECK(!(fcntl(fb, F_GETFL) & O_NONBLOCK), "fb became O_NONBLOCK");
    CHECK(!(fcntl(fs, F_GETFL) & O_NONBLOCK), "fs became O_NONBLOCK");
    /* fa and fa2 share a description: a flag change through one shows in the other. */
    fcntl(fa2, F_SETFL, 0);
    CHECK(!(fcntl(fa, F_GETFL) & O_NONBLOCK), "fa and fa2 do not share their description");
    fcntl(fa2, F_SETFL, O_NONBLOCK);
    CHECK(fdinfo_pid(fa) == a, "fa refers to %d, not A %d", (int)fdinfo_pid(fa), (int)a);
    CHECK(fdinfo_pid(fb) == b, "fb refers to %d, not B %d", (int)fdinfo_pid(fb), (int)b);
    CHECK(fdinfo_pid(fs) == getpid(), "fs refers to %d, not P %d", (int)fdinfo_pid(fs), (int)getpid());
    siginfo_t si;
    memset(&si, 0, sizeof si);
    errno = 0;
    CHECK(waitid((idtype_t)P_PIDFD, (id_t)fa, &si, WEXITED) < 0 && errno == EAGAIN,
          "waitid on the non-blocking pidfd of a running child: errno %d, not EAGAIN", errno);
    memset(&si, 0, sizeof si);
    CHECK(waitid((idtype_t)P_PIDFD, (id_t)fa, &si, WEXITED | WNOHANG) == 0 && si.si_pid == 0,
          "waitid WNOHANG reported something for the running A");
    struct pollfd pf = {fa, POLLIN, 0};
    CHECK(poll(&pf, 1, 0) == 0, "poll on A's pidfd reports an event while A runs");
    CHECK(pidfd_send(fs, SIGUSR2) == 0, "pidfd_send_signal to self: %s", strerror(errno));
    for (int i = 0; i < 100 && !got_usr2; i++) sleep_ms(5);
    CHECK(got_usr2, "SIGUSR2 sent through the own pidfd did not arrive");
    CHECK(pidfd_send(fa, SIGUSR1) == 0, "pidfd_send_signal to A: %s", strerror(errno));
    pf.revents = 0;
    CHECK(poll(&pf, 1, 5000) == 1 && (pf.revents & POLLIN), "poll on A's pidfd did not report its exit");
    memset(&si, 0, sizeof si);
    CHECK(waitid((idtype_t)P_PIDFD, (id_t)fa, &si, WEXITED) == 0, "waitid(P_PIDFD, fa): %s", strerror(errno));
    CHECK(si.si_pid == a && si.si_code == CLD_EXITED && si.si_status == 7,
          "A: waitid reported pid %d code %d status %d, not exit 7 of %d", (int)si.si_pid, si.si_code,
          si.si_status, (int)a);
    CHECK(pidfd_send(fb, SIGTERM) == 0, "pidfd_send_signal to B: %s", strerror(errno));
    memset(&si, 0, sizeof si);
    CHECK(waitid((idtype_t)P_PIDFD, (id_t)fb, &si, WEXITED) == 0, "waitid(P_PIDFD, fb): %s", strerror(errno));
    CHECK(si.si_pid == b && si.si_code == CLD_KILLED && si.si_status == SIGTERM,
          "B: waitid reported pid %d code %d status %d, not killed by SIGTERM", (int)si.si_pid, si.si_code,
          si.si_status);
    CHECK(fdinfo_pid(fz) == z, "fz refers to %d, not Z %d", (int)fdinfo_pid(fz), (int)z);
    struct pollfd pz = {fz, POLLIN, 0};
    CHECK(poll(&pz, 1, 0) == 1 && (pz.revents & POLLIN), "poll on the zombie Z's pidfd reports nothing");
    memset(&si, 0, sizeof si);
    CHECK(waitid((idtype_t)P_PIDFD, (id_t)fz, &si, WEXITED) == 0, "waitid(P_PIDFD, fz): %s", strerror(errno));
    CHECK(si.si_pid == z && si.si_code == CLD_EXITED && si.si_status == 5,
          "Z: waitid reported pid %d code %d status %d, not exit 5 of %d", (int)si.si_pid, si.si_code, si.si_status,
          (int)z);
    finish("ticks=%u", n);
}
