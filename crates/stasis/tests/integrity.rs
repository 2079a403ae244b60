//! Image integrity: a flipped byte or a truncated image file makes restart
//! fail with a checksum/truncation error and restore nothing; with the
//! original bytes back the restart works and continues exactly.
mod common;
use common::*;
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
