//! Self-checks of the test harness: the continuity/hash verifiers must reject
//! gaps, repeats, wrong hashes and missing OK lines, and the progress verifier
//! of the threaded programs counters going back, threads not running after a
//! restore and missing joins (so the real tests cannot pass vacuously), and
//! the test programs' own checks must report FAIL when their state is wrong.
mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

fn counter_text(range: std::ops::Range<u64>, ok: bool) -> String {
    let mut t = String::new();
    for n in range.clone() {
        t.push_str(&format!("tick {n} {:016x}\n", counter_hash(n)));
    }
    if ok {
        let last = range.end - 1;
        t.push_str(&format!(
            "OK ticks={} hash={:016x}\n",
            last + 1,
            counter_hash(last)
        ));
    }
    t
}

fn runs(parts: &[String]) -> Vec<(String, String)> {
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("run{i}"), p.clone()))
        .collect()
}

#[test]
fn verifier_accepts_exact_continuity() {
    let t = verify_counter(
        &runs(&[counter_text(0..10, false), counter_text(10..25, true)]),
        Some(0),
    );
    assert_eq!(t.len(), 25);
}

/// A line begun before a checkpoint and ended after the restart (Python's print writes
/// the text, then the newline) counts once; a run killed mid-line and followed by a
/// run that starts a tick line of its own is not joined to it.
#[test]
fn a_line_split_across_runs_counts_once() {
    let t = assert_ticks_consecutive(
        &runs(&[
            "tick 0 a\ntick 1 b\ntick 2 c".into(),
            "\ntick 3 d\ntick 4 e\n".into(),
        ]),
        Some(0),
    );
    assert_eq!(t, [0, 1, 2, 3, 4]);
    let t = assert_ticks_consecutive(
        &runs(&[
            "tick 0 a\ntick 1 b\ntick 2".into(),
            "tick 2 c\ntick 3 d\n".into(),
        ]),
        Some(0),
    );
    assert_eq!(t, [0, 1, 2, 3]);
}

#[test]
#[should_panic(expected = "gap")]
fn verifier_rejects_gap() {
    verify_counter(
        &runs(&[counter_text(0..10, false), counter_text(11..25, true)]),
        Some(0),
    );
}

#[test]
#[should_panic(expected = "repeat")]
fn verifier_rejects_repeat() {
    verify_counter(
        &runs(&[counter_text(0..10, false), counter_text(9..25, true)]),
        Some(0),
    );
}

#[test]
#[should_panic(expected = "first tick")]
fn verifier_rejects_wrong_start() {
    verify_counter(
        &runs(&[counter_text(1..10, false), counter_text(10..25, true)]),
        Some(0),
    );
}

#[test]
#[should_panic(expected = "hash")]
fn verifier_rejects_wrong_hash() {
    let bad = counter_text(10..25, true).replacen(
        &format!("{:016x}", counter_hash(12)),
        "0000000000000000",
        1,
    );
    verify_counter(&runs(&[counter_text(0..10, false), bad]), Some(0));
}

#[test]
#[should_panic(expected = "final line")]
fn verifier_requires_ok() {
    verify_counter(
        &runs(&[counter_text(0..10, false), counter_text(10..25, false)]),
        Some(0),
    );
}

/// pthreads.c-style ticks n in `range` with counters growing by `step`.
fn pthreads_text(range: std::ops::Range<u64>, step: u64) -> String {
    range
        .map(|n| {
            format!(
                "tick {n} shared={} pp={} rounds={}\n",
                n * step,
                n * step,
                n * step
            )
        })
        .collect()
}

#[test]
fn pthreads_verifier_accepts_continuation() {
    let out = runs(&[pthreads_text(0..10, 5), pthreads_text(10..20, 5)]);
    verify_pthreads(
        &out,
        39,
        "OK ticks=20 threads=39 joined=38 shared=100 pp=100 rounds=100",
    );
}

#[test]
#[should_panic(expected = "went back")]
fn pthreads_verifier_rejects_counters_going_back() {
    // a restart that starts the counters over (ticks fine)
    let restarted = pthreads_text(10..20, 5).replace("shared=50 ", "shared=3 ");
    let out = runs(&[pthreads_text(0..10, 5), restarted]);
    verify_pthreads(
        &out,
        39,
        "OK ticks=20 threads=39 joined=38 shared=100 pp=100 rounds=100",
    );
}

#[test]
#[should_panic(expected = "did not advance")]
fn pthreads_verifier_rejects_frozen_threads_after_restore() {
    // restored threads that do not run: counters stuck at their values
    let stuck: String = (10..20)
        .map(|n| format!("tick {n} shared=50 pp=50 rounds=50\n"))
        .collect();
    let out = runs(&[pthreads_text(0..10, 5), stuck]);
    verify_pthreads(
        &out,
        39,
        "OK ticks=20 threads=39 joined=38 shared=50 pp=50 rounds=50",
    );
}

#[test]
#[should_panic(expected = "not every thread was joined")]
fn pthreads_verifier_requires_all_joined() {
    let out = runs(&[pthreads_text(0..10, 5), pthreads_text(10..20, 5)]);
    verify_pthreads(
        &out,
        39,
        "OK ticks=20 threads=39 joined=30 shared=100 pp=100 rounds=100",
    );
}

#[test]
fn partial_last_line_is_ignored() {
    assert_eq!(ticks("tick 0 a\ntick 1 b\ntick 2"), vec![0, 1]);
    assert!(mentions_number("fd 3, a pipe", 3));
    assert!(!mentions_number("fd 13, a pipe", 3));
}

/// Run a program natively (no stasis) in a work dir, create `go` after
/// `setup` and return (exit code, stdout).
fn native(
    name: &str,
    args: &[&str],
    setup: impl FnOnce(&Work, &mut Proc),
) -> (Option<i32>, String) {
    let w = Work::new(&format!("native_{name}"));
    let mut c = Command::new(prog(name));
    c.args(args).current_dir(&w.dir);
    let mut p = w.spawn(name, c, Stdio::null());
    p.wait_ready();
    setup(&w, &mut p);
    w.go();
    let st = p.wait(Duration::from_secs(30));
    (st.code(), p.stdout())
}

/// Without stasis every program passes its own checks.
#[test]
fn programs_pass_natively() {
    for (name, args) in [
        ("counter", vec![]),
        ("memory", vec![]),
        ("filemap", vec![]),
        ("files", vec![]),
        ("sighandler", vec![]),
        ("spin", vec![]),
        ("unsupported", vec!["pipe"]),
        ("pthreads", vec!["32"]),
        ("churn", vec![]),
        ("openmp", vec!["20", "100000"]),
    ] {
        let (code, out) = native(name, &args, |_, _| {
            std::thread::sleep(Duration::from_millis(100))
        });
        let last = complete_lines(&out).last().cloned().unwrap_or_default();
        assert!(
            code == Some(0) && last.starts_with("OK"),
            "{name}: exit {code:?}, last line {last:?}"
        );
    }
}

/// The programs' checks do detect a wrong state (disturbed from outside while
/// they run natively): wrong stdin data, a mapped file changed underneath, a
/// foreign line in the output file.
#[test]
fn programs_detect_wrong_state() {
    // readblock: wrong data on stdin
    let w = Work::new("native_readblock");
    let mut c = Command::new(prog("readblock"));
    c.current_dir(&w.dir);
    let mut p = w.spawn("readblock", c, Stdio::piped());
    p.wait_ready();
    {
        use std::io::Write;
        let mut i = p.child.stdin.take().unwrap();
        i.write_all(b"hellx\n").unwrap();
    }
    w.go();
    let st = p.wait(Duration::from_secs(10));
    assert_eq!(st.code(), Some(1));
    assert!(p.stdout().contains("FAIL read 6 bytes"), "{}", p.stdout());
    drop(p);
    drop(w);

    // filemap: the file changes underneath the read-only mapping
    let (code, out) = native("filemap", &[], |w, _| {
        let path = w.path("mapped.dat");
        let mut b = std::fs::read(&path).unwrap();
        b[100] ^= 0xff;
        std::fs::write(&path, &b).unwrap();
    });
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL") && out.contains("read-only mapping"),
        "{out}"
    );

    // files: out.txt gets an extra line from outside
    let (code, out) = native("files", &[], |w, p| {
        p.wait_tick(3, Duration::from_secs(10));
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(w.path("out.txt"))
            .unwrap();
        f.write_all(b"intruder\n").unwrap();
    });
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL") && out.contains("out.txt"), "{out}");
}
