//! File locks across checkpoint/restart: POSIX record locks (fcntl F_SETLK),
//! open-file-description locks (F_OFD_SETLK) and flock(2).
//!
//! * `locks.c`: one process holding a POSIX write lock on a range and a read
//!   lock to EOF, OFD write and read locks through two other descriptions of
//!   the same (also mapped) file, and flocks (exclusive through a dup'ed fd,
//!   shared) on two more files.
//! * `lockwait.c`: a parent and a child holding POSIX locks on different
//!   ranges of one file (and a shared read range), and a second child blocked
//!   in F_SETLKW on the parent's range, which gets it only when the parent
//!   releases it at `go`.
//! * Refusals: a lease (F_SETLEASE) and a flock held only through a memory
//!   mapping (its fd closed) fail the checkpoint with an error naming the
//!   process and the file; the job runs on with its lock.
//!
//! Each workload takes checkpoints without --kill at random moments (seed
//! printed; STASIS_TEST_SEED repeats it) and then checkpoint --kill / restart
//! cycles; after every checkpoint and restart the program checks its locks on
//! request (file `check`: forked probes with F_OFD_GETLK and flock LOCK_NB see
//! every range with its owner), every image's `locks` are compared with what
//! the program holds, and at `go` the programs check the owners (closing or
//! unlocking releases exactly what that owner held). Run as the user running
//! the tests and as the unprivileged `stasis-test` user, under `stasis run`
//! and through `checkpoint --pid`.
mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A work dir for test `name` and the paths of the programs `progs`; with
/// `as_user`, everything belongs to and runs as the unprivileged test user
/// (returns its uid then). As in tests/inet.rs.
fn work(name: &str, as_user: bool, progs: &[&str]) -> (Work, Vec<PathBuf>, Option<u32>) {
    if !as_user {
        let w = Work::new(name);
        return (w, progs.iter().map(|p| prog(p)).collect(), None);
    }
    let (uid, gid, prefix) = unprivileged_user();
    let mut w = Work::new(name);
    let bin = w.path("bin");
    fs::create_dir(&bin).unwrap();
    fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    w.stasis = install(Path::new(STASIS), &bin, "stasis");
    let exes = progs.iter().map(|p| install(&prog(p), &bin, p)).collect();
    w.give_to(uid, gid);
    w.prefix = prefix;
    (w, exes, Some(uid))
}

/// pid -> process object of the image.
fn image_procs(meta: &Value) -> BTreeMap<i32, &Value> {
    meta["processes"]
        .as_array()
        .expect("no processes array in inspect --json")
        .iter()
        .map(|p| (num(p, "pid") as i32, p))
        .collect()
}

/// The `locks` of process `p` of the image, sorted, as compact JSON.
fn image_locks(p: &Value) -> Vec<String> {
    let mut v: Vec<String> = p["locks"]
        .as_array()
        .map(|a| a.iter().map(|l| l.to_string()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A lock as the image holds it.
fn lock(fd: u64, kind: &str, write: bool, start: u64, end: Option<u64>) -> String {
    let mut l = json!({"fd": fd, "kind": kind, "write": write, "start": start});
    if let Some(e) = end {
        l["end"] = json!(e);
    }
    l.to_string()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Makes the program verify its locks (file `check`) and waits for its
/// `checked ...` answer, which must be `checked ok`.
fn check_now(w: &Work, p: &mut Proc, what: &str) {
    let n = p
        .lines()
        .iter()
        .filter(|l| l.starts_with("checked"))
        .count();
    fs::write(w.path("check"), b"").unwrap();
    let t0 = Instant::now();
    loop {
        let lines: Vec<String> = p
            .lines()
            .into_iter()
            .filter(|l| l.starts_with("checked"))
            .collect();
        if lines.len() > n {
            assert_eq!(lines[n], "checked ok", "{what}\n{}", p.diag());
            return;
        }
        if p.try_status().is_some() || t0.elapsed() > T_READY {
            let d = p.diag();
            panic!("{what}: no answer to `check`\n{d}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `plain` checkpoints without --kill, then `kills` checkpoint --kill /
/// restart cycles, at random moments; `check_image` sees every image; the
/// program checks its locks after each checkpoint and restart.
fn cycles(
    s: &mut Session,
    rng: &mut Rng,
    plain: usize,
    kills: usize,
    check_image: impl Fn(&Value, &str),
) {
    let w = s.w;
    for i in 0..plain + kills {
        rng.sleep_ms(20, 300);
        let kill = i >= plain;
        let what = format!("checkpoint #{i} (kill={kill})");
        if kill {
            s.checkpoint_kill();
        } else {
            w.checkpoint_ok(false, s.cur());
        }
        check_image(&w.inspect_json(), &what);
        if kill {
            s.restart(Probe::Ticks);
        } else {
            s.cur().wait_more_ticks(3, T_READY);
        }
        check_now(w, s.cur(), &format!("after {what}"));
    }
}

// ---------------------------------------------------------------------------
// 1: one process, every kind of lock
// ---------------------------------------------------------------------------

/// The locks locks.c holds, by its ready line (`a=.. b=.. ...`): D and its dup
/// E share one description, whose flock is recorded once (on D, the lower fd).
fn expected_single(ready: &str) -> Vec<String> {
    let f = |k: &str| field_num(ready, k);
    sorted(vec![
        lock(f("a"), "posix", true, 10, Some(29)),
        lock(f("a"), "posix", false, 100, None),
        lock(f("b"), "ofd", true, 50, Some(59)),
        lock(f("c"), "ofd", false, 60, Some(69)),
        lock(f("d").min(f("e")), "flock", true, 0, None),
        lock(f("f"), "flock", false, 0, None),
    ])
}

fn single_cycles(name: &str, as_user: bool) {
    let t0 = Instant::now();
    let (w, exes, uid) = work(name, as_user, &["locks"]);
    let mut rng = Rng::new(name);
    let mut s = Session::start(&w, &[exes[0].as_os_str()]);
    let ready = s.cur().lines()[0].clone();
    let pid = field_num(&ready, "pid") as i32;
    let want = expected_single(&ready);
    s.cur().wait_tick(3, T_READY);
    if let Some(uid) = uid {
        assert_tree_runs_as(&w, &exes[0], 1, uid);
    }
    cycles(&mut s, &mut rng, 2, 3, |meta, what| {
        let procs = image_procs(meta);
        assert_eq!(procs.len(), 1, "{what}: {:?}", procs.keys());
        assert_eq!(image_locks(procs[&pid]), want, "{what}: locks of {pid}");
    });
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

/// (1) POSIX write and read (to EOF) locks, OFD write and read locks through
/// two more descriptions of the same mapped file, an exclusive flock through
/// two dup'ed fds and a shared one: the image records each once with its fd,
/// they are held after checkpoints without --kill and after three restarts
/// (probed from other processes: same ranges, types and owners), and at `go`
/// each is released by exactly its owner (the POSIX ones by the process, the
/// OFD ones by their description, the flock when the last fd of its
/// description closes).
#[test]
fn one_process_holds_every_kind_of_lock() {
    single_cycles("locks_single", false);
}

#[test]
fn one_process_holds_every_kind_of_lock_as_unprivileged_user() {
    single_cycles("locks_single_user", true);
}

// ---------------------------------------------------------------------------
// 2: a tree: two owners on one file and a blocked waiter
// ---------------------------------------------------------------------------

fn tree_cycles(name: &str, as_user: bool) {
    let t0 = Instant::now();
    let (w, exes, uid) = work(name, as_user, &["lockwait"]);
    let mut rng = Rng::new(name);
    let mut s = Session::start(&w, &[exes[0].as_os_str()]);
    let ready = s.cur().lines()[0].clone();
    let parent = field_num(&ready, "parent") as i32;
    let c1 = field_num(&ready, "c1") as i32;
    let c2 = field_num(&ready, "c2") as i32;
    s.cur().wait_tick(3, T_READY);
    if let Some(uid) = uid {
        assert_tree_runs_as(&w, &exes[0], 3, uid);
    }
    cycles(&mut s, &mut rng, 2, 3, |meta, what| {
        let procs = image_procs(meta);
        let pids: Vec<i32> = procs.keys().copied().collect();
        let mut all = vec![parent, c1, c2];
        all.sort();
        assert_eq!(pids, all, "{what}: processes");
        assert_eq!(
            image_locks(procs[&parent]),
            sorted(vec![
                lock(3, "posix", true, 0, Some(99)),
                lock(3, "posix", false, 200, Some(299)),
            ]),
            "{what}: locks of the parent {parent}"
        );
        assert_eq!(
            image_locks(procs[&c1]),
            sorted(vec![
                lock(3, "posix", true, 100, Some(199)),
                lock(3, "posix", false, 200, Some(299)),
            ]),
            "{what}: locks of child 1 ({c1}), through the parent's description"
        );
        assert!(
            image_locks(procs[&c2]).is_empty(),
            "{what}: child 2 ({c2}) only waits, it holds nothing: {:?}",
            image_locks(procs[&c2])
        );
        // the waiter was stopped inside fcntl(F_SETLKW), to be run again
        let t = &procs[&c2]["threads"][0]["regs"];
        assert_eq!(
            t["orig_rax"].as_i64(),
            Some(libc::SYS_fcntl),
            "{what}: child 2 is not in fcntl: {t}"
        );
    });
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

/// (2) A parent and a child hold POSIX locks on different ranges of one file
/// (the child through the description it inherited) and both a read lock on
/// a third range; a second child waits in F_SETLKW for the parent's range.
/// Proves: each process's locks are recorded on it (child 2 none, stopped in
/// fcntl), are held by the same owners after checkpoints without --kill and
/// three restarts, the waiter waits again after each (/proc/locks shows it,
/// it never got the range early), and it gets the range when the parent
/// releases it at `go`.
#[test]
fn tree_locks_and_a_blocked_waiter() {
    tree_cycles("locks_tree", false);
}

#[test]
fn tree_locks_and_a_blocked_waiter_as_unprivileged_user() {
    tree_cycles("locks_tree_user", true);
}

// ---------------------------------------------------------------------------
// 3: checkpoint --pid of a process not started by stasis
// ---------------------------------------------------------------------------

/// (3) locks.c started outside stasis: `checkpoint --pid` without --kill (it
/// runs on with its locks), then with --kill; `stasis restart` brings it back
/// under stasis with every lock, and a further checkpoint --kill / restart
/// keeps them.
#[test]
fn locks_through_checkpoint_pid() {
    let t0 = Instant::now();
    let name = "locks_pid";
    let w = Work::new(name);
    let mut cmd = Command::new(prog("locks"));
    cmd.current_dir(&w.dir).process_group(0);
    let app = w.spawn_io("direct", cmd, Stdio::null(), true);
    let mut s = Session::from_proc(&w, app);
    s.cur().wait_ready();
    let ready = s.cur().lines()[0].clone();
    let pid = field_num(&ready, "pid") as i32;
    let want = expected_single(&ready);
    s.cur().wait_tick(3, T_READY);
    let pid_s = pid.to_string();
    for kill in [false, true] {
        let mut a: Vec<&OsStr> = vec![
            "checkpoint".as_ref(),
            "--pid".as_ref(),
            pid_s.as_ref(),
            "--dir".as_ref(),
            w.ck.as_os_str(),
        ];
        if kill {
            a.push("--kill".as_ref());
        }
        let r = w.stasis("ckpt-pid", &a);
        assert!(r.status.success(), "{r}\n{}", s.diag());
        let meta = w.inspect_json();
        assert_eq!(
            image_locks(image_procs(&meta)[&pid]),
            want,
            "--pid (kill={kill})"
        );
        if !kill {
            s.cur().wait_more_ticks(3, T_READY);
            check_now(&w, s.cur(), "after checkpoint --pid");
        }
    }
    s.cur().wait(T_CMD);
    s.restart(Probe::Ticks);
    check_now(&w, s.cur(), "after the restart of the --pid image");
    s.checkpoint_kill();
    assert_eq!(
        image_locks(image_procs(&w.inspect_json())[&pid]),
        want,
        "under the restarted supervisor"
    );
    s.restart(Probe::Ticks);
    check_now(&w, s.cur(), "after the second restart");
    let ok = s.finish();
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

// ---------------------------------------------------------------------------
// 4: refusals
// ---------------------------------------------------------------------------

fn refused(mode: &str, file: &str, as_user: bool) {
    let name = format!("locks_refused_{mode}{}", if as_user { "_user" } else { "" });
    let (w, exes, _) = work(&name, as_user, &["locks"]);
    let mut s = Session::start(&w, &[exes[0].as_os_str(), mode.as_ref()]);
    let ready = s.cur().lines()[0].clone();
    let pid = field_num(&ready, "pid") as i64;
    s.cur().wait_tick(3, T_READY);
    for kill in [false, true] {
        let what = format!("{mode} (kill={kill})");
        let r = w.checkpoint(kill);
        eprintln!("{what}: {}", r.stderr.trim());
        assert!(!r.status.success(), "{what}: checkpoint succeeded: {r}");
        assert!(
            mentions_number(&r.stderr, pid) && r.stderr.contains(file),
            "{what}: the error names neither process {pid} nor {file}: {r}"
        );
        assert!(w.checkpoints().is_empty(), "{what}: {:?}", w.checkpoints());
        s.cur().wait_more_ticks(5, T_READY);
        assert!(s.cur().running(), "{what}: the job died\n{}", s.diag());
    }
    s.finish();
}

/// (4) A read lease (F_SETLEASE) cannot be taken back at restart (another
/// program's open would have broken it meanwhile): checkpoint and checkpoint
/// --kill are refused with an error naming the process, the fd and the file;
/// nothing is published and the job runs on with its lease.
#[test]
fn a_lease_is_refused() {
    refused("lease", "lease.dat", false);
}

#[test]
fn a_lease_is_refused_as_unprivileged_user() {
    refused("lease", "lease.dat", true);
}

/// (5) A flock whose description only a memory mapping keeps (the fd closed), as
/// the JVM does with its perfdata file: the image records it against the mapped
/// file, the restore takes it on the file the mapping is made from; after a
/// checkpoint and two checkpoint --kill/restart cycles another process still cannot
/// take the file, and the mapping still carries the program's stamps.
fn mapped_cycles(as_user: bool) {
    let name = if as_user {
        "locks_mapped_user"
    } else {
        "locks_mapped"
    };
    let (w, exes, _) = work(name, as_user, &["locks"]);
    let mut s = Session::start(&w, &[exes[0].as_os_str(), "mapped".as_ref()]);
    s.cur().wait_tick(3, T_READY);
    w.checkpoint_ok(false, s.cur());
    s.cur().wait_more_ticks(3, T_READY);
    for _ in 0..2 {
        s.checkpoint_kill();
        let meta = w.inspect_json();
        let held: Vec<&Value> = image_procs(&meta)
            .values()
            .flat_map(|p| p["locks"].as_array().into_iter().flatten())
            .filter(|l| l["mapped"].as_str().is_some_and(|m| m.ends_with("/m.dat")))
            .collect();
        assert_eq!(
            held.len(),
            1,
            "the flock held through the mapping of m.dat: {meta}"
        );
        assert_eq!(held[0]["kind"], "flock", "{}", held[0]);
        s.restart(Probe::Ticks);
    }
    s.finish();
}

#[test]
fn a_lock_held_only_through_a_mapping_comes_back() {
    mapped_cycles(false);
}

#[test]
fn a_lock_held_only_through_a_mapping_comes_back_as_unprivileged_user() {
    mapped_cycles(true);
}
