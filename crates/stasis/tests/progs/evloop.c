/* evloop: an epoll event loop over an eventfd, a periodic timerfd, a pipe fed
 * by a child and a signalfd for SIGUSR1.
 *
 * The parent blocks SIGUSR1, creates
 *   efd  eventfd(0, EFD_NONBLOCK), registered EPOLLIN|EPOLLET;
 *   tfd  timerfd (CLOCK_MONOTONIC), periodic every 10 ms, EPOLLIN;
 *   p0   the read end of a pipe, EPOLLIN (switched off with EPOLL_CTL_MOD
 *        after each read and on again at the next timer expiration);
 *   sfd  signalfd for SIGUSR1, EPOLLIN (removed with EPOLL_CTL_DEL and added
 *        again every 10 timer reads);
 * each registered with data = TAG | kind << 16 | fd, and forks a child that
 * writes 16-byte records {seq, h(seq)} into the pipe every ~2 ms and sends
 * SIGUSR1 to the parent every 20 records. The loop: epoll_wait(2 s timeout;
 * EINTR and a timeout are failures; so is a timerfd found disarmed after 1 s
 * without expirations: it is reported at once with a `timer-disarmed` line
 * and armed again, so that the loop goes on and finds any other problem).
 * On each timer expiration read: write
 * k = reads % 7 + 1 to the eventfd (expected counter += k) and re-enable the
 * pipe. On an eventfd edge: every 4th edge read the counter and compare it
 * with the expected value (so the counter is usually non-zero). On pipe data:
 * read all complete records but 3 (the pipe always holds >= 3 records),
 * checking their sequence and content. On the signalfd: read the siginfos
 * (SIGUSR1 from the child's pid).
 *
 * Prints `ready efd=F tfd=F pipe=F sfd=F ep=F child=PID`, then every 5 timer
 * reads `tick N timer=T efd=E recs=R sigs=S` (T: expirations, E: eventfd
 * reads, R: records read, S: signals read). At `go`: the eventfd holds the
 * expected value; epoll_ctl DEL of tfd works and a second DEL fails with
 * ENOENT, MOD of efd works and ADD of efd fails with EEXIST (registrations
 * keyed by the right fd numbers); the timer still has a 10 ms interval and
 * fires; the pipe is drained up to the child's END record (sequence intact)
 * and then EOF; the child exits 0. Output: `OK ticks=N timer=T efd=E recs=R
 * sigs=S` / `FAIL ...`. */
#include "util.h"
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <sys/wait.h>

#define TAG 0x5354000000000000ULL
#define K_EFD 1
#define K_TFD 2
#define K_PIPE 3
#define K_SFD 4
#define END 0xffffffffffffffffULL
#define KEEP 3

static uint64_t h(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t tag(int kind, int fd) { return TAG | (uint64_t)kind << 16 | (uint64_t)fd; }

static void child_main(int w) {
    uint64_t seq = 0;
    for (;;) {
        if (go_exists()) {
            uint64_t r[2] = {END, seq};
            write_all(w, (const char *)r, sizeof r);
            _exit(0);
        }
        uint64_t r[2] = {seq, h(seq)};
        write_all(w, (const char *)r, sizeof r);
        if (seq % 20 == 19) kill(getppid(), SIGUSR1);
        seq++;
        sleep_ms(2);
    }
}

static int ep, efd, tfd, p0, sfd;
static pid_t child;
static uint64_t recs, sigs, efd_expected, efd_reads, efd_edges, timer_total, timer_reads;
static int got_end;

static void ctl(int op, int fd, int kind, uint32_t events, const char *what) {
    struct epoll_event e = {.events = events, .data.u64 = tag(kind, fd)};
    if (epoll_ctl(ep, op, fd, &e)) fail("epoll_ctl %s fd %d: %s", what, fd, strerror(errno));
}

/* Read n records from the pipe and check them. */
static void read_recs(size_t n) {
    for (size_t i = 0; i < n && !got_end; i++) {
        uint64_t r[2];
        ssize_t got = 0;
        while (got < (ssize_t)sizeof r) {
            ssize_t x = read(p0, (char *)r + got, sizeof r - (size_t)got);
            if (x < 0 && errno == EINTR) {
                fail("read from the pipe: EINTR");
                continue;
            }
            if (x <= 0) {
                fail("pipe: record %llu: %s", (unsigned long long)recs, x < 0 ? strerror(errno) : "EOF");
                got_end = 1;
                return;
            }
            got += x;
        }
        if (r[0] == END) {
            CHECK(r[1] == recs, "END says %llu records, %llu read", (unsigned long long)r[1],
                  (unsigned long long)recs);
            got_end = 1;
            return;
        }
        if (r[0] != recs || r[1] != h(r[0])) {
            fail("pipe: record %llu arrived as {%llu, %llx}", (unsigned long long)recs,
                 (unsigned long long)r[0], (unsigned long long)r[1]);
            got_end = 1;
            return;
        }
        recs++;
    }
}

static void on_efd(void) {
    efd_edges++;
    if (efd_edges % 4) return;
    uint64_t v = 0;
    ssize_t r = read(efd, &v, sizeof v);
    if (efd_expected == 0) {
        CHECK(r < 0 && errno == EAGAIN, "eventfd: read %llu, expected nothing", (unsigned long long)v);
        return;
    }
    if (r != 8 || v != efd_expected)
        fail("eventfd counter %llu (read returned %zd), expected %llu", (unsigned long long)v, r,
             (unsigned long long)efd_expected);
    efd_expected = 0;
    efd_reads++;
}

int main(void) {
    setup();
    sigset_t ss;
    sigemptyset(&ss);
    sigaddset(&ss, SIGUSR1);
    if (sigprocmask(SIG_BLOCK, &ss, NULL)) die("sigprocmask");
    int p[2];
    if (pipe(p)) die("pipe");
    child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        close(p[0]);
        child_main(p[1]);
    }
    close(p[1]);
    p0 = p[0];
    efd = eventfd(0, EFD_NONBLOCK);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    sfd = signalfd(-1, &ss, SFD_NONBLOCK);
    ep = epoll_create1(0);
    if (efd < 0 || tfd < 0 || sfd < 0 || ep < 0) die("eventfd/timerfd/signalfd/epoll");
    struct itimerspec its = {{0, 10000000}, {0, 10000000}};
    if (timerfd_settime(tfd, 0, &its, NULL)) die("timerfd_settime");
    ctl(EPOLL_CTL_ADD, efd, K_EFD, EPOLLIN | EPOLLET, "ADD efd");
    ctl(EPOLL_CTL_ADD, tfd, K_TFD, EPOLLIN, "ADD tfd");
    ctl(EPOLL_CTL_ADD, p0, K_PIPE, EPOLLIN, "ADD pipe");
    ctl(EPOLL_CTL_ADD, sfd, K_SFD, EPOLLIN, "ADD sfd");
    int ready = 0;
    unsigned n = 0;
    double last_timer = mono_now();
    while (!got_end) {
        struct epoll_event ev[8];
        int k = epoll_wait(ep, ev, 8, 2000);
        if (mono_now() - last_timer > 1.0) {
            /* no expiration for a second (the restore may have taken that
             * long): the timer must still be armed */
            struct itimerspec cur;
            if (timerfd_gettime(tfd, &cur) == 0 && cur.it_value.tv_sec == 0 &&
                cur.it_value.tv_nsec == 0) {
                fail("the periodic timerfd was found disarmed (it_value 0, interval %ld ns) "
                     "after %llu expirations",
                     cur.it_interval.tv_nsec, (unsigned long long)timer_total);
                out("timer-disarmed after %llu expirations; arming it again\n",
                    (unsigned long long)timer_total);
                if (timerfd_settime(tfd, 0, &its, NULL)) die("timerfd_settime");
            }
            last_timer = mono_now();
        }
        if (k < 0) {
            fail("epoll_wait: %s%s", strerror(errno), errno == EINTR ? " (spurious EINTR)" : "");
            if (errno != EINTR) break;
            continue;
        }
        if (k == 0) {
            fail("epoll_wait: no event for 2 s");
            out("FAIL %s\n", g_failbuf);
            exit(1);
        }
        for (int i = 0; i < k; i++) {
            uint64_t d = ev[i].data.u64;
            int kind = (int)((d >> 16) & 0xff), fd = (int)(d & 0xffff);
            int want = kind == K_EFD ? efd : kind == K_TFD ? tfd : kind == K_PIPE ? p0 : kind == K_SFD ? sfd : -1;
            if ((d & ~0xffffffULL) != TAG || fd != want) {
                fail("epoll event with unknown data %llx", (unsigned long long)d);
                continue;
            }
            if (kind == K_TFD) {
                uint64_t x;
                if (read(tfd, &x, 8) != 8) continue; /* EAGAIN: already read */
                timer_total += x;
                timer_reads++;
                last_timer = mono_now();
                uint64_t add = timer_reads % 7 + 1;
                if (write(efd, &add, 8) != 8) fail("write to the eventfd: %s", strerror(errno));
                efd_expected += add;
                ctl(EPOLL_CTL_MOD, p0, K_PIPE, EPOLLIN, "MOD pipe on");
                if (timer_reads % 10 == 0) {
                    ctl(EPOLL_CTL_DEL, sfd, K_SFD, 0, "DEL sfd");
                    ctl(EPOLL_CTL_ADD, sfd, K_SFD, EPOLLIN, "ADD sfd again");
                }
                if (timer_reads % 5 == 0) {
                    if (!ready && recs >= 10) {
                        out("ready efd=%d tfd=%d pipe=%d sfd=%d ep=%d child=%d\n", efd, tfd, p0, sfd,
                            ep, (int)child);
                        ready = 1;
                    }
                    if (ready)
                        out("tick %u timer=%llu efd=%llu recs=%llu sigs=%llu\n", n++,
                            (unsigned long long)timer_total, (unsigned long long)efd_reads,
                            (unsigned long long)recs, (unsigned long long)sigs);
                }
            } else if (kind == K_EFD) {
                on_efd();
            } else if (kind == K_PIPE) {
                int avail = 0;
                if (ioctl(p0, FIONREAD, &avail)) fail("FIONREAD: %s", strerror(errno));
                size_t nrec = (size_t)avail / 16;
                if (go_exists()) read_recs(nrec); /* final: everything, up to END */
                else if (nrec > KEEP) read_recs(nrec - KEEP);
                if (!(ev[i].events & EPOLLHUP)) ctl(EPOLL_CTL_MOD, p0, K_PIPE, 0, "MOD pipe off");
            } else {
                struct signalfd_siginfo si[4];
                ssize_t r = read(sfd, si, sizeof si);
                for (ssize_t j = 0; j < r / (ssize_t)sizeof si[0]; j++) {
                    CHECK(si[j].ssi_signo == SIGUSR1 && si[j].ssi_pid == (uint32_t)child,
                          "signalfd: signal %u from pid %u", si[j].ssi_signo, si[j].ssi_pid);
                    sigs++;
                }
            }
        }
    }
    /* the eventfd holds what was written since the last read */
    uint64_t v = 0;
    ssize_t r = read(efd, &v, 8);
    if (efd_expected)
        CHECK(r == 8 && v == efd_expected, "final eventfd counter %llu (read %zd), expected %llu",
              (unsigned long long)v, r, (unsigned long long)efd_expected);
    else
        CHECK(r < 0 && errno == EAGAIN, "final eventfd read gave %llu, expected nothing",
              (unsigned long long)v);
    /* registrations are keyed by the right fd numbers */
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = tag(K_TFD, tfd)};
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, tfd, &e) == 0, "DEL tfd %d: %s", tfd, strerror(errno));
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, tfd, &e) < 0 && errno == ENOENT,
          "second DEL of tfd %d did not fail with ENOENT", tfd);
    e.data.u64 = tag(K_EFD, efd);
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, efd, &e) == 0, "MOD efd %d: %s", efd, strerror(errno));
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, efd, &e) < 0 && errno == EEXIST,
          "ADD of the registered efd %d did not fail with EEXIST", efd);
    /* the timer is still periodic and fires */
    struct itimerspec cur;
    CHECK(timerfd_gettime(tfd, &cur) == 0 && cur.it_interval.tv_sec == 0 &&
              cur.it_interval.tv_nsec == 10000000,
          "timer interval is %ld.%09ld s", (long)cur.it_interval.tv_sec, cur.it_interval.tv_nsec);
    struct pollfd pf = {.fd = tfd, .events = POLLIN};
    uint64_t x = 0;
    CHECK(poll(&pf, 1, 1000) == 1 && read(tfd, &x, 8) == 8 && x >= 1,
          "the timer did not fire within 1 s at the end");
    char c;
    CHECK(read(p0, &c, 1) == 0, "pipe: data after END");
    int st = 0;
    CHECK(waitpid(child, &st, 0) == child && WIFEXITED(st) && WEXITSTATUS(st) == 0,
          "child ended with status %#x", st);
    CHECK(sigs > 0, "no SIGUSR1 read from the signalfd");
    finish("ticks=%u timer=%llu efd=%llu recs=%llu sigs=%llu", n, (unsigned long long)timer_total,
           (unsigned long long)efd_reads, (unsigned long long)recs, (unsigned long long)sigs);
}
