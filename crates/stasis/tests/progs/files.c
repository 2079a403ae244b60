/* files: regular file descriptors must survive checkpoint/restart with their
 * path, offset and flags.
 *  - fd `out` (O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC) on out.txt: one line
 *    "line K" per tick;
 *  - fd `in` (O_RDONLY) on in.txt, pre-filled with 16-byte records
 *    "rec %011u\n" and positioned at record SKIP before the first tick: one
 *    record read per tick, each must be the next one;
 *  - fd `app` (O_WRONLY|O_APPEND) on app.txt: "app K" per tick;
 *  - fd `gone` (O_RDWR|O_NOFOLLOW) on gone.txt that is unlinked while open, with 20000
 *    bytes of content.
 * Ticks (`tick K`) run every ~20 ms until `go`. Then: flags/offsets/fd numbers
 * are checked, out.txt must hold every line exactly once in order, a write
 * through `app` after lseek(0) must land at the end, the unlinked file's
 * content is read back with pread (nlink must be 0 and gone.txt must not
 * exist), and the set of open fds must be what it was at `ready`. */
#include "util.h"

#define SKIP 37
#define NREC 200000
#define GONE_SIZE 20000

static uint8_t gone_byte(size_t i) { return (uint8_t)(i * 31 + (i >> 8) + 1); }

static char *slurp(const char *path, size_t *len) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return NULL;
    struct stat st;
    fstat(fd, &st);
    char *b = malloc((size_t)st.st_size + 1);
    ssize_t r = pread(fd, b, (size_t)st.st_size, 0);
    close(fd);
    if (r < 0) r = 0;
    b[r] = 0;
    *len = (size_t)r;
    return b;
}

/* Does text consist of exactly "<prefix> 0\n" ... "<prefix> n-1\n" + tail? */
static void check_lines(const char *file, const char *prefix, unsigned n, const char *tail) {
    size_t len;
    char *b = slurp(file, &len);
    if (!b) { fail("cannot read %s", file); return; }
    char *p = b;
    for (unsigned k = 0; k < n; k++) {
        char want[64];
        int wl = snprintf(want, sizeof want, "%s %u\n", prefix, k);
        if (strncmp(p, want, (size_t)wl) != 0) {
            char got[40];
            snprintf(got, sizeof got, "%.*s", (int)strcspn(p, "\n"), p);
            fail("%s: line %u is '%s', want '%s %u'", file, k, got, prefix, k);
            free(b);
            return;
        }
        p += wl;
    }
    CHECK(strcmp(p, tail) == 0, "%s: unexpected trailing content '%.40s' (want '%s')", file, p, tail);
    free(b);
}

int main(void) {
    setup();
    /* in.txt */
    int w = open("in.txt", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (w < 0) die("create in.txt");
    {
        char *buf = malloc(NREC * 16 + 1);
        for (unsigned i = 0; i < NREC; i++) snprintf(buf + i * 16, 17, "rec %011u\n", i);
        write_all(w, buf, NREC * 16);
        free(buf);
        close(w);
    }
    int out_fd = open("out.txt", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int in_fd = open("in.txt", O_RDONLY);
    int app_fd = open("app.txt", O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    /* O_NOFOLLOW as OpenMPI opens its /dev/shm backing file (then unlinks it) */
    int gone_fd = open("gone.txt", O_RDWR | O_CREAT | O_TRUNC | O_NOFOLLOW, 0600);
    if (out_fd < 0 || in_fd < 0 || app_fd < 0 || gone_fd < 0) die("open");
    if (lseek(in_fd, SKIP * 16, SEEK_SET) != SKIP * 16) die("lseek in");
    {
        char g[GONE_SIZE];
        for (size_t i = 0; i < GONE_SIZE; i++) g[i] = (char)gone_byte(i);
        write_all(gone_fd, g, GONE_SIZE);
        if (unlink("gone.txt")) die("unlink");
    }
    char fds0[4096], fds1[4096];
    fd_list(fds0, sizeof fds0);
    out("ready out=%d in=%d app=%d gone=%d fds=%s\n", out_fd, in_fd, app_fd, gone_fd, fds0);

    unsigned k = 0;
    off_t out_off = 0;
    for (; !go_exists(); k++) {
        char line[64];
        int n = snprintf(line, sizeof line, "line %u\n", k);
        write_all(out_fd, line, (size_t)n);
        out_off += n;
        char rec[17] = {0}, want[17];
        ssize_t r = read(in_fd, rec, 16);
        snprintf(want, sizeof want, "rec %011u\n", k + SKIP);
        if (r != 16 || memcmp(rec, want, 16) != 0) {
            fail("tick %u: read %zd bytes '%.16s' from in.txt, want '%.15s'", k, r, rec, want);
            break;
        }
        n = snprintf(line, sizeof line, "app %u\n", k);
        write_all(app_fd, line, (size_t)n);
        out("tick %u\n", k);
        sleep_ms(20);
    }

    /* flags */
    int fl = fcntl(out_fd, F_GETFL), fdf = fcntl(out_fd, F_GETFD);
    CHECK(fl >= 0 && (fl & O_ACCMODE) == O_WRONLY && !(fl & O_APPEND), "out fd flags %#x", fl);
    CHECK(fdf >= 0 && (fdf & FD_CLOEXEC), "out fd lost FD_CLOEXEC (%#x)", fdf);
    fl = fcntl(in_fd, F_GETFL), fdf = fcntl(in_fd, F_GETFD);
    CHECK(fl >= 0 && (fl & O_ACCMODE) == O_RDONLY, "in fd flags %#x", fl);
    CHECK(fdf == 0, "in fd has fd flags %#x, want 0", fdf);
    fl = fcntl(app_fd, F_GETFL);
    CHECK(fl >= 0 && (fl & O_ACCMODE) == O_WRONLY && (fl & O_APPEND), "app fd flags %#x (want O_APPEND)", fl);
    fl = fcntl(gone_fd, F_GETFL);
    CHECK(fl >= 0 && (fl & O_ACCMODE) == O_RDWR, "gone fd flags %#x", fl);

    /* offsets */
    CHECK(lseek(out_fd, 0, SEEK_CUR) == out_off, "out offset %lld, want %lld",
          (long long)lseek(out_fd, 0, SEEK_CUR), (long long)out_off);
    CHECK(lseek(in_fd, 0, SEEK_CUR) == (off_t)(SKIP + k) * 16, "in offset %lld, want %lld",
          (long long)lseek(in_fd, 0, SEEK_CUR), (long long)(SKIP + k) * 16);
    {
        char rec[17] = {0}, want[17];
        ssize_t r = read(in_fd, rec, 16);
        snprintf(want, sizeof want, "rec %011u\n", k + SKIP);
        CHECK(r == 16 && memcmp(rec, want, 16) == 0, "final read '%.16s', want '%.15s'", rec, want);
    }
    write_all(out_fd, "end\n", 4);
    check_lines("out.txt", "line", k, "end\n");

    /* O_APPEND: a write after seeking to 0 must still go to the end */
    lseek(app_fd, 0, SEEK_SET);
    write_all(app_fd, "end\n", 4);
    check_lines("app.txt", "app", k, "end\n");

    /* unlinked file */
    {
        struct stat st;
        CHECK(fstat(gone_fd, &st) == 0 && st.st_nlink == 0 && st.st_size == GONE_SIZE,
              "unlinked file: nlink=%ld size=%lld", (long)st.st_nlink, (long long)st.st_size);
        CHECK(lseek(gone_fd, 0, SEEK_CUR) == GONE_SIZE, "unlinked file offset %lld",
              (long long)lseek(gone_fd, 0, SEEK_CUR));
        char g[GONE_SIZE];
        ssize_t r = pread(gone_fd, g, GONE_SIZE, 0);
        size_t bad = 0;
        for (ssize_t i = 0; i < r; i++) bad += (uint8_t)g[i] != gone_byte((size_t)i);
        CHECK(r == GONE_SIZE && bad == 0, "unlinked file: pread %zd bytes, %zu bad", r, bad);
        write_all(gone_fd, "tail", 4);
        char t[4];
        CHECK(pread(gone_fd, t, 4, GONE_SIZE) == 4 && memcmp(t, "tail", 4) == 0,
              "unlinked file not writable");
        CHECK(access("gone.txt", F_OK) != 0, "gone.txt exists again after restart");
    }
    fd_list(fds1, sizeof fds1);
    CHECK(strcmp(fds0, fds1) == 0, "open fds changed from [%s] to [%s]", fds0, fds1);
    finish("ticks=%u", k);
}
