//! Pseudo-terminals and inotify inside the job.
mod common;
use common::*;
use std::ffi::OsStr;
use std::time::{Duration, Instant};

/// inotify.c: two watches survive two kill/restart cycles with their numbers; an
/// event after restart arrives on the right watch.
#[test]
fn inotify_watches_survive() {
    let w = Work::new("inotify");
    let mut s = Session::start(&w, &[prog("inotify")]);
    s.cur().wait_tick(3, T_READY);
    s.cycle(Probe::Ticks);
    s.cycle(Probe::Ticks);
    let ok = s.finish();
    assert!(ok.starts_with("OK wd=1"), "{ok}");
    assert_ticks_consecutive(&s.outputs(), Some(0));
    let inspect = w.inspect_json();
    let fds = inspect["processes"][0]["fds"].as_array().unwrap().clone();
    assert!(
        fds.iter().any(|f| f["kind"]["type"] == "inotify"
            && f["kind"]["watches"]
                .as_array()
                .is_some_and(|a| a.len() == 2)),
        "the image does not hold the two watches: {fds:?}"
    );
}

fn wait_file(p: &std::path::Path, what: &str) -> String {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(p) {
            if !s.is_empty() {
                return s;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A job run under `script`: the pty pair, its window size, the controlling
/// terminal and the foreground group survive a plain checkpoint and two
/// kill/restart cycles, and the counter goes on.
#[test]
fn pty_under_script_survives() {
    let w = Work::new("pty");
    let job = format!(
        "stty rows 41 cols 97; exec {} {}",
        prog("ptyjob").display(),
        w.path("").display()
    );
    let script: &[&OsStr] = &[
        OsStr::new("script"),
        OsStr::new("-qfc"),
        OsStr::new(&job),
        OsStr::new("/dev/null"),
    ];
    let mut p = w.run("00-run", script);
    wait_file(&w.path("ready"), "the job to start");
    let tick = |w: &Work| {
        std::fs::read_to_string(w.path("ticks"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let r = w.checkpoint(false);
    assert!(r.status.success(), "{r}");
    for round in 0..2 {
        let before = tick(&w);
        std::thread::sleep(Duration::from_millis(100));
        let r = w.checkpoint(true);
        assert!(r.status.success(), "{r}");
        p.expect_exit(EXIT_CHECKPOINTED, T_CMD);
        let stopped = tick(&w);
        assert!(
            stopped > before,
            "the job did not run before the checkpoint"
        );
        p = w.restart(&format!("restart{round}"));
        let t0 = Instant::now();
        while tick(&w) <= stopped {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the job does not go on after restart {round}\n{}",
                p.diag()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let json = w.inspect_json();
    let ptys = json["ptys"].as_array().cloned().unwrap_or_default();
    assert_eq!(ptys.len(), 1, "the image should hold one pty pair: {json}");
    assert_eq!(ptys[0]["winsize"][0], 41);
    assert!(
        ptys[0]["session"].as_i64().unwrap_or(0) > 0,
        "no controlling session recorded"
    );
    w.go();
    p.expect_exit(0, T_CMD);
    let result = wait_file(&w.path("result"), "the job's result");
    assert!(result.starts_with("OK"), "{result}");
    assert!(result.contains("window=41x97"), "{result}");
}
