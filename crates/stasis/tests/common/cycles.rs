//! The cycles most state tests put a program through, shared: under `stasis run` (a
//! checkpoint it survives, two `--kill`/restart cycles at random moments, a checkpoint
//! of the restored job) and through `checkpoint --pid` (it runs on, `--kill`, restart,
//! a supervised cycle), as root and as the unprivileged test user, with every image
//! checked by the test's own function.

use super::*;
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
pub fn work_for(name: &str, program: &str, as_user: bool) -> (Work, PathBuf) {
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
pub fn user_may_ptrace() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .map(|s| s.trim() == "0")
        .unwrap_or(true)
}

/// Starts `exe ARGS` outside stasis (as the test user when `w` has a prefix), with
/// the work dir as cwd, and waits for `ready`.
pub fn spawn_direct(w: &Work, exe: &Path, args: &[&str]) -> Proc {
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
pub fn checkpoint_pid(w: &Work, pid: i32, kill: bool) -> CmdOut {
    checkpoint_pid_with(w, pid, kill, &[])
}

/// `stasis checkpoint --pid PID --dir ck [--kill] EXTRA...`.
pub fn checkpoint_pid_with(w: &Work, pid: i32, kill: bool, extra: &[&str]) -> CmdOut {
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
    args.extend(extra.iter().map(OsStr::new));
    w.stasis(if kill { "ckpt-pid-kill" } else { "ckpt-pid" }, &args)
}

/// pid -> process object of `stasis inspect --json` output.
pub fn image_procs(meta: &Value) -> BTreeMap<i64, &Value> {
    meta["processes"]
        .as_array()
        .expect("no processes array in inspect --json")
        .iter()
        .map(|p| (p["pid"].as_i64().expect("process without pid"), p))
        .collect()
}

/// The process `pid` of an image.
pub fn image_proc(meta: &Value, pid: i64) -> &Value {
    image_procs(meta)
        .remove(&pid)
        .unwrap_or_else(|| panic!("process {pid} is not in the image"))
}

/// Checks an image; gets the image and the program's `ready` line.
pub type ImageCheck = fn(&Value, &str, &str);

/// The program under `stasis run`: a checkpoint it survives, two checkpoint --kill /
/// restart cycles at random moments, a checkpoint of the restored job, then `go`.
/// Every image is checked by `check`. Returns the OK line.
pub fn run_cycles(name: &str, program: &str, args: &[&str], as_user: bool, check: ImageCheck) {
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
pub fn pid_cycles(name: &str, program: &str, args: &[&str], as_user: bool, check: ImageCheck) {
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
