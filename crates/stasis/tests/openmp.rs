//! OpenMP (openmp.c, gcc -fopenmp, OMP_NUM_THREADS=4): a long parallel
//! reduction is checkpointed (--kill) and restarted three times at random
//! moments in the middle of the computation; every partial result and the
//! final result equal those of an uninterrupted run of the same binary, whose
//! first partial result is in turn checked against a computation here.
mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const CHUNKS: u64 = 400;
const CHUNK: u64 = 6_000_000;

/// splitmix64, as in openmp.c
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

/// `tick K acc=HEX` lines and the `done`/`OK` lines of an output.
fn result_lines(text: &str) -> Vec<String> {
    complete_lines(text)
        .into_iter()
        .filter(|l| l.starts_with("tick ") || l.starts_with("done ") || l.starts_with("OK "))
        .collect()
}

/// The command line: OMP_NUM_THREADS=4 through env(1), which execs the
/// program (so the checkpointed process is openmp itself).
fn omp_argv() -> Vec<std::ffi::OsString> {
    vec![
        "env".into(),
        "OMP_NUM_THREADS=4".into(),
        prog("openmp").into(),
        CHUNKS.to_string().into(),
        CHUNK.to_string().into(),
    ]
}

#[test]
fn openmp_reduction_survives_restarts_mid_run() {
    let w = Work::new("openmp");
    let mut rng = Rng::new("openmp");
    let argv = omp_argv();

    // The uninterrupted reference run (its own dir, `go` already there).
    let refw = Work::new("openmp_ref");
    refw.go();
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]).current_dir(&refw.dir);
    let mut r = refw.spawn("reference", c, Stdio::null());
    r.expect_exit(0, Duration::from_secs(120));
    let reference = result_lines(&r.stdout());
    assert_eq!(reference.len() as u64, CHUNKS + 2, "{}", r.diag());
    let first: u64 = (0..CHUNK).fold(0u64, |a, i| a.wrapping_add(mix(i)));
    assert_eq!(
        reference[0],
        format!("tick 0 acc={first:016x}"),
        "the reference run's first chunk differs from the sum computed here"
    );

    let mut s = Session::start(&w, &argv);
    assert_eq!(s.cur().lines()[0], "ready team=4");
    let mut at = vec![];
    for _ in 0..3 {
        // a random moment a few chunks on (a chunk takes some ms)
        let cur = s.cur().last_tick().unwrap_or(0);
        s.cur().wait_tick(cur + rng.range(5, 100), T_READY);
        rng.sleep_ms(0, 15);
        s.checkpoint_kill();
        let t = s.cur().last_tick().unwrap();
        assert!(
            !s.cur().lines().iter().any(|l| l.starts_with("done")),
            "the computation ended before the checkpoint (make it longer)\n{}",
            s.diag()
        );
        at.push(t);
        s.restart(Probe::Ticks);
    }
    s.cur().wait_line("`done`", Duration::from_secs(120), |l| {
        l.starts_with("done")
    });
    let ok = s.finish();
    s.assert_no_rerun();
    assert_ticks_consecutive(&s.outputs(), Some(0));
    let got: Vec<String> = s
        .outputs()
        .iter()
        .flat_map(|(_, t)| result_lines(t))
        .collect();
    assert_eq!(got.len(), reference.len());
    for (g, r) in got.iter().zip(&reference) {
        assert_eq!(g, r, "result differs from the uninterrupted run's");
    }
    eprintln!("checkpoints after chunks {at:?}; {ok}");
}
