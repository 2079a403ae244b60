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
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// A work dir for the test; with `as_user`, every stasis command and the program run
/// as the unprivileged test user (both copied into the work dir, which the user owns).
/// Returns the work dir and the program's path.
fn work_for(name: &str, program: &str, as_user: bool) -> (Work, PathBuf) {
    if !as_user {
        return (Work::new(name), prog(program));
    }
    let (uid, gid, prefix) = unprivileged_user();
    let mut w = Work::new(name);
    let bin = w.path("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    w.stasis = install(Path::new(STASIS), &bin, "stasis");
    let exe = install(&prog(program), &bin, program);
    w.give_to(uid, gid);
    w.prefix = prefix;
    (w, exe)
}

/// Whether a plain user may ptrace their own processes that are not their
/// descendants (what `checkpoint --pid` of a user's process needs).
fn user_may_ptrace() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .map(|s| s.trim() == "0")
        .unwrap_or(true)
}

/// Starts `exe ARGS` outside stasis (as the test user when `w` has a prefix), with
/// the work dir as cwd, and waits for `ready`.
fn spawn_direct(w: &Work, exe: &Path, args: &[&str]) -> Proc {
    let mut cmd = if w.prefix.is_empty() {
        Command::new(exe)
    } else {
        let mut c = Command::new(&w.prefix[0]);
        c.args(&w.prefix[1..]).arg(exe);
        c
    };
    cmd.args(args).current_dir(&w.dir).process_group(0);
    let mut app = w.spawn_io("direct", cmd, Stdio::null(), true);
    app.wait_ready();
    app
}

/// `stasis checkpoint --pid PID --dir ck [--kill]`.
fn checkpoint_pid(w: &Work, pid: i32, kill: bool) -> CmdOut {
    let pid = pid.to_string();
    let mut args: Vec<&OsStr> = vec![
        "checkpoint".as_ref(),
        "--pid".as_ref(),
        pid.as_ref(),
        "--dir".as_ref(),
        w.ck.as_os_str(),
    ];
    if kill {
        args.push("--kill".as_ref());
    }
    w.stasis(if kill { "ckpt-pid-kill" } else { "ckpt-pid" }, &args)
}

/// pid -> process object of `stasis inspect --json` output.
fn image_procs(meta: &Value) -> BTreeMap<i64, &Value> {
    meta["processes"]
        .as_array()
        .expect("no processes array in inspect --json")
        .iter()
        .map(|p| (p["pid"].as_i64().expect("process without pid"), p))
        .collect()
}

/// The process `pid` of an image.
fn image_proc(meta: &Value, pid: i64) -> &Value {
    image_procs(meta)
        .remove(&pid)
        .unwrap_or_else(|| panic!("process {pid} is not in the image"))
}

/// Checks an image; gets the image and the program's `ready` line.
type ImageCheck = fn(&Value, &str, &str);

/// The program under `stasis run`: a checkpoint it survives, two checkpoint --kill /
/// restart cycles at random moments, a checkpoint of the restored job, then `go`.
/// Every image is checked by `check`. Returns the OK line.
fn run_cycles(name: &str, program: &str, args: &[&str], as_user: bool, check: ImageCheck) {
    let t0 = Instant::now();
    let (w, exe) = work_for(name, program, as_user);
    let mut rng = Rng::new(name);
    let mut argv: Vec<&OsStr> = vec![exe.as_os_str()];
    argv.extend(args.iter().map(OsStr::new));
    let mut s = Session::start(&w, &argv);
    let ready = s.cur().lines()[0].clone();
    if as_user {
        let (uid, _, _) = unprivileged_user();
        for pid in procs_in(&w.dir) {
            let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let line = st.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
            assert!(
                line.split_whitespace()
                    .skip(1)
                    .all(|u| u == uid.to_string()),
                "process {pid} runs as {line:?}, not the test user {uid}"
            );
        }
    }
    s.cur().wait_tick(3, T_READY);
    w.checkpoint_ok(false, s.cur());
    check(&w.inspect_json(), &ready, "checkpoint without --kill");
    s.cur().wait_more_ticks(2, T_READY);
    for i in 0..2 {
        rng.sleep_ms(10, 200);
        s.checkpoint_kill();
        check(
            &w.inspect_json(),
            &ready,
            &format!("checkpoint --kill #{i}"),
        );
        s.restart(Probe::Ticks);
    }
    // The restored job can be checkpointed again, and runs on.
    w.checkpoint_ok(false, s.cur());
    check(&w.inspect_json(), &ready, "checkpoint of the restored job");
    s.cur().wait_more_ticks(2, T_READY);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

/// The program started outside stasis: `checkpoint --pid` (it runs on),
/// `checkpoint --pid --kill`, `stasis restart`, a supervised kill/restart cycle, `go`.
fn pid_cycles(name: &str, program: &str, args: &[&str], as_user: bool, check: ImageCheck) {
    let t0 = Instant::now();
    let (w, exe) = work_for(name, program, as_user);
    let mut app = spawn_direct(&w, &exe, args);
    let ready = app.lines()[0].clone();
    app.wait_tick(3, T_READY);
    let r = checkpoint_pid(&w, app.pid(), false);
    assert!(r.status.success(), "{r}\n{}", app.diag());
    check(&w.inspect_json(), &ready, "checkpoint --pid");
    app.wait_more_ticks(2, T_READY);
    let r = checkpoint_pid(&w, app.pid(), true);
    assert!(r.status.success(), "{r}\n{}", app.diag());
    let st = app.wait(T_CMD);
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "checkpoint --pid --kill should have killed the application: {}",
        status_str(&st)
    );
    check(&w.inspect_json(), &ready, "checkpoint --pid --kill");
    let mut s = Session::from_proc(&w, app);
    s.restart(Probe::Ticks);
    s.cycle(Probe::Ticks);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

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
