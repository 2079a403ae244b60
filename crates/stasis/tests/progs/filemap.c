/* filemap: MAP_PRIVATE file mappings must survive checkpoint/restart.
 * Creates `mapped.dat` (16 pages + 100 bytes, content derived from the offset)
 * in its cwd, maps it MAP_PRIVATE PROT_READ|PROT_WRITE, closes the fd,
 * modifies pages 1, 5, 9 fully and one word of the last (partial) page, also
 * maps it a second time PROT_READ (untouched) and a third time MAP_SHARED
 * PROT_READ (like glibc's gconv cache; the size is not page aligned). After `go`: modified pages show
 * the modification, untouched pages show the file content, the mapping is
 * still backed by the file (per /proc/self/maps) and the file is unchanged.
 * Output: `ready file=<path> size=N`, then `OK ...` / `FAIL ...`. */
#include "util.h"
#include <sys/mman.h>

static uint8_t file_byte(size_t off) { return (uint8_t)((off * 2654435761u) >> 13) ^ (uint8_t)(off >> 12); }
static uint8_t mod_byte(size_t off) { return (uint8_t)(~file_byte(off) + 3); }
static int is_mod_page(size_t page) { return page == 1 || page == 5 || page == 9; }

int main(void) {
    setup();
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    size_t size = 16 * pg + 100;
    const char *name = "mapped.dat";

    int fd = open(name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) die("create mapped.dat");
    uint8_t *buf = malloc(size);
    for (size_t i = 0; i < size; i++) buf[i] = file_byte(i);
    write_all(fd, (char *)buf, size);
    close(fd);

    fd = open(name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open mapped.dat");
    uint8_t *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) die("mmap rw");
    uint8_t *ro = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (ro == MAP_FAILED) die("mmap ro");
    /* shared read-only, like glibc's gconv cache; size not page aligned */
    uint8_t *sh = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (sh == MAP_FAILED) die("mmap shared ro");
    close(fd);

    for (size_t p = 0; p < 16; p++)
        if (is_mod_page(p))
            for (size_t i = p * pg; i < (p + 1) * pg; i++) map[i] = mod_byte(i);
    /* touch (read) page 3 so it is resident but unmodified */
    volatile uint8_t sink = map[3 * pg + 5];
    (void)sink;
    size_t lastword = 16 * pg + 40;
    map[lastword] = 0xEE;

    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) die("getcwd");
    out("ready file=%s/%s size=%zu\n", cwd, name, size);
    wait_go();

    size_t bad = 0, firstbad = (size_t)-1;
    for (size_t i = 0; i < size; i++) {
        uint8_t want = is_mod_page(i / pg) ? mod_byte(i) : (i == lastword ? 0xEE : file_byte(i));
        if (map[i] != want) {
            if (firstbad == (size_t)-1) firstbad = i;
            bad++;
        }
    }
    CHECK(bad == 0, "rw private mapping: %zu bad bytes, first at offset %zu (page %zu)", bad,
          firstbad, firstbad / pg);
    /* the rest of the last page beyond EOF reads zero */
    for (size_t i = size; i < 17 * pg; i++)
        if (map[i] != 0) { fail("byte %zu beyond EOF is %u, want 0", i, map[i]); break; }
    bad = 0;
    for (size_t i = 0; i < size; i++) bad += ro[i] != file_byte(i);
    CHECK(bad == 0, "read-only mapping: %zu bad bytes", bad);
    bad = 0;
    for (size_t i = 0; i < size; i++) bad += sh[i] != file_byte(i);
    CHECK(bad == 0, "shared read-only mapping: %zu bad bytes", bad);

    char perms[5], path[PATH_MAX + 64], want[PATH_MAX + 64];
    snprintf(want, sizeof want, "%s/%s", cwd, name);
    if (maps_lookup(map + 2 * pg, perms, path, sizeof path, NULL, NULL)) fail("rw mapping gone");
    else {
        CHECK(strcmp(perms, "rw-p") == 0, "rw mapping perms %s", perms);
        CHECK(strcmp(path, want) == 0, "rw mapping backed by '%s', want '%s'", path, want);
    }
    if (maps_lookup(ro, perms, path, sizeof path, NULL, NULL)) fail("ro mapping gone");
    else {
        CHECK(strcmp(perms, "r--p") == 0, "ro mapping perms %s", perms);
        CHECK(strcmp(path, want) == 0, "ro mapping backed by '%s', want '%s'", path, want);
    }
    if (maps_lookup(sh, perms, path, sizeof path, NULL, NULL)) fail("shared mapping gone");
    else {
        CHECK(strcmp(perms, "r--s") == 0, "shared mapping perms %s", perms);
        CHECK(strcmp(path, want) == 0, "shared mapping backed by '%s', want '%s'", path, want);
    }
    /* writing to a never-modified page still works (COW) and does not reach the file */
    uint8_t flipped = file_byte(7 * pg) ^ 0xFFu;
    map[7 * pg] = flipped;
    CHECK(map[7 * pg] == flipped, "COW write to page 7 lost");
    fd = open(name, O_RDONLY);
    if (fd < 0) fail("reopen: %s", strerror(errno));
    else {
        ssize_t r = pread(fd, buf, size, 0);
        CHECK(r == (ssize_t)size, "file size now %zd, want %zu", r, size);
        bad = 0;
        for (ssize_t i = 0; i < r; i++) bad += buf[i] != file_byte((size_t)i);
        CHECK(bad == 0, "file content changed (%zu bytes) - private mapping leaked?", bad);
        close(fd);
    }
    finish("mapped %zu bytes", size);
}
