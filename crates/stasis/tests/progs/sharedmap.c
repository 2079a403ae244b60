/* sharedmap: a file mapped MAP_SHARED by every process of a tree, each with a mapping
 * of its own (as MPI ranks map each other's shared-memory segments), must come back
 * as one file shared by all, also when it is gone at restart (recreated from the
 * checkpoint, which holds its content once).
 *
 * Creates `shared.dat` (4 pages) in its cwd; the parent forks 3 children; every
 * process opens and maps the file MAP_SHARED itself and closes the fd. Every ~20 ms
 * process i increments word i of page 0 and writes its count into page i+1 (the whole
 * page, so that all of it is checked); the parent prints `tick N` (its own count).
 * Prints `ready pid=P`. At `go`: every process checks its words continued (page i+1
 * holds its count everywhere), then process i writes a token at page 0 word 8+i and
 * the parent checks it sees the three children's tokens through its own mapping
 * (the mappings are still of one file), and prints `OK ...` / `FAIL ...`. */
#include "util.h"
#include <sys/mman.h>
#include <sys/wait.h>

#define NPROC 4

static uint64_t *map_file(size_t len) {
    int fd = open("shared.dat", O_RDWR | O_CLOEXEC);
    if (fd < 0) die("open shared.dat");
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) die("mmap shared.dat");
    close(fd);
    return m;
}

/* Checks page `i` + 1 holds `count` in every word. */
static void check_page(uint64_t *m, size_t pg, int i, uint64_t count) {
    uint64_t *p = m + (size_t)(i + 1) * pg / 8;
    for (size_t k = 0; k < pg / 8; k++) {
        if (p[k] != count) {
            fail("process %d: page %d word %zu is %llu, not %llu", i, i + 1, k,
                 (unsigned long long)p[k], (unsigned long long)count);
            return;
        }
    }
}

static uint64_t *run(int i, size_t pg, int result_fd) {
    uint64_t *m = map_file(5 * pg);
    uint64_t count = 0;
    while (!go_exists()) {
        count++;
        uint64_t *p = m + (size_t)(i + 1) * pg / 8;
        for (size_t k = 0; k < pg / 8; k++) p[k] = count;
        __atomic_store_n(&m[i], count, __ATOMIC_SEQ_CST);
        if (i == 0) {
            out("tick %llu\n", (unsigned long long)count);
            answer_ping();
        }
        sleep_ms(20);
    }
    CHECK(__atomic_load_n(&m[i], __ATOMIC_SEQ_CST) == count, "process %d: word %d is %llu, not %llu",
          i, i, (unsigned long long)m[i], (unsigned long long)count);
    check_page(m, pg, i, count);
    __atomic_store_n(&m[8 + i], 0x5eed0000ull + (uint64_t)i, __ATOMIC_SEQ_CST);
    if (result_fd >= 0) {
        char r = g_failures ? 'F' : 'K';
        write_all(result_fd, &r, 1);
        if (g_failures) out("FAIL %s\n", g_failbuf);
        _exit(0);
    }
    return m;
}

int main(void) {
    setup();
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    int fd = open("shared.dat", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) die("create shared.dat");
    if (ftruncate(fd, (off_t)(5 * pg)) != 0) die("ftruncate");
    close(fd);
    int res[2];
    if (pipe(res) != 0) die("pipe");
    pid_t kids[NPROC];
    for (int i = 1; i < NPROC; i++) {
        kids[i] = fork();
        if (kids[i] < 0) die("fork");
        if (kids[i] == 0) {
            close(res[0]);
            run(i, pg, res[1]);
        }
    }
    close(res[1]);
    out("ready pid=%d\n", (int)getpid());
    uint64_t *m = run(0, pg, -1);
    int ok = 0;
    for (int i = 1; i < NPROC; i++) {
        char r = 0;
        if (read(res[0], &r, 1) == 1 && r == 'K') ok++;
    }
    CHECK(ok == NPROC - 1, "only %d of %d children checked out", ok, NPROC - 1);
    for (int i = 1; i < NPROC; i++) waitpid(kids[i], NULL, 0);
    for (int i = 1; i < NPROC; i++)
        CHECK(m[8 + i] == 0x5eed0000ull + (uint64_t)i,
              "process %d's token is not seen through the parent's mapping", i);
    finish("processes=%d ticks=%llu", NPROC, (unsigned long long)m[0]);
}
