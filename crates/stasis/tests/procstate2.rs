//! Process state that must come back (issue #11), each kind set up by a small program
//! that checks its own state after `go`: the prctl settings and oom_score_adj of a
//! tree (procflags.c: parent-death signals of two threads, a child subreaper, THP
//! disabled, a non-dumpable process, raised oom_score_adj; after the restarts the
//! parent-death signals fire and the subreaper adopts), membarrier registrations
//! (membarrier.c: after the restarts the registered process's private expedited
//! commands succeed, its unregistered child's still fail with EPERM), and processes
//! stopped by job control (jobstop.c: a child stopped by SIGSTOP whose stop its parent
//! collected, one stopped by SIGTSTP whose stop is still to be collected; after the
//! restarts both are stopped, the parent's waitpid reports what it would have, no
//! SIGCHLD more came, and both continue on SIGCONT).
//!
//! Every program runs under `stasis run` through a checkpoint it survives, two
//! `checkpoint --kill` / restart cycles at random moments (seed printed;
//! STASIS_TEST_SEED repeats it) and a checkpoint of the restored job, as root and as a
//! plain user; and started outside stasis through `checkpoint --pid P --dir D`,
//! `--kill`, `stasis restart D` and a supervised cycle. The images are inspected for
//! the saved state.
mod common;
use common::cycles::*;
use common::*;
use serde_json::Value;

// ---------------------------------------------------------------------------
// procflags.c: prctl settings and oom_score_adj
// ---------------------------------------------------------------------------

/// R, M and G of procflags.c's image: R a subreaper with THP disabled and
/// oom_score_adj 300; M with its THP mode, dumpability and 500; G with THP allowed,
/// 500, and parent-death signals SIGUSR1 (main thread) and SIGUSR2 (its other thread).
fn check_procflags(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let id = |k: &str| -> i64 { f[k].parse().unwrap() };
    let settings = |pid: i64| image_proc(meta, pid)["settings"].clone();
    let r = settings(id("pid"));
    assert_eq!(r["child_subreaper"], true, "{what}: R {r}");
    assert_eq!(num(&r, "thp_disable"), 1, "{what}: R {r}");
    assert_eq!(num(&r, "dumpable"), 1, "{what}: R {r}");
    assert_eq!(num(&r, "oom_score_adj"), 300, "{what}: R {r}");
    let m = settings(id("m"));
    assert_eq!(m["child_subreaper"], false, "{what}: M {m}");
    assert_eq!(num(&m, "thp_disable"), id("mthp"), "{what}: M {m}");
    assert_eq!(num(&m, "dumpable"), id("mdumpable"), "{what}: M {m}");
    assert_eq!(num(&m, "oom_score_adj"), 500, "{what}: M {m}");
    let gp = image_proc(meta, id("g"));
    let g = &gp["settings"];
    assert_eq!(num(g, "thp_disable"), 0, "{what}: G {g}");
    assert_eq!(num(g, "oom_score_adj"), 500, "{what}: G {g}");
    let threads = gp["threads"].as_array().expect("G without threads");
    let pdeath: Vec<i64> = threads.iter().map(|t| num(t, "pdeath_signal")).collect();
    assert_eq!(
        pdeath,
        vec![libc::SIGUSR1 as i64, libc::SIGUSR2 as i64],
        "{what}: G's threads' parent-death signals"
    );
}

#[test]
fn prctl_settings_under_run() {
    run_cycles("ps2_flags", "procflags", &[], false, check_procflags);
}

#[test]
fn prctl_settings_under_run_as_unprivileged_user() {
    run_cycles("ps2_flags_user", "procflags", &[], true, check_procflags);
}

#[test]
fn prctl_settings_by_pid() {
    pid_cycles("ps2_flags_pid", "procflags", &[], false, check_procflags);
}

/// As a plain user, by `--pid`, with every process dumpable (a plain user cannot trace
/// a non-dumpable process it did not start under stasis: see the next test).
#[test]
fn prctl_settings_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles(
        "ps2_flags_pid_user",
        "procflags",
        &["dumpable"],
        true,
        check_procflags,
    );
}

/// A plain user's `checkpoint --pid` of a tree holding a non-dumpable process (M) is
/// refused with an error naming M and why; nothing is published and the job runs on
/// and ends well.
#[test]
fn non_dumpable_process_by_pid_as_unprivileged_user_is_refused() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    let (w, exe) = work_for("ps2_nodump_pid_user", "procflags", true);
    let mut app = spawn_direct(&w, &exe, &[]);
    let m = field_num(&app.lines()[0], "m") as i64;
    app.wait_tick(3, T_READY);
    for kill in [false, true] {
        let r = checkpoint_pid(&w, app.pid(), kill);
        assert!(!r.status.success(), "the checkpoint should fail: {r}");
        assert!(
            r.stderr.contains("not dumpable") && mentions_number(&r.stderr, m),
            "the error should name process {m} and say it is not dumpable: {r}"
        );
        assert!(w.checkpoints().is_empty(), "{:?}", w.checkpoints());
        app.wait_more_ticks(2, T_READY);
    }
    w.go();
    app.expect_exit(0, T_CMD);
    let last = app.lines().last().cloned().unwrap_or_default();
    assert!(last.starts_with("OK"), "{last}\n{}", app.diag());
}

// ---------------------------------------------------------------------------
// membarrier.c: membarrier registrations
// ---------------------------------------------------------------------------

/// The registered process has the registrations it made (`mask` of the ready line),
/// its child none.
fn check_membarrier(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let id = |k: &str| -> i64 { f[k].parse().unwrap() };
    let reg = |pid: i64| num(&image_proc(meta, pid)["settings"], "membarrier");
    assert_eq!(reg(id("pid")), id("mask"), "{what}: the registrations");
    assert_eq!(reg(id("child")), 0, "{what}: the child's registrations");
}

#[test]
fn membarrier_registrations_under_run() {
    run_cycles("ps2_mb", "membarrier", &[], false, check_membarrier);
}

#[test]
fn membarrier_registrations_under_run_as_unprivileged_user() {
    run_cycles("ps2_mb_user", "membarrier", &[], true, check_membarrier);
}

#[test]
fn membarrier_registrations_by_pid() {
    pid_cycles("ps2_mb_pid", "membarrier", &[], false, check_membarrier);
}

#[test]
fn membarrier_registrations_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles("ps2_mb_pid_user", "membarrier", &[], true, check_membarrier);
}

// ---------------------------------------------------------------------------
// jobstop.c: processes stopped by job control
// ---------------------------------------------------------------------------

/// C1 is saved stopped by SIGSTOP with its stop collected by its parent, C2 stopped by
/// SIGTSTP with its stop still to be collected; the parent is not stopped.
fn check_jobstop(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let id = |k: &str| -> i64 { f[k].parse().unwrap() };
    let stop = |pid: i64| image_proc(meta, pid)["job_stop"].clone();
    assert_eq!(
        stop(id("pid")),
        Value::Null,
        "{what}: the parent is not stopped"
    );
    let c1 = stop(id("c1"));
    assert_eq!(num(&c1, "signal"), libc::SIGSTOP as i64, "{what}: C1 {c1}");
    assert_eq!(c1["waited"], true, "{what}: C1's stop was collected: {c1}");
    let c2 = stop(id("c2"));
    assert_eq!(num(&c2, "signal"), libc::SIGTSTP as i64, "{what}: C2 {c2}");
    assert_eq!(
        c2["waited"], false,
        "{what}: C2's stop was not collected: {c2}"
    );
}

#[test]
fn job_control_stops_under_run() {
    run_cycles("ps2_stop", "jobstop", &[], false, check_jobstop);
}

#[test]
fn job_control_stops_under_run_as_unprivileged_user() {
    run_cycles("ps2_stop_user", "jobstop", &[], true, check_jobstop);
}

#[test]
fn job_control_stops_by_pid() {
    pid_cycles("ps2_stop_pid", "jobstop", &[], false, check_jobstop);
}

#[test]
fn job_control_stops_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles("ps2_stop_pid_user", "jobstop", &[], true, check_jobstop);
}

// ---------------------------------------------------------------------------
// creds.c: user and group IDs, capabilities, no_new_privs
// ---------------------------------------------------------------------------

const CAP_KILL: i64 = 5;
const CAP_NET_BIND_SERVICE: i64 = 10;
const CAP_SYS_BOOT: i64 = 22;

/// R and C of creds.c's image: the IDs R reported (the user's own, not 0, for a
/// plain user), and for C its changed IDs, groups and capability sets (as root) or
/// no_new_privs.
fn check_creds(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let id = |k: &str| -> i64 { f[k].parse().unwrap() };
    let creds = |pid: i64| image_proc(meta, pid)["creds"].clone();
    let r = creds(id("pid"));
    let uids: Vec<i64> = r["uids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(uids, vec![id("uid"); 4], "{what}: R {r}");
    let c = creds(id("c"));
    assert_eq!(c["no_new_privs"], true, "{what}: C {c}");
    if id("root") == 1 {
        let ids = |k: &str| -> Vec<i64> {
            c[k].as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect()
        };
        assert_eq!(ids("uids"), vec![1234, 1235, 1236, 1235], "{what}: C {c}");
        assert_eq!(ids("gids"), vec![1234, 1235, 1236, 1235], "{what}: C {c}");
        assert_eq!(ids("groups"), vec![1, 2], "{what}: C {c}");
        let kill = 1i64 << CAP_KILL;
        assert_eq!(num(&c, "cap_effective"), kill, "{what}: C {c}");
        assert_eq!(num(&c, "cap_ambient"), kill, "{what}: C {c}");
        assert_eq!(
            num(&c, "cap_permitted"),
            kill | 1i64 << CAP_NET_BIND_SERVICE,
            "{what}: C {c}"
        );
        assert_eq!(
            num(&c, "cap_bounding") & 1i64 << CAP_SYS_BOOT,
            0,
            "{what}: C {c}"
        );
    }
}

/// The job's own user: root's job as 0, a plain user's as their own ID (not 0).
fn check_creds_user(meta: &Value, ready: &str, what: &str) {
    let (uid, _, _) = unprivileged_user();
    let f = fields(ready);
    assert_eq!(f["uid"], uid.to_string(), "{what}: the job runs as {ready}");
    assert_eq!(f["root"], "0", "{what}: {ready}");
    check_creds(meta, ready, what);
}

fn check_creds_root(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    assert_eq!(
        (f["uid"].as_str(), f["root"].as_str()),
        ("0", "1"),
        "{what}: {ready}"
    );
    check_creds(meta, ready, what);
}

#[test]
fn credentials_under_run() {
    run_cycles("ps2_creds", "creds", &[], false, check_creds_root);
}

#[test]
fn credentials_under_run_as_unprivileged_user() {
    run_cycles("ps2_creds_user", "creds", &[], true, check_creds_user);
}

#[test]
fn credentials_by_pid() {
    pid_cycles("ps2_creds_pid", "creds", &[], false, check_creds_root);
}

#[test]
fn credentials_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles("ps2_creds_pid_user", "creds", &[], true, check_creds_user);
}

// ---------------------------------------------------------------------------
// ptimers.c: POSIX interval timers
// ---------------------------------------------------------------------------

/// The process's timers in the image: A signalling SIGUSR1 every 20 ms with its
/// value, B signalling thread T, N (SIGEV_NONE) with time left, D disarmed, and
/// not the deleted one.
fn check_ptimers(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let id = |k: &str| -> i64 { f[k].parse().unwrap() };
    let p = image_proc(meta, id("pid"));
    let timers = p["posix_timers"].as_array().expect("no posix_timers");
    let ids: Vec<i64> = timers.iter().map(|t| num(t, "id")).collect();
    let mut want = vec![id("a"), id("b"), id("n"), id("d")];
    want.sort();
    assert_eq!(ids, want, "{what}: timer IDs");
    let t = |k: &str| timers.iter().find(|t| num(t, "id") == id(k)).unwrap();
    assert_eq!(
        (
            num(t("a"), "signal"),
            num(t("a"), "value"),
            num(t("a"), "interval_ns")
        ),
        (libc::SIGUSR1 as i64, 0xA11CE, 20_000_000),
        "{what}: A {}",
        t("a")
    );
    assert_eq!(
        num(t("b"), "notify"),
        4,
        "{what}: B signals a thread: {}",
        t("b")
    );
    assert!(
        num(t("n"), "value_ns") > 900_000_000_000,
        "{what}: N {}",
        t("n")
    );
    assert_eq!(num(t("d"), "value_ns"), 0, "{what}: D {}", t("d"));
}

#[test]
fn posix_timers_under_run() {
    run_cycles("ps2_ptimers", "ptimers", &[], false, check_ptimers);
}

#[test]
fn posix_timers_under_run_as_unprivileged_user() {
    run_cycles("ps2_ptimers_user", "ptimers", &[], true, check_ptimers);
}

#[test]
fn posix_timers_by_pid() {
    pid_cycles("ps2_ptimers_pid", "ptimers", &[], false, check_ptimers);
}

// ---------------------------------------------------------------------------
// asyncio.c: signal-driven I/O owners
// ---------------------------------------------------------------------------

/// The pipe's fd owned by the process with SIGUSR1, the socket's by thread T with
/// SIGUSR2.
fn check_asyncio(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let id = |k: &str| -> i64 { f[k].parse().unwrap() };
    let p = image_proc(meta, id("pid"));
    let fd = |n: i64| {
        p["fds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| num(x, "fd") == n)
            .unwrap_or_else(|| panic!("{what}: no fd {n}"))["owner"]
            .clone()
    };
    let (po, so) = (fd(id("p")), fd(id("s")));
    assert_eq!(
        (num(&po, "pid"), num(&po, "signal")),
        (id("pid"), libc::SIGUSR1 as i64),
        "{what}: pipe {po}"
    );
    assert_eq!(
        (num(&so, "kind"), num(&so, "pid"), num(&so, "signal")),
        (0, id("t"), libc::SIGUSR2 as i64),
        "{what}: socket {so}"
    );
}

#[test]
fn async_io_owners_under_run() {
    run_cycles("ps2_async", "asyncio", &[], false, check_asyncio);
}

#[test]
fn async_io_owners_under_run_as_unprivileged_user() {
    run_cycles("ps2_async_user", "asyncio", &[], true, check_asyncio);
}

#[test]
fn async_io_owners_by_pid() {
    pid_cycles("ps2_async_pid", "asyncio", &[], false, check_asyncio);
}

// ---------------------------------------------------------------------------
// vdsomove.c: a vdso and vvar moved or unmapped by the process
// ---------------------------------------------------------------------------

/// The image holds the vdso where the program put it (`vdso` of the ready line), or
/// none when it unmapped it.
fn check_vdso(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let want = u64::from_str_radix(&f["vdso"], 16).unwrap();
    let maps = meta["processes"][0]["mappings"].as_array().unwrap();
    let vdso: Vec<u64> = maps
        .iter()
        .filter(|m| m["kind"]["type"] == "vdso")
        .map(|m| m["start"].as_u64().unwrap())
        .collect();
    if want == 0 {
        assert!(vdso.is_empty(), "{what}: a vdso in the image at {vdso:x?}");
    } else {
        assert_eq!(vdso, vec![want], "{what}: the vdso's address");
    }
}

#[test]
fn moved_vdso_under_run() {
    run_cycles("ps2_vdso_move", "vdsomove", &["move"], false, check_vdso);
}

#[test]
fn moved_vdso_under_run_as_unprivileged_user() {
    run_cycles(
        "ps2_vdso_move_user",
        "vdsomove",
        &["move"],
        true,
        check_vdso,
    );
}

#[test]
fn unmapped_vdso_under_run() {
    run_cycles("ps2_vdso_unmap", "vdsomove", &["unmap"], false, check_vdso);
}

#[test]
fn moved_vdso_by_pid() {
    pid_cycles(
        "ps2_vdso_move_pid",
        "vdsomove",
        &["move"],
        false,
        check_vdso,
    );
}

#[test]
fn unmapped_vdso_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles(
        "ps2_vdso_unmap_pid_user",
        "vdsomove",
        &["unmap"],
        true,
        check_vdso,
    );
}
