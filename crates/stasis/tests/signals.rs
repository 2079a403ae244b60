//! Per-thread kernel state: signal state (sighandler.c), syscalls interrupted
//! by the checkpoint (sleeper.c, readblock.c) and the register file (avx.c).
mod common;
use common::*;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

/// Dispositions, flags, sa_mask, blocked mask, pending standard + queued RT
/// signals with their si_value, sigaltstack and ITIMER_REAL survive two
/// checkpoint/restart cycles.
#[test]
fn signal_state_survives() {
    let w = Work::new("sighandler");
    let mut s = Session::start(&w, &[prog("sighandler")]);
    s.cycle(Probe::Ping);
    s.cycle(Probe::Ping);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_eq!(ok, "OK usr1=2 usr2=42 rt=2");
}

/// Checkpoints taken while the program is blocked in nanosleep,
/// clock_nanosleep (absolute and relative), poll and select: after each
/// restart the sleep completes with 0, never EINTR, never early.
#[test]
fn blocked_sleeps_complete_after_restart() {
    let w = Work::new("sleeper");
    let mut s = Session::start(&w, &[prog("sleeper")]);
    for phase in [
        "nanosleep0",
        "nanosleep2",
        "clock_abs",
        "clock_rel",
        "poll",
        "select",
    ] {
        let enter = format!("enter {phase}");
        s.cur()
            .wait_line(&enter, Duration::from_secs(20), |l| l == enter);
        // let it block in the syscall
        std::thread::sleep(Duration::from_millis(300));
        let done = format!("done {phase} ");
        assert!(
            !s.cur().lines().iter().any(|l| l.starts_with(&done)),
            "{phase} already finished before the checkpoint (machine too slow?)"
        );
        s.checkpoint_kill();
        // the checkpoint must have caught it inside the sleep
        assert!(
            !s.cur().lines().iter().any(|l| l.starts_with(&done)),
            "{phase} completed before the checkpoint froze it (machine too slow?)\n{}",
            s.diag()
        );
        s.restart(Probe::Sleep(50));
    }
    s.cur()
        .wait_line("`sleeps done`", Duration::from_secs(20), |l| {
            l == "sleeps done"
        });
    s.finish();
    s.assert_no_rerun();
    // every phase finished exactly once, with rc=0
    let all: Vec<String> = s
        .outputs()
        .iter()
        .flat_map(|(_, o)| complete_lines(o))
        .collect();
    for phase in [
        "nanosleep0",
        "nanosleep1",
        "nanosleep2",
        "clock_abs",
        "clock_rel",
        "poll",
        "select",
    ] {
        let done: Vec<&String> = all
            .iter()
            .filter(|l| l.starts_with(&format!("done {phase} ")))
            .collect();
        assert_eq!(done.len(), 1, "phase {phase}: {done:?}");
        assert!(done[0].contains(" rc=0 "), "{}", done[0]);
        let enters = all
            .iter()
            .filter(|l| **l == format!("enter {phase}"))
            .count();
        assert_eq!(enters, 1, "phase {phase} entered {enters} times");
    }
}

/// Blocked in read(0) at checkpoint time, twice; the restored read gets its
/// data from the last restart's stdin (a pipe) and sees no EINTR.
#[test]
fn blocked_read_on_stdin_is_rebound() {
    let w = Work::new("readblock");
    // keep the write end open so that read(0) blocks
    let mut p = w.run_with_stdin("run", &[prog("readblock")], Stdio::piped());
    p.wait_ready();
    let _stdin0 = p.child.stdin.take().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut s = Session::from_proc(&w, p);
    s.checkpoint_kill();
    s.restart_with_stdin(Probe::Sleep(300), Stdio::piped());
    let _stdin1 = s.cur().child.stdin.take().unwrap();
    s.checkpoint_kill();
    s.restart_with_stdin(Probe::Sleep(300), Stdio::piped());
    let mut stdin2 = s.cur().child.stdin.take().unwrap();
    assert!(
        !s.cur().lines().iter().any(|l| l.starts_with("read ")),
        "read returned before any data was written:\n{}",
        s.diag()
    );
    stdin2.write_all(b"hello\n").unwrap();
    drop(stdin2);
    let l = s
        .cur()
        .wait_line("`read ... bytes`", T_READY, |l| l.starts_with("read "));
    assert_eq!(l, "read 6 bytes");
    s.finish();
    s.assert_no_rerun();
}

fn registers(name: &str) {
    let w = Work::new(name);
    let mut s = Session::start(&w, &[prog(name)]);
    s.cycle(Probe::Ping);
    s.cycle(Probe::Ping);
    let ok = s.finish();
    s.assert_no_rerun();
    eprintln!("{ok}");
}

/// ymm0-15, r12-r15, MXCSR and the x87 control word survive while the
/// program only runs raw syscalls in an asm loop.
#[test]
#[cfg(target_arch = "x86_64")]
fn avx2_registers_survive() {
    if !cpu_has("avx2") {
        eprintln!("CPU has no avx2; nothing to test");
        return;
    }
    registers("avx");
}

/// Same with zmm0-31 and k1-k7 (only on CPUs with AVX-512F).
#[test]
#[cfg(target_arch = "x86_64")]
fn avx512_registers_survive() {
    if !cpu_has("avx512f") {
        eprintln!("CPU has no avx512f; nothing to test");
        return;
    }
    registers("avx512");
}
