/* counter: prints `tick N H` every ~20 ms (N consecutive from 0, H = running
 * FNV-1a style hash of 0..N kept in memory) until `go` exists, then re-derives
 * the hash and checks pid, cwd, /proc/self/exe, the memory map
 * (/proc/self/maps without device/inode) and open fds are unchanged.
 * With argument `stderr` every tick is also written to stderr as `etick N`.
 * Output: `ready pid=P`, `tick N H`..., `OK ticks=N hash=H` / `FAIL ...`. */
#include "util.h"

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static uint64_t step(uint64_t h, uint64_t n) { return (h ^ n) * FNV_PRIME; }

int main(int argc, char **argv) {
    setup();
    int to_stderr = argc > 1 && strcmp(argv[1], "stderr") == 0;
    pid_t pid0 = getpid();
    char cwd0[PATH_MAX], cwd1[PATH_MAX], fds0[4096], fds1[4096];
    if (!getcwd(cwd0, sizeof cwd0)) die("getcwd");
    fd_list(fds0, sizeof fds0);
    char exe0[PATH_MAX] = "", exe1[PATH_MAX] = "";
    if (readlink("/proc/self/exe", exe0, sizeof exe0 - 1) < 0) die("readlink exe");

    uint64_t h = FNV_OFFSET, n = 0;
    char *maps0 = maps_snapshot();
    out("ready pid=%d fds=%s\n", (int)pid0, fds0);
    while (!go_exists()) {
        h = step(h, n);
        out("tick %llu %016llx\n", (unsigned long long)n, (unsigned long long)h);
        if (to_stderr) {
            char b[64];
            int l = snprintf(b, sizeof b, "etick %llu\n", (unsigned long long)n);
            write_all(2, b, (size_t)l);
        }
        n++;
        sleep_ms(20);
    }

    uint64_t h2 = FNV_OFFSET;
    for (uint64_t i = 0; i < n; i++) h2 = step(h2, i);
    CHECK(h2 == h, "hash in memory %016llx != recomputed %016llx", (unsigned long long)h,
          (unsigned long long)h2);
    CHECK(getpid() == pid0, "getpid() changed from %d to %d", (int)pid0, (int)getpid());
    if (!getcwd(cwd1, sizeof cwd1)) fail("getcwd after: %s", strerror(errno));
    else CHECK(strcmp(cwd0, cwd1) == 0, "cwd changed from %s to %s", cwd0, cwd1);
    if (readlink("/proc/self/exe", exe1, sizeof exe1 - 1) < 0) fail("readlink exe: %s", strerror(errno));
    CHECK(strcmp(exe0, exe1) == 0, "/proc/self/exe changed from %s to %s", exe0, exe1);
    char *maps1 = maps_snapshot();
    compare_maps(maps0, maps1);
    fd_list(fds1, sizeof fds1);
    CHECK(strcmp(fds0, fds1) == 0, "open fds changed from [%s] to [%s]", fds0, fds1);
    finish("ticks=%llu hash=%016llx", (unsigned long long)n, (unsigned long long)h);
}
