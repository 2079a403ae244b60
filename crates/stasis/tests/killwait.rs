//! Waits of the checkpoint that must end (issue #11): `checkpoint --kill` of a job
//! whose child process is multi-threaded (an MPI rank under its launcher) used to
//! wait forever for the killed child (a traced thread-group leader is reported only
//! once its other threads are reaped), and so did `checkpoint --pid P --kill` of a
//! multi-threaded process; both now return, the supervisor exits 75 and the restart
//! continues. A thread that cannot be stopped (a vfork parent) fails the checkpoint
//! after a bounded wait, and the job runs on. As root and as an unprivileged user.
mod common;
use common::cycles::*;
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

/// The thread ids of process `pid` in `stasis inspect --json` output.
fn image_tids(meta: &Value, pid: i32) -> BTreeSet<i32> {
    let procs = meta["processes"].as_array().expect("no processes array");
    let p = procs
        .iter()
        .find(|p| p["pid"].as_i64() == Some(pid as i64))
        .unwrap_or_else(|| panic!("process {pid} is not in the image"));
    p["threads"]
        .as_array()
        .expect("process without threads")
        .iter()
        .map(|t| t["tid"].as_i64().expect("thread without tid") as i32)
        .collect()
}

/// forkthread.c's `ready pid=P child=C threads=T tids=...`: (root, child, child's
/// threads including its main thread).
fn forkthread_ids(ready: &str) -> (i32, i32, BTreeSet<i32>) {
    let f = fields(ready);
    let pid = f["pid"].parse().unwrap();
    let child: i32 = f["child"].parse().unwrap();
    let mut tids: BTreeSet<i32> = f["tids"].split(',').map(|t| t.parse().unwrap()).collect();
    tids.insert(child);
    (pid, child, tids)
}

/// forkthread.c under `stasis run`: a plain checkpoint, then three `checkpoint
/// --kill` / restart cycles at random moments. Each --kill returns (bounded by the
/// harness), `stasis run`/`restart` exits 75, every image holds the child with all
/// its threads; after the restores the child's threads count on, and at the end the
/// child finds its threads alive with their tids, joins them and exits 0.
fn threaded_child_cycles(name: &str, threads: usize, as_user: bool) {
    let t0 = Instant::now();
    let (w, exe) = work_for(name, "forkthread", as_user);
    let mut rng = Rng::new(name);
    let n = threads.to_string();
    let mut s = Session::start(&w, &[exe.as_os_str(), n.as_ref()]);
    let ready = s.cur().lines()[0].clone();
    let (root, child, tids) = forkthread_ids(&ready);
    assert_eq!(tids.len(), threads + 1, "{ready}");
    if as_user {
        let (uid, _, _) = unprivileged_user();
        assert_tree_runs_as(&w, &exe, 2, uid);
    }
    s.cur().wait_tick(3, T_READY);
    w.checkpoint_ok(false, s.cur());
    s.cur().wait_more_ticks(2, T_READY);
    for i in 0..3 {
        rng.sleep_ms(10, 200);
        let t = Instant::now();
        s.checkpoint_kill();
        eprintln!(
            "{name}: checkpoint --kill #{i} and exit 75 in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        let meta = w.inspect_json();
        assert_eq!(
            image_tids(&meta, child),
            tids,
            "checkpoint --kill #{i}: the child's threads in the image"
        );
        assert_eq!(image_tids(&meta, root), [root].into(), "the root's threads");
        if let Err(p) = wait_no_procs_in(&w.dir, Duration::from_secs(5)) {
            panic!(
                "after checkpoint --kill #{i} these processes are left:\n{}",
                describe_procs(&p)
            );
        }
        s.restart(Probe::Ticks);
        wait_field_advance(s.cur(), "count", "the child's threads after the restore");
    }
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    assert_fields_progress(&s.outputs(), &["count"]);
    eprintln!("{name}: {ok}");
    elapsed(t0, name);
}

#[test]
fn kill_job_with_threaded_child() {
    threaded_child_cycles("killwait_child", 1, false);
}

/// Like an MPI rank: a child with several threads.
#[test]
fn kill_job_with_child_of_four_threads() {
    threaded_child_cycles("killwait_child4", 4, false);
}

#[test]
fn kill_job_with_threaded_child_as_unprivileged_user() {
    threaded_child_cycles("killwait_child_user", 2, true);
}

/// `stasis checkpoint --pid P --dir D --kill` of a process started outside stasis.
/// Returns once the application is dead (by SIGKILL).
fn checkpoint_pid_kill(w: &Work, app: &mut Proc) {
    let pid = app.pid().to_string();
    let t = Instant::now();
    let r = checkpoint_pid(w, app.pid(), true);
    assert!(r.status.success(), "{r}\n{}", app.diag());
    eprintln!(
        "checkpoint --pid {pid} --kill in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let st = app.wait(T_CMD);
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "the application should have been killed by checkpoint --kill, got {}",
        status_str(&st)
    );
}

/// churn.c (threads created and joined every millisecond or two) started outside
/// stasis, checkpointed with `--pid --kill` twice, each time at a random moment
/// just after a batch of its short-lived threads exited (`batches` advanced):
/// the checkpoint returns, the restart (`stasis restart D`) continues, the churn
/// goes on, and a supervised kill/restart cycle follows the first.
fn pid_kill_after_thread_exit(name: &str, as_user: bool) {
    let t0 = Instant::now();
    let mut rng = Rng::new(name);
    for round in 0..2 {
        let (w, exe) = work_for(&format!("{name}{round}"), "churn", as_user);
        let mut app = spawn_direct(&w, &exe, &[]);
        app.wait_tick(3, T_READY);
        // Right after a batch of threads was joined (they exited a moment ago).
        rng.sleep_ms(0, 100);
        app.wait_more_ticks(1, T_READY);
        checkpoint_pid_kill(&w, &mut app);
        let tids = inspect_tids(&w.inspect_json());
        assert!(
            // main, 2 churners, 4 joinable and 2 detached ones, and up to 2 detached
            // ones of the previous batch that posted their semaphore but have not
            // exited yet.
            (3..=11).contains(&tids.len()),
            "round {round}: {} threads in the image: {tids:?}",
            tids.len()
        );
        let mut s = Session::from_proc(&w, app);
        s.restart(Probe::Ticks);
        wait_field_advance(s.cur(), "batches", "churn after the restore");
        if round == 0 {
            rng.sleep_ms(10, 200);
            s.cycle(Probe::Ticks);
        }
        let ok = s.finish();
        s.assert_no_rerun();
        assert_ticks_consecutive(&s.outputs(), Some(0));
        assert_fields_progress(&s.outputs(), &["batches", "detached"]);
        eprintln!("{name} round {round}: {ok}");
    }
    elapsed(t0, name);
}

#[test]
fn pid_kill_of_threaded_process_after_thread_exit() {
    pid_kill_after_thread_exit("killwait_pid", false);
}

#[test]
fn pid_kill_of_threaded_process_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_kill_after_thread_exit("killwait_pid_user", true);
}

/// `checkpoint --pid ROOT --kill` of forkthread.c started outside stasis (a tree
/// whose child is multi-threaded; we trace the child without being its parent),
/// then `stasis restart` and a supervised cycle; the child verifies its threads.
fn pid_kill_of_tree(name: &str, as_user: bool) {
    let (w, exe) = work_for(name, "forkthread", as_user);
    let mut app = spawn_direct(&w, &exe, &["2"]);
    let ready = app.lines()[0].clone();
    let (_, child, tids) = forkthread_ids(&ready);
    app.wait_tick(3, T_READY);
    checkpoint_pid_kill(&w, &mut app);
    assert_eq!(
        image_tids(&w.inspect_json(), child),
        tids,
        "the child's threads"
    );
    if let Err(p) = wait_no_procs_in(&w.dir, Duration::from_secs(5)) {
        panic!(
            "after checkpoint --pid --kill these processes are left:\n{}",
            describe_procs(&p)
        );
    }
    let mut s = Session::from_proc(&w, app);
    s.restart(Probe::Ticks);
    wait_field_advance(s.cur(), "count", "the child's threads after the restore");
    s.cycle(Probe::Ticks);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    assert_fields_progress(&s.outputs(), &["count"]);
    eprintln!("{name}: {ok}");
}

#[test]
fn pid_kill_of_tree_with_threaded_child() {
    pid_kill_of_tree("killwait_pidtree", false);
}

#[test]
fn pid_kill_of_tree_with_threaded_child_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_kill_of_tree("killwait_pidtree_user", true);
}

/// vforkwait.c: the application sits in vfork() (an uninterruptible wait that
/// ptrace cannot stop) while its child runs. A checkpoint fails after the bounded
/// wait for the stop, naming the process and the thread's state, publishes nothing,
/// and leaves the job running: once the vfork child exits, the application (asked
/// to stop meanwhile) is resumed by the init, runs on, and goes through a kill /
/// restart cycle.
#[test]
fn checkpoint_of_thread_that_cannot_stop_fails_in_time() {
    let w = Work::new("killwait_vfork");
    let mut s = Session::start(&w, &[prog("vforkwait")]);
    let pid = field_num(&s.cur().lines()[0], "pid") as i64;
    s.cur().wait_line("vchild 3", T_READY, |l| l == "vchild 3");
    let t = Instant::now();
    let r = w.checkpoint(false);
    let took = t.elapsed();
    assert!(!r.status.success(), "the checkpoint should fail: {r}");
    assert!(
        took < Duration::from_secs(15),
        "the checkpoint took {took:?} to fail"
    );
    assert!(
        r.stderr.contains("did not stop within") && mentions_number(&r.stderr, pid),
        "the error should say which process did not stop: {r}"
    );
    assert!(
        w.checkpoints().is_empty(),
        "a failed checkpoint was published: {:?}",
        w.checkpoints()
    );
    assert!(s.cur().running(), "the job died\n{}", s.diag());
    // The vfork child still runs; once it exits, the application goes on.
    let last = s
        .cur()
        .lines()
        .iter()
        .filter_map(|l| l.strip_prefix("vchild ")?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    let want = format!("vchild {}", last + 3);
    s.cur().wait_line(&want, T_READY, |l| l == want);
    std::fs::write(w.path("release"), b"").unwrap();
    s.cur()
        .wait_line("`released`", T_READY, |l| l == "released");
    s.cur().wait_tick(3, T_READY);
    s.checkpoint_kill();
    s.restart(Probe::Ticks);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    eprintln!("vforkwait: {ok}");
}

/// The same from outside stasis (`--pid`): the checkpoint fails in time, and the
/// application, left when stasis exits, runs on.
#[test]
fn pid_checkpoint_of_thread_that_cannot_stop_fails_in_time() {
    let w = Work::new("killwait_vfork_pid");
    let mut app = spawn_direct(&w, &prog("vforkwait"), &[]);
    app.wait_line("vchild 3", T_READY, |l| l == "vchild 3");
    let pid = app.pid().to_string();
    let t = Instant::now();
    let r = w.stasis(
        "ckpt-pid",
        &[
            "checkpoint".as_ref(),
            "--pid".as_ref(),
            pid.as_ref(),
            "--dir".as_ref(),
            w.ck.as_os_str(),
        ],
    );
    assert!(!r.status.success(), "the checkpoint should fail: {r}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        r.stderr.contains("did not stop within") && r.stderr.contains(pid.as_str()),
        "{r}"
    );
    std::fs::write(w.path("release"), b"").unwrap();
    app.wait_line("`released`", T_READY, |l| l == "released");
    app.wait_tick(3, T_READY);
    std::fs::write(w.path("go"), b"").unwrap();
    app.expect_exit(0, T_CMD);
    let last = app.lines().last().cloned().unwrap_or_default();
    assert!(last.starts_with("OK"), "{last}\n{}", app.diag());
}
