//! File descriptor kinds that must come back (issue #11), each set up by a small
//! program that checks its own state after `go`: pidfds (pidfds.c: of a child from
//! pidfd_open with PIDFD_NONBLOCK and a dup of it, of a child from clone CLONE_PIDFD,
//! of the process itself, of a zombie child; after the restarts the flags are the same,
//! pidfd_send_signal reaches the right processes, poll reports a child's exit and
//! waitid(P_PIDFD) reaps it; a pidfd of a process outside the job is refused at
//! checkpoint time, the job running on), epoll sets (epollx.c: files whose fd number
//! was closed, reused, or held only by a child, and a nested set), /proc files
//! (procfiles.c: /proc/self/status at an offset, /proc/self, a child's /proc/PID/stat
//! and /proc/PID, and a pipe opened again through /proc/self/fd; a /proc file of a
//! process outside the job is refused at checkpoint time) and shared fd
//! tables (sharedfiles.c: a child made with clone CLONE_FILES still shares its
//! parent's table, a forked one does not).
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
use std::ffi::OsStr;

/// The fds of process `pid` of an image, of kind `kind`.
fn fds_of_kind<'a>(meta: &'a Value, pid: i64, kind: &str) -> Vec<&'a Value> {
    image_proc(meta, pid)["fds"]
        .as_array()
        .expect("no fds array")
        .iter()
        .filter(|f| f["kind"]["type"] == kind)
        .collect()
}

/// Runs `program` through both kinds of cycles, as root and as the plain user.
macro_rules! four_ways {
    ($program:literal, $check:ident, $run:ident, $run_user:ident, $pid:ident, $pid_user:ident) => {
        #[test]
        fn $run() {
            run_cycles(concat!("fdk_", $program), $program, &[], false, $check);
        }
        #[test]
        fn $run_user() {
            run_cycles(
                concat!("fdk_", $program, "_user"),
                $program,
                &[],
                true,
                $check,
            );
        }
        #[test]
        fn $pid() {
            pid_cycles(
                concat!("fdk_", $program, "_pid"),
                $program,
                &[],
                false,
                $check,
            );
        }
        #[test]
        fn $pid_user() {
            if !user_may_ptrace() {
                eprintln!(
                    "skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant"
                );
                return;
            }
            pid_cycles(
                concat!("fdk_", $program, "_pid_user"),
                $program,
                &[],
                true,
                $check,
            );
        }
    };
}

// ---------------------------------------------------------------------------
// pidfds.c
// ---------------------------------------------------------------------------

/// P holds pidfds of A (twice, non-blocking), B, the zombie Z and itself.
fn check_pidfds(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let id = |k: &str| -> i64 { f[k].parse().unwrap() };
    let pidfds = fds_of_kind(meta, id("pid"), "pidfd");
    let to = |pid: i64| {
        pidfds
            .iter()
            .filter(|x| x["kind"]["pid"].as_i64() == Some(pid))
            .count()
    };
    assert_eq!(to(id("a")), 2, "{what}: pidfds of A in {pidfds:?}");
    assert_eq!(to(id("b")), 1, "{what}: pidfds of B in {pidfds:?}");
    assert_eq!(to(id("pid")), 1, "{what}: pidfds of P in {pidfds:?}");
    assert_eq!(
        to(id("z")),
        1,
        "{what}: pidfds of the zombie Z in {pidfds:?}"
    );
    let fa = pidfds
        .iter()
        .find(|x| x["fd"].as_i64() == Some(id("fa")))
        .unwrap_or_else(|| panic!("{what}: fd fa is not a pidfd"));
    assert_ne!(
        num(&fa["kind"], "flags") & libc::O_NONBLOCK as i64,
        0,
        "{what}: fa's flags"
    );
}

four_ways!(
    "pidfds",
    check_pidfds,
    pidfds_under_run,
    pidfds_under_run_as_unprivileged_user,
    pidfds_by_pid,
    pidfds_by_pid_as_unprivileged_user
);

/// `program parent` holds a pidfd or /proc file of a process outside the job (the
/// job's parent), which cannot be opened again after a restart: the checkpoint is
/// refused with an error naming the fd (`what`), nothing is published, and the job
/// runs on and ends well.
fn outside_refused(program: &str, what: &str, as_user: bool, by_pid: bool) {
    let name = format!("fdk_{program}_refused_{as_user}_{by_pid}");
    let (w, exe) = work_for(&name, program, as_user);
    let check = |r: &CmdOut| {
        assert!(!r.status.success(), "the checkpoint should fail: {r}");
        assert!(
            r.stderr.contains(what)
                && r.stderr.contains("fd ")
                && r.stderr.contains("not a process of the checkpoint"),
            "the error should name the fd ({what}) and why: {r}"
        );
        assert!(w.checkpoints().is_empty(), "{:?}", w.checkpoints());
    };
    if by_pid {
        let mut app = spawn_direct(&w, &exe, &["parent"]);
        app.wait_tick(3, T_READY);
        for kill in [false, true] {
            check(&checkpoint_pid(&w, app.pid(), kill));
            app.wait_more_ticks(2, T_READY);
        }
        w.go();
        app.expect_exit(0, T_CMD);
        let last = app.lines().last().cloned().unwrap_or_default();
        assert!(last.starts_with("OK"), "{last}\n{}", app.diag());
    } else {
        let argv: Vec<&OsStr> = vec![exe.as_os_str(), OsStr::new("parent")];
        let mut s = Session::start(&w, &argv);
        s.cur().wait_tick(3, T_READY);
        for kill in [false, true] {
            check(&w.checkpoint(kill));
            s.cur().wait_more_ticks(2, T_READY);
        }
        let ok = s.finish();
        eprintln!("{name}: {ok}");
    }
}

#[test]
fn pidfd_of_outside_process_is_refused_under_run() {
    outside_refused("pidfds", "pidfd", false, false);
}

#[test]
fn pidfd_of_outside_process_is_refused_under_run_as_unprivileged_user() {
    outside_refused("pidfds", "pidfd", true, false);
}

#[test]
fn pidfd_of_outside_process_is_refused_by_pid() {
    outside_refused("pidfds", "pidfd", false, true);
}

// ---------------------------------------------------------------------------
// epollx.c
// ---------------------------------------------------------------------------

/// P's outer set holds NA, NB and NC through other fds (their descriptions saved)
/// and the inner set under its own number.
fn check_epollx(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let id = |k: &str| -> i64 { f[k].parse().unwrap() };
    let sets = fds_of_kind(meta, id("pid"), "epoll");
    let ep = sets
        .iter()
        .find(|x| x["fd"].as_i64() == Some(id("ep")))
        .unwrap_or_else(|| panic!("{what}: fd ep is not an epoll set"));
    let items = ep["kind"]["items"].as_array().expect("no items");
    assert_eq!(items.len(), 4, "{what}: items {items:?}");
    for k in ["na", "nb", "nc"] {
        let it = items
            .iter()
            .find(|i| i["fd"].as_i64() == Some(id(k)))
            .unwrap_or_else(|| panic!("{what}: no item for {k} in {items:?}"));
        assert!(
            it["desc"].as_u64().is_some(),
            "{what}: item {k} has no description: {it}"
        );
    }
    let inner = items
        .iter()
        .find(|i| i["fd"].as_i64() == Some(id("in")))
        .unwrap_or_else(|| panic!("{what}: the inner set is not watched: {items:?}"));
    assert!(inner.get("desc").is_none(), "{what}: {inner}");
}

four_ways!(
    "epollx",
    check_epollx,
    epoll_corners_under_run,
    epoll_corners_under_run_as_unprivileged_user,
    epoll_corners_by_pid,
    epoll_corners_by_pid_as_unprivileged_user
);

// ---------------------------------------------------------------------------
// procfiles.c
// ---------------------------------------------------------------------------

/// P's /proc files are saved as such, the pipe's four descriptions as pipe ends.
fn check_procfiles(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let id = |k: &str| -> i64 { f[k].parse().unwrap() };
    let pid = id("pid");
    let files = fds_of_kind(meta, pid, "proc_file");
    let path_of = |k: &str| {
        files
            .iter()
            .find(|x| x["fd"].as_i64() == Some(id(k)))
            .map(|x| x["kind"]["path"].as_str().unwrap_or("").to_string())
            .unwrap_or_else(|| panic!("{what}: fd {k} is not a /proc file: {files:?}"))
    };
    assert_eq!(path_of("s"), format!("/proc/{pid}/status"), "{what}");
    assert_eq!(path_of("d"), format!("/proc/{pid}"), "{what}");
    assert_eq!(
        path_of("ks"),
        format!("/proc/{}/stat", id("child")),
        "{what}"
    );
    assert_eq!(path_of("kd"), format!("/proc/{}", id("child")), "{what}");
    let s = files
        .iter()
        .find(|x| x["fd"].as_i64() == Some(id("s")))
        .unwrap();
    assert_eq!(
        num(&s["kind"], "pos"),
        5,
        "{what}: offset of /proc/self/status"
    );
    let pipes = fds_of_kind(meta, pid, "pipe");
    let descs: std::collections::BTreeSet<i64> = pipes.iter().map(|x| num(x, "desc")).collect();
    assert_eq!(pipes.len(), 5, "{what}: {pipes:?}");
    assert_eq!(descs.len(), 5, "{what}: one description each: {pipes:?}");
}

#[test]
fn proc_file_of_outside_process_is_refused_under_run() {
    outside_refused("procfiles", "/status", false, false);
}

#[test]
fn proc_file_of_outside_process_is_refused_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    outside_refused("procfiles", "/status", true, true);
}

four_ways!(
    "procfiles",
    check_procfiles,
    proc_files_under_run,
    proc_files_under_run_as_unprivileged_user,
    proc_files_by_pid,
    proc_files_by_pid_as_unprivileged_user
);

// ---------------------------------------------------------------------------
// sharedfiles.c
// ---------------------------------------------------------------------------

/// C shares P's table, D does not.
fn check_sharedfiles(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let id = |k: &str| -> i64 { f[k].parse().unwrap() };
    let table_of = |k: &str| image_proc(meta, id(k))["fd_table_of"].as_i64();
    assert_eq!(table_of("c"), Some(id("pid")), "{what}: C's table");
    assert_eq!(table_of("d"), None, "{what}: D's table");
    assert_eq!(table_of("pid"), None, "{what}: P's table");
}

four_ways!(
    "sharedfiles",
    check_sharedfiles,
    shared_fd_tables_under_run,
    shared_fd_tables_under_run_as_unprivileged_user,
    shared_fd_tables_by_pid,
    shared_fd_tables_by_pid_as_unprivileged_user
);
