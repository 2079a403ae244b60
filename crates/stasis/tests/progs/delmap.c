/* delmap: mappings of files deleted while open must come back with their content
 * and sharing.
 *
 * In a directory `delm` of its cwd, R makes
 *  - M: a 4-page file held as fd `mf` (O_RDWR), mapped MAP_SHARED (`ms`) and
 *    MAP_PRIVATE (`mp`), then unlinked; page 0 of `mp` is written (copied on write:
 *    "PRIVATE"), page 1 of `ms` ("SHARED"), page 2 through the fd ("FDWRITE");
 *  - N: a 2-page file mapped MAP_SHARED only (its fd closed), then unlinked;
 *  - P: a 2-page file mapped MAP_PRIVATE only (its fd closed), then unlinked, its
 *    page 1 written ("PCOPY").
 * Prints `ready pid=R`, then `tick N` every ~20 ms until `go` exists. Then it checks
 * every page, that a write through the fd is seen in `ms` and in `mp`'s pages not
 * copied, not in `mp`'s copied page, that a write through `ms` is read through the
 * fd, and that N's and P's content is intact. `OK ...` / `FAIL ...`. */
#include "util.h"
#include <sys/mman.h>

#define PG 4096

static char *map_new(const char *path, int pages, int flags, int keep_fd, int *fd_out, char tag) {
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) die("open");
    char page[PG];
    for (int p = 0; p < pages; p++) {
        memset(page, tag + p, PG);
        if (write(fd, page, PG) != PG) die("write");
    }
    char *m = mmap(NULL, (size_t)pages * PG, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (m == MAP_FAILED) die("mmap");
    if (unlink(path)) die("unlink");
    if (keep_fd) *fd_out = fd;
    else close(fd);
    return m;
}

static int page_is(const char *p, const char *prefix, char fill) {
    size_t l = strlen(prefix);
    if (memcmp(p, prefix, l)) return 0;
    for (size_t i = l; i < PG; i++)
        if (p[i] != fill) return 0;
    return 1;
}

int main(void) {
    setup();
    if (mkdir("delm", 0755) && errno != EEXIST) die("mkdir delm");
    int mf = -1, unused;
    char *ms = map_new("delm/m", 4, MAP_SHARED, 1, &mf, 'a');
    char *mp = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, mf, 0);
    if (mp == MAP_FAILED) die("mmap private");
    memcpy(mp, "PRIVATE", 7);
    memcpy(ms + PG, "SHARED", 6);
    if (pwrite(mf, "FDWRITE", 7, 2 * PG) != 7) die("pwrite");
    char *ns = map_new("delm/n", 2, MAP_SHARED, 0, &unused, 'n');
    char *pp = map_new("delm/p", 2, MAP_PRIVATE, 0, &unused, 'p');
    memcpy(pp + PG, "PCOPY", 5);
    (void)mp[3 * PG]; /* page 3 of mp: a file page, mapped and not copied */

    out("ready pid=%d\n", (int)getpid());
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }

    struct stat st;
    if (fstat(mf, &st)) die("fstat");
    CHECK(st.st_nlink == 0 && st.st_size == 4 * PG, "m: nlink %lu size %lld", (unsigned long)st.st_nlink,
          (long long)st.st_size);
    CHECK(page_is(ms, "", 'a'), "ms page 0 differs");
    CHECK(page_is(ms + PG, "SHARED", 'b'), "ms page 1 differs");
    CHECK(page_is(ms + 2 * PG, "FDWRITE", 'c'), "ms page 2 differs");
    CHECK(page_is(ms + 3 * PG, "", 'd'), "ms page 3 differs");
    CHECK(page_is(mp, "PRIVATE", 'a'), "mp page 0 (copied) differs");
    CHECK(page_is(mp + PG, "SHARED", 'b'), "mp page 1 differs");
    CHECK(page_is(mp + 2 * PG, "FDWRITE", 'c'), "mp page 2 differs");
    CHECK(page_is(mp + 3 * PG, "", 'd'), "mp page 3 differs");
    char buf[16];
    CHECK(pread(mf, buf, 6, PG) == 6 && memcmp(buf, "SHARED", 6) == 0, "the fd does not see ms's write");
    CHECK(pread(mf, buf, 1, 0) == 1 && buf[0] == 'a', "the fd sees mp's private page");
    /* Sharing after the restart. */
    if (pwrite(mf, "AFTER", 5, 0) != 5 || pwrite(mf, "AFTER", 5, 3 * PG) != 5) die("pwrite after");
    CHECK(memcmp(ms, "AFTER", 5) == 0, "ms does not see the fd's write");
    CHECK(memcmp(mp, "PRIVATE", 7) == 0, "mp's copied page changed");
    CHECK(memcmp(mp + 3 * PG, "AFTER", 5) == 0, "mp's file page does not see the fd's write");
    memcpy(ms + 3 * PG + 100, "VIAMAP", 6);
    CHECK(pread(mf, buf, 6, 3 * PG + 100) == 6 && memcmp(buf, "VIAMAP", 6) == 0,
          "the fd does not see ms's write after the restart");
    CHECK(page_is(ns, "", 'n') && page_is(ns + PG, "", 'o'), "n differs");
    CHECK(page_is(pp, "", 'p') && page_is(pp + PG, "PCOPY", 'q'), "p differs");
    char perms[5], path[4096];
    CHECK(maps_lookup(ms, perms, path, sizeof path, NULL, NULL) == 0 && strcmp(perms, "rw-s") == 0 &&
              strstr(path, "(deleted)"),
          "ms maps as %s %s", perms, path);
    CHECK(maps_lookup(mp, perms, path, sizeof path, NULL, NULL) == 0 && strcmp(perms, "rw-p") == 0 &&
              strstr(path, "(deleted)"),
          "mp maps as %s %s", perms, path);
    finish("ticks=%u", n);
}
