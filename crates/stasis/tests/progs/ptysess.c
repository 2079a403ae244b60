/* ptysess: sessions of the job with their own pseudo-terminals as controlling
 * terminals, and /dev/tty opened through them.
 * The root R opens two pty pairs and keeps the masters. For each pair i it forks a
 * session leader Li: setsid(), opens the slave (so it becomes Li's controlling
 * terminal), forks Ki into a process group of its own and makes that group the
 * terminal's foreground group (tcsetpgrp). Ki opens /dev/tty (before the checkpoint)
 * and counts SIGINTs.
 * After `go`: Li checks getsid, tcgetpgrp (== Ki), TIOCGSID (== Li) on its slave fd,
 * and that a new open of /dev/tty is its slave; Ki checks that its /dev/tty fd is
 * still /dev/tty, refers to the same terminal as a new open of /dev/tty, answers
 * tcgetpgrp == its group and TIOCGSID == Li, and writes "Ki" through it, which R
 * must read from master i (and not the other one); then R writes ^C into master i
 * and Ki must get exactly one SIGINT (its group is the foreground one; Li gets none).
 * Output: `ready L0=.. K0=.. L1=.. K1=..`, `tick N`, `OK ticks=N` / `FAIL ...`. */
#include "util.h"
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <termios.h>

#define NT 2
static int rep_w = -1;
static volatile sig_atomic_t ints;
static void on_int(int s) { (void)s; ints++; }

/* A child's failure, sent to R. */
__attribute__((format(printf, 1, 2))) static void report(const char *fmt, ...) {
    char b[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b, sizeof b - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof b - 2) n = sizeof b - 2;
    b[n++] = '\n';
    write_all(rep_w, b, (size_t)n);
}

static unsigned int gdev(int fd) {
    unsigned int d = 0;
    if (ioctl(fd, TIOCGDEV, &d) != 0) return 0;
    return d;
}

static void __attribute__((noreturn)) k_main(int i, pid_t leader) {
    int tfd = open("/dev/tty", O_RDWR);
    if (tfd < 0) {
        report("K%d: open /dev/tty before the checkpoint: %s", i, strerror(errno));
        _exit(1);
    }
    while (!go_exists()) sleep_ms(10);
    int bad = 0;
    struct stat st;
    if (fstat(tfd, &st) != 0 || !S_ISCHR(st.st_mode) || st.st_rdev != makedev(5, 0)) {
        report("K%d: its /dev/tty fd is no longer /dev/tty", i);
        bad = 1;
    }
    int fresh = open("/dev/tty", O_RDWR);
    if (fresh < 0) {
        report("K%d: /dev/tty does not open after restart: %s", i, strerror(errno));
        bad = 1;
    } else if (gdev(fresh) == 0 || gdev(fresh) != gdev(tfd)) {
        report("K%d: its /dev/tty fd is terminal %x, /dev/tty now %x", i, gdev(tfd), gdev(fresh));
        bad = 1;
    }
    pid_t fg = tcgetpgrp(tfd);
    if (fg != getpgrp()) {
        report("K%d: tcgetpgrp %d, its group %d (%s)", i, (int)fg, (int)getpgrp(), strerror(errno));
        bad = 1;
    }
    pid_t sid = 0;
    if (ioctl(tfd, TIOCGSID, &sid) != 0 || sid != leader) {
        report("K%d: TIOCGSID %d, want %d", i, (int)sid, (int)leader);
        bad = 1;
    }
    char msg[8];
    snprintf(msg, sizeof msg, "K%d\n", i);
    if (write(tfd, msg, strlen(msg)) != (ssize_t)strlen(msg)) {
        report("K%d: write to /dev/tty: %s", i, strerror(errno));
        bad = 1;
    }
    for (int t = 0; t < 1000 && ints == 0; t++) sleep_ms(10);
    sleep_ms(100);
    if (ints != 1) {
        report("K%d: %d SIGINTs from ^C on its terminal, want 1", i, (int)ints);
        bad = 1;
    }
    _exit(bad);
}

static void __attribute__((noreturn)) l_main(int i, const char *slave) {
    if (setsid() < 0) die("setsid");
    int s = open(slave, O_RDWR); /* becomes the controlling terminal */
    if (s < 0) die("open slave");
    pid_t me = getpid();
    pid_t k = fork();
    if (k < 0) die("fork");
    if (k == 0) {
        setpgid(0, 0);
        k_main(i, me);
    }
    setpgid(k, k);
    if (tcsetpgrp(s, k) != 0) {
        report("L%d: tcsetpgrp: %s", i, strerror(errno));
        _exit(1);
    }
    while (!go_exists()) sleep_ms(10);
    int bad = 0;
    if (getsid(0) != me) {
        report("L%d: getsid %d", i, (int)getsid(0));
        bad = 1;
    }
    pid_t fg = tcgetpgrp(s);
    if (fg != k) {
        report("L%d: tcgetpgrp %d, want %d (%s)", i, (int)fg, (int)k, strerror(errno));
        bad = 1;
    }
    pid_t sid = 0;
    if (ioctl(s, TIOCGSID, &sid) != 0 || sid != me) {
        report("L%d: TIOCGSID %d (%s)", i, (int)sid, strerror(errno));
        bad = 1;
    }
    int t = open("/dev/tty", O_RDWR);
    struct stat st;
    if (t < 0 || fstat(s, &st) != 0 || gdev(t) != (unsigned int)st.st_rdev) {
        report("L%d: /dev/tty (%s) is not its slave", i, t < 0 ? strerror(errno) : "opens");
        bad = 1;
    }
    int stt;
    if (waitpid(k, &stt, 0) != k || !WIFEXITED(stt) || WEXITSTATUS(stt) != 0) bad = 1;
    _exit(bad);
}

int main(void) {
    setup();
    signal(SIGINT, on_int);
    int rep[2];
    if (pipe(rep)) die("pipe");
    rep_w = rep[1];
    int m[NT];
    pid_t l[NT], k[NT];
    for (int i = 0; i < NT; i++) {
        m[i] = posix_openpt(O_RDWR | O_NOCTTY);
        if (m[i] < 0 || grantpt(m[i]) || unlockpt(m[i])) die("posix_openpt");
        char slave[64];
        if (ptsname_r(m[i], slave, sizeof slave)) die("ptsname");
        int kp[2];
        if (pipe(kp)) die("pipe");
        l[i] = fork();
        if (l[i] < 0) die("fork");
        if (l[i] == 0) {
            close(rep[0]);
            close(kp[0]);
            for (int j = 0; j <= i; j++) close(m[j]);
            /* tell R the pid of K once it exists: L forks it first thing */
            pid_t self = getpid();
            (void)self;
            close(kp[1]);
            l_main(i, slave);
        }
        close(kp[1]);
        close(kp[0]);
    }
    /* Wait until each terminal's foreground group is set, and learn K's pid. */
    for (int i = 0; i < NT; i++) {
        k[i] = 0;
        for (int t = 0; t < 500 && !k[i]; t++) {
            pid_t fg = tcgetpgrp(m[i]);
            if (fg > 0 && fg != l[i]) k[i] = fg;
            else sleep_ms(10);
        }
        if (!k[i]) {
            out("FAIL terminal %d got no foreground group\n", i);
            exit(1);
        }
    }
    out("ready L0=%d K0=%d L1=%d K1=%d\n", (int)l[0], (int)k[0], (int)l[1], (int)k[1]);
    unsigned long long tick = 0;
    while (!go_exists()) {
        out("tick %llu\n", tick++);
        sleep_ms(20);
    }
    /* Each K writes "Ki" through its /dev/tty: read it on its master. */
    for (int i = 0; i < NT; i++) {
        char buf[4096];
        size_t len = 0;
        char want[8];
        snprintf(want, sizeof want, "K%d", i);
        char other[8];
        snprintf(other, sizeof other, "K%d", 1 - i);
        double t0 = mono_now();
        while (mono_now() - t0 < 10) {
            struct pollfd p = {m[i], POLLIN, 0};
            if (poll(&p, 1, 100) > 0 && (p.revents & POLLIN)) {
                ssize_t r = read(m[i], buf + len, sizeof buf - 1 - len);
                if (r > 0) len += (size_t)r;
            }
            buf[len] = 0;
            if (strstr(buf, want)) break;
        }
        CHECK(strstr(buf, want) != NULL, "master %d did not get %s written to /dev/tty (got %zu bytes)", i, want, len);
        CHECK(strstr(buf, other) == NULL, "master %d got %s", i, other);
        if (write(m[i], "\x03", 1) != 1) fail("write ^C to master %d: %s", i, strerror(errno));
    }
    for (int i = 0; i < NT; i++) {
        int st;
        pid_t w = waitpid(l[i], &st, 0);
        CHECK(w == l[i] && WIFEXITED(st) && WEXITSTATUS(st) == 0, "L%d: status 0x%x", i, st);
    }
    CHECK(ints == 0, "R got %d SIGINTs", (int)ints);
    close(rep[1]);
    char rb[4096];
    ssize_t n = read(rep[0], rb, sizeof rb - 1);
    if (n > 0) {
        rb[n] = 0;
        for (char *s = rb; *s; s++)
            if (*s == '\n') *s = ' ';
        fail("%s", rb);
    }
    finish("ticks=%llu", tick);
}
