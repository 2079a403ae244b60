/* appfork: two processes using the stasis application interface. The parent sets
 * its hooks, then forks a child, which (having no connection after fork) sets its
 * own. Each hook prints `pre who=W n=K` / `post who=W n=K pre=J` (W parent or
 * child). The parent prints `tick N H` like counter.c, the child `child ready`
 * once its hooks are set. At `go` the child exits 0; the parent checks that it did
 * and prints `OK ticks=N hash=H`. */
#include "util.h"
#include "stasis.h"

#include <stdatomic.h>
#include <sys/wait.h>

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static const char *g_who = "parent";
static atomic_int g_pre, g_post;

static void pre_checkpoint(void *arg) {
    (void)arg;
    sleep_ms(50);
    int n = ++g_pre;
    out("pre who=%s n=%d\n", g_who, n);
}

static void post_restart(void *arg) {
    (void)arg;
    int n = ++g_post;
    out("post who=%s n=%d pre=%d\n", g_who, n, (int)g_pre);
}

static void hooks(void) {
    if (stasis_set_hooks(pre_checkpoint, post_restart, NULL) != 0) {
        out("FAIL %s: stasis_set_hooks: %s\n", g_who, stasis_last_error());
        exit(1);
    }
}

int main(void) {
    setup();
    hooks();
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        g_who = "child";
        g_pre = g_post = 0;
        hooks();
        out("child ready\n");
        while (!go_exists()) sleep_ms(10);
        exit(0);
    }
    out("ready pid=%d child=%d\n", (int)getpid(), (int)child);
    uint64_t h = FNV_OFFSET, n = 0;
    while (!go_exists()) {
        h = (h ^ n) * FNV_PRIME;
        out("tick %llu %016llx\n", (unsigned long long)n, (unsigned long long)h);
        n++;
        answer_ping();
        sleep_ms(20);
    }
    int st;
    if (waitpid(child, &st, 0) != child) die("waitpid");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    finish("ticks=%llu hash=%016llx", (unsigned long long)n, (unsigned long long)h);
}
