//! Pseudo-terminals inside the job (issue #11), each kind set up by a small program
//! that checks its own state after `go`: sessions with their own ptys as controlling
//! terminals, foreground groups set with tcsetpgrp, /dev/tty opened through them and
//! ^C delivering SIGINT to the foreground group (ptysess.c), and bytes waiting in
//! ptys in both directions, canonical and raw (ptypend.c: each reader gets exactly
//! those bytes, once, in order, with the settings unchanged). Also two inotify
//! corners (inotifydel.c): a watch on a deleted file still held open comes back on
//! the recreated file (its events, IN_DELETE_SELF on the last close included, arrive
//! once), and events still queued refuse the checkpoint (they cannot be read without
//! consuming them), the application running on and reading them once; a watch on
//! an inode with no path stasis finds is refused the same way. A process holding a
//! pty whose master is outside the job is refused, and runs on.
//!
//! Every program runs under `stasis run` through a checkpoint it survives, two
//! `checkpoint --kill` / restart cycles at random moments (seed printed;
//! STASIS_TEST_SEED repeats it) and a checkpoint of the restored job, as root and as a
//! plain user; and started outside stasis (so its ptys and sessions are its own)
//! through `checkpoint --pid P --dir D`, `--kill`, `stasis restart D` and a supervised
//! cycle. The images are inspected for the saved state. (Helpers copied from
//! procstate2.rs.)
mod common;
use common::cycles::*;
use common::*;
use serde_json::Value;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------
// ptysess.c: sessions, controlling terminals, /dev/tty
// ---------------------------------------------------------------------------

/// Two ptys, each the controlling terminal of its session leader Li and of Ki, with
/// Ki's group in the foreground; Ki holds a /dev/tty fd of it.
fn check_ptysess(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let id = |k: &str| -> i64 { f[k].parse().unwrap() };
    let ptys = meta["ptys"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        ptys.len(),
        2,
        "{what}: the image should hold two ptys: {ptys:?}"
    );
    for i in 0..2 {
        let (l, k) = (id(&format!("L{i}")), id(&format!("K{i}")));
        let t = ptys
            .iter()
            .find(|t| t["session"] == l)
            .unwrap_or_else(|| panic!("{what}: no pty has session {l}: {ptys:?}"));
        assert_eq!(t["foreground"], k, "{what}: foreground of L{i}'s terminal");
        for pid in [l, k] {
            assert_eq!(
                image_proc(meta, pid)["ctty"],
                t["id"],
                "{what}: controlling terminal of process {pid}"
            );
        }
        let fds = image_proc(meta, k)["fds"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            fds.iter()
                .any(|x| x["kind"]["type"] == "pty" && x["kind"]["dev_tty"] == true),
            "{what}: K{i} holds no /dev/tty fd: {fds:?}"
        );
    }
}

#[test]
fn sessions_with_own_ptys_under_run() {
    run_cycles("ptys_sess", "ptysess", &[], false, check_ptysess);
}

#[test]
fn sessions_with_own_ptys_under_run_as_unprivileged_user() {
    run_cycles("ptys_sess_user", "ptysess", &[], true, check_ptysess);
}

#[test]
fn sessions_with_own_ptys_by_pid() {
    pid_cycles("ptys_sess_pid", "ptysess", &[], false, check_ptysess);
}

#[test]
fn sessions_with_own_ptys_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles("ptys_sess_pid_user", "ptysess", &[], true, check_ptysess);
}

// ---------------------------------------------------------------------------
// ptypend.c: bytes waiting in ptys
// ---------------------------------------------------------------------------

/// Two ptys, each with bytes saved in both directions (A's slave input as its line
/// discipline holds it: ICRNL, ERASE and LNEXT already applied).
fn check_ptypend(meta: &Value, _ready: &str, what: &str) {
    let ptys = meta["ptys"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        ptys.len(),
        2,
        "{what}: the image should hold two ptys: {ptys:?}"
    );
    let hex = |s: &[u8]| s.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let inputs: Vec<&str> = ptys
        .iter()
        .map(|t| t["input"].as_str().unwrap_or(""))
        .collect();
    let outputs: Vec<&str> = ptys
        .iter()
        .map(|t| t["output"].as_str().unwrap_or(""))
        .collect();
    assert!(
        inputs.contains(&hex(b"one\ntw\x7fo\nac").as_str()),
        "{what}: pty A's waiting input not saved as the slave would read it: {inputs:?}"
    );
    assert!(
        outputs.contains(&hex(b"out1\r\nout2").as_str()),
        "{what}: pty A's waiting output not saved: {outputs:?}"
    );
    assert!(
        inputs.contains(&hex(b"\x00\x03\x7f\r\n\x11\x13z\x04").as_str()),
        "{what}: pty B's waiting input not saved: {inputs:?}"
    );
    assert!(
        outputs.contains(&hex(b"\n\r\x00\xff\x1b[0m").as_str()),
        "{what}: pty B's waiting output not saved: {outputs:?}"
    );
}

#[test]
fn pending_pty_bytes_under_run() {
    run_cycles("ptys_pend", "ptypend", &[], false, check_ptypend);
}

#[test]
fn pending_pty_bytes_under_run_as_unprivileged_user() {
    run_cycles("ptys_pend_user", "ptypend", &[], true, check_ptypend);
}

#[test]
fn pending_pty_bytes_by_pid() {
    pid_cycles("ptys_pend_pid", "ptypend", &[], false, check_ptypend);
}

#[test]
fn pending_pty_bytes_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles("ptys_pend_pid_user", "ptypend", &[], true, check_ptypend);
}

// ---------------------------------------------------------------------------
// inotifydel.c: a watch on a deleted file; queued events
// ---------------------------------------------------------------------------

/// The instance holds watch 1 by path and watch 2 on the deleted file, as the fd
/// that holds it.
fn check_inotifydel(meta: &Value, ready: &str, what: &str) {
    let procs = meta["processes"].as_array().cloned().unwrap_or_default();
    let fds = procs[0]["fds"].as_array().cloned().unwrap_or_default();
    let watches = fds
        .iter()
        .find(|f| f["kind"]["type"] == "inotify")
        .and_then(|f| f["kind"]["watches"].as_array().cloned())
        .unwrap_or_else(|| panic!("{what}: no inotify fd: {fds:?}"));
    let w2 = field_num(ready, "w2") as i64;
    let w = watches
        .iter()
        .find(|w| w["wd"] == w2)
        .unwrap_or_else(|| panic!("{what}: no watch {w2}: {watches:?}"));
    assert!(
        w["deleted_fd"].is_array() && w["path"] == "",
        "{what}: watch {w2} should be saved as the fd holding the deleted file: {w}"
    );
}

#[test]
fn inotify_watch_on_deleted_file_under_run() {
    run_cycles("ino_del", "inotifydel", &[], false, check_inotifydel);
}

#[test]
fn inotify_watch_on_deleted_file_under_run_as_unprivileged_user() {
    run_cycles("ino_del_user", "inotifydel", &[], true, check_inotifydel);
}

#[test]
fn inotify_watch_on_deleted_file_by_pid() {
    pid_cycles("ino_del_pid", "inotifydel", &[], false, check_inotifydel);
}

#[test]
fn inotify_watch_on_deleted_file_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles(
        "ino_del_pid_user",
        "inotifydel",
        &[],
        true,
        check_inotifydel,
    );
}

/// The refusal names the inotify fd and says why.
fn assert_queued_refusal(r: &CmdOut) {
    assert!(!r.status.success(), "the checkpoint should be refused: {r}");
    let msg = format!("{}{}", r.stdout, r.stderr);
    assert!(
        msg.contains("an inotify instance") && msg.contains("unread events") && msg.contains("fd "),
        "the refusal should name the inotify fd and its queued events: {r}"
    );
}

/// Events queued in an inotify instance refuse the checkpoint (with and without
/// --kill, under run, as root and as a plain user); the job runs on and reads them once.
fn queued_under_run(name: &str, as_user: bool) {
    let (w, exe) = work_for(name, "inotifydel", as_user);
    let argv: Vec<&OsStr> = vec![exe.as_os_str(), OsStr::new("queue")];
    let mut s = Session::start(&w, &argv);
    s.cur().wait_tick(3, T_READY);
    assert_queued_refusal(&w.checkpoint(false));
    assert_queued_refusal(&w.checkpoint(true));
    s.cur().wait_more_ticks(2, T_READY);
    let ok = s.finish();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    eprintln!("{name}: {ok}");
}

#[test]
fn inotify_queued_events_are_refused_under_run() {
    queued_under_run("ino_q", false);
}

#[test]
fn inotify_queued_events_are_refused_under_run_as_unprivileged_user() {
    queued_under_run("ino_q_user", true);
}

/// The same through `checkpoint --pid` (--kill included: the process is not killed).
#[test]
fn inotify_queued_events_are_refused_by_pid() {
    let (w, exe) = work_for("ino_q_pid", "inotifydel", false);
    let mut app = spawn_direct(&w, &exe, &["queue"]);
    app.wait_tick(3, T_READY);
    assert_queued_refusal(&checkpoint_pid(&w, app.pid(), false));
    assert_queued_refusal(&checkpoint_pid(&w, app.pid(), true));
    app.wait_more_ticks(2, T_READY);
    let mut s = Session::from_proc(&w, app);
    let ok = s.finish();
    eprintln!("ino_q_pid: {ok}");
}

/// A watch on a directory stasis does not find by path (too deep below the cwd) and
/// that is no deleted file: the checkpoint is refused naming the watch, and the job
/// runs on (its watch still reports).
fn far_refused(r: &CmdOut) {
    assert!(!r.status.success(), "the checkpoint should be refused: {r}");
    let msg = format!("{}{}", r.stdout, r.stderr);
    assert!(
        msg.contains("inotify watch (number 1)") && msg.contains("could not find by path"),
        "the refusal should name the watch: {r}"
    );
}

#[test]
fn inotify_watch_unreachable_by_path_is_refused_under_run() {
    let (w, exe) = work_for("ino_far", "inotifydel", false);
    let argv: Vec<&OsStr> = vec![exe.as_os_str(), OsStr::new("far")];
    let mut s = Session::start(&w, &argv);
    s.cur().wait_tick(3, T_READY);
    far_refused(&w.checkpoint(false));
    far_refused(&w.checkpoint(true));
    s.cur().wait_more_ticks(2, T_READY);
    let ok = s.finish();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    eprintln!("ino_far: {ok}");
}

#[test]
fn inotify_watch_unreachable_by_path_is_refused_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    let (w, exe) = work_for("ino_far_pid_user", "inotifydel", true);
    let mut app = spawn_direct(&w, &exe, &["far"]);
    app.wait_tick(3, T_READY);
    far_refused(&checkpoint_pid(&w, app.pid(), false));
    far_refused(&checkpoint_pid(&w, app.pid(), true));
    app.wait_more_ticks(2, T_READY);
    let mut s = Session::from_proc(&w, app);
    let ok = s.finish();
    eprintln!("ino_far_pid_user: {ok}");
}

// ---------------------------------------------------------------------------
// A pty from outside the job
// ---------------------------------------------------------------------------

/// A process holding the slave of a pty whose master is not in the job (here the
/// test's) is refused by `checkpoint --pid`, with and without --kill, naming the fd;
/// the process runs on unharmed (counter.c checks its fds and memory at the end).
fn outside_pty_refused(name: &str, as_user: bool) {
    if as_user && !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    let (w, exe) = work_for(name, "counter", as_user);
    // Close-on-exec at once: the programs of the tests running alongside must not
    // inherit it. The program opens the slave by name.
    // SAFETY: open of /dev/ptmx; unlockpt/ptsname_r on the master we own, into our buffer.
    let (m, slave) = unsafe {
        let m = libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(m >= 0, "/dev/ptmx: {}", std::io::Error::last_os_error());
        assert_eq!(libc::unlockpt(m), 0);
        let mut buf = [0 as libc::c_char; 64];
        assert_eq!(libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()), 0);
        let name = std::ffi::CStr::from_ptr(buf.as_ptr());
        (m, PathBuf::from(name.to_str().unwrap()))
    };
    if as_user {
        let (uid, gid, _) = unprivileged_user();
        std::os::unix::fs::chown(&slave, Some(uid), Some(gid)).unwrap();
    }
    let script = format!("exec {} 3<>{}", exe.display(), slave.display());
    let mut app = spawn_direct(&w, Path::new("/bin/sh"), &["-c", &script]);
    app.wait_tick(3, T_READY);
    for kill in [false, true] {
        let r = checkpoint_pid(&w, app.pid(), kill);
        assert!(!r.status.success(), "the checkpoint should be refused: {r}");
        let msg = format!("{}{}", r.stdout, r.stderr);
        assert!(
            msg.contains("fd 3") && msg.contains("whose master is not held by the job"),
            "the refusal should name fd 3 and say why: {r}"
        );
    }
    app.wait_more_ticks(2, T_READY);
    let mut s = Session::from_proc(&w, app);
    let ok = s.finish();
    // SAFETY: closing our master.
    unsafe { libc::close(m) };
    eprintln!("{name}: {ok}");
}

#[test]
fn pty_from_outside_is_refused_by_pid() {
    outside_pty_refused("ptys_outside_pid", false);
}

#[test]
fn pty_from_outside_is_refused_by_pid_as_unprivileged_user() {
    outside_pty_refused("ptys_outside_pid_user", true);
}
