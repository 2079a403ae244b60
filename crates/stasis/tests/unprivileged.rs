//! Everything as an unprivileged user: when the tests run as root, a system
//! user `stasis-test` is created if needed and every stasis command runs
//! through `setpriv --reuid --regid --clear-groups`; the stasis binary and the
//! test program are copied into the (world-accessible, user-owned) work dir.
//! When not root, the tests run as the current user.
mod common;
use common::*;

fn unprivileged_work(name: &str, program: &str) -> (Work, std::path::PathBuf) {
    let (uid, gid, prefix) = unprivileged_user();
    let mut w = Work::new(name);
    let bin = w.path("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    w.stasis = install(std::path::Path::new(STASIS), &bin, "stasis");
    let exe = install(&prog(program), &bin, program);
    w.give_to(uid, gid);
    w.prefix = prefix;
    (w, exe)
}

/// Check the application (and every other process of the test) really runs
/// as the user.
fn assert_runs_as_user(w: &Work, exe: &std::path::Path) {
    let (uid, _, _) = unprivileged_user();
    assert_tree_runs_as(w, exe, 1, uid);
    let app = pids_of_exe(&w.dir, exe);
    assert!(
        procs_in(&w.dir).contains(&app[0]),
        "the application is not among the test's processes"
    );
}

#[test]
fn counter_cycle_as_unprivileged_user() {
    let (w, exe) = unprivileged_work("unpriv_counter", "counter");
    let mut s = Session::start(&w, &[&exe]);
    s.cur().wait_tick(5, T_READY);
    assert_runs_as_user(&w, &exe);
    s.cycle(Probe::Ticks);
    assert_runs_as_user(&w, &exe);
    s.cycle(Probe::Ticks);
    s.finish();
    s.assert_no_rerun();
    verify_counter(&s.outputs(), Some(0));
}

#[test]
fn memory_cycle_as_unprivileged_user() {
    let (w, exe) = unprivileged_work("unpriv_memory", "memory");
    let mut s = Session::start(&w, &[&exe]);
    assert_runs_as_user(&w, &exe);
    s.cycle(Probe::Ping);
    s.finish();
    s.assert_no_rerun();
}

/// pthreads.c with 32 workers (39 threads) as the user: a checkpoint without
/// --kill and two checkpoint --kill/restart cycles at random moments; the
/// images list every thread, every restored process runs as the user, ticks
/// and counters continue, invariants hold and all threads are joined.
#[test]
fn pthreads_cycle_as_unprivileged_user() {
    const THREADS: usize = 32 + 2 + 4 + 1;
    let (w, exe) = unprivileged_work("unpriv_pthreads", "pthreads");
    let mut rng = Rng::new("unpriv_pthreads");
    let mut s = Session::start(&w, &[exe.as_os_str(), "32".as_ref()]);
    let ready = s.cur().lines()[0].clone();
    let tids: std::collections::BTreeSet<i32> =
        pthreads_ready_tids(&ready, THREADS).into_iter().collect();
    s.cur().wait_tick(3, T_READY);
    assert_runs_as_user(&w, &exe);
    rng.sleep_ms(20, 300);
    w.checkpoint_ok(false, s.cur());
    for i in 0..2 {
        rng.sleep_ms(20, 300);
        s.checkpoint_kill();
        let image: std::collections::BTreeSet<i32> =
            inspect_tids(&w.inspect_json()).into_iter().collect();
        assert_eq!(
            image, tids,
            "checkpoint --kill #{i}: the image's tids differ"
        );
        s.restart(Probe::Ticks);
        assert_runs_as_user(&w, &exe);
    }
    rng.sleep_ms(20, 300);
    let ok = s.finish();
    s.assert_no_rerun();
    verify_pthreads(&s.outputs(), THREADS, &ok);
    eprintln!("{ok}");
}

/// The process-tree, IPC and event programs, each through a plain checkpoint and two
/// kill/restart cycles as the unprivileged user: same results as with root.
#[test]
fn ipc_and_tree_programs_as_unprivileged_user() {
    for program in [
        "files", "churn", "evloop", "sysv", "fifo", "inotify", "sessions",
    ] {
        let (w, exe) = unprivileged_work(&format!("unpriv_{program}"), program);
        let mut s = Session::start(&w, &[&exe]);
        s.cur().wait_tick(3, T_READY);
        let r = w.checkpoint(false);
        assert!(r.status.success(), "{program}: {r}");
        s.cur().wait_more_ticks(2, T_READY);
        s.cycle(Probe::Ticks);
        s.cycle(Probe::Ticks);
        let ok = s.finish();
        assert!(ok.starts_with("OK"), "{program}: {ok}");
        assert_ticks_consecutive(&s.outputs(), None);
    }
}
