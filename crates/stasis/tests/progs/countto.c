/* countto: a job that ends by itself, for batch-system tests.
 *
 *   countto N
 * Prints `ready pid=P`, then `tick K H` for K = 0..N-1, ~20 ms apart, H being the
 * running hash of 0..K kept in memory (the same hash as counter.c's), then re-derives
 * the hash from scratch and checks that pid, cwd, /proc/self/exe, the memory map and
 * the open fds are what they were at the start, and prints `OK ticks=N hash=H` (exit
 * 0) or `FAIL ...` (exit 1). A run restored from a checkpoint continues its ticks; one
 * started over prints `ready` and tick 0 again. */
#include "util.h"

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static uint64_t step(uint64_t h, uint64_t n) { return (h ^ n) * FNV_PRIME; }

int main(int argc, char **argv) {
    setup();
    if (argc != 2) {
        out("FAIL usage: countto N\n");
        return 2;
    }
    uint64_t total = strtoull(argv[1], NULL, 10);
    pid_t pid0 = getpid();
    char cwd0[PATH_MAX], cwd1[PATH_MAX], fds0[4096], fds1[4096];
    char exe0[PATH_MAX] = "", exe1[PATH_MAX] = "";
    if (!getcwd(cwd0, sizeof cwd0)) die("getcwd");
    if (readlink("/proc/self/exe", exe0, sizeof exe0 - 1) < 0) die("readlink exe");
    fd_list(fds0, sizeof fds0);
    char *maps0 = maps_snapshot();

    uint64_t h = FNV_OFFSET;
    out("ready pid=%d fds=%s\n", (int)pid0, fds0);
    for (uint64_t n = 0; n < total; n++) {
        h = step(h, n);
        out("tick %llu %016llx\n", (unsigned long long)n, (unsigned long long)h);
        sleep_ms(20);
    }

    uint64_t h2 = FNV_OFFSET;
    for (uint64_t i = 0; i < total; i++) h2 = step(h2, i);
    CHECK(h2 == h, "hash in memory %016llx != recomputed %016llx", (unsigned long long)h,
          (unsigned long long)h2);
    CHECK(getpid() == pid0, "getpid() changed from %d to %d", (int)pid0, (int)getpid());
    if (!getcwd(cwd1, sizeof cwd1)) fail("getcwd after: %s", strerror(errno));
    else CHECK(strcmp(cwd0, cwd1) == 0, "cwd changed from %s to %s", cwd0, cwd1);
    if (readlink("/proc/self/exe", exe1, sizeof exe1 - 1) < 0) fail("readlink exe: %s", strerror(errno));
    CHECK(strcmp(exe0, exe1) == 0, "/proc/self/exe changed from %s to %s", exe0, exe1);
    compare_maps(maps0, maps_snapshot());
    fd_list(fds1, sizeof fds1);
    CHECK(strcmp(fds0, fds1) == 0, "open fds changed from [%s] to [%s]", fds0, fds1);
    finish("ticks=%llu hash=%016llx", (unsigned long long)total, (unsigned long long)h);
}
