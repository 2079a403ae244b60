//! Checkpoints WITHOUT --kill must be invisible to the running application:
//! after several of them, the original process (still under `stasis run`)
//! passes all of its own checks (memory, registers, fds, pending signals,
//! memory map, blocked syscalls not interrupted, ...) and exits 0.
mod common;
use common::*;
use std::ffi::OsStr;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

/// run, wait for ready, 3 checkpoints 100 ms apart, go: the run exits 0 with OK.
fn plain(name: &str, args: &[&str]) {
    let w = Work::new(&format!("plain_{name}"));
    let exe = prog(name);
    let mut argv: Vec<&OsStr> = vec![exe.as_os_str()];
    argv.extend(args.iter().map(OsStr::new));
    let mut s = Session::start(&w, &argv);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(100));
        w.checkpoint_ok(false, s.cur());
        assert!(
            s.cur().running(),
            "the app stopped after a checkpoint without --kill\n{}",
            s.diag()
        );
    }
    let ok = s.finish();
    eprintln!("{name}: {ok}");
    if !ticks(&s.cur().stdout()).is_empty() {
        assert_ticks_consecutive(&s.outputs(), Some(0));
    }
}

#[test]
fn plain_counter() {
    plain("counter", &[]);
}

#[test]
fn plain_sighandler() {
    plain("sighandler", &[]);
}

#[test]
fn plain_memory() {
    plain("memory", &[]);
}

#[test]
fn plain_filemap() {
    plain("filemap", &[]);
}

#[test]
fn plain_files() {
    plain("files", &[]);
}

#[test]
fn plain_spin() {
    plain("spin", &[]);
}

#[test]
fn plain_procstate() {
    plain("procstate", &[]);
}

#[test]
#[cfg(target_arch = "x86_64")]
fn plain_avx() {
    if cpu_has("avx2") {
        plain("avx", &[]);
    }
    if cpu_has("avx512f") {
        plain("avx512", &[]);
    }
}

/// Checkpoints while blocked in each kind of sleep: no EINTR, not early.
#[test]
fn plain_checkpoints_during_sleeps() {
    let w = Work::new("plain_sleeper");
    let mut s = Session::start(&w, &[prog("sleeper")]);
    for phase in [
        "nanosleep0",
        "nanosleep1",
        "clock_abs",
        "clock_rel",
        "poll",
        "select",
    ] {
        let enter = format!("enter {phase}");
        s.cur()
            .wait_line(&enter, Duration::from_secs(20), |l| l == enter);
        std::thread::sleep(Duration::from_millis(300));
        w.checkpoint_ok(false, s.cur());
        let done = format!("done {phase} ");
        assert!(
            !s.cur().lines().iter().any(|l| l.starts_with(&done)),
            "{phase} was already over when the checkpoint finished (machine too slow?)"
        );
    }
    s.cur()
        .wait_line("`sleeps done`", Duration::from_secs(20), |l| {
            l == "sleeps done"
        });
    s.finish();
}

/// Checkpoint while blocked in read(0): the read then gets its data normally.
#[test]
fn plain_checkpoint_during_read() {
    let w = Work::new("plain_readblock");
    let mut p = w.run_with_stdin("run", &[prog("readblock")], Stdio::piped());
    p.wait_ready();
    let mut stdin = p.child.stdin.take().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    w.checkpoint_ok(false, &mut p);
    w.checkpoint_ok(false, &mut p);
    assert!(
        !p.lines().iter().any(|l| l.starts_with("read ")),
        "read returned early: {}",
        p.diag()
    );
    stdin.write_all(b"hello\n").unwrap();
    drop(stdin);
    let l = p.wait_line("`read ... bytes`", T_READY, |l| l.starts_with("read "));
    assert_eq!(l, "read 6 bytes");
    let mut s = Session::from_proc(&w, p);
    s.finish();
}
