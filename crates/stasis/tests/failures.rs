//! Nothing lost when things go wrong (issue #14): a checkpoint that cannot finish
//! (a read-only or vanished directory) returns a clear error while the job runs on
//! and the last good checkpoint stays; a restart that fails part-way (a process's
//! mapped file changed on disk, in a tree whose other processes were already made)
//! leaves no process running and says why; two `stasis run` on one directory: the
//! second is refused and the first's checkpoints are untouched.
mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// A plain user's `checkpoint --pid` into a checkpoint directory that turned
/// read-only: the checkpoint fails naming the directory and why, the process runs on,
/// the earlier checkpoint is still the newest. (Under `stasis run` the init holds
/// CAP_DAC_OVERRIDE over the user's own files in the job's user namespace, so a mode
/// does not stop it; a read-only file system would.)
#[test]
fn read_only_directory_fails_cleanly() {
    let (uid, gid, prefix) = unprivileged_user();
    let w = Work::new("fail_ro");
    let bin = w.path("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stasis = install(Path::new(STASIS), &bin, "stasis");
    let exe = install(&prog("counter"), &bin, "counter");
    w.give_to(uid, gid);
    let mut cmd = std::process::Command::new(&prefix[0]);
    cmd.args(&prefix[1..]).arg(&exe).current_dir(&w.dir);
    let mut app = w.spawn_io("direct", cmd, std::process::Stdio::null(), true);
    app.wait_tick(3, T_READY);
    let ck = |label: &str| {
        let out = std::process::Command::new(&prefix[0])
            .args(&prefix[1..])
            .arg(&stasis)
            .args(["checkpoint", "--pid", &app.pid().to_string(), "--dir"])
            .arg(&w.ck)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
            label.to_string(),
        )
    };
    let (ok, err, _) = ck("first");
    assert!(ok, "{err}");
    let good = w.newest_checkpoint();
    std::fs::set_permissions(&w.ck, std::fs::Permissions::from_mode(0o500)).unwrap();
    let (ok, err, _) = ck("read-only");
    std::fs::set_permissions(&w.ck, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(
        !ok,
        "a checkpoint into a read-only directory succeeded: {err}"
    );
    assert!(
        err.contains(w.ck.to_str().unwrap()) && err.contains("ermission denied"),
        "the error should name the directory and why: {err}"
    );
    app.wait_more_ticks(3, T_READY);
    assert_eq!(w.newest_checkpoint(), good, "the newest checkpoint changed");
    app.kill();
}

/// The checkpoint directory of a job that checkpoints every second removed, and a
/// file put in its place: each periodic checkpoint fails with an error, the job runs
/// on and finishes. (A directory merely removed is made again by the next one.)
#[test]
fn vanished_directory_fails_cleanly() {
    let mut w = Work::new("fail_gone");
    w.run_opts = vec!["--interval".into(), "1".into()];
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    std::fs::remove_dir_all(&w.ck).unwrap();
    std::fs::write(&w.ck, b"not a directory").unwrap();
    let t0 = std::time::Instant::now();
    while !s.cur().stderr().contains("checkpoint failed") {
        assert!(t0.elapsed() < T_READY, "no failure reported:\n{}", s.diag());
        std::thread::sleep(Duration::from_millis(50));
    }
    s.cur().wait_more_ticks(5, T_READY);
    let ok = s.finish();
    verify_counter(&s.outputs(), Some(0));
    eprintln!("{ok}; {}", s.cur().stderr().lines().last().unwrap_or(""));
}

/// A tree (ring.c: a parent and 4 children) whose executable changed on disk after
/// the checkpoint (rebuilt): the restart fails while its processes are being made,
/// names the file, and leaves none of them running; with the executable back the
/// same checkpoint restarts and the ring goes on.
#[test]
fn restart_failing_part_way_leaves_nothing() {
    let w = Work::new("fail_partway");
    let exe = install(&prog("ring"), &w.dir, "ring");
    let mut s = Session::start(&w, &[exe.as_os_str(), "4".as_ref()]);
    s.cur().wait_tick(3, T_READY);
    s.checkpoint_kill();
    // The executable changes on disk (rebuilt): its mappings no longer match.
    let orig = std::fs::read(&exe).unwrap();
    let mtime = std::fs::metadata(&exe).unwrap().modified().unwrap();
    std::fs::remove_file(&exe).unwrap();
    let mut changed = orig.clone();
    changed.extend_from_slice(&[0u8; 4096]);
    std::fs::write(&exe, &changed).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut r = w.restart("restart-changed");
    let st = r.wait(T_CMD);
    let err = r.stderr();
    assert!(
        !st.success(),
        "restart with a changed executable succeeded:\n{}",
        r.diag()
    );
    assert!(
        err.contains("ring"),
        "the error should name the file: {err}"
    );
    assert!(
        wait_no_procs_in(&w.dir, Duration::from_secs(5)).is_ok(),
        "processes left running: {}",
        describe_procs(&procs_in(&w.dir))
    );
    // With the executable back (bytes and time) the same checkpoint restarts.
    std::fs::remove_file(&exe).unwrap();
    std::fs::write(&exe, &orig).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&exe)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    eprintln!("refused: {}", err.trim());
    s.restart(Probe::Ticks);
    s.finish();
}

/// A second `stasis run --dir DIR` while the first runs is refused before starting
/// anything; the first job and its checkpoints are untouched.
#[test]
fn second_run_on_one_directory_is_refused() {
    let w = Work::new("fail_two_runs");
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    let first = w.checkpoint_ok(false, s.cur());
    let marker = w.path("second-ran");
    let mut p = w.run(
        "second",
        &["/bin/sh", "-c", &format!("touch {}", marker.display())],
    );
    let st = p.wait(T_CMD);
    assert!(!st.success(), "the second run started: {}", p.diag());
    assert!(p.stderr().contains("already"), "{}", p.stderr());
    assert!(!marker.exists(), "the second run's command ran");
    assert_eq!(w.checkpoints().len(), 1);
    assert_eq!(w.newest_checkpoint(), first);
    s.cur().wait_more_ticks(3, T_READY);
    s.cycle(Probe::Ticks);
    s.finish();
    verify_counter(&s.outputs(), Some(0));
}

/// A checkpoint asked for while a restart is still restoring the job (memory.c: 80
/// MiB and more to map and fill) waits until the job runs, then is taken: both
/// succeed, the job goes on and finishes right.
#[test]
fn checkpoint_during_restart_waits() {
    let w = Work::new("fail_during_restart");
    let mut s = Session::start(&w, &[prog("memory")]);
    s.checkpoint_kill();
    let restart = w.restart("restart-busy");
    // As soon as the restart listens (its supervisor binds the control socket before
    // the init verifies and restores the image), not before: a request before that
    // is refused clearly ("no `stasis run` or `stasis restart` is supervising").
    let t0 = std::time::Instant::now();
    loop {
        let st = w.stasis(
            "status",
            &["status".as_ref(), "--json".as_ref(), w.ck.as_os_str()],
        );
        if st.stdout.contains("\"running\": true") {
            break;
        }
        assert!(t0.elapsed() < T_READY, "the restart never listened: {st}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = std::time::Instant::now();
    let c = w.checkpoint(false);
    assert!(c.status.success(), "{c}");
    assert_eq!(w.checkpoints().len(), 2, "{:?}", w.checkpoints());
    eprintln!(
        "checkpoint asked for as the restart began, answered after {:.0} ms: {}",
        t0.elapsed().as_secs_f64() * 1e3,
        c.stderr.trim()
    );
    let mut s = Session::from_proc(&w, restart);
    let ok = s.finish();
    eprintln!("{ok}");
}
