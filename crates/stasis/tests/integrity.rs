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

/// Copies every file of checkpoint `from` into directory `to` (emptied first).
fn copy_checkpoint(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for (f, _) in files_under(from) {
        let rel = f.strip_prefix(from).unwrap();
        if let Some(parent) = rel.parent() {
            std::fs::create_dir_all(to.join(parent)).unwrap();
        }
        std::fs::copy(&f, to.join(rel)).unwrap();
    }
}

/// 100 damaged images, each made from an intact one by one to three random changes
/// (a byte flipped, a file truncated at a random length, garbage appended, a file
/// removed, a file emptied, a digit of the metadata changed, bytes of one file copied
/// over another's): every restart is refused with an error, and nothing runs. Then the
/// intact image restarts and continues exactly.
#[test]
fn hundred_random_damaged_images_are_refused() {
    let w = Work::new("integrity_random");
    let mut rng = Rng::new("integrity_random");
    let mut s = checkpointed_counter(&w);
    let good = w.newest_checkpoint();
    let name = good.file_name().unwrap().to_owned();
    let keep = w.path("intact");
    copy_checkpoint(&good, &keep);
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for round in 0..100 {
        copy_checkpoint(&keep, &good);
        let files: Vec<(PathBuf, u64)> = files_under(&good);
        let mut what = Vec::new();
        for _ in 0..1 + rng.next() % 3 {
            let (f, _) = &files[(rng.next() % files.len() as u64) as usize];
            let mut bytes = std::fs::read(f).unwrap_or_default();
            let kind = match rng.next() % 7 {
                0 if !bytes.is_empty() => {
                    let i = (rng.next() % bytes.len() as u64) as usize;
                    bytes[i] ^= 1 << (rng.next() % 8);
                    "flipped"
                }
                1 if !bytes.is_empty() => {
                    bytes.truncate((rng.next() % bytes.len() as u64) as usize);
                    "truncated"
                }
                2 => {
                    bytes.extend((0..1 + rng.next() % 64).map(|_| rng.next() as u8));
                    "appended"
                }
                3 => {
                    let _ = std::fs::remove_file(f);
                    what.push(format!("removed {}", f.display()));
                    *kinds.entry("removed").or_default() += 1;
                    continue;
                }
                4 => {
                    bytes.clear();
                    "emptied"
                }
                5 if bytes.iter().any(u8::is_ascii_digit) => {
                    let digits: Vec<usize> = (0..bytes.len())
                        .filter(|&i| bytes[i].is_ascii_digit())
                        .collect();
                    let i = digits[(rng.next() % digits.len() as u64) as usize];
                    bytes[i] = b'0' + ((bytes[i] - b'0' + 1 + (rng.next() % 9) as u8) % 10);
                    "digit changed"
                }
                _ => {
                    let (g, _) = &files[(rng.next() % files.len() as u64) as usize];
                    if g == f {
                        bytes.push(0);
                        "appended"
                    } else {
                        std::fs::read(g).unwrap_or_default().clone_into(&mut bytes);
                        "replaced by another file"
                    }
                }
            };
            std::fs::write(f, &bytes).unwrap();
            what.push(format!("{kind}: {}", f.display()));
            *kinds.entry(kind).or_default() += 1;
        }
        // Changes can cancel out (appended to an empty file, then emptied): the image
        // must differ from the intact one.
        let same = files_under(&keep).iter().all(|(f, _)| {
            let g = good.join(f.strip_prefix(&keep).unwrap());
            std::fs::read(&g).ok() == std::fs::read(f).ok()
        });
        if same {
            let f = good.join("checkpoint.json");
            let mut bytes = std::fs::read(&f).unwrap();
            bytes[0] ^= 0x20;
            std::fs::write(&f, &bytes).unwrap();
            what.push(format!("flipped: {}", f.display()));
        }
        eprintln!("round {round}: {}", what.join(", "));
        expect_refused(
            &w,
            &format!("round {round}: {}", what.join(", ")),
            &[
                "checksum",
                "corrupt",
                "truncat",
                "missing",
                "no such",
                "damaged",
                "not a checkpoint",
                "no complete checkpoint",
                "size",
            ],
        );
    }
    eprintln!("100 damaged images refused; changes made: {kinds:?}");
    copy_checkpoint(&keep, &good);
    assert_eq!(w.newest_checkpoint().file_name().unwrap(), name);
    s.restart(Probe::Ticks);
    s.finish();
    verify_counter(&s.outputs(), Some(0));
}
