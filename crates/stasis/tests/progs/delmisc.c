/* delmisc: what is left of removed names must keep referring to the same things.
 *
 * In a directory `misc` of its cwd, R makes
 *  - H: a file with two links, misc/h1 and misc/deep/er/h2, opened through h1 (fd
 *    `hf`, offset 3) and mapped MAP_SHARED through h1 (`hm`); then h1 is unlinked (the
 *    fd's link says "(deleted)", st_nlink is 1);
 *  - G: a file misc/gone/g opened (fd `gf`), unlinked, and its directory removed;
 *  - D: a directory misc/rd opened (fd `df`) and removed;
 * and forks C, whose working directory misc/cwd is removed. Prints `ready pid=R
 * child=C hf=FD`, then `tick N` every ~20 ms until `go` exists. Then R checks that hf is
 * the inode of misc/deep/er/h2 (fstat, stat) and that writes through the fd, the
 * path and the mapping are seen by the others, G's content, that D is still a
 * removed directory (a directory, no links, nothing can be created in it); and C
 * that its working directory is such a removed directory. `OK ...` / `FAIL ...`.
 *
 * With the argument `far`, misc also holds 20001 empty files, more than stasis reads
 * looking for H's other link: the checkpoint must be refused, naming h1. */
#include "util.h"
#include <sys/mman.h>
#include <sys/wait.h>

static int removed_dir_ok(int dfd, char *why, size_t cap) {
    struct stat st;
    if (fstat(dfd, &st)) { snprintf(why, cap, "fstat: %s", strerror(errno)); return 0; }
    if (!S_ISDIR(st.st_mode) || st.st_nlink != 0) {
        snprintf(why, cap, "mode %o nlink %lu", st.st_mode, (unsigned long)st.st_nlink);
        return 0;
    }
    int f = openat(dfd, "x", O_CREAT | O_WRONLY, 0600);
    if (f >= 0 || errno != ENOENT) {
        snprintf(why, cap, "creating in it: %d (%s)", f, strerror(errno));
        return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    setup();
    int far = argc > 1 && strcmp(argv[1], "far") == 0;
    if ((mkdir("misc", 0755) && errno != EEXIST) || (mkdir("misc/deep", 0755) && errno != EEXIST) ||
        (mkdir("misc/deep/er", 0755) && errno != EEXIST) || (mkdir("misc/gone", 0755) && errno != EEXIST) ||
        (mkdir("misc/rd", 0755) && errno != EEXIST) || (mkdir("misc/cwd", 0755) && errno != EEXIST))
        die("mkdir");
    unlink("misc/deep/er/h2");
    for (int i = 0; far && i < 20001; i++) {
        char name[64];
        snprintf(name, sizeof name, "misc/f%05d", i);
        int f = open(name, O_WRONLY | O_CREAT, 0600);
        if (f < 0) die("open misc/fNNNNN");
        close(f);
    }
    int hf = open("misc/h1", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (hf < 0) die("open h1");
    char page[4096];
    memset(page, 'h', sizeof page);
    if (write(hf, page, sizeof page) != (ssize_t)sizeof page) die("write h1");
    if (link("misc/h1", "misc/deep/er/h2")) die("link h2");
    char *hm = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, hf, 0);
    if (hm == MAP_FAILED) die("mmap h1");
    if (unlink("misc/h1")) die("unlink h1");
    lseek(hf, 3, SEEK_SET);
    int gf = open("misc/gone/g", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (gf < 0 || write(gf, "gone-content", 12) != 12) die("g");
    if (unlink("misc/gone/g") || rmdir("misc/gone")) die("remove g");
    int df = open("misc/rd", O_RDONLY | O_DIRECTORY);
    if (df < 0 || rmdir("misc/rd")) die("rd");

    int rep[2];
    if (pipe(rep)) die("pipe");
    pid_t c = fork();
    if (c < 0) die("fork");
    if (c == 0) {
        close(rep[0]);
        if (chdir("misc/cwd") || rmdir("../cwd")) _exit(2);
        while (access("../../go", F_OK) != 0) sleep_ms(10);
        char why[512] = "", line[600];
        int dot = open(".", O_RDONLY | O_DIRECTORY);
        int ok = dot >= 0 && removed_dir_ok(dot, why, sizeof why);
        char l[4096];
        ssize_t n = readlink("/proc/self/cwd", l, sizeof l - 1);
        if (n < 0 || (l[n] = 0, !strstr(l, "(deleted)"))) { ok = 0; snprintf(why, sizeof why, "cwd %.400s", n < 0 ? "?" : l); }
        int k = snprintf(line, sizeof line, "%s\n", ok ? "" : why);
        write_all(rep[1], line, (size_t)k);
        _exit(0);
    }
    close(rep[1]);
    out("ready pid=%d child=%d hf=%d\n", (int)getpid(), (int)c, hf);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }

    struct stat a, b;
    if (fstat(hf, &a) || stat("misc/deep/er/h2", &b)) die("stat h");
    CHECK(a.st_ino == b.st_ino && a.st_dev == b.st_dev, "hf is not misc/deep/er/h2's inode");
    CHECK(a.st_nlink == 1, "h nlink %lu", (unsigned long)a.st_nlink);
    CHECK(lseek(hf, 0, SEEK_CUR) == 3, "hf offset %lld", (long long)lseek(hf, 0, SEEK_CUR));
    if (pwrite(hf, "FD", 2, 0) != 2) die("pwrite hf");
    CHECK(memcmp(hm, "FD", 2) == 0, "hm does not see hf's write");
    memcpy(hm + 10, "MAP", 3);
    int h2 = open("misc/deep/er/h2", O_RDONLY);
    char buf[64];
    CHECK(h2 >= 0 && pread(h2, buf, 13, 0) == 13 && memcmp(buf, "FDhhhhhhhhMAP", 13) == 0,
          "h2 does not see the writes");
    CHECK(fstat(gf, &a) == 0 && a.st_nlink == 0 && a.st_size == 12, "g stat");
    CHECK(pread(gf, buf, 12, 0) == 12 && memcmp(buf, "gone-content", 12) == 0, "g content");
    char why[512] = "";
    CHECK(removed_dir_ok(df, why, sizeof why), "rd: %s", why);
    char cl[700] = "";
    ssize_t k = read(rep[0], cl, sizeof cl - 1);
    if (k <= 0) fail("no report from C");
    else if (cl[0] != '\n') fail("C: %.*s", (int)strcspn(cl, "\n"), cl);
    int st;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "C did not end well");
    finish("ticks=%u", n);
}
