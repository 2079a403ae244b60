/* procstate: per-process attributes must survive checkpoint/restart:
 * cwd (a subdirectory `sub` it chdirs into), umask, rlimits (NOFILE and CORE
 * soft limits lowered), nice value, the thread name (PR_SET_NAME), the
 * environment (STASIS_TEST_PHASE, which differs for every stasis command),
 * pid, ppid, process group and session, and /proc/self/exe.
 * Prints `ready ...`, then `tick N` every ~20 ms until `../go` exists (it
 * answers `../ping` with `pong`), then `OK` / `FAIL ...`. */
#include "util.h"
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/time.h>

int main(void) {
    setup();
    if (mkdir("sub", 0755) && errno != EEXIST) die("mkdir sub");
    if (chdir("sub")) die("chdir sub");
    char cwd0[PATH_MAX], cwd1[PATH_MAX], exe0[PATH_MAX] = "", exe1[PATH_MAX] = "";
    if (!getcwd(cwd0, sizeof cwd0)) die("getcwd");
    if (readlink("/proc/self/exe", exe0, sizeof exe0 - 1) < 0) die("readlink");
    umask(027);
    struct rlimit nofile0, core0, nofile1, core1;
    getrlimit(RLIMIT_NOFILE, &nofile0);
    nofile0.rlim_cur = 200;
    if (setrlimit(RLIMIT_NOFILE, &nofile0)) die("setrlimit nofile");
    getrlimit(RLIMIT_CORE, &core0);
    core0.rlim_cur = 0;
    if (setrlimit(RLIMIT_CORE, &core0)) die("setrlimit core");
    errno = 0;
    if (setpriority(PRIO_PROCESS, 0, 7)) die("setpriority");
    if (prctl(PR_SET_NAME, "stasis-ps", 0, 0, 0)) die("PR_SET_NAME");
    const char *env = getenv("STASIS_TEST_PHASE");
    char env0[256];
    snprintf(env0, sizeof env0, "%s", env ? env : "(unset)");
    pid_t pid0 = getpid(), ppid0 = getppid(), pgrp0 = getpgrp(), sid0 = getsid(0);
    out("ready pid=%d ppid=%d pgrp=%d sid=%d env=%s\n", (int)pid0, (int)ppid0, (int)pgrp0, (int)sid0, env0);

    unsigned n = 0;
    for (; access("../go", F_OK) != 0; n++) {
        if (access("../ping", F_OK) == 0 && unlink("../ping") == 0) out("pong\n");
        out("tick %u\n", n);
        sleep_ms(20);
    }

    if (!getcwd(cwd1, sizeof cwd1)) fail("getcwd: %s", strerror(errno));
    else CHECK(strcmp(cwd0, cwd1) == 0, "cwd %s, want %s", cwd1, cwd0);
    if (readlink("/proc/self/exe", exe1, sizeof exe1 - 1) < 0) fail("readlink exe: %s", strerror(errno));
    CHECK(strcmp(exe0, exe1) == 0, "/proc/self/exe is %s, want %s", exe1, exe0);
    mode_t m = umask(0);
    CHECK(m == 027, "umask %03o, want 027", (unsigned)m);
    getrlimit(RLIMIT_NOFILE, &nofile1);
    CHECK(nofile1.rlim_cur == 200 && nofile1.rlim_max == nofile0.rlim_max, "RLIMIT_NOFILE %llu/%llu, want 200/%llu",
          (unsigned long long)nofile1.rlim_cur, (unsigned long long)nofile1.rlim_max,
          (unsigned long long)nofile0.rlim_max);
    getrlimit(RLIMIT_CORE, &core1);
    CHECK(core1.rlim_cur == 0 && core1.rlim_max == core0.rlim_max, "RLIMIT_CORE %llu/%llu",
          (unsigned long long)core1.rlim_cur, (unsigned long long)core1.rlim_max);
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, 0);
    CHECK(nice == 7 && errno == 0, "nice %d, want 7", nice);
    char name[17] = "";
    prctl(PR_GET_NAME, name, 0, 0, 0);
    CHECK(strcmp(name, "stasis-ps") == 0, "thread name '%s', want 'stasis-ps'", name);
    env = getenv("STASIS_TEST_PHASE");
    CHECK(env && strcmp(env, env0) == 0, "environment STASIS_TEST_PHASE=%s, want %s", env ? env : "(unset)", env0);
    CHECK(getpid() == pid0, "pid %d, want %d", (int)getpid(), (int)pid0);
    CHECK(getppid() == ppid0, "ppid %d, want %d", (int)getppid(), (int)ppid0);
    CHECK(getpgrp() == pgrp0, "process group %d, want %d", (int)getpgrp(), (int)pgrp0);
    CHECK(getsid(0) == sid0, "session %d, want %d", (int)getsid(0), (int)sid0);
    finish("ticks=%u", n);
}
