/* asyncio: signal-driven I/O (O_ASYNC) must keep its owner and signal.
 *
 * P: a pipe's read end with O_ASYNC, owned by the process (F_SETOWN), signal SIGUSR1
 * (F_SETSIG, so the siginfo names the fd). S: one end of a UNIX socketpair with
 * O_ASYNC, owned by thread T (F_OWNER_TID), signal SIGUSR2.
 * Prints `ready pid=P`, then `tick N` every ~20 ms until `go` exists (answers `ping`
 * with `pong`). Then: both fds still have O_ASYNC and their owners and signals; a byte
 * written into the pipe brings SIGUSR1 naming P's fd, one sent to S's peer brings
 * SIGUSR2 to T. `OK ...` / `FAIL ...`. */
#include "util.h"
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>

static volatile int usr1_fd = -1, usr2_tid;
static volatile pid_t t_tid;

static void on_usr1(int s, siginfo_t *si, void *u) { (void)s; (void)u; usr1_fd = si->si_fd; }
static void on_usr2(int s, siginfo_t *si, void *u) { (void)s; (void)si; (void)u; usr2_tid = (int)syscall(SYS_gettid); }

static void *thread_t(void *arg) {
    (void)arg;
    t_tid = (pid_t)syscall(SYS_gettid);
    for (;;) pause();
    return NULL;
}

int main(void) {
    setup();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sa.sa_sigaction = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_sigaction = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    pthread_t th;
    if (pthread_create(&th, NULL, thread_t, NULL)) die("pthread_create");
    while (!t_tid) sleep_ms(1);
    int p[2], s[2];
    if (pipe(p) || socketpair(AF_UNIX, SOCK_STREAM, 0, s)) die("pipe/socketpair");
    if (fcntl(p[0], F_SETOWN, getpid()) || fcntl(p[0], F_SETSIG, SIGUSR1) || fcntl(p[0], F_SETFL, O_ASYNC | O_NONBLOCK))
        die("pipe async");
    struct f_owner_ex o = {F_OWNER_TID, t_tid};
    if (fcntl(s[0], F_SETOWN_EX, &o) || fcntl(s[0], F_SETSIG, SIGUSR2) || fcntl(s[0], F_SETFL, O_ASYNC | O_NONBLOCK))
        die("socket async");
    out("ready pid=%d p=%d s=%d t=%d\n", (int)getpid(), p[0], s[0], (int)t_tid);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }
    CHECK(fcntl(p[0], F_GETFL) & O_ASYNC, "the pipe lost O_ASYNC");
    CHECK(fcntl(s[0], F_GETFL) & O_ASYNC, "the socket lost O_ASYNC");
    CHECK(fcntl(p[0], F_GETOWN) == getpid(), "pipe owner %d", fcntl(p[0], F_GETOWN));
    CHECK(fcntl(p[0], F_GETSIG) == SIGUSR1, "pipe signal %d", fcntl(p[0], F_GETSIG));
    struct f_owner_ex g = {0, 0};
    fcntl(s[0], F_GETOWN_EX, &g);
    CHECK(g.type == F_OWNER_TID && g.pid == t_tid, "socket owner %d/%d, want thread %d", g.type, g.pid, (int)t_tid);
    write_all(p[1], "x", 1);
    write_all(s[1], "y", 1);
    for (int i = 0; i < 500 && (usr1_fd < 0 || !usr2_tid); i++) sleep_ms(2);
    CHECK(usr1_fd == p[0], "SIGUSR1 for fd %d, want the pipe's %d", usr1_fd, p[0]);
    CHECK(usr2_tid == t_tid, "SIGUSR2 ran in %d, want thread T %d", usr2_tid, (int)t_tid);
    finish("ticks=%u", n);
}
