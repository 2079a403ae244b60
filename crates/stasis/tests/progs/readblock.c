/* readblock: blocked in read(0, ...) at checkpoint time. After restart the
 * read must return exactly "hello\n" (from restart's stdin, no EINTR), the
 * next read must return EOF; then waits for `go`.
 * Output: `ready`, `read N bytes`, then `OK` / `FAIL ...`. */
#include "util.h"

int main(void) {
    setup();
    char buf[256];
    out("ready\n");
    errno = 0;
    ssize_t r = read(0, buf, sizeof buf);
    int err = errno;
    out("read %zd bytes\n", r);
    CHECK(r >= 0, "read(0) failed: %s", strerror(err));
    CHECK(r == 6 && memcmp(buf, "hello\n", 6) == 0, "read %zd bytes '%.*s', want 'hello\\n'", r,
          r > 0 ? (int)r : 0, buf);
    errno = 0;
    ssize_t r2 = read(0, buf, sizeof buf);
    CHECK(r2 == 0, "second read returned %zd (errno %s), want EOF", r2, strerror(errno));
    wait_go();
    finish("read hello");
}
