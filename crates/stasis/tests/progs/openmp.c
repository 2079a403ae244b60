/* openmp: a long parallel reduction (built with -fopenmp).
 * acc = sum over i < NCHUNK * CHUNK of mix(i) (mod 2^64), computed in NCHUNK
 * chunks (argv[1], default 300) of CHUNK (argv[2], default 1 Mi) elements,
 * each one `omp parallel for reduction(+)` over the team (OMP_NUM_THREADS).
 * Between chunks the master prints `tick K acc=HEX` (acc after chunk K).
 * Every region checks its team size and that all iterations were done. Then
 * it prints `done acc=HEX`, waits for `go` and prints `OK acc=HEX chunks=N
 * team=T` / `FAIL ...`. The result does not depend on the schedule, so an
 * uninterrupted run must print exactly the same lines.
 * Output: `ready team=T`, ticks, `done ...`, `OK ...`. */
#include "util.h"
#include <omp.h>

static uint64_t mix(uint64_t x) { /* splitmix64 */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

int main(int argc, char **argv) {
    setup();
    long nchunk = argc > 1 ? atol(argv[1]) : 300;
    long chunk = argc > 2 ? atol(argv[2]) : 1 << 20;
    int team = 0;
#pragma omp parallel
    {
#pragma omp single
        team = omp_get_num_threads();
    }
    out("ready team=%d\n", team);
    uint64_t acc = 0, iters_total = 0;
    int bad_team = 0;
    for (long k = 0; k < nchunk; k++) {
        uint64_t s = 0, iters = 0;
        uint64_t base = (uint64_t)k * (uint64_t)chunk;
#pragma omp parallel reduction(+ : s, iters)
        {
            if (omp_get_num_threads() != team) __atomic_add_fetch(&bad_team, 1, __ATOMIC_SEQ_CST);
#pragma omp for schedule(static)
            for (long i = 0; i < chunk; i++) {
                s += mix(base + (uint64_t)i);
                iters++;
            }
        }
        CHECK(iters == (uint64_t)chunk, "chunk %ld: %llu iterations done, want %ld", k, (unsigned long long)iters,
              chunk);
        iters_total += iters;
        acc += s;
        out("tick %ld acc=%016llx\n", k, (unsigned long long)acc);
        answer_ping();
    }
    out("done acc=%016llx\n", (unsigned long long)acc);
    wait_go();
    CHECK(bad_team == 0, "%d parallel regions ran with another team size than %d", bad_team, team);
    CHECK(iters_total == (uint64_t)nchunk * (uint64_t)chunk, "%llu iterations in total",
          (unsigned long long)iters_total);
    finish("acc=%016llx chunks=%ld team=%d", (unsigned long long)acc, nchunk, team);
}
