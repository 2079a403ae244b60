//! No one let in (issue #14): images are private to their owner; a checkpoint
//! directory of another user, one others may write into, or an image with a planted
//! symbolic link is refused; the control socket answers only the job's owner; an
//! image of another user's process cannot make a plain user's restart run it as that
//! user. Each case with a second user (the unprivileged test user) against root.
mod common;
use common::*;
use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

/// Every file of a checkpoint is 0600 and every directory 0700, DIR included.
#[test]
fn images_are_private_to_their_owner() {
    let w = Work::new("sec_modes");
    let _ = std::fs::remove_dir(&w.ck); // made by stasis, with its own mode
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    let ck = w.checkpoint_ok(false, s.cur());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&w.ck), 0o700, "{}", w.ck.display());
    assert_eq!(mode(&ck), 0o700, "{}", ck.display());
    let mut n = 0;
    for e in std::fs::read_dir(&ck).unwrap().flatten() {
        assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
        n += 1;
    }
    assert!(n > 3, "only {n} files in {}", ck.display());
    s.finish();
}

/// A plain user's `stasis run` into a directory of root's (writable by all), or into
/// one of their own that others may write into, is refused before the command runs,
/// naming the directory and why.
#[test]
fn foreign_or_shared_checkpoint_dir_is_refused() {
    let (uid, gid, prefix) = unprivileged_user();
    let w = Work::new("sec_dir");
    w.give_to(uid, gid);
    for (label, owner) in [("root's", 0), ("shared", uid)] {
        let d = w.path(&format!("ck-{owner}"));
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(owner), Some(owner)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let marker = w.path(&format!("ran-{owner}"));
        let out = Command::new(&prefix[0])
            .args(&prefix[1..])
            .arg(STASIS)
            .args(["run", "--dir"])
            .arg(&d)
            .args(["--", "/bin/sh", "-c"])
            .arg(format!("touch {}", marker.display()))
            .current_dir(&w.dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{label} dir: stasis run succeeded: {err}"
        );
        let why = if owner == 0 {
            "belongs to uid 0"
        } else {
            "writable by other users"
        };
        assert!(
            err.contains(why) && err.contains(d.to_str().unwrap()),
            "{label} dir: the error should name it and say {why:?}: {err}"
        );
        assert!(!marker.exists(), "{label} dir: the command ran");
    }
}

/// A file of an image replaced by a symbolic link (to a copy with the same bytes, so
/// that every checksum holds), or a checkpoint that is a link to another directory, is
/// refused; with the files back the restart works.
#[test]
fn planted_symbolic_links_are_refused() {
    let w = Work::new("sec_links");
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    let ck = s.checkpoint_kill();
    let meta = ck.join("checkpoint.json");
    let copy = w.path("elsewhere/checkpoint.json");
    std::fs::rename(&meta, &copy).unwrap();
    std::os::unix::fs::symlink(&copy, &meta).unwrap();
    let mut r = w.restart("restart-link");
    let st = r.wait(T_CMD);
    assert!(!st.success(), "a planted link was followed: {}", r.diag());
    assert!(r.stderr().contains("symbolic link"), "{}", r.stderr());
    std::fs::remove_file(&meta).unwrap();
    std::fs::rename(&copy, &meta).unwrap();
    // A checkpoint that is a link to a directory elsewhere.
    let other = w.path("elsewhere/checkpoint-000009");
    std::fs::create_dir(&other).unwrap();
    std::os::unix::fs::symlink(&other, w.ck.join("checkpoint-000009")).unwrap();
    let mut r = w.restart("restart-dirlink");
    let st = r.wait(T_CMD);
    assert!(
        !st.success(),
        "a planted checkpoint link was followed: {}",
        r.diag()
    );
    assert!(r.stderr().contains("symbolic link"), "{}", r.stderr());
    std::fs::remove_file(w.ck.join("checkpoint-000009")).unwrap();
    s.restart(Probe::Ticks);
    s.finish();
    verify_counter(&s.outputs(), Some(0));
}

/// `stasis checkpoint DIR` of another user's job is refused by the job's control
/// socket (both ways: the plain user asking root's job, root asking the plain user's),
/// and the job runs on without a new checkpoint.
#[test]
fn control_socket_answers_only_the_jobs_owner() {
    let (uid, gid, prefix) = unprivileged_user();
    // Root's job, the user asks.
    let w = Work::new("sec_ctl_root");
    std::fs::set_permissions(&w.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    let out = Command::new(&prefix[0])
        .args(&prefix[1..])
        .arg(STASIS)
        .arg("checkpoint")
        .arg(&w.ck)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the user checkpointed root's job: {err}"
    );
    assert!(w.checkpoints().is_empty(), "a checkpoint appeared");
    s.cur().wait_more_ticks(2, T_READY);
    s.finish();
    // The user's job, root asks.
    let mut w = Work::new("sec_ctl_user");
    let bin = w.path("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    w.stasis = install(Path::new(STASIS), &bin, "stasis");
    let exe = install(&prog("counter"), &bin, "counter");
    w.give_to(uid, gid);
    w.prefix = prefix;
    let mut s = Session::start(&w, &[exe.as_os_str()]);
    s.cur().wait_tick(3, T_READY);
    let out = Command::new(STASIS)
        .arg("checkpoint")
        .arg(&w.ck)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "root checkpointed the user's job: {err}"
    );
    assert!(err.contains("not the owner"), "{err}");
    assert!(w.checkpoints().is_empty(), "a checkpoint appeared");
    s.cur().wait_more_ticks(2, T_READY);
    s.finish();
}

/// An image of a process that ran as root (`checkpoint --pid` by root), handed to a
/// plain user (files chowned to them), does not restart as root or at all: the user's
/// restart fails naming the IDs, and nothing runs.
#[test]
fn image_of_roots_process_cannot_run_as_root() {
    let (uid, gid, prefix) = unprivileged_user();
    let w = Work::new("sec_ids");
    let mut app = {
        let mut cmd = Command::new(prog("counter"));
        cmd.current_dir(&w.dir);
        w.spawn("direct", cmd, Stdio::null())
    };
    app.wait_tick(3, T_READY);
    let pid = app.pid().to_string();
    let args: Vec<&OsStr> = vec![
        "checkpoint".as_ref(),
        "--pid".as_ref(),
        pid.as_ref(),
        "--dir".as_ref(),
        w.ck.as_os_str(),
        "--kill".as_ref(),
    ];
    let r = w.stasis("ckpt-pid", &args);
    assert!(r.status.success(), "{r}");
    app.wait(T_CMD);
    // Hand everything to the user.
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(&w.dir)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::set_permissions(&w.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(&prefix[0])
        .args(&prefix[1..])
        .arg(STASIS)
        .arg("restart")
        .arg(&w.ck)
        .current_dir(w.path("elsewhere"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "the user restarted root's process: {err}"
    );
    assert!(
        err.contains("uid 0"),
        "the error should name the IDs: {err}"
    );
    assert!(ticks(&text).is_empty(), "it ran: {text}");
    assert!(
        procs_in(&w.dir).is_empty(),
        "processes left: {:?}",
        procs_in(&w.dir)
    );
}
