//! The job's private /tmp and /dev/shm (`stasis run --tmp private`, the default):
//! what a job keeps there comes back after a restart with its metadata (tmpdirs.c: a
//! tree with modes, times, a hard link, a symlink, a FIFO, a sparse file, an
//! appended log kept open, a MAP_SHARED /dev/shm segment, the working directory
//! there), as root and as a plain user; two jobs at once each have their own; the
//! host's /tmp is untouched (and used with `--tmp host`); a checkpoint directory under
//! /tmp still works; a working directory under /tmp is refused with a clear error.
mod common;
use common::*;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// A work dir; with `as_user`, stasis and the program run as the test user.
fn work_for(name: &str, as_user: bool) -> (Work, PathBuf) {
    let mut w = Work::new(name);
    if !as_user {
        return (w, prog("tmpdirs"));
    }
    let (uid, gid, prefix) = unprivileged_user();
    let bin = w.path("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    w.stasis = install(Path::new(STASIS), &bin, "stasis");
    let exe = install(&prog("tmpdirs"), &bin, "tmpdirs");
    w.give_to(uid, gid);
    w.prefix = prefix;
    (w, exe)
}

/// A checkpoint the job survives, two kill/restart cycles and a checkpoint of the
/// restored job; the program checks everything at `go`.
fn cycles(name: &str, as_user: bool) {
    let (w, exe) = work_for(name, as_user);
    let mut s = Session::start(&w, &[exe.as_os_str()]);
    s.cur().wait_tick(3, T_READY);
    w.checkpoint_ok(false, s.cur());
    let meta = w.inspect_json();
    let dirs = meta["private_dirs"]
        .as_array()
        .expect("no private_dirs in the image");
    let tmp = dirs
        .iter()
        .find(|d| d["path"] == "/tmp")
        .expect("no /tmp in the image");
    let names: Vec<&str> = tmp["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    for n in [
        "job/a/data",
        "job/hard",
        "job/sym",
        "job/fifo",
        "job/sparse",
        "job/log",
    ] {
        assert!(
            names.contains(&n),
            "{n} missing from the saved /tmp: {names:?}"
        );
    }
    s.cur().wait_more_ticks(2, T_READY);
    for _ in 0..2 {
        s.checkpoint_kill();
        // Nothing of the job's /tmp is on the host's, before or after.
        assert!(
            !Path::new("/tmp/job/a/data").exists(),
            "the job's /tmp/job is on the host's /tmp"
        );
        s.restart(Probe::Ticks);
    }
    w.checkpoint_ok(false, s.cur());
    s.cur().wait_more_ticks(2, T_READY);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    eprintln!("{name}: {ok}");
}

#[test]
fn private_tmp_and_dev_shm_come_back() {
    cycles("tmp_private", false);
}

#[test]
fn private_tmp_and_dev_shm_come_back_as_unprivileged_user() {
    cycles("tmp_private_user", true);
}

/// Two jobs at once create the same names in /tmp (`/tmp/mark`, `/tmp/job/...`) and
/// /dev/shm, which would collide in a shared one; each is checkpointed, killed and
/// restarted, and each finds its own.
#[test]
fn two_jobs_each_have_their_own_tmp() {
    let w1 = Work::new("tmp_two_a");
    let w2 = Work::new("tmp_two_b");
    let exe = prog("tmpdirs");
    let mut s1 = Session::start(&w1, &[exe.as_os_str(), OsStr::new("mark=first")]);
    let mut s2 = Session::start(&w2, &[exe.as_os_str(), OsStr::new("mark=second")]);
    s1.cur().wait_tick(3, T_READY);
    s2.cur().wait_tick(3, T_READY);
    assert!(
        !Path::new("/tmp/mark").exists(),
        "a job's /tmp/mark is on the host's /tmp"
    );
    s1.cycle(Probe::Ticks);
    s2.cycle(Probe::Ticks);
    let ok1 = s1.finish();
    let ok2 = s2.finish();
    eprintln!("{ok1}; {ok2}");
}

/// `/tmp/NAME` written by the job: on the host's /tmp only with `--tmp host`.
#[test]
fn host_tmp_only_with_tmp_host() {
    for (opt, on_host) in [("private", false), ("host", true)] {
        let mut w = Work::new(&format!("tmp_host_{opt}"));
        let name = format!("/tmp/stasis-tmp-test-{}-{opt}", std::process::id());
        let _ = std::fs::remove_file(&name);
        w.run_opts = vec!["--tmp".into(), opt.into()];
        let mut p = w.run("run", &["/bin/sh", "-c", &format!("echo job > {name}")]);
        p.expect_exit(0, T_CMD);
        assert_eq!(
            Path::new(&name).exists(),
            on_host,
            "--tmp {opt}: {name} on the host: {}",
            Path::new(&name).exists()
        );
        let _ = std::fs::remove_file(&name);
    }
}

/// A checkpoint directory under the host's /tmp is still written there (the init
/// opened it before its own /tmp hid the host's), and the job restarts from it.
#[test]
fn checkpoint_dir_under_host_tmp() {
    let mut w = Work::new("tmp_ckdir");
    let ck = PathBuf::from(format!("/tmp/stasis-ck-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ck);
    w.ck = ck.clone();
    let exe = prog("tmpdirs");
    let mut s = Session::start(&w, &[exe.as_os_str()]);
    s.cur().wait_tick(3, T_READY);
    let path = w.checkpoint_ok(false, s.cur());
    assert!(
        path.starts_with(&ck),
        "{} is not under {}",
        path.display(),
        ck.display()
    );
    assert!(ck
        .join(path.file_name().unwrap())
        .join("checkpoint.json")
        .exists());
    s.cycle(Probe::Ticks);
    let ok = s.finish();
    eprintln!("{ok}");
    let _ = std::fs::remove_dir_all(&ck);
}

/// `stasis run` from a working directory under /tmp is refused, naming it and the
/// way out; with `--tmp host` it runs.
#[test]
fn working_directory_under_tmp_is_refused() {
    let w = Work::new("tmp_cwd");
    let cwd = PathBuf::from(format!("/tmp/stasis-cwd-test-{}", std::process::id()));
    std::fs::create_dir_all(&cwd).unwrap();
    for (opt, ok) in [("private", false), ("host", true)] {
        let mut cmd = w.stasis_cmd(&[
            "run".as_ref(),
            "--fresh".as_ref(),
            "--dir".as_ref(),
            w.ck.as_os_str(),
            "--tmp".as_ref(),
            opt.as_ref(),
            "--".as_ref(),
            "/bin/true".as_ref(),
        ]);
        cmd.current_dir(&cwd);
        let mut p = w.spawn(&format!("cwd-{opt}"), cmd, Stdio::null());
        let st = p.wait(T_CMD);
        assert_eq!(
            st.success(),
            ok,
            "--tmp {opt}: {}\n{}",
            status_str(&st),
            p.stderr()
        );
        if !ok {
            let err = p.stderr();
            assert!(
                err.contains(cwd.to_str().unwrap()) && err.contains("--tmp host"),
                "the error should name the directory and --tmp host: {err}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&cwd);
}
