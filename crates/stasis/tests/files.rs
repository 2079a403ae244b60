//! Regular files opened by the application (files.c): reopened at the same
//! path, offset and flags; O_APPEND kept; an unlinked-but-open file keeps its
//! content.
mod common;
use common::*;

fn expect_lines(text: &str, prefix: &str, n: u64, file: &str) {
    let mut want = String::new();
    for k in 0..n {
        want.push_str(&format!("{prefix} {k}\n"));
    }
    want.push_str("end\n");
    if text != want {
        let got: Vec<&str> = text.lines().collect();
        let exp: Vec<&str> = want.lines().collect();
        let i = got
            .iter()
            .zip(&exp)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(exp.len()));
        panic!(
            "{file}: {} lines, want {}; first difference at line {i}: {:?} vs {:?}",
            got.len(),
            exp.len(),
            got.get(i),
            exp.get(i)
        );
    }
}

#[test]
fn open_files_continue_after_restart() {
    let w = Work::new("files");
    let mut s = Session::start(&w, &[prog("files")]);
    s.cur().wait_tick(5, T_READY);
    s.cycle(Probe::Ticks);
    s.cycle(Probe::Ticks);
    let ok = s.finish();
    s.assert_no_rerun();
    let t = assert_ticks_consecutive(&s.outputs(), Some(0));
    let n = t.last().unwrap() + 1;
    assert_eq!(ok, format!("OK ticks={n}"));
    // check the files from the outside too
    expect_lines(&w.read("out.txt"), "line", n, "out.txt");
    expect_lines(&w.read("app.txt"), "app", n, "app.txt");
    assert!(
        !w.path("gone.txt").exists(),
        "unlinked file reappeared in the work dir"
    );
}
