//! O_PATH descriptors and per-mapping advice (issue #11), each set up by a small
//! program that checks its own state after `go`: O_PATH fds of a file, a directory, a
//! FIFO, /dev/null, a symbolic link itself (O_NOFOLLOW), a file deleted since (one
//! inode with an O_RDWR fd of it), a memfd, /proc/self/status and a directory removed
//! since (opath.c: F_GETFL, fstat, openat, fchdir, readlinkat after the restarts);
//! the advice smaps shows in VmFlags (hg nh dd dc wf mg sr rr), mlock and
//! mlock2(MLOCK_ONFAULT) (lo, lf), mlockall(MCL_FUTURE, also with MCL_ONFAULT), and
//! file mappings whose protection differs from their file's open mode (advice.c: the
//! same VmFlags, content and permissions after the restarts, a new mapping locked).
//! What cannot be restored is refused at checkpoint time, naming it, the program
//! running on: an O_PATH fd of a FIFO removed since, more memory locked than
//! RLIMIT_MEMLOCK allows.
//!
//! Every program runs under `stasis run` through a checkpoint it survives, two
//! `checkpoint --kill` / restart cycles at random moments (seed printed;
//! STASIS_TEST_SEED repeats it) and a checkpoint of the restored job, as root and as a
//! plain user; and started outside stasis through `checkpoint --pid P --dir D`,
//! `--kill`, `stasis restart D` and a supervised cycle. The images are inspected for
//! the saved state. (Helpers copied from procstate2.rs.)
mod common;
use common::cycles::*;
use common::*;
use serde_json::Value;
use std::ffi::OsStr;

// ---------------------------------------------------------------------------
// opath.c: O_PATH descriptors
// ---------------------------------------------------------------------------

/// The image holds the eight O_PATH fds of opath.c as `path` fds with O_PATH, one
/// the link (O_NOFOLLOW, S_IFLNK), two regular files with an object (the deleted file
/// and the memfd), one a removed directory.
fn check_opath(meta: &Value, ready: &str, what: &str) {
    let pid = field_num(ready, "pid") as i64;
    let fds = image_proc(meta, pid)["fds"].as_array().unwrap();
    let paths: Vec<&Value> = fds
        .iter()
        .map(|f| &f["kind"])
        .filter(|k| k["type"] == "path")
        .collect();
    // The eight, and the program's own O_PATH fd of its cwd.
    assert_eq!(paths.len(), 9, "{what}: O_PATH fds {paths:?}");
    // /proc/self/status, opened again by the process itself.
    let proc_files: Vec<&Value> = fds
        .iter()
        .map(|f| &f["kind"])
        .filter(|k| k["type"] == "proc_file" && num(k, "flags") & libc::O_PATH as i64 != 0)
        .collect();
    assert_eq!(
        proc_files.len(),
        1,
        "{what}: O_PATH /proc files {proc_files:?}"
    );
    for k in &paths {
        assert_ne!(num(k, "flags") & libc::O_PATH as i64, 0, "{what}: {k}");
    }
    let link = paths
        .iter()
        .find(|k| num(k, "file_type") == libc::S_IFLNK as i64)
        .unwrap_or_else(|| panic!("{what}: no O_PATH fd of a link in {paths:?}"));
    assert_ne!(
        num(link, "flags") & libc::O_NOFOLLOW as i64,
        0,
        "{what}: {link}"
    );
    // (Their paths, after a restart, are those of the inode and directory made for
    // them then.)
    assert!(
        paths
            .iter()
            .filter(|k| k["object"].is_u64() && num(k, "file_type") == libc::S_IFREG as i64)
            .count()
            == 2,
        "{what}: not two files (deleted, memfd) with their objects in {paths:?}"
    );
    assert!(
        paths.iter().any(|k| k["removed_dir"].is_u64()),
        "{what}: no removed directory in {paths:?}"
    );
}

#[test]
fn opath_fds_under_run() {
    run_cycles("opath_run", "opath", &[], false, check_opath);
}

#[test]
fn opath_fds_under_run_as_unprivileged_user() {
    run_cycles("opath_run_user", "opath", &[], true, check_opath);
}

#[test]
fn opath_fds_by_pid() {
    pid_cycles("opath_pid", "opath", &[], false, check_opath);
}

#[test]
fn opath_fds_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles("opath_pid_user", "opath", &[], true, check_opath);
}

/// The refusal names the fd, an O_PATH descriptor; nothing is published.
fn assert_refused_opath(w: &Work, r: &CmdOut, fd: i64) {
    assert!(!r.status.success(), "the checkpoint should fail: {r}");
    assert!(
        r.stderr.contains("O_PATH") && r.stderr.contains(&format!("fd {fd}")),
        "the error should name fd {fd}, an O_PATH descriptor: {r}"
    );
    assert!(w.checkpoints().is_empty(), "{:?}", w.checkpoints());
}

/// An O_PATH fd of a FIFO removed since cannot be reopened: the checkpoint (with and
/// without --kill) is refused naming the fd, and the program runs on to its OK.
#[test]
fn opath_of_removed_fifo_is_refused_under_run() {
    let (w, exe) = work_for("opath_refuse_run", "opath", true);
    let mut s = Session::start(&w, &[exe.as_os_str(), OsStr::new("refuse")]);
    let fd = field_num(&s.cur().lines()[0], "refused") as i64;
    s.cur().wait_tick(3, T_READY);
    for kill in [false, true] {
        let r = w.checkpoint(kill);
        assert_refused_opath(&w, &r, fd);
        s.cur().wait_more_ticks(2, T_READY);
    }
    let ok = s.finish();
    eprintln!("opath_refuse_run: {ok}");
}

#[test]
fn opath_of_removed_fifo_is_refused_by_pid() {
    let (w, exe) = work_for("opath_refuse_pid", "opath", false);
    let mut app = spawn_direct(&w, &exe, &["refuse"]);
    let fd = field_num(&app.lines()[0], "refused") as i64;
    app.wait_tick(3, T_READY);
    for kill in [false, true] {
        let r = checkpoint_pid(&w, app.pid(), kill);
        assert_refused_opath(&w, &r, fd);
        app.wait_more_ticks(2, T_READY);
    }
    w.go();
    app.expect_exit(0, T_CMD);
    let last = app.lines().last().cloned().unwrap_or_default();
    assert!(last.starts_with("OK"), "{last}\n{}", app.diag());
}

// ---------------------------------------------------------------------------
// advice.c: per-mapping advice, memory locks, file mappings' protection
// ---------------------------------------------------------------------------

/// The image's mappings carry every advice advice.c gave (those the kernel took:
/// hugepage and mergeable need THP and KSM), the locks, and the mlockall flags
/// `mlockall` in settings.
fn check_advice_with(meta: &Value, ready: &str, what: &str, mlockall: i32) {
    let pid = field_num(ready, "pid") as i64;
    let p = image_proc(meta, pid);
    let advice: Vec<String> = p["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["advice"].as_array().cloned().unwrap_or_default())
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    for a in [
        "nohugepage",
        "dontdump",
        "dontfork",
        "wipeonfork",
        "sequential",
        "random",
        "locked",
        "lockonfault",
    ] {
        assert!(
            advice.iter().any(|x| x == a),
            "{what}: no mapping with {a} in {advice:?}"
        );
    }
    assert_eq!(
        num(&p["settings"], "mlockall"),
        i64::from(mlockall),
        "{what}: mlockall"
    );
}

fn check_advice(meta: &Value, ready: &str, what: &str) {
    check_advice_with(meta, ready, what, 0)
}

fn check_advice_future(meta: &Value, ready: &str, what: &str) {
    check_advice_with(meta, ready, what, libc::MCL_FUTURE)
}

fn check_advice_future_onfault(meta: &Value, ready: &str, what: &str) {
    check_advice_with(meta, ready, what, libc::MCL_FUTURE | libc::MCL_ONFAULT)
}

#[test]
fn mapping_advice_under_run() {
    run_cycles("advice_run", "advice", &[], false, check_advice);
}

#[test]
fn mapping_advice_under_run_as_unprivileged_user() {
    run_cycles("advice_run_user", "advice", &[], true, check_advice);
}

#[test]
fn mapping_advice_and_mlockall_future_under_run() {
    run_cycles(
        "advice_future_run",
        "advice",
        &["future"],
        false,
        check_advice_future,
    );
}

#[test]
fn mapping_advice_and_mlockall_future_under_run_as_unprivileged_user() {
    run_cycles(
        "advice_future_run_user",
        "advice",
        &["future"],
        true,
        check_advice_future,
    );
}

#[test]
fn mapping_advice_and_mlockall_future_onfault_under_run_as_unprivileged_user() {
    run_cycles(
        "advice_onfault_run_user",
        "advice",
        &["future-onfault"],
        true,
        check_advice_future_onfault,
    );
}

#[test]
fn mapping_advice_by_pid() {
    pid_cycles("advice_pid", "advice", &[], false, check_advice);
}

#[test]
fn mapping_advice_and_mlockall_future_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles(
        "advice_future_pid_user",
        "advice",
        &["future"],
        true,
        check_advice_future,
    );
}

/// More memory locked than the process's RLIMIT_MEMLOCK now allows (it lowered the
/// limit after locking): a restore could not lock it again, so the checkpoint is
/// refused naming the locked mapping, and the program runs on to its OK.
#[test]
fn locked_memory_above_rlimit_is_refused_under_run() {
    let (w, exe) = work_for("advice_overlimit_run", "advice", true);
    let mut s = Session::start(&w, &[exe.as_os_str(), OsStr::new("overlimit")]);
    let f = fields(&s.cur().lines()[0]);
    let addrs = [f["mlock"].clone(), f["onfault"].clone()];
    s.cur().wait_tick(3, T_READY);
    for kill in [false, true] {
        let r = w.checkpoint(kill);
        assert!(!r.status.success(), "the checkpoint should fail: {r}");
        assert!(
            r.stderr.contains("RLIMIT_MEMLOCK") && r.stderr.contains("locked mapping"),
            "the error should name a locked mapping and RLIMIT_MEMLOCK: {r}"
        );
        assert!(
            addrs.iter().any(|a| r.stderr.contains(a.as_str())),
            "the error should name a locked mapping at {addrs:?}: {r}"
        );
        assert!(w.checkpoints().is_empty(), "{:?}", w.checkpoints());
        s.cur().wait_more_ticks(2, T_READY);
    }
    let ok = s.finish();
    eprintln!("advice_overlimit_run: {ok}");
}
