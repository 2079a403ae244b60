/* inotifydel [queue]: an inotify watch on a deleted file still held open.
 * Creates "victim", opens it, watches the directory "watched" (IN_CREATE, watch 1) and the file
 * (IN_MODIFY|IN_ATTRIB|IN_CLOSE_WRITE|IN_DELETE_SELF, watch 2), unlinks the file and
 * reads the IN_ATTRIB that caused. Prints `ready w1=N w2=M`, then `tick N` until
 * `go`, reading (and failing on) any event meanwhile. After `go`: writes to the
 * deleted file (its content must be "hello" + "x"), closes it, and must read exactly
 * IN_MODIFY, IN_CLOSE_WRITE, IN_DELETE_SELF, IN_IGNORED on watch 2, and, for a file
 * created in "watched", IN_CREATE on watch 1.
 * With `queue`: after `ready` it creates "watched/queued" and reads no event until
 * `go` (a checkpoint meanwhile must be refused); after `go` that IN_CREATE must be
 * read once, first.
 * With `far`: watch 1 is on "far/1/2/3/4/5" instead, a directory stasis does not
 * search (too deep below the cwd): a checkpoint must be refused; after `go` a file
 * created there must still be reported on watch 1.
 * Output: `OK ticks=N` / `FAIL ...`. */
#include "util.h"
#include <sys/inotify.h>

static char evbuf[8192] __attribute__((aligned(8)));
static size_t evlen, evpos;

/* The next event, waiting up to 2 s; NULL if none. */
static struct inotify_event *next_event(int in) {
    for (int i = 0; i < 200 && evpos >= evlen; i++) {
        ssize_t r = read(in, evbuf, sizeof evbuf);
        if (r > 0) {
            evlen = (size_t)r;
            evpos = 0;
            break;
        }
        sleep_ms(10);
    }
    if (evpos >= evlen) return NULL;
    struct inotify_event *e = (struct inotify_event *)(evbuf + evpos);
    evpos += sizeof *e + e->len;
    return e;
}

static void expect(int in, int wd, uint32_t mask, const char *name) {
    struct inotify_event *e = next_event(in);
    if (!e) {
        fail("no event (want mask %x on watch %d)", mask, wd);
        return;
    }
    CHECK(e->wd == wd && (e->mask & mask) == mask && (!name || (e->len && strcmp(e->name, name) == 0)),
          "event wd=%d mask=%x name=%s, want wd=%d mask=%x name=%s", e->wd, e->mask, e->len ? e->name : "",
          wd, mask, name ? name : "");
}

int main(int argc, char **argv) {
    setup();
    int queue = argc > 1 && strcmp(argv[1], "queue") == 0;
    int far = argc > 1 && strcmp(argv[1], "far") == 0;
    const char *dir = far ? "far/1/2/3/4/5" : "watched";
    unlink("victim");
    mkdir("watched", 0700);
    const char *parts[] = {"far", "far/1", "far/1/2", "far/1/2/3", "far/1/2/3/4", "far/1/2/3/4/5"};
    for (int i = 0; far && i < 6; i++) mkdir(parts[i], 0700);
    char after[256];
    snprintf(after, sizeof after, "%s/after", dir);
    unlink("watched/queued");
    unlink(after);
    int fd = open("victim", O_CREAT | O_RDWR | O_TRUNC, 0600);
    if (fd < 0) die("open victim");
    write_all(fd, "hello", 5);
    int in = inotify_init1(IN_NONBLOCK);
    if (in < 0) die("inotify_init1");
    int w1 = inotify_add_watch(in, dir, IN_CREATE);
    int w2 = inotify_add_watch(in, "victim", IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_DELETE_SELF);
    if (w1 < 0 || w2 < 0) die("inotify_add_watch");
    if (unlink("victim")) die("unlink");
    expect(in, w2, IN_ATTRIB, NULL);
    if (g_failures) finish("setup");
    out("ready w1=%d w2=%d\n", w1, w2);
    if (queue) {
        int q = open("watched/queued", O_CREAT | O_WRONLY, 0600);
        if (q < 0) die("create queued");
        close(q);
    }
    unsigned long long tick = 0;
    while (!go_exists()) {
        out("tick %llu\n", tick++);
        sleep_ms(20);
        if (!queue) {
            ssize_t r = read(in, evbuf, sizeof evbuf);
            CHECK(r < 0, "an event came before go (%zd bytes)", r);
        }
    }
    if (queue) expect(in, w1, IN_CREATE, "queued");
    struct stat st;
    CHECK(fstat(fd, &st) == 0 && st.st_nlink == 0, "the file is no longer deleted (nlink %lu)",
          (unsigned long)st.st_nlink);
    write_all(fd, "x", 1);
    char buf[16] = {0};
    CHECK(pread(fd, buf, sizeof buf - 1, 0) == 6 && strcmp(buf, "hellox") == 0, "content %s", buf);
    expect(in, w2, IN_MODIFY, NULL);
    close(fd);
    expect(in, w2, IN_CLOSE_WRITE, NULL);
    expect(in, w2, IN_DELETE_SELF, NULL);
    expect(in, w2, IN_IGNORED, NULL);
    int a = open(after, O_CREAT | O_WRONLY, 0600);
    if (a >= 0) close(a);
    expect(in, w1, IN_CREATE, "after");
    struct inotify_event *extra = next_event(in);
    CHECK(!extra, "one event too many (wd=%d mask=%x)", extra ? extra->wd : 0, extra ? extra->mask : 0);
    finish("ticks=%llu", tick);
}
