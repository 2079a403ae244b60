/* pipeline: the stages of a shell pipeline
 *     pipeline produce M | pipeline filter | cat | pipeline consume M
 * `produce M` writes lines `L <n> <h(n)>` for n = 0..M-1 then `END M`, as fast
 * as the pipe takes them (stdio, fully buffered). `filter` checks each line and
 * turns it into `F <n> <h(n) ^ K>` (END passes through). `consume M` checks
 * that the lines arrive exactly once and in order (n = 0, 1, 2, ... with the
 * right value) and that END carries M after exactly M lines. Until `go` exists
 * the consumer is slow (~1 ms pause every 20 lines) so that the producer runs
 * ahead and every pipe holds data; it prints `ready` after the first line and
 * `tick K lines=L` every ~50 ms; after `go` it reads the rest at full speed
 * and prints `OK lines=M ticks=K` (exit 0) or `FAIL ...` (exit 1). Stages other
 * than the consumer report problems on stderr and exit 1. */
#include "util.h"

#define K 0x5a5a5a5a5a5a5a5aULL

static uint64_t h(uint64_t x) { /* splitmix64 */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static int produce(unsigned long long m) {
    for (unsigned long long i = 0; i < m; i++)
        if (printf("L %llu %016llx\n", i, (unsigned long long)h(i)) < 0) return 1;
    printf("END %llu\n", m);
    return fflush(stdout) == 0 ? 0 : 1;
}

static int filter(void) {
    char line[256];
    unsigned long long expect = 0;
    while (fgets(line, sizeof line, stdin)) {
        unsigned long long n, v;
        if (sscanf(line, "L %llu %llx", &n, &v) == 2) {
            if (n != expect || v != h(n)) {
                fprintf(stderr, "filter: line %llu is %s", expect, line);
                return 1;
            }
            expect++;
            printf("F %llu %016llx\n", n, v ^ K);
        } else if (strncmp(line, "END ", 4) == 0) {
            fputs(line, stdout);
        } else {
            fprintf(stderr, "filter: bad line %s", line);
            return 1;
        }
    }
    return fflush(stdout) == 0 ? 0 : 1;
}

static int consume(unsigned long long m) {
    char line[256];
    unsigned long long expect = 0, tick = 0, endv = 0;
    int end = 0, fast = 0;
    double next = 0;
    while (fgets(line, sizeof line, stdin)) {
        unsigned long long n, v;
        if (end) {
            fail("line after END: %s", line);
            break;
        }
        if (sscanf(line, "F %llu %llx", &n, &v) == 2) {
            if (n != expect) {
                fail("line %llu: got number %llu (%s)", expect, n,
                     n < expect ? "repeated" : "lines lost");
                break;
            }
            if (v != (h(n) ^ K)) {
                fail("line %llu: wrong value %016llx", n, v);
                break;
            }
            if (expect == 0) out("ready\n");
            expect++;
        } else if (sscanf(line, "END %llu", &endv) == 1) {
            end = 1;
        } else {
            fail("line %llu: garbage '%.60s'", expect, line);
            break;
        }
        if (!fast && expect % 20 == 0) {
            double now = mono_now();
            if (now >= next) {
                out("tick %llu lines=%llu\n", tick++, expect);
                next = now + 0.05;
                if (go_exists()) fast = 1;
            }
            if (!fast) sleep_ms(1);
        }
    }
    if (!g_failures) {
        CHECK(end, "no END line after %llu lines (stream cut)", expect);
        CHECK(endv == m, "END says %llu lines, want %llu", endv, m);
        CHECK(expect == m, "%llu lines arrived, want %llu", expect, m);
    }
    if (!fast) wait_go();
    finish("lines=%llu ticks=%llu", expect, tick);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    unsigned long long m = argc > 2 ? strtoull(argv[2], NULL, 10) : 0;
    if (strcmp(argv[1], "produce") == 0) return produce(m);
    if (strcmp(argv[1], "filter") == 0) return filter();
    if (strcmp(argv[1], "consume") == 0) {
        setup();
        return consume(m);
    }
    return 2;
}
