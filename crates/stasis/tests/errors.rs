//! Refused checkpoints: unsupported resources (unsupported.c: a netlink socket; pipes,
//! UNIX sockets, a UDP socket and shared memory are supported since process trees and are checked
//! here to survive), a held
//! DIR/.lock, concurrent checkpoint requests, and commands without a
//! supervisor/checkpoint. In every case the application must keep running
//! unharmed and nothing may be published.
mod common;
use common::*;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// The app holds `kind`; checkpoint and checkpoint --kill are refused with an
/// error naming it, nothing is published, the app keeps ticking; once it
/// releases the resource a checkpoint --kill/restart works with exact
/// continuity.
fn unsupported(kind: &str, word: Option<&str>) {
    let w = Work::new(&format!("unsup_{kind}"));
    let mut s = Session::start(&w, &[prog("unsupported").as_os_str(), OsStr::new(kind)]);
    let ready = s.cur().lines()[0].clone();
    let fds: Vec<i64> = ready
        .split("fds=")
        .nth(1)
        .unwrap()
        .split(',')
        .map(|x| x.trim().parse().unwrap())
        .filter(|x| *x >= 0)
        .collect();
    s.cur().wait_tick(3, T_READY);
    for kill in [false, true] {
        let before = s.cur().last_tick().unwrap();
        let r = w.checkpoint(kill);
        assert!(
            !r.status.success(),
            "checkpoint of an app holding a {kind} succeeded: {r}"
        );
        let err = r.stderr.to_lowercase();
        eprintln!("{kind} (kill={kill}): {}", r.stderr.trim());
        assert!(
            !err.trim().is_empty(),
            "refused checkpoint without an error message: {r}"
        );
        if let Some(word) = word {
            assert!(err.contains(word), "error does not mention {word:?}: {r}");
            assert!(
                fds.iter().any(|fd| mentions_number(&err, *fd)),
                "error does not name the fd ({fds:?}): {r}"
            );
        }
        assert!(
            w.checkpoints().is_empty(),
            "a checkpoint was published: {:?}",
            w.checkpoints()
        );
        // still alive and ticking
        let after = s.cur().wait_more_ticks(5, T_READY);
        assert!(after > before);
        assert!(
            s.cur().running(),
            "stasis run exited after a refused checkpoint\n{}",
            s.diag()
        );
    }
    // drop the resource; now it can be checkpointed
    std::fs::write(w.path("release"), b"").unwrap();
    s.cur()
        .wait_line("`released`", T_READY, |l| l == "released");
    s.cur().wait_more_ticks(3, T_READY);
    s.cycle(Probe::Ticks);
    let ok = s.finish();
    let t = assert_ticks_consecutive(&s.outputs(), Some(0));
    assert_eq!(ok, format!("OK ticks={} released=1", t.last().unwrap() + 1));
}

/// A seccomp filter cannot be restored (and could kill the process for a syscall
/// stasis injects): refused before anything is injected, with an error naming it,
/// plain and with --kill; the application keeps ticking and finishes on its own.
#[test]
fn seccomp_filter_is_refused_and_app_survives() {
    let w = Work::new("unsup_seccomp");
    let mut s = Session::start(
        &w,
        &[prog("unsupported").as_os_str(), OsStr::new("seccomp")],
    );
    s.cur().wait_tick(3, T_READY);
    for kill in [false, true] {
        let before = s.cur().last_tick().unwrap();
        let r = w.checkpoint(kill);
        assert!(
            !r.status.success(),
            "checkpoint of a seccomp-filtered app succeeded: {r}"
        );
        assert!(
            r.stderr.contains("seccomp") && r.stderr.contains("keeps running"),
            "the error should name the seccomp filter and say the app runs on: {r}"
        );
        assert!(w.checkpoints().is_empty(), "a checkpoint was published");
        let after = s.cur().wait_more_ticks(5, T_READY);
        assert!(after > before && s.cur().running(), "{}", s.diag());
    }
    let ok = s.finish();
    let t = assert_ticks_consecutive(&s.outputs(), Some(0));
    assert_eq!(ok, format!("OK ticks={} released=0", t.last().unwrap() + 1));
}

/// Netlink sockets are not supported: refused, naming the fd.
#[test]
fn netlink_socket_is_refused_and_app_survives() {
    unsupported("netlink", Some("netlink socket"));
}

/// A connected UDP socket over loopback (once refused) is saved and restored.
#[test]
fn udp_socket_survives() {
    survives("inet");
}

/// The app holds `kind`, which stasis now supports: it survives two kill/restart
/// cycles and still works (the program checks it on `release`).
fn survives(kind: &str) {
    let w = Work::new(&format!("{kind}_ok"));
    let mut s = Session::start(&w, &[prog("unsupported").as_os_str(), OsStr::new(kind)]);
    s.cur().wait_tick(3, T_READY);
    s.cycle(Probe::Ticks);
    s.cycle(Probe::Ticks);
    std::fs::write(w.path("release"), b"").unwrap();
    s.cur()
        .wait_line("`released`", T_READY, |l| l == "released");
    let ok = s.finish();
    let t = assert_ticks_consecutive(&s.outputs(), Some(0));
    assert_eq!(ok, format!("OK ticks={} released=1", t.last().unwrap() + 1));
}

/// The 1 MiB MAP_SHARED|MAP_ANONYMOUS mapping keeps every byte (checked on release).
#[test]
fn shared_anonymous_mapping_survives() {
    survives("shmem");
}

/// A UNIX socketpair still carries a ping both ways after two restarts.
#[test]
fn unix_socketpair_survives() {
    survives("socket");
}

fn flock(path: &std::path::Path) -> i32 {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: opening a path held in a live CString.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
            0o644,
        )
    };
    assert!(
        fd >= 0,
        "open {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: flock on the descriptor just opened.
    let r = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(
        r,
        0,
        "cannot flock {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    fd
}

/// Someone holds DIR/.lock (a checkpoint being written): a checkpoint asked for
/// meanwhile waits, publishing nothing, while the app runs on; once the lock is
/// released it is taken.
#[test]
fn held_lock_makes_checkpoint_wait() {
    let w = Work::new("lock");
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    let fd = flock(&w.ck.join(".lock"));
    let args: Vec<&OsStr> = vec!["checkpoint".as_ref(), w.ck.as_os_str()];
    let mut c = w.spawn(
        "ckpt-waiting",
        w.stasis_cmd(&args),
        std::process::Stdio::null(),
    );
    s.cur().wait_more_ticks(10, T_READY);
    assert!(
        c.running(),
        "the checkpoint did not wait for the lock:\n{}",
        c.diag()
    );
    assert!(
        w.checkpoints().is_empty(),
        "published {:?}",
        w.checkpoints()
    );
    // SAFETY: closing the descriptor we opened.
    unsafe { libc::close(fd) };
    let st = c.wait(T_CMD);
    assert!(st.success(), "the waiting checkpoint failed:\n{}", c.diag());
    assert_eq!(w.checkpoints().len(), 1, "{:?}", w.checkpoints());
    s.cycle(Probe::Ticks);
    s.finish();
    verify_counter(&s.outputs(), Some(0));
}

/// Two checkpoint requests at the same time are taken one after the other: both
/// succeed, two checkpoints appear; the app is unharmed.
#[test]
fn concurrent_checkpoints() {
    let w = Work::new("concurrent");
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    for _round in 0..3 {
        let before = w.checkpoints();
        let args: Vec<&OsStr> = vec!["checkpoint".as_ref(), w.ck.as_os_str()];
        let mut a = w.spawn("ckpt-a", w.stasis_cmd(&args), std::process::Stdio::null());
        let mut b = w.spawn("ckpt-b", w.stasis_cmd(&args), std::process::Stdio::null());
        let (sa, sb) = (a.wait(T_CMD), b.wait(T_CMD));
        assert!(sa.success(), "checkpoint a failed:\n{}", a.diag());
        assert!(sb.success(), "checkpoint b failed:\n{}", b.diag());
        new_checkpoints(&before, &w.checkpoints(), 2, "two concurrent checkpoints");
        s.cur().wait_more_ticks(3, T_READY);
    }
    s.cycle(Probe::Ticks);
    s.finish();
    verify_counter(&s.outputs(), Some(0));
}

/// Commands without anything to act on fail cleanly (non-zero, message, no
/// hang).
#[test]
fn commands_without_target_fail_cleanly() {
    let w = Work::new("notarget");
    let r = w.checkpoint(false);
    assert!(
        !r.status.success() && !r.stderr.trim().is_empty(),
        "checkpoint without supervisor: {r}"
    );
    let r = w.checkpoint(true);
    assert!(
        !r.status.success() && !r.stderr.trim().is_empty(),
        "checkpoint --kill without supervisor: {r}"
    );
    assert!(w.checkpoints().is_empty());
    let mut p = w.restart("restart-empty");
    let st = p.wait(T_CMD);
    assert!(
        !st.success() && !p.stderr().trim().is_empty(),
        "restart of an empty dir: {}",
        p.diag()
    );
    let r = w.stasis("inspect-empty", &["inspect".as_ref(), w.ck.as_os_str()]);
    assert!(
        !r.status.success() && !r.stderr.trim().is_empty(),
        "inspect of an empty dir: {r}"
    );
    // --pid of a process that does not exist
    let r = w.stasis(
        "ckpt-nopid",
        &[
            "checkpoint".as_ref(),
            "--pid".as_ref(),
            "999999999".as_ref(),
            "--dir".as_ref(),
            w.ck.as_os_str(),
        ],
    );
    assert!(
        !r.status.success() && !r.stderr.trim().is_empty(),
        "checkpoint --pid of no process: {r}"
    );
    assert!(w.checkpoints().is_empty());
}

/// Consecutive numbers of lines `<prefix> N` in `text`.
fn prefixed_ticks(text: &str, prefix: &str) -> Vec<u64> {
    complete_lines(text)
        .iter()
        .filter_map(|l| l.strip_prefix(prefix).and_then(|r| r.trim().parse().ok()))
        .collect()
}

/// A process with a second thread or a child process: stasis either
/// refuses the checkpoint cleanly (non-zero, message, nothing published, app
/// unharmed) or checkpoints and restores all of it (both tick sequences
/// continue exactly).
fn thread_or_child(kind: &str, other: &str) {
    let w = Work::new(&format!("multi_{kind}"));
    let mut s = Session::start(&w, &[prog("multi").as_os_str(), OsStr::new(kind)]);
    s.cur().wait_tick(3, T_READY);
    let r = w.checkpoint(true);
    if r.status.success() {
        eprintln!("{kind}: checkpoint supported: {}", r.stderr.trim());
        s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
        s.restart(Probe::Ticks);
        let o = format!("{other} ");
        s.cur()
            .wait_line(&format!("`{o}...` after restart"), T_READY, |l| {
                l.starts_with(&o)
            });
        s.finish();
        assert_ticks_consecutive(&s.outputs(), Some(0));
        let mut all = vec![];
        for (_, text) in s.outputs() {
            all.extend(prefixed_ticks(&text, &o));
        }
        for win in all.windows(2) {
            assert_eq!(win[1], win[0] + 1, "{other} sequence broken: {all:?}");
        }
    } else {
        eprintln!("{kind}: refused: {}", r.stderr.trim());
        assert!(
            !r.stderr.trim().is_empty(),
            "refused without a message: {r}"
        );
        assert!(
            w.checkpoints().is_empty(),
            "published {:?}",
            w.checkpoints()
        );
        s.cur().wait_more_ticks(5, T_READY);
        assert!(
            s.cur().running(),
            "app died after a refused checkpoint\n{}",
            s.diag()
        );
        s.finish();
        assert_ticks_consecutive(&s.outputs(), Some(0));
    }
}

#[test]
fn second_thread_is_refused_or_restored() {
    thread_or_child("thread", "wtick");
}

#[test]
fn child_process_is_refused_or_restored() {
    thread_or_child("child", "ctick");
}
