//! stasis killed, or failing, at any step of a checkpoint leaves the application
//! unharmed and the previous checkpoint the newest (issue #14).
//!
//! `progs/faultapp.c` checks itself all the time (registers of a computing thread,
//! results of a thread looping through sleeping syscalls, memory, signal mask,
//! alternate stack, fds, socket queues and peek offsets, its memory map) and answers a
//! `ping` with its progress. A normal checkpoint's steps are counted first
//! (`STASIS_FAULT_AT=0 STASIS_FAULT_LOG=...`), then checkpoints are killed
//! (`STASIS_FAULT_MODE=kill`) or made to fail (`error`) at points spread over all of
//! them. After each: the application still runs (both threads progress, a SIGUSR1
//! sent is handled, all its checks pass), the newest checkpoint is the previous one
//! (or, killed once published, the new one) and verifies. `checkpoint --pid` is killed
//! itself; under `stasis run` the init does the work (its death ends the job by
//! design), so there the checkpoints fail at each point instead, and the processes
//! that may die are killed: the `stasis checkpoint DIR` client (the init abandons the
//! checkpoint) and the snapshot while it writes.
mod common;
use common::*;
use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The application and what the test knows of it.
struct App {
    p: Proc,
    /// Its PID here (under `stasis run` it prints its namespace PID).
    pid: i32,
    calc: u64,
    sys: u64,
    usr1_sent: u64,
    checks: usize,
}

impl App {
    fn new(mut p: Proc, pid: i32) -> App {
        p.wait_ready();
        App {
            p,
            pid,
            calc: 0,
            sys: 0,
            usr1_sent: 0,
            checks: 0,
        }
    }

    /// Sends a SIGUSR1, then pings: the application must answer with every check
    /// passed, both threads further along than at the last check, and every SIGUSR1
    /// handled.
    fn check(&mut self, w: &Work, after: &str) {
        // SAFETY: signalling the test's own application.
        unsafe { libc::kill(self.pid, libc::SIGUSR1) };
        self.usr1_sent += 1;
        let n = self.pongs().len();
        std::fs::write(w.path("ping"), b"").unwrap();
        let t0 = Instant::now();
        let line = loop {
            if let Some(l) = self.p.lines().iter().find(|l| l.starts_with("FAIL")) {
                panic!("{after}: the application failed: {l}\n{}", self.p.diag());
            }
            if let Some(l) = self.pongs().get(n) {
                break l.clone();
            }
            if !self.p.running() || t0.elapsed() > T_READY {
                panic!(
                    "{after}: the application does not answer (alive: {})\n{}\n{}",
                    self.p.running(),
                    proc_state(self.pid),
                    self.p.diag()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let f = fields(&line);
        let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let (calc, sys, usr1) = (num("calc"), num("sys"), num("usr1"));
        assert!(
            calc > self.calc && sys > self.sys,
            "{after}: a thread of the application stopped progressing: {line} (before: calc={} sys={})",
            self.calc,
            self.sys
        );
        assert_eq!(
            usr1, self.usr1_sent,
            "{after}: SIGUSR1 sent {} times, handled {usr1} ({line})",
            self.usr1_sent
        );
        self.calc = calc;
        self.sys = sys;
        self.checks += 1;
    }

    fn pongs(&self) -> Vec<String> {
        self.p
            .lines()
            .into_iter()
            .filter(|l| l.starts_with("pong"))
            .collect()
    }

    /// `go`: the final checks, OK and exit 0.
    fn finish(&mut self, w: &Work) -> String {
        w.go();
        let st = self.p.wait(T_CMD);
        let last = self.p.lines().last().cloned().unwrap_or_default();
        assert!(
            st.code() == Some(0) && last.starts_with("OK"),
            "the application did not end with OK ({})\n{}",
            status_str(&st),
            self.p.diag()
        );
        last
    }
}

fn proc_state(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("State") || l.starts_with("TracerPid"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|_| "gone".into())
}

/// How a checkpoint is asked for.
#[derive(Clone, Copy)]
enum Ask {
    /// `checkpoint --pid PID --dir ck`.
    Pid(i32),
    /// `checkpoint ck` (the job's init does it).
    Dir,
}

/// Runs a checkpoint with `env` added; (success, stderr).
fn checkpoint(w: &Work, ask: Ask, extra: &[&str], env: &[(&str, String)]) -> (bool, String) {
    let pid;
    let mut args: Vec<&OsStr> = vec!["checkpoint".as_ref()];
    args.extend(extra.iter().map(OsStr::new));
    match ask {
        Ask::Pid(p) => {
            pid = p.to_string();
            args.extend([OsStr::new("--pid"), OsStr::new(&pid), OsStr::new("--dir")]);
        }
        Ask::Dir => {}
    }
    args.push(w.ck.as_os_str());
    loop {
        let mut cmd = w.stasis_cmd(&args);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let mut p = w.spawn("ckpt", cmd, Stdio::null());
        let st = p.wait(T_CMD);
        let err = p.stderr();
        // The init may still be abandoning a checkpoint whose asker was killed.
        if !st.success() && err.contains("in progress") {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        return (st.success(), err);
    }
}

/// Counts the steps of a normal checkpoint (which is taken).
fn count_steps(w: &Work, ask: Ask, extra: &[&str]) -> u64 {
    let log = w.path("steps-count.log");
    let _ = std::fs::remove_file(&log);
    let (ok, err) = checkpoint(
        w,
        ask,
        extra,
        &[
            ("STASIS_FAULT_AT", "0".into()),
            ("STASIS_FAULT_LOG", log.display().to_string()),
        ],
    );
    assert!(ok, "counting checkpoint failed: {err}");
    let steps = std::fs::read_to_string(&log).unwrap();
    let n = steps.lines().count() as u64;
    eprintln!("a checkpoint has {n} steps");
    assert!(n > 20, "too few steps counted:\n{steps}");
    n
}

/// About `count` step numbers spread evenly over 1..=n.
fn spread(n: u64, count: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..count).map(|i| 1 + i * n / count).collect();
    v.dedup();
    v
}

/// What step `at` of a faulted checkpoint was, if it got that far.
fn step_at(log: &Path, at: u64) -> Option<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().find_map(|l| {
        let (n, what) = l.split_once(' ')?;
        (n.parse() == Ok(at)).then(|| what.to_string())
    })
}

/// After a checkpoint that failed or was killed (`newer_allowed`: it may have been
/// published first): the newest checkpoint is the previous one (or one new), it
/// verifies, and returns the listing.
fn check_newest(w: &Work, before: &[String], newer_allowed: bool, what: &str) -> Vec<String> {
    let after = w.checkpoints();
    if after.last() != before.last() {
        assert!(
            newer_allowed,
            "{what}: the newest checkpoint changed from {:?} to {:?}",
            before.last(),
            after.last()
        );
        // (Pruning may have removed older ones, not always the oldest: those an
        // incremental checkpoint refers to stay.)
        let new: Vec<&String> = after.iter().filter(|a| !before.contains(a)).collect();
        assert!(
            new.len() == 1 && Some(new[0]) == after.last(),
            "{what}: checkpoints went from {before:?} to {after:?}"
        );
    }
    let r = w.stasis(
        "verify",
        &["verify".as_ref(), "--latest".as_ref(), w.ck.as_os_str()],
    );
    assert!(
        r.status.success(),
        "{what}: the newest checkpoint does not verify: {r}"
    );
    after
}

/// Steps after which a checkpoint is published: failing is no longer possible there
/// (in error mode they do nothing).
const PUBLISHED: &[&str] = &["checkpoint published", "removing an old checkpoint"];

/// Faults `checkpoint --pid` (or, `ask` Dir, the init's checkpoint) at each of
/// `points`, checking the application after each. Every point the checkpoint got to
/// must make it fail (but after its publication). Returns how many it got to.
fn sweep(w: &Work, app: &mut App, ask: Ask, extra: &[&str], mode: &str, points: &[u64]) -> usize {
    let mut reached = 0;
    for &at in points {
        let before = w.checkpoints();
        let log = w.path(&format!("steps-{mode}{}-{at}.log", extra.join("")));
        let _ = std::fs::remove_file(&log);
        let (ok, err) = checkpoint(
            w,
            ask,
            extra,
            &[
                ("STASIS_FAULT_AT", at.to_string()),
                ("STASIS_FAULT_MODE", mode.into()),
                ("STASIS_FAULT_LOG", log.display().to_string()),
            ],
        );
        let step = step_at(&log, at);
        let what = format!("{mode} at step {at} ({step:?})");
        let published = step.as_deref().is_some_and(|s| PUBLISHED.contains(&s));
        if let Some(s) = &step {
            reached += 1;
            if mode == "kill" || !published {
                assert!(!ok, "{what}: the checkpoint succeeded");
            }
            if mode == "error" && !published {
                assert!(
                    err.contains(&format!("fault injected at step {at} ({s})")),
                    "{what}: the error does not name the step: {err}"
                );
            }
        } else {
            assert!(
                ok,
                "{what}: a checkpoint that did not get there failed: {err}"
            );
        }
        // Killed or failed before the publication: the previous one stays the newest.
        check_newest(w, &before, ok || published, &what);
        app.check(w, &what);
    }
    reached
}

fn spawn_outside(w: &Work, exe: &Path, args: &[&str]) -> App {
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args).current_dir(&w.dir);
    let p = w.spawn_io("faultapp", cmd, Stdio::null(), true);
    let pid = p.pid();
    App::new(p, pid)
}

/// `checkpoint --pid` of a small application killed at about 100 points spread over
/// the whole checkpoint, then made to fail at about 100.
#[test]
fn faultkill_pid_sweep() {
    let t0 = Instant::now();
    let w = Work::new("faultkill_pid");
    let exe = prog("faultapp");
    let mut app = spawn_outside(&w, &exe, &["4"]);
    let ask = Ask::Pid(app.pid);
    let (ok, err) = checkpoint(&w, ask, &[], &[]);
    assert!(ok, "first checkpoint failed: {err}");
    check_newest(&w, &[], true, "first checkpoint");
    app.check(&w, "first checkpoint");
    let n = count_steps(&w, ask, &[]);
    app.check(&w, "counted checkpoint");
    let points = spread(n + 2, 100);
    let killed = sweep(&w, &mut app, ask, &[], "kill", &points);
    eprintln!("killed at {killed} points of {n} steps");
    assert!(
        killed * 10 >= points.len() * 9,
        "few points reached: {killed}"
    );
    let failed = sweep(&w, &mut app, ask, &[], "error", &points);
    eprintln!("errors at {failed} points of {n} steps");
    assert!(
        failed * 10 >= points.len() * 9,
        "few points reached: {failed}"
    );
    // A checkpoint after all that is whole, and the application ends well.
    let before = w.checkpoints();
    let (ok, err) = checkpoint(&w, ask, &[], &[]);
    assert!(ok, "checkpoint after the sweeps failed: {err}");
    check_newest(&w, &before, true, "final checkpoint");
    eprintln!("{} ({} checks)", app.finish(&w), app.checks);
    elapsed(t0, "faultkill_pid_sweep");
}

/// A bigger application (128 MiB), `checkpoint --pid` killed at a few points, and
/// restarted from the newest checkpoint in the end.
#[test]
fn faultkill_pid_big() {
    let t0 = Instant::now();
    let w = Work::new("faultkill_big");
    let exe = prog("faultapp");
    let mut app = spawn_outside(&w, &exe, &["128"]);
    let ask = Ask::Pid(app.pid);
    let (ok, err) = checkpoint(&w, ask, &[], &[]);
    assert!(ok, "first checkpoint failed: {err}");
    app.check(&w, "first checkpoint");
    let n = count_steps(&w, ask, &[]);
    let points = spread(n, 6);
    let killed = sweep(&w, &mut app, ask, &[], "kill", &points);
    eprintln!("killed at {killed} points of {n} steps");
    assert_eq!(killed, points.len());
    // The image still restores: the application continues from it.
    let (ok, err) = checkpoint(&w, ask, &["--kill"], &[]);
    assert!(ok, "checkpoint --kill failed: {err}");
    let st = app.p.wait(T_CMD);
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{}", app.p.diag());
    let p = w.restart("restart");
    let pid = wait_for_pid(&w, &exe);
    // Its handled SIGUSR1 count came back with it.
    let mut app = App {
        p,
        pid,
        calc: 0,
        sys: 0,
        usr1_sent: app.usr1_sent,
        checks: 0,
    };
    app.check(&w, "restart");
    eprintln!("restarted: {}", app.finish(&w));
    elapsed(t0, "faultkill_pid_big");
}

/// The main thread asleep at the deepest point its stack ever reached: its stack is
/// grown (by another thread) to make room for its frame, and a kill at any of 20
/// points leaves it unharmed.
#[test]
fn faultkill_deep_stack() {
    let w = Work::new("faultkill_deep");
    let exe = prog("faultapp");
    let mut app = spawn_outside(&w, &exe, &["4", "deep"]);
    let ask = Ask::Pid(app.pid);
    // The main thread is asleep at its deepest point most of the time, not always:
    // a few checkpoints catch it there.
    let mut grown = 0;
    for _ in 0..10 {
        let (ok, err) = checkpoint(&w, ask, &[], &[("STASIS_LOG", "debug".into())]);
        assert!(ok, "checkpoint failed: {err}");
        assert!(
            !err.contains("without return frames"),
            "injected without return frames:\n{err}"
        );
        grown += usize::from(err.contains("grown to"));
        if grown == 2 {
            break;
        }
    }
    assert!(
        grown > 0,
        "the main thread's stack was never grown for its frame"
    );
    app.check(&w, "first checkpoint");
    let n = count_steps(&w, ask, &[]);
    let killed = sweep(&w, &mut app, ask, &[], "kill", &spread(n, 20));
    eprintln!("killed at {killed} points of {n} steps");
    eprintln!("{}", app.finish(&w));
}

/// Under `stasis run`: the init's checkpoint made to fail at 32 points (and, with
/// --incremental, at 16), the `stasis checkpoint DIR` client killed at 6 moments,
/// and the snapshot killed while it writes.
#[test]
fn faultkill_run() {
    let t0 = Instant::now();
    let w = Work::new("faultkill_run");
    let exe = prog("faultapp");
    let p = w.run("run", &[exe.as_os_str(), "32".as_ref()]);
    let mut app = App::new(p, 0);
    app.pid = wait_for_pid(&w, &exe);
    let (ok, err) = checkpoint(&w, Ask::Dir, &[], &[]);
    assert!(ok, "first checkpoint failed: {err}");
    app.check(&w, "first checkpoint");
    let n = count_steps(&w, Ask::Dir, &[]);
    let points = spread(n, 32);
    let failed = sweep(&w, &mut app, Ask::Dir, &[], "error", &points);
    eprintln!("errors at {failed} points of {n} steps");
    assert!(
        failed * 10 >= points.len() * 9,
        "few points reached: {failed}"
    );
    // The first incremental checkpoint arms the dirty tracking; the next one is
    // counted.
    count_steps(&w, Ask::Dir, &["--incremental"]);
    let n = count_steps(&w, Ask::Dir, &["--incremental"]);
    let points = spread(n, 16);
    let failed = sweep(&w, &mut app, Ask::Dir, &["--incremental"], "error", &points);
    eprintln!("--incremental: errors at {failed} points of {n} steps");
    assert!(
        failed * 10 >= points.len() * 8,
        "few points reached: {failed}"
    );

    // The client killed at various moments: the init abandons the checkpoint (or had
    // published it already).
    for delay in [0u64, 10, 20, 40, 80, 150] {
        let before = w.checkpoints();
        let cmd = w.stasis_cmd(&["checkpoint".as_ref(), w.ck.as_os_str()]);
        let mut c = w.spawn("ckpt-client", cmd, Stdio::null());
        std::thread::sleep(Duration::from_millis(delay));
        c.kill();
        wait_unlocked(&w.ck);
        let what = format!("client killed after {delay} ms");
        check_newest(&w, &before, true, &what);
        app.check(&w, &what);
    }

    // The snapshot killed while it writes (a child of the init other than the
    // application, running the application's executable).
    let mut caught = 0;
    for round in 0..5 {
        let before = w.checkpoints();
        let cmd = w.stasis_cmd(&["checkpoint".as_ref(), w.ck.as_os_str()]);
        let mut c = w.spawn("ckpt-snapshot", cmd, Stdio::null());
        let t = Instant::now();
        while t.elapsed() < T_CMD && c.running() {
            if let Some(&snap) = pids_of_exe(&w.dir, &exe).iter().find(|&&p| p != app.pid) {
                // SAFETY: killing the snapshot of the test's own application.
                unsafe { libc::kill(snap, libc::SIGKILL) };
                caught += 1;
                break;
            }
        }
        let st = c.wait(T_CMD);
        let what = format!(
            "snapshot killed (round {round}; the checkpoint {})",
            status_str(&st)
        );
        eprintln!("{what}: {}", c.stderr().trim());
        check_newest(&w, &before, true, &what);
        app.check(&w, &what);
    }
    assert!(
        caught >= 3,
        "the snapshot was caught only {caught} times of 5"
    );
    eprintln!("{} ({} checks)", app.finish(&w), app.checks);
    elapsed(t0, "faultkill_run");
}

/// The PID of the (one) process running `exe` in the work dir, once there is one.
fn wait_for_pid(w: &Work, exe: &Path) -> i32 {
    let t0 = Instant::now();
    loop {
        if let [pid] = pids_of_exe(&w.dir, exe)[..] {
            return pid;
        }
        assert!(
            t0.elapsed() < T_READY,
            "no single {} running",
            exe.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until nothing holds the checkpoint directory's lock for a moment (a
/// checkpoint in progress has finished or been abandoned).
fn wait_unlocked(ck: &Path) {
    use std::os::unix::io::AsRawFd;
    let t0 = Instant::now();
    let mut free = 0;
    while free < 3 {
        assert!(t0.elapsed() < T_CMD, "{} stays locked", ck.display());
        let f = std::fs::OpenOptions::new()
            .read(true)
            .open(ck.join(".lock"))
            .ok();
        let locked = f.as_ref().is_some_and(|f| {
            // SAFETY: flock on an open file of ours.
            let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            r != 0
        });
        free = if locked { 0 } else { free + 1 };
        std::thread::sleep(Duration::from_millis(50));
    }
}
