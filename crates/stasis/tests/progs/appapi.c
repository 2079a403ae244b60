/* appapi: a program using the stasis application interface (include/stasis.h,
 * lib/stasis.c).
 *
 * Counts like counter.c (`tick N H`, H a hash of 0..N kept in memory) and writes
 * one record `rec N H` per tick into data.txt through a fully buffered stream (1 MiB:
 * never written out by itself). Its pre-checkpoint hook (slow: 100 ms) writes the
 * buffer out, so that the file holds every record the checkpointed memory knows of,
 * and prints
 * `pre n=K records=R` (K hooks so far, R records in the file). Its post-restart hook
 * prints `post n=K pre=J phase=P`: K restarts, J pre-checkpoint hooks so far (those
 * of the checkpoints it was restarted from included: they ran before the freeze),
 * P the STASIS_TEST_PHASE of the stasis that restarted it (stasis_getenv; the
 * program's own environment keeps the first one's). A file `self-ckpt` makes it ask
 * for a checkpoint itself: `self r=R tick=N pre=J post=K` (R what stasis_checkpoint
 * returned, N the next tick).
 *
 * With argument `hang`, the pre-checkpoint hook first waits (printing
 * `pre-waiting`) until a file `release` exists: stasis must checkpoint anyway.
 *
 * At `go` it writes the buffer out, checks that data.txt holds exactly the records
 * 0..N-1 with their hashes, prints `stats pre=J post=K records=R` and
 * `OK ticks=N hash=H`. */
#include "util.h"
#include "stasis.h"

#include <pthread.h>
#include <stdatomic.h>

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static uint64_t step(uint64_t h, uint64_t n) { return (h ^ n) * FNV_PRIME; }

static FILE *g_data;
static char g_buffer[1 << 20]; /* the stream's (glibc ignores the size of its own) */
static long g_records; /* records written into g_data; under its stream lock */
static atomic_int g_pre, g_post, g_errors;
static int g_hang;

static void pre_checkpoint(void *arg) {
    (void)arg;
    if (g_hang && access("release", F_OK) != 0) {
        out("pre-waiting\n");
        while (access("release", F_OK) != 0) sleep_ms(10);
    }
    sleep_ms(100); /* a slow flush: a checkpoint that did not wait for it shows */
    flockfile(g_data);
    if (fflush_unlocked(g_data) != 0) g_errors++;
    long r = g_records;
    funlockfile(g_data);
    int n = ++g_pre;
    out("pre n=%d records=%ld\n", n, r);
}

static void post_restart(void *arg) {
    (void)arg;
    int n = ++g_post;
    char *phase = stasis_getenv("STASIS_TEST_PHASE");
    out("post n=%d pre=%d phase=%s\n", n, (int)g_pre, phase ? phase : stasis_last_error());
    free(phase);
}

/* data.txt holds exactly records 0..n-1 with their hashes. */
static void check_records(uint64_t n) {
    FILE *f = fopen("data.txt", "r");
    if (!f) {
        fail("data.txt: %s", strerror(errno));
        return;
    }
    char line[128];
    uint64_t i = 0, h = FNV_OFFSET;
    while (fgets(line, sizeof line, f)) {
        unsigned long long k, got;
        h = step(h, i);
        if (sscanf(line, "rec %llu %llx", &k, &got) != 2 || k != i || got != h) {
            fail("data.txt line %llu is %.60s, want rec %llu %016llx", (unsigned long long)i,
                 line, (unsigned long long)i, (unsigned long long)h);
            break;
        }
        i++;
    }
    fclose(f);
    CHECK(i == n, "data.txt holds %llu records, %llu were written", (unsigned long long)i,
          (unsigned long long)n);
}

int main(int argc, char **argv) {
    setup();
    g_hang = argc > 1 && strcmp(argv[1], "hang") == 0;
    g_data = fopen("data.txt", "w");
    if (!g_data) die("data.txt");
    if (setvbuf(g_data, g_buffer, _IOFBF, sizeof g_buffer) != 0) die("setvbuf");
    if (!stasis_available()) {
        out("FAIL stasis_available: %s\n", stasis_last_error());
        return 1;
    }
    if (stasis_set_hooks(pre_checkpoint, post_restart, NULL) != 0) {
        out("FAIL stasis_set_hooks: %s\n", stasis_last_error());
        return 1;
    }
    const char *phase = getenv("STASIS_TEST_PHASE");
    out("ready pid=%d phase=%s\n", (int)getpid(), phase ? phase : "?");
    uint64_t h = FNV_OFFSET, n = 0;
    while (!go_exists()) {
        h = step(h, n);
        char rec[64];
        snprintf(rec, sizeof rec, "rec %llu %016llx\n", (unsigned long long)n,
                 (unsigned long long)h);
        flockfile(g_data);
        fputs_unlocked(rec, g_data);
        g_records++;
        funlockfile(g_data);
        out("tick %llu %016llx\n", (unsigned long long)n, (unsigned long long)h);
        n++;
        answer_ping();
        if (access("self-ckpt", F_OK) == 0 && unlink("self-ckpt") == 0) {
            int r = stasis_checkpoint();
            out("self r=%d tick=%llu pre=%d post=%d%s%s\n", r, (unsigned long long)n, (int)g_pre,
                (int)g_post, r < 0 ? " error=" : "", r < 0 ? stasis_last_error() : "");
        }
        sleep_ms(20);
    }
    if (fflush(g_data) != 0) fail("fflush: %s", strerror(errno));
    CHECK(g_errors == 0, "%d pre-checkpoint flushes failed", (int)g_errors);
    CHECK(g_records == (long)n, "%ld records for %llu ticks", g_records, (unsigned long long)n);
    check_records(n);
    uint64_t h2 = FNV_OFFSET;
    for (uint64_t i = 0; i < n; i++) h2 = step(h2, i);
    CHECK(h2 == h, "hash in memory %016llx != recomputed %016llx", (unsigned long long)h,
          (unsigned long long)h2);
    out("stats pre=%d post=%d records=%ld\n", (int)g_pre, (int)g_post, g_records);
    finish("ticks=%llu hash=%016llx", (unsigned long long)n, (unsigned long long)h);
}
