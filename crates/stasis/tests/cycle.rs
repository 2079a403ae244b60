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

/// Plain checkpoint (no --kill) keeps the app running; the app is then
/// killed (SIGKILL to the app itself, so `stasis run` reports its death); the
/// restart continues from the checkpoint (repeating what came after it).
#[test]
fn counter_checkpoint_without_kill_then_app_killed() {
    let w = Work::new("counter_nokill");
    let exe = prog("counter");
    let mut s = Session::start(&w, &[&exe]);
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

    let app = pids_of_exe(&w.dir, &exe);
    assert_eq!(app.len(), 1, "expected one app process: {app:?}");
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

/// SIGKILL of `stasis run` (e.g. by a batch system) must not leave the
/// application (or stasis's init) running.
#[test]
fn sigkill_of_stasis_run_kills_app() {
    let w = Work::new("sigkill_run");
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    s.cur().kill();
    if let Err(p) = wait_no_procs_in(&w.dir, Duration::from_secs(10)) {
        panic!(
            "after SIGKILL of `stasis run` these processes survive (the app must die too):\n{}",
            describe_procs(&p)
        );
    }
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
    let mut app = w.spawn("direct", cmd, Stdio::null());
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
