//! Basic checkpoint/restart cycles with counter.c (a ticking counter whose
//! state is a running hash): continuity across repeated checkpoint --kill /
//! restart, checkpoints without --kill, restart picking the newest
//! checkpoint, `--pid` mode and exit status propagation.
mod common;
use common::*;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::Duration;

/// run -> (checkpoint --kill -> restart) x3 -> go: ticks exactly consecutive
/// across 4 processes, every tick's hash right, OK at the end.
#[test]
fn counter_checkpoint_kill_restart_three_times() {
    let w = Work::new("counter3");
    let mut s = Session::start(&w, &[prog("counter")]);
    let ready = s.cur().lines()[0].clone();
    s.cur().wait_tick(5, T_READY);
    for _ in 0..3 {
        s.cycle(Probe::Ticks);
    }
    s.cur().wait_more_ticks(3, T_READY);
    s.finish();
    s.assert_no_rerun();
    let t = verify_counter(&s.outputs(), Some(0));
    eprintln!("{ready}; {} ticks over 4 processes", t.len());
    // The app is gone after it exited; nothing left behind.
    if let Err(p) = wait_no_procs_in(&w.dir, Duration::from_secs(5)) {
        panic!(
            "processes left after the app exited:\n{}",
            describe_procs(&p)
        );
    }
}

/// Plain checkpoint (no --kill) keeps the app running; then `stasis run` is
/// SIGKILLed (as a batch system would): the application must die with it.
/// The restart continues from the checkpoint (repeating what came after it).
#[test]
fn counter_checkpoint_without_kill_then_run_sigkilled() {
    let w = Work::new("counter_nokill");
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(5, T_READY);
    let before = s.cur().last_tick().unwrap();
    w.checkpoint_ok(false, s.cur());
    let after = s.cur().last_tick().unwrap();
    // still running and ticking
    s.cur().wait_more_ticks(10, T_READY);
    assert!(
        s.cur().running(),
        "stasis run exited after a checkpoint without --kill\n{}",
        s.diag()
    );

    let st = s.kill_supervisor();
    assert_eq!(st.signal(), Some(libc::SIGKILL));

    s.restart(Probe::Ticks);
    s.cur().wait_more_ticks(3, T_READY);
    s.finish();
    let out = s.outputs();
    let run_ticks = ticks(&out[0].1);
    let rs_ticks = ticks(&out[1].1);
    assert_ticks_consecutive(&out[0..1], Some(0));
    let first = rs_ticks[0];
    // the checkpoint was taken after tick `before` and before tick `after`+1
    assert!(
        first > before && first <= after + 1,
        "restart continued at tick {first}, but the checkpoint was taken between ticks {before} and {after}"
    );
    assert!(
        first < *run_ticks.last().unwrap(),
        "restart must repeat the ticks printed after the checkpoint"
    );
    verify_counter(&out[1..], Some(first));
}

/// The application is SIGKILLed (e.g. by the OOM killer): `stasis run` dies
/// of the same signal (or exits 137) and leaves nothing behind; the
/// checkpoint taken before is still usable.
#[test]
fn app_sigkilled_is_reported_and_checkpoint_usable() {
    let w = Work::new("app_killed");
    let exe = prog("counter");
    let mut s = Session::start(&w, &[&exe]);
    s.cur().wait_tick(3, T_READY);
    w.checkpoint_ok(false, s.cur());
    let app = pids_of_exe(&w.dir, &exe);
    assert_eq!(app.len(), 1, "expected one app process: {app:?}");
    // SAFETY: killing the application process the test found.
    unsafe { libc::kill(app[0], libc::SIGKILL) };
    let st = s.cur().wait(T_CMD);
    assert!(
        st.signal() == Some(libc::SIGKILL) || st.code() == Some(128 + libc::SIGKILL),
        "app was SIGKILLed, stasis run ended with {}\n{}",
        status_str(&st),
        s.diag()
    );
    if let Err(p) = wait_no_procs_in(&w.dir, Duration::from_secs(10)) {
        panic!(
            "processes left after the run ended:\n{}",
            describe_procs(&p)
        );
    }
    s.restart(Probe::Ticks);
    s.finish();
    let out = s.outputs();
    let first = ticks(&out[1].1)[0];
    verify_counter(&out[1..], Some(first));
}

/// CPU-bound program caught in user mode mid-computation (state only in
/// registers), three times.
#[test]
fn cpu_bound_loop_survives() {
    let w = Work::new("spin");
    let mut s = Session::start(&w, &[prog("spin")]);
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        s.cycle(Probe::Ping);
        std::thread::sleep(Duration::from_millis(150));
    }
    s.finish();
    s.assert_no_rerun();
}

/// Several checkpoints: restart uses the newest one; numbering increases.
#[test]
fn restart_uses_newest_checkpoint() {
    let w = Work::new("newest");
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    let c1 = w.checkpoint_ok(false, s.cur());
    s.cur().wait_more_ticks(5, T_READY);
    let c2 = w.checkpoint_ok(false, s.cur());
    s.cur().wait_more_ticks(5, T_READY);
    let c3 = s.checkpoint_kill();
    assert!(c1 < c2 && c2 < c3, "{c1:?} {c2:?} {c3:?}");
    s.restart(Probe::Ticks);
    s.finish();
    // exact continuity proves the newest (--kill) checkpoint was used
    verify_counter(&s.outputs(), Some(0));
    // no stray temporary checkpoint dirs
    for e in std::fs::read_dir(&w.ck).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(
            !n.starts_with("checkpoint") || is_checkpoint_name(&n),
            "unexpected entry {n} in checkpoint dir"
        );
    }
}

/// `stasis checkpoint --pid PID --dir DIR --kill` on a process not started by
/// stasis, then `stasis restart DIR`.
#[test]
fn checkpoint_by_pid() {
    let w = Work::new("bypid");
    let mut cmd = Command::new(prog("counter"));
    cmd.current_dir(&w.dir).process_group(0);
    let mut app = w.spawn_io("direct", cmd, Stdio::null(), true);
    app.wait_ready();
    app.wait_tick(5, T_READY);
    let pid = app.pid().to_string();
    let r = w.stasis(
        "ckpt-pid",
        &[
            "checkpoint".as_ref(),
            "--pid".as_ref(),
            pid.as_ref(),
            "--dir".as_ref(),
            w.ck.as_os_str(),
            "--kill".as_ref(),
        ],
    );
    assert!(r.status.success(), "{r}\n{}", app.diag());
    assert_eq!(w.checkpoints().len(), 1, "no checkpoint published by {r}");
    let st = app.wait(T_CMD);
    assert!(
        st.signal().is_some(),
        "app should have been killed by checkpoint --kill, got {}",
        status_str(&st)
    );
    let mut s = Session::from_proc(&w, app);
    s.restart(Probe::Ticks);
    // and once more through the supervisor of the restarted process
    s.cycle(Probe::Ticks);
    s.finish();
    s.assert_no_rerun();
    verify_counter(&s.outputs(), Some(0));
}

/// A process started outside stasis with its output in a file (`nohup ./sim >out.log
/// &`), checkpointed with `--pid --kill`: `stasis restart` reopens the file at its
/// offset, so the output goes on in out.log (every tick once, in order) and nothing
/// lands on the restart's own stdout; with `restart --stdio inherit`, the output
/// comes to the restart's stdout instead.
#[test]
fn pid_output_to_a_file_goes_on_in_it() {
    let w = Work::new("bypid_log");
    let log = w.path("out.log");
    let mut cmd = Command::new(prog("counter"));
    cmd.current_dir(&w.dir)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    let ticks_in = |min: usize| {
        let t0 = std::time::Instant::now();
        loop {
            let n = ticks(&read_lossy(&log)).len();
            if n >= min {
                return n;
            }
            assert!(
                t0.elapsed() < T_READY,
                "{n} ticks in out.log, waiting for {min}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    ticks_in(5);
    let pid_s = pid.to_string();
    let ck = |label: &str| {
        let r = w.stasis(
            label,
            &[
                "checkpoint".as_ref(),
                "--pid".as_ref(),
                pid_s.as_ref(),
                "--dir".as_ref(),
                w.ck.as_os_str(),
                "--kill".as_ref(),
            ],
        );
        assert!(r.status.success(), "{r}");
    };
    ck("ckpt-pid");
    let _ = child.wait();
    let before = ticks(&read_lossy(&log)).len();
    // Default: the file is reopened; the restart's stdout stays empty.
    let mut r = w.restart("restart-restore");
    ticks_in(before + 5);
    assert!(
        ticks(&r.stdout()).is_empty(),
        "output on the restart's stdout: {}",
        r.stdout()
    );
    let c = w.checkpoint(true);
    assert!(c.status.success(), "{c}");
    r.wait(T_CMD);
    let in_log = ticks(&read_lossy(&log));
    assert_eq!(
        in_log,
        (0..in_log.len() as u64).collect::<Vec<_>>(),
        "out.log does not hold every tick once, in order"
    );
    // --stdio inherit: the output comes to the restart's stdout.
    let mut cmd = w.stasis_cmd(&[
        "restart".as_ref(),
        "--stdio".as_ref(),
        "inherit".as_ref(),
        w.ck.as_os_str(),
    ]);
    cmd.current_dir(w.path("elsewhere"));
    let mut r = w.spawn("restart-inherit", cmd, Stdio::null());
    r.wait_tick(in_log.len() as u64 + 3, T_READY);
    assert_eq!(
        ticks(&read_lossy(&log)).len(),
        in_log.len(),
        "out.log grew with --stdio inherit"
    );
    w.go();
    let st = r.wait(T_CMD);
    assert!(st.success(), "{}", r.diag());
}

/// Exit status and death by signal are propagated by run and restart.
#[test]
fn exit_status_propagation() {
    // plain run, exit code
    let w = Work::new("exitcode");
    let mut s = Session::start(
        &w,
        &[prog("exiter").as_os_str(), "code".as_ref(), "3".as_ref()],
    );
    w.go();
    s.cur().expect_exit(3, T_CMD);
    drop(s);
    drop(w);

    // after restart, exit code
    let w = Work::new("exitcode_rs");
    let mut s = Session::start(
        &w,
        &[prog("exiter").as_os_str(), "code".as_ref(), "7".as_ref()],
    );
    s.cycle(Probe::Ticks);
    w.go();
    s.cur().expect_exit(7, T_CMD);
    drop(s);
    drop(w);

    // death by signal, plain and after restart
    for (restart, sig) in [(false, libc::SIGTERM), (true, libc::SIGUSR1)] {
        let w = Work::new("exitsig");
        let sigs = sig.to_string();
        let mut s = Session::start(
            &w,
            &[prog("exiter").as_os_str(), "signal".as_ref(), sigs.as_ref()],
        );
        if restart {
            s.cycle(Probe::Ticks);
        }
        w.go();
        let st = s.cur().wait(T_CMD);
        assert!(
            st.signal() == Some(sig) || st.code() == Some(128 + sig),
            "app died by signal {sig} (restart={restart}); stasis ended with {}\n{}",
            status_str(&st),
            s.diag()
        );
    }
}

/// cwd (a subdirectory; restarts are started from another directory), umask,
/// rlimits, nice value, thread name, environment (differs for the restart
/// command), pid/ppid/pgrp/session and /proc/self/exe survive two cycles.
#[test]
fn process_attributes_survive() {
    let w = Work::new("procstate");
    let mut s = Session::start(&w, &[prog("procstate")]);
    s.cur().wait_tick(3, T_READY);
    s.cycle(Probe::Ticks);
    s.cycle(Probe::Ticks);
    s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
}

/// `stasis run ... | consumer`: stdout is a pipe, both for run and restart.
#[test]
fn stdout_pipe_is_rebound() {
    let mut w = Work::new("stdout_pipe");
    w.pipe_stdout = true;
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    s.cycle(Probe::Ticks);
    s.cycle(Probe::Ticks);
    s.finish();
    s.assert_no_rerun();
    verify_counter(&s.outputs(), Some(0));
}

/// Every path (checkpoint dir, cwd, open files, the mapped file) contains
/// spaces and non-ASCII characters.
#[test]
fn paths_with_spaces_and_unicode() {
    let w = Work::with_suffix("odd_paths", " a b-ü€");
    let mut s = Session::start(&w, &[prog("files")]);
    s.cur().wait_tick(3, T_READY);
    s.cycle(Probe::Ticks);
    s.finish();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    drop(s);
    drop(w);
    let w = Work::with_suffix("odd_paths_map", " x y-ü€");
    let mut s = Session::start(&w, &[prog("filemap")]);
    s.cycle(Probe::Ping);
    s.finish();
}

/// SIGTERM to `stasis run` / `stasis restart` (what a batch system sends
/// first) reaches the application; stasis then dies of it (or exits 143).
#[test]
fn sigterm_to_stasis_reaches_app() {
    for restart in [false, true] {
        let w = Work::new("sigterm");
        let exe = prog("exiter");
        let mut s = Session::start(&w, &[exe.as_os_str(), "code".as_ref(), "0".as_ref()]);
        if restart {
            s.cycle(Probe::Ticks);
        }
        s.cur().wait_more_ticks(2, T_READY);
        // SAFETY: signalling the child we spawned.
        unsafe { libc::kill(s.cur().pid(), libc::SIGTERM) };
        let st = s.cur().wait(T_CMD);
        assert!(
            st.signal() == Some(libc::SIGTERM) || st.code() == Some(128 + libc::SIGTERM),
            "after SIGTERM to stasis (restart={restart}): {}\n{}",
            status_str(&st),
            s.diag()
        );
        if let Err(p) = wait_no_procs_in(&w.dir, Duration::from_secs(10)) {
            panic!("left after SIGTERM:\n{}", describe_procs(&p));
        }
    }
}

/// `stasis restart DIR` while the application of DIR is still running under
/// its `stasis run` is refused; the running application is not disturbed.
#[test]
fn restart_while_running_is_refused() {
    let w = Work::new("restart_busy");
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    w.checkpoint_ok(false, s.cur());
    let mut r = w.restart("restart-busy");
    let st = r.wait(T_CMD);
    assert!(
        !st.success() && !r.stderr().trim().is_empty(),
        "second restart of a busy DIR: {}\n{}",
        status_str(&st),
        r.diag()
    );
    eprintln!("busy: {}", r.stderr().trim());
    assert!(
        ticks(&r.stdout()).is_empty(),
        "a second copy ran:\n{}",
        r.diag()
    );
    s.cur().wait_more_ticks(5, T_READY);
    s.cycle(Probe::Ticks);
    s.finish();
    verify_counter(&s.outputs(), Some(0));
}

/// stderr is rebound like stdout: `etick N` lines continue exactly in the
/// stderr of each restart.
#[test]
fn stderr_is_rebound() {
    let w = Work::new("stderr");
    let mut s = Session::start(&w, &[prog("counter").as_os_str(), "stderr".as_ref()]);
    s.cur().wait_tick(3, T_READY);
    s.cycle(Probe::Ticks);
    s.cycle(Probe::Ticks);
    s.finish();
    verify_counter(&s.outputs(), Some(0));
    let mut all = vec![];
    for p in &s.phases {
        let e: Vec<u64> = complete_lines(&p.stderr())
            .iter()
            .filter_map(|l| l.strip_prefix("etick ").and_then(|n| n.parse().ok()))
            .collect();
        assert!(!e.is_empty(), "{}: nothing on stderr", p.label);
        all.extend(e);
    }
    let t = ticks(
        &s.outputs()
            .iter()
            .map(|(_, o)| o.as_str())
            .collect::<String>(),
    );
    assert_eq!(all, t, "stderr ticks differ from stdout ticks");
}
