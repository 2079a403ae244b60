//! Progress on a terminal: `stasis checkpoint` and `stasis restart` show a spinner
//! on stderr when it is a terminal and the operation takes longer than the delay
//! (1 s by default; STASIS_PROGRESS_AFTER_MS=0 here, so that a quick operation
//! shows it too), and `--quiet` turns it off. The commands run under `script`, which
//! gives them a pseudo-terminal.
mod common;
use common::*;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `stasis ARGS` on a pseudo-terminal (through `script`) and returns what
/// appeared on the terminal once `until` holds for it (or the command ended).
fn on_terminal(w: &Work, label: &str, args: &str, until: impl Fn(&str) -> bool) -> String {
    let log = w.path(&format!("{label}.tty"));
    let line = format!(
        "STASIS_PROGRESS_AFTER_MS=0 '{}' {args}",
        env!("CARGO_BIN_EXE_stasis")
    );
    let mut child = Command::new("script")
        .args(["-qfec", &line])
        .arg(&log)
        .current_dir(&w.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("running script");
    let t0 = Instant::now();
    loop {
        let text = read_lossy(&log);
        let done = child.try_wait().ok().flatten().is_some();
        if until(&text) || done || t0.elapsed() > T_CMD {
            // SAFETY: killing the process group we created.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A checkpoint and a restart show their spinner on a terminal; with --quiet
/// neither does (and the restored program still runs and ticks on).
#[test]
fn spinner_on_a_terminal_and_quiet_silences_it() {
    let w = Work::new("progress");
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    let ck = w.ck.display().to_string();
    let text = on_terminal(&w, "ckpt", &format!("checkpoint '{ck}'"), |t| {
        t.contains("written")
    });
    assert!(
        text.contains("checkpointing"),
        "no spinner on the terminal during the checkpoint: {text:?}"
    );
    let text = on_terminal(
        &w,
        "ckpt-quiet",
        &format!("--quiet checkpoint --kill '{ck}'"),
        |_| false,
    );
    s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
    assert!(
        !text.contains("checkpointing"),
        "--quiet still showed the spinner: {text:?}"
    );
    let text = on_terminal(&w, "restart", &format!("restart '{ck}'"), |t| {
        t.lines().filter(|l| l.starts_with("tick")).count() >= 3
    });
    assert!(
        text.contains("restarting from"),
        "no spinner on the terminal during the restart: {text:?}"
    );
    assert!(
        text.lines().filter(|l| l.contains("tick")).count() >= 3,
        "the restored counter did not tick on: {text:?}"
    );
    let text = on_terminal(
        &w,
        "restart-quiet",
        &format!("--quiet restart '{ck}'"),
        |t| t.lines().filter(|l| l.contains("tick")).count() >= 3,
    );
    assert!(
        !text.contains("restarting from"),
        "--quiet still showed the spinner: {text:?}"
    );
    assert!(
        text.lines().filter(|l| l.contains("tick")).count() >= 3,
        "the restored counter did not tick on under --quiet: {text:?}"
    );
}
