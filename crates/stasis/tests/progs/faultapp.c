/* faultapp MIB: an application that checks itself all the time, to be
 * checkpointed by a stasis that is killed (or fails) at any moment.
 *
 * It holds MIB MiB of patterned memory, two worker threads (one computing with
 * invariants kept in general and vector registers, one looping through sleeping and
 * blocking syscalls whose results it checks), a signal mask, an alternate signal
 * stack, a SIGUSR1 handler, and fds: a file at a known offset, a pipe and a UNIX
 * stream and datagram socket pair with bytes queued. The main thread verifies all of
 * it continuously (a slice of memory per round, the mask, the altstack, the fd list,
 * the queues, SO_PEEK_OFF, the memory map): the first failure prints `FAIL ...` and
 * exits 1, a worker's at once.
 *
 * `faultapp MIB deep`: the main thread runs one MiB down its stack and sleeps at the
 * deepest point its stack ever reached (no room below it until the stack grows).
 *
 * Protocol: prints `ready pid=P`; on a file `ping` it verifies everything (the
 * whole memory too) and prints `pong calc=N sys=N usr1=N` (the workers' iteration
 * counts and the SIGUSR1 handled); on `go` the same, then `OK ...` and exit 0. */
#include "util.h"
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>

static volatile uint64_t g_calc, g_sys;
static volatile sig_atomic_t g_usr1;
static uint64_t *g_mem;
static size_t g_words;

static void fail_now(const char *what, unsigned long long a, unsigned long long b) {
    char buf[256];
    int n = snprintf(buf, sizeof buf, "FAIL %s (%llx, %llx)\n", what, a, b);
    write_all(1, buf, (size_t)n);
    _exit(1);
}

static uint64_t pattern(uint64_t i) {
    uint64_t x = i * 0x9E3779B97F4A7C15ULL + 0x1234567;
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ULL;
    return x ^ (x >> 32);
}

/* Computes with invariants the compiler cannot see through, kept in registers. */
static void *calc(void *arg) {
    (void)arg;
    uint64_t a = 0x0123456789abcdefULL, b = ~a, c = a ^ 0x5555, d = 1;
    double x = 1.0, y = 2.0;
    for (;;) {
        for (int k = 0; k < 1000; k++) {
            a = a * 6364136223846793005ULL + 1442695040888963407ULL;
            b = ~a;
            c = a ^ 0x5555;
            d += 1;
            x += 1.0;
            y = x + 1.0;
            __asm__ volatile("" : "+r"(a), "+r"(b), "+r"(c), "+r"(d), "+x"(x), "+x"(y));
            if ((a ^ b) != ~0ULL) fail_now("calc: a ^ b", a, b);
            if ((a ^ c) != 0x5555) fail_now("calc: a ^ c", a, c);
            if (y - x != 1.0) fail_now("calc: y - x", (unsigned long long)x, (unsigned long long)y);
        }
        g_calc = d;
    }
    return NULL;
}

/* Loops through syscalls that sleep or block and checks every result: none may fail
 * (no spurious EINTR) or return something else. */
static int g_tick[2];
static void *sys(void *arg) {
    (void)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    for (uint64_t i = 1;; i++) {
        struct timespec ts = {0, 300000};
        if (nanosleep(&ts, NULL) != 0) fail_now("sys: nanosleep", (unsigned long long)errno, i);
        struct pollfd p = {g_tick[0], POLLIN, 0};
        int r = poll(&p, 1, 1);
        if (r != 0) fail_now("sys: poll", (unsigned long long)r, (unsigned long long)errno);
        if (syscall(SYS_getppid) <= 0) fail_now("sys: getppid", i, 0);
        g_sys = i;
    }
    return NULL;
}

static void on_usr1(int s) {
    (void)s;
    g_usr1++;
}

static sigset_t g_mask;
static stack_t g_alt;
static char g_fds[1024];
static char *g_maps;
static int g_file, g_pipe[2], g_stream[2], g_dgram[2];
static off_t g_file_off;

/* /proc/self/maps without the [stack] and [heap] lines (they may grow). */
static char *maps_now(void) {
    char *m = maps_snapshot();
    const char *skip[] = {"[stack]", "[heap]"};
    for (int k = 0; k < 2; k++) {
        char *s = strstr(m, skip[k]);
        if (!s) continue;
        char *start = s;
        while (start > m && start[-1] != '\n') start--;
        char *end = strchr(s, '\n');
        end = end ? end + 1 : s + strlen(s);
        memmove(start, end, strlen(end) + 1);
    }
    return m;
}

static int queued(int fd) {
    int n = -1;
    if (ioctl(fd, FIONREAD, &n) != 0) return -2;
    return n;
}

static int peek_off(int fd) {
    int v = -3;
    socklen_t l = sizeof v;
    if (getsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &v, &l) != 0) return -4;
    return v;
}

/* Everything but the memory. */
static void check_state(void) {
    sigset_t cur;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    for (int s = 1; s < NSIG; s++)
        if (sigismember(&cur, s) != sigismember(&g_mask, s))
            fail_now("signal mask of the main thread changed at signal", (unsigned long long)s,
                     (unsigned long long)sigismember(&cur, s));
    stack_t alt;
    sigaltstack(NULL, &alt);
    if (alt.ss_sp != g_alt.ss_sp || alt.ss_size != g_alt.ss_size || alt.ss_flags != g_alt.ss_flags)
        fail_now("alternate signal stack changed", (unsigned long long)(uintptr_t)alt.ss_sp,
                 (unsigned long long)alt.ss_flags);
    char fds[1024];
    fd_list(fds, sizeof fds);
    if (strcmp(fds, g_fds) != 0) {
        out("FAIL fds changed: %s, were %s\n", fds, g_fds);
        _exit(1);
    }
    if (lseek(g_file, 0, SEEK_CUR) != g_file_off) fail_now("file offset", (unsigned long long)lseek(g_file, 0, SEEK_CUR), 0);
    if (queued(g_pipe[0]) != 100) fail_now("pipe bytes", (unsigned long long)queued(g_pipe[0]), 100);
    if (queued(g_stream[1]) != 300) fail_now("stream socket bytes", (unsigned long long)queued(g_stream[1]), 300);
    if (peek_off(g_stream[1]) != -1) fail_now("stream SO_PEEK_OFF", (unsigned long long)peek_off(g_stream[1]), 0);
    if (peek_off(g_dgram[1]) != -1) fail_now("datagram SO_PEEK_OFF", (unsigned long long)peek_off(g_dgram[1]), 0);
    char buf[64];
    ssize_t n = recv(g_dgram[1], buf, sizeof buf, MSG_PEEK | MSG_DONTWAIT);
    if (n != 10 || buf[0] != 'A') fail_now("first datagram", (unsigned long long)n, (unsigned long long)buf[0]);
    char *m = maps_now();
    if (strcmp(m, g_maps) != 0) {
        compare_maps(g_maps, m);
        out("FAIL memory map changed: %s\n", g_failbuf);
        _exit(1);
    }
    free(m);
}

static void check_memory(size_t from, size_t to) {
    for (size_t i = from; i < to; i++)
        if (g_mem[i] != pattern(i)) fail_now("memory word", (unsigned long long)i, (unsigned long long)g_mem[i]);
}

/* Sleeps at the deepest point of the stack: the pad is below every other frame. */
static __attribute__((noinline)) void nap(void) {
    char pad[16384];
    memset(pad, 0, sizeof pad);
    __asm__ volatile("" : : "r"(pad) : "memory");
    sleep_ms(1);
}

static int g_deep;

static __attribute__((noinline)) void main_loop(void) {
    size_t at = 0, slice = 1 << 15;
    for (unsigned round = 0;; round++) {
        size_t end = at + slice < g_words ? at + slice : g_words;
        check_memory(at, end);
        at = end == g_words ? 0 : end;
        if (round % 16 == 0) check_state();
        int go = go_exists();
        if (go || access("ping", F_OK) == 0) {
            check_memory(0, g_words);
            check_state();
            if (go) finish("calc=%llu sys=%llu usr1=%d", (unsigned long long)g_calc, (unsigned long long)g_sys, (int)g_usr1);
            unlink("ping");
            out("pong calc=%llu sys=%llu usr1=%d\n", (unsigned long long)g_calc, (unsigned long long)g_sys, (int)g_usr1);
        }
        if (g_deep)
            nap();
        else
            sleep_ms(1);
    }
}

/* Runs the main loop one MiB down the stack, sleeping at its deepest point. */
static __attribute__((noinline)) void deep(void) {
    char big[1 << 20];
    memset(big, 1, sizeof big);
    __asm__ volatile("" : : "r"(big) : "memory");
    g_deep = 1;
    main_loop();
}

int main(int argc, char **argv) {
    setup();
    size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 16;
    g_words = mib << 17;
    g_mem = mmap(NULL, g_words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g_mem == MAP_FAILED) die("mmap");
    for (size_t i = 0; i < g_words; i++) g_mem[i] = pattern(i);

    g_file = open("faultapp.data", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (g_file < 0) die("open");
    if (write(g_file, "0123456789abcdef", 16) != 16) die("write");
    g_file_off = lseek(g_file, 7, SEEK_SET);
    if (pipe(g_pipe) || pipe(g_tick)) die("pipe");
    char bytes[300];
    memset(bytes, 'p', sizeof bytes);
    if (write(g_pipe[1], bytes, 100) != 100) die("write pipe");
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, g_stream)) die("socketpair");
    if (write(g_stream[0], bytes, 100) != 100 || write(g_stream[0], bytes, 200) != 200) die("write stream");
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, g_dgram)) die("socketpair");
    if (send(g_dgram[0], "AAAAAAAAAA", 10, 0) != 10 || send(g_dgram[0], "BBBBB", 5, 0) != 5) die("send");

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    g_alt.ss_sp = malloc(65536);
    g_alt.ss_size = 65536;
    g_alt.ss_flags = 0;
    if (sigaltstack(&g_alt, NULL)) die("sigaltstack");
    sigemptyset(&g_mask);
    sigaddset(&g_mask, SIGUSR2);
    sigaddset(&g_mask, SIGRTMIN + 3);
    sigprocmask(SIG_SETMASK, &g_mask, NULL);

    pthread_t t;
    if (pthread_create(&t, NULL, calc, NULL) || pthread_create(&t, NULL, sys, NULL)) die("pthread_create");
    while (g_calc == 0 || g_sys == 0) sleep_ms(1);
    fd_list(g_fds, sizeof g_fds);
    g_maps = maps_now();
    out("ready pid=%d\n", getpid());

    if (argc > 2 && strcmp(argv[2], "deep") == 0)
        deep();
    else
        main_loop();
    return 0;
}
