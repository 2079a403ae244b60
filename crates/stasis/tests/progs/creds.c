/* creds: user and group IDs, supplementary groups, capability sets and no_new_privs
 * must survive checkpoint/restart, as the process saw them (its own IDs, not root's,
 * under a plain user's `stasis run`).
 *
 * R (this process) keeps the credentials it was started with. Its child C changes
 * its own: with root's power (euid 0 and CAP_SETUID) it takes supplementary groups
 * 1 2, gids 1234/1235/1236, uids 1234/1235/1236 keeping only CAP_KILL (effective,
 * permitted, inheritable and ambient) and CAP_NET_BIND_SERVICE (permitted), drops
 * CAP_SYS_BOOT from its bounding set; any user's C then sets no_new_privs.
 * Prints `ready pid=R c=C uid=U euid=E root=0|1`, then `tick N` every ~20 ms until
 * `go` exists (answers `ping` with `pong`). Then both compare their credentials with
 * those they had at `ready`; `OK ...` / `FAIL ...`. */
#include "util.h"
#include <grp.h>
#include <linux/capability.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_IS_SET 1
#define PR_CAP_AMBIENT_RAISE 2
#endif

/* The credentials, as text. */
static void describe(char *b, size_t cap) {
    uid_t r, e, s;
    gid_t gr, ge, gs;
    getresuid(&r, &e, &s);
    getresgid(&gr, &ge, &gs);
    gid_t groups[64];
    int ng = getgroups(64, groups);
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2] = {{0}};
    syscall(SYS_capget, &h, d);
    unsigned long long amb = 0, bnd = 0;
    for (int c = 0; c < 64; c++) {
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, c, 0, 0) == 1) amb |= 1ULL << c;
        if (prctl(PR_CAPBSET_READ, c, 0, 0, 0) == 1) bnd |= 1ULL << c;
    }
    size_t n = (size_t)snprintf(b, cap,
        "uid %u/%u/%u fsuid %d gid %u/%u/%u fsgid %d eff %x:%x prm %x:%x inh %x:%x amb %llx bnd %llx nnp %d groups",
        r, e, s, (int)setfsuid(-1), gr, ge, gs, (int)setfsgid(-1), d[1].effective, d[0].effective,
        d[1].permitted, d[0].permitted, d[1].inheritable, d[0].inheritable, amb, bnd,
        prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
    for (int i = 0; i < ng && n < cap; i++) n += (size_t)snprintf(b + n, cap - n, " %u", groups[i]);
}

static void change(int root) {
    if (root) {
        gid_t g[2] = {1, 2};
        if (setgroups(2, g)) die("setgroups");
        if (prctl(PR_CAPBSET_DROP, CAP_SYS_BOOT, 0, 0, 0)) die("PR_CAPBSET_DROP");
        if (setresgid(1234, 1235, 1236)) die("setresgid");
        if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)) die("PR_SET_KEEPCAPS");
        if (setresuid(1234, 1235, 1236)) die("setresuid");
        struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
        struct __user_cap_data_struct d[2] = {{0}};
        d[0].effective = 1u << CAP_KILL;
        d[0].permitted = (1u << CAP_KILL) | (1u << CAP_NET_BIND_SERVICE);
        d[0].inheritable = 1u << CAP_KILL;
        if (syscall(SYS_capset, &h, d)) die("capset");
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_KILL, 0, 0)) die("ambient raise");
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) die("PR_SET_NO_NEW_PRIVS");
}

int main(void) {
    setup();
    int root = geteuid() == 0 && prctl(PR_CAPBSET_READ, CAP_SETUID, 0, 0, 0) == 1;
    int res[2], rd[2];
    if (pipe(res) || pipe(rd)) die("pipe");
    pid_t c = fork();
    if (c < 0) die("fork");
    if (c == 0) {
        close(res[0]);
        close(rd[0]);
        change(root);
        char before[2048], after[2048], line[4200];
        describe(before, sizeof before);
        write_all(rd[1], "x", 1);
        close(rd[1]);
        while (!go_exists()) sleep_ms(10);
        describe(after, sizeof after);
        int n = strcmp(before, after) == 0
                    ? snprintf(line, sizeof line, "ok\n")
                    : snprintf(line, sizeof line, "C was [%s], now [%s]\n", before, after);
        write_all(res[1], line, (size_t)n);
        _exit(0);
    }
    close(res[1]);
    close(rd[1]);
    char x;
    if (read(rd[0], &x, 1) != 1) die("C did not start");
    char before[2048], after[2048];
    describe(before, sizeof before);
    out("ready pid=%d c=%d uid=%u euid=%u root=%d\n", (int)getpid(), (int)c, getuid(), geteuid(), root);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }
    describe(after, sizeof after);
    CHECK(strcmp(before, after) == 0, "R was [%s], now [%s]", before, after);
    char rep[4300] = "";
    ssize_t k = read(res[0], rep, sizeof rep - 1);
    CHECK(k > 0 && strcmp(rep, "ok\n") == 0, "%s", k > 0 ? rep : "no report from C");
    int st;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "C did not exit 0");
    finish("ticks=%u %s", n, before);
}
