//! Image integrity: a flipped byte or a truncated image file makes restart
//! fail with a checksum/truncation error and restore nothing; with the
//! original bytes back the restart works and continues exactly.
mod common;
use common::*;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn files_under(p: &Path) -> Vec<(PathBuf, u64)> {
    let mut v = vec![];
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                v.push((e.path(), m.len()));
            }
        }
    }
    v.sort();
    v
}

/// Restart must fail; its stderr must contain one of `words`; nothing may run.
fn expect_refused(w: &Work, what: &str, words: &[&str]) {
    let mut r = w.restart("restart-bad");
    let st = r.wait(T_CMD);
    let err = r.stderr().to_lowercase();
    assert!(
        !st.success() && st.code() != Some(EXIT_CHECKPOINTED),
        "restart with {what} did not fail: {}\n{}",
        status_str(&st),
        r.diag()
    );
    assert!(
        words.iter().any(|x| err.contains(x)),
        "restart with {what}: error mentions none of {words:?}\n{}",
        r.diag()
    );
    eprintln!("{what}: {}", r.stderr().trim());
    assert!(
        ticks(&r.stdout()).is_empty(),
        "restart with {what}: the application ran\n{}",
        r.diag()
    );
    if let Err(p) = wait_no_procs_in(&w.dir, Duration::from_secs(5)) {
        panic!(
            "restart with {what}: processes left behind:\n{}",
            describe_procs(&p)
        );
    }
}

fn checkpointed_counter(w: &Work) -> Session<'_> {
    let mut s = Session::start(w, &[prog("counter")]);
    s.cur().wait_tick(5, T_READY);
    s.checkpoint_kill();
    s
}

#[test]
fn corrupted_largest_image_file_is_refused() {
    let w = Work::new("integrity");
    let mut s = checkpointed_counter(&w);
    let files = files_under(&w.newest_checkpoint());
    let (big, len) = files
        .iter()
        .max_by_key(|(_, l)| *l)
        .cloned()
        .expect("empty checkpoint");
    assert!(len > 0);
    let orig = std::fs::read(&big).unwrap();

    // one byte flipped in the middle
    let mut bad = orig.clone();
    bad[orig.len() / 2] ^= 0x01;
    std::fs::write(&big, &bad).unwrap();
    expect_refused(
        &w,
        &format!("a flipped byte in {}", big.display()),
        &["checksum"],
    );

    // truncated to half
    std::fs::write(&big, &orig[..orig.len() / 2]).unwrap();
    expect_refused(
        &w,
        &format!("{} truncated", big.display()),
        &["truncat", "corrupt", "checksum"],
    );

    // truncated by one byte
    std::fs::write(&big, &orig[..orig.len() - 1]).unwrap();
    expect_refused(
        &w,
        &format!("{} missing its last byte", big.display()),
        &["truncat", "corrupt", "checksum"],
    );

    // original bytes back: restart works and continues exactly
    std::fs::write(&big, &orig).unwrap();
    s.restart(Probe::Ticks);
    s.finish();
    verify_counter(&s.outputs(), Some(0));
}

/// Every (non-empty) file of the checkpoint is protected: flip a byte at the
/// start, middle and end of each one in turn, and change one digit (keeps
/// JSON well-formed).
#[test]
fn every_image_file_is_verified() {
    let w = Work::new("integrity_all");
    let mut s = checkpointed_counter(&w);
    let files = files_under(&w.newest_checkpoint());
    assert!(!files.is_empty());
    for (f, len) in files.iter().filter(|(_, l)| *l > 0).take(32) {
        let orig = std::fs::read(f).unwrap();
        for pos in [0, *len as usize / 2, *len as usize - 1] {
            let mut bad = orig.clone();
            bad[pos] ^= 0x80;
            std::fs::write(f, &bad).unwrap();
            expect_refused(
                &w,
                &format!("byte {pos} of {} flipped", f.display()),
                &["checksum", "corrupt", "truncat"],
            );
        }
        // a change that keeps the file well-formed: one digit replaced by
        // another, in the second half (for JSON: a number or hex checksum)
        if let Some(pos) = (orig.len() / 2..orig.len()).find(|i| orig[*i].is_ascii_digit()) {
            let mut bad = orig.clone();
            bad[pos] = if orig[pos] == b'7' { b'3' } else { b'7' };
            std::fs::write(f, &bad).unwrap();
            expect_refused(
                &w,
                &format!("digit at {pos} of {} changed", f.display()),
                &["checksum", "corrupt", "truncat"],
            );
        }
        std::fs::write(f, &orig).unwrap();
    }
    s.restart(Probe::Ticks);
    s.finish();
    verify_counter(&s.outputs(), Some(0));
}

/// `stasis verify` checks every checkpoint without restoring: 0 when intact; 1 with
/// the damaged checkpoint named when a byte is flipped; the application state in the
/// intact checkpoints is still restartable with `--from`.
#[test]
fn verify_reports_damage_without_restoring() {
    let w = Work::new("verify");
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    let first = w.checkpoint_ok(false, s.cur());
    s.cur().wait_more_ticks(3, T_READY);
    s.checkpoint_kill();
    let dir = w.ck.clone();
    let ok = w.stasis("verify-ok", &[OsStr::new("verify"), dir.as_os_str()]);
    assert!(
        ok.status.success(),
        "verify of intact checkpoints failed: {ok}"
    );
    assert_eq!(
        ok.stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        2,
        "{ok}"
    );
    // Damage the newest checkpoint's page file.
    let newest = w.newest_checkpoint();
    let page = std::fs::read_dir(&newest)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
        })
        .expect("a page file");
    let mut bytes = std::fs::read(&page).unwrap();
    let at = bytes
        .iter()
        .position(|&b| b != 0)
        .expect("non-zero page data");
    bytes[at] ^= 0x5a;
    std::fs::write(&page, &bytes).unwrap();
    let bad = w.stasis("verify-bad", &[OsStr::new("verify"), dir.as_os_str()]);
    assert_eq!(
        bad.status.code(),
        Some(1),
        "verify of a damaged checkpoint: {bad}"
    );
    assert!(
        bad.stdout.contains("CORRUPT") && bad.stdout.contains("checksum"),
        "{bad}"
    );
    assert!(
        bad.stderr.contains("--from"),
        "no hint to the intact checkpoint: {bad}"
    );
    let latest = w.stasis(
        "verify-latest",
        &[
            OsStr::new("verify"),
            OsStr::new("--latest"),
            dir.as_os_str(),
        ],
    );
    assert_eq!(latest.status.code(), Some(1), "{latest}");
    assert!(first.exists(), "the intact checkpoint must stay");
}
