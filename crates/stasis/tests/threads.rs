//! Multi-threaded processes (threads.c): worker threads with TLS sharing a
//! mutex, a thread blocked in pthread_cond_wait and one blocked in a long
//! nanosleep survive checkpoint/restart (tids, TLS, futex waits, per-thread
//! signal delivery).
mod common;
use common::*;
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
