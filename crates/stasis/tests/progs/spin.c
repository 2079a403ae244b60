/* spin: CPU-bound, so checkpoints catch it in user mode in the middle of a
 * computation (state in registers). Iterates a 4-word xoshiro-like mixer;
 * every 2^18 iterations it checks for `go` (and answers `ping`). After `go`
 * it recomputes the same number of iterations from the seed and compares.
 * Output: `ready`, `pong`..., `OK iters=N state=S` / `FAIL ...`. */
#include "util.h"

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline void step(uint64_t s[4]) {
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
}

int main(void) {
    setup();
    uint64_t s[4] = {0x0123456789abcdefULL, 0xfedcba9876543210ULL, 0x0f1e2d3c4b5a6978ULL, 0x1122334455667788ULL};
    uint64_t iters = 0;
    out("ready\n");
    for (;;) {
        for (int i = 0; i < (1 << 18); i++) step(s);
        iters += 1 << 18;
        answer_ping();
        if (go_exists()) break;
    }
    uint64_t r[4] = {0x0123456789abcdefULL, 0xfedcba9876543210ULL, 0x0f1e2d3c4b5a6978ULL, 0x1122334455667788ULL};
    for (uint64_t i = 0; i < iters; i++) step(r);
    CHECK(memcmp(r, s, sizeof r) == 0, "state after %llu iterations is %016llx..., recomputed %016llx...",
          (unsigned long long)iters, (unsigned long long)s[0], (unsigned long long)r[0]);
    finish("iters=%llu state=%016llx", (unsigned long long)iters, (unsigned long long)s[0]);
}
