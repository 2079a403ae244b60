/* grow: ticks every ~20 ms; when a file `grow` appears it fills 8 MiB of fresh
 * memory with a pseudo-random pattern and prints `grown`; on `go` it checks the
 * pattern and prints `OK ticks=N` (or FAIL). Used to make a checkpoint too big
 * for its file system. */
#include "util.h"

int main(void) {
    setup();
    size_t n = 8u << 20;
    uint8_t *big = NULL;
    uint64_t x = 0x9e3779b97f4a7c15ULL, ticks = 0;
    out("ready pid=%d\n", (int)getpid());
    while (!go_exists()) {
        if (!big && access("grow", F_OK) == 0) {
            big = malloc(n);
            if (!big) die("malloc");
            for (size_t i = 0; i < n; i++) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                big[i] = (uint8_t)x;
            }
            out("grown\n");
        }
        out("tick %llu\n", (unsigned long long)ticks++);
        sleep_ms(20);
    }
    if (big) {
        uint64_t y = 0x9e3779b97f4a7c15ULL;
        for (size_t i = 0; i < n; i++) {
            y ^= y << 13; y ^= y >> 7; y ^= y << 17;
            if (big[i] != (uint8_t)y) {
                out("FAIL memory changed at %zu\n", i);
                return 1;
            }
        }
    }
    out("OK ticks=%llu\n", (unsigned long long)ticks);
    return 0;
}
