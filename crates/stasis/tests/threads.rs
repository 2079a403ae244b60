//! Multi-threaded processes (threads.c): worker threads with TLS sharing a
//! mutex, a thread blocked in pthread_cond_wait and one blocked in a long
//! nanosleep survive checkpoint/restart (tids, TLS, futex waits, per-thread
//! signal delivery). pthreads.c: 256 workers on a mutex, a condvar ping-pong
//! and a barrier group through random checkpoints and restarts, all joined at
//! the end; the image lists every thread. churn.c: threads created and joined
//! (or detached) continuously while checkpoints are taken.
mod common;
use common::*;
use std::collections::BTreeSet;
use std::time::Duration;

fn tids(ready: &str) -> String {
    ready.split("tids=").nth(1).unwrap_or_default().to_string()
}

#[test]
fn threads_survive_two_restarts() {
    let w = Work::new("threads");
    let mut s = Session::start(&w, &[prog("threads")]);
    let ready = s.cur().lines()[0].clone();
    s.cur().wait_tick(3, T_READY);
    s.cycle(Probe::Ticks);
    s.cycle(Probe::Ticks);
    s.cur().wait_more_ticks(3, T_READY);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    eprintln!("{ready} -> {ok}");
    assert_eq!(tids(&ready).split(',').count(), 7);
}

#[test]
fn threads_plain_checkpoints() {
    let w = Work::new("threads_plain");
    let mut s = Session::start(&w, &[prog("threads")]);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(100));
        w.checkpoint_ok(false, s.cur());
    }
    s.finish();
    assert_ticks_consecutive(&s.outputs(), Some(0));
}

/// 256 workers + ping-pong pair + barrier group + main = 263 threads.
const PTHREADS: usize = 256 + 2 + 4 + 1;

/// pthreads.c with 256 workers: a checkpoint without --kill, then three
/// checkpoint --kill/restart cycles, each at a random moment. Every image
/// lists exactly the program's 263 threads (same tids as reported by the
/// program, each with its own clear_child_tid). The main-thread ticks are
/// exactly consecutive across the four processes, the counters continue and
/// advance after every restore, the invariants hold and every thread is
/// joined at the end.
#[test]
fn pthreads_256_survive_random_checkpoints() {
    let w = Work::new("pthreads256");
    let mut rng = Rng::new("pthreads256");
    let mut s = Session::start(&w, &[prog("pthreads")]);
    let ready = s.cur().lines()[0].clone();
    let tids: BTreeSet<i32> = pthreads_ready_tids(&ready, PTHREADS).into_iter().collect();
    s.cur().wait_tick(3, T_READY);

    let check_image = |what: &str| {
        let meta = w.inspect_json();
        let image: BTreeSet<i32> = inspect_tids(&meta).into_iter().collect();
        assert_eq!(
            image.len(),
            PTHREADS,
            "{what}: the image has {} threads, the program {PTHREADS}",
            image.len()
        );
        assert_eq!(
            image, tids,
            "{what}: the image's tids differ from the program's"
        );
    };

    rng.sleep_ms(20, 300);
    w.checkpoint_ok(false, s.cur());
    check_image("checkpoint without --kill");
    s.cur().wait_more_ticks(2, T_READY);
    for i in 0..3 {
        rng.sleep_ms(20, 300);
        s.checkpoint_kill();
        check_image(&format!("checkpoint --kill #{i}"));
        s.restart(Probe::Ticks);
    }
    rng.sleep_ms(20, 300);
    let ok = s.finish();
    s.assert_no_rerun();
    verify_pthreads(&s.outputs(), PTHREADS, &ok);
    eprintln!("{ok}");
}

/// churn.c: threads are created, joined and detached continuously (some
/// thousands a second) while five checkpoints without --kill are taken at
/// random moments (the app keeps running and churning after each), then a
/// checkpoint --kill. After the restart the churn goes on, the main-thread
/// ticks continue exactly, and the program's final accounting (every thread
/// run counted once, every result right, no thread left over) is OK.
#[test]
fn thread_churn_survives_checkpoints() {
    let w = Work::new("churn");
    let mut rng = Rng::new("churn");
    let mut s = Session::start(&w, &[prog("churn")]);
    s.cur().wait_tick(3, T_READY);
    let mut counts = vec![];
    for i in 0..5 {
        rng.sleep_ms(10, 200);
        w.checkpoint_ok(false, s.cur());
        let tids = inspect_tids(&w.inspect_json());
        // main, two churners, up to 4 joinable and 2 detached short-lived ones
        assert!(
            (3..=9).contains(&tids.len()),
            "checkpoint {i}: {} threads in the image: {tids:?}",
            tids.len()
        );
        counts.push(tids.len());
        s.cur().wait_more_ticks(2, T_READY);
        assert!(
            s.cur().running(),
            "churn stopped after checkpoint {i}\n{}",
            s.diag()
        );
    }
    rng.sleep_ms(10, 200);
    s.checkpoint_kill();
    let n = inspect_tids(&w.inspect_json()).len();
    assert!((3..=9).contains(&n), "{n} threads in the --kill image");
    counts.push(n);
    // The short-lived threads live most of the time (0-2 ms of 1-3 ms per
    // batch): some image must hold some (otherwise the test proves little).
    assert!(
        counts.iter().any(|c| *c > 3),
        "no checkpoint caught a short-lived thread: {counts:?}"
    );
    s.restart(Probe::Ticks);
    s.cur().wait_more_ticks(5, T_READY);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    assert_fields_progress(&s.outputs(), &["batches", "detached"]);
    eprintln!("threads per checkpoint {counts:?}; {ok}");
}
