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

/// A file the application had open disappears between checkpoint and
/// restart: restart must fail naming it and restore nothing (not silently
/// create an empty file); once it is back, restart continues exactly.
#[test]
fn missing_open_file_is_refused() {
    let w = Work::new("files_missing");
    let mut s = Session::start(&w, &[prog("files")]);
    s.cur().wait_tick(3, T_READY);
    s.checkpoint_kill();
    if let Err(p) = wait_no_procs_in(&w.dir, std::time::Duration::from_secs(5)) {
        panic!("app alive after checkpoint --kill:\n{}", describe_procs(&p));
    }
    for name in ["out.txt", "in.txt"] {
        std::fs::rename(w.path(name), w.path("moved-away")).unwrap();
        let mut r = w.restart("restart-missing");
        let st = r.wait(T_CMD);
        assert!(
            !st.success() && st.code() != Some(EXIT_CHECKPOINTED),
            "restart without {name}: {}\n{}",
            status_str(&st),
            r.diag()
        );
        assert!(
            r.stderr().contains(name),
            "error does not name {name}:\n{}",
            r.diag()
        );
        eprintln!("{name} missing: {}", r.stderr().trim());
        assert!(r.stdout().is_empty(), "the application ran:\n{}", r.diag());
        assert!(!w.path(name).exists(), "restart created {name}");
        if let Err(p) = wait_no_procs_in(&w.dir, std::time::Duration::from_secs(5)) {
            panic!(
                "processes left after the failed restart:\n{}",
                describe_procs(&p)
            );
        }
        std::fs::rename(w.path("moved-away"), w.path(name)).unwrap();
    }
    s.restart(Probe::Ticks);
    let ok = s.finish();
    let t = assert_ticks_consecutive(&s.outputs(), Some(0));
    let n = t.last().unwrap() + 1;
    assert_eq!(ok, format!("OK ticks={n}"));
    expect_lines(&w.read("out.txt"), "line", n, "out.txt");
}
