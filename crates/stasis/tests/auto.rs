//! Checkpoints stasis takes by itself, and jobs that resume by themselves:
//! `stasis run --interval` (periodic checkpoints while the job runs, the newest
//! `--keep` kept), `--checkpoint-on SIGNAL` (checkpoint, stop, exit 75, as a batch
//! system's warning signal asks), and `stasis run` in a directory that holds
//! checkpoints (resumes from the newest; a damaged one is passed over with a warning;
//! `--fresh` starts anew), also after the job was killed with SIGKILL between two
//! checkpoints (a lost node); and `stasis status`. Every test runs counter.c, whose ticks carry a hash of
//! its whole history, so a resumed run that is not exactly the saved state shows.
mod common;
use common::*;
use std::time::{Duration, Instant};

/// Periodic checkpoints `p` reported on its standard error so far.
fn periodic(p: &Proc) -> usize {
    p.stderr()
        .lines()
        .filter(|l| l.contains(" written (") && l.ends_with("(periodic)"))
        .count()
}

fn wait_periodic(p: &mut Proc, n: usize) {
    let t0 = Instant::now();
    while periodic(p) < n {
        assert!(
            t0.elapsed() < T_READY,
            "{} periodic checkpoints reported, {n} expected\n{}",
            periodic(p),
            p.diag()
        );
        assert!(p.running(), "stasis run ended\n{}", p.diag());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `sig` to the current `stasis run`/`restart` (the supervisor).
fn signal(s: &mut Session, sig: i32) {
    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(s.cur().pid(), sig) };
}

/// `stasis run` again in the same directory (with the Work's run options).
fn run_again(s: &mut Session, label: &str) {
    let p = s.w.run(label, &[prog("counter")]);
    s.phases.push(p);
    s.cur().wait_more_ticks(3, T_READY);
    let err = s.cur().stderr();
    assert!(
        err.contains("resuming from"),
        "{label}: `stasis run` did not say it resumes: {err}"
    );
}

/// (1) `--interval 1 --keep 2`: a checkpoint every second while the counter runs on
/// (each reported on stderr, the job never stopping), only the newest two kept; then
/// a checkpoint --kill/restart cycle: every tick exactly once, hashes right.
#[test]
fn periodic_checkpoints_keep_the_newest() {
    let mut w = Work::new("auto_periodic");
    w.run_opts = vec!["--interval".into(), "1".into(), "--keep".into(), "2".into()];
    let mut s = Session::start(&w, &[prog("counter")]);
    let before = s.cur().wait_tick(5, T_READY);
    wait_periodic(s.cur(), 3);
    let after = s.cur().wait_more_ticks(5, T_READY);
    assert!(after > before + 5);
    let cks = w.checkpoints();
    assert_eq!(cks.len(), 2, "--keep 2: {cks:?}");
    // `stasis status`: running, the checkpoints on disk, each with its pause.
    let st = status_json(&w);
    assert_eq!(st["running"].as_bool(), Some(true), "{st}");
    let listed: Vec<String> = st["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    let on_disk = w.checkpoints();
    assert!(
        listed
            .iter()
            .all(|c| on_disk.contains(c) || c < &on_disk[0]),
        "status lists {listed:?}, on disk {on_disk:?}"
    );
    for c in st["checkpoints"].as_array().unwrap() {
        assert!(c["pause_ms"].as_f64().unwrap() > 0.0, "{c}");
        assert!(c["bytes"].as_u64().unwrap() > 0, "{c}");
        assert_eq!(c["processes"].as_u64(), Some(1), "{c}");
        let age = now_ms().saturating_sub(c["created_unix_ms"].as_u64().unwrap());
        assert!(age < 60_000, "checkpoint taken {age} ms ago: {c}");
    }
    assert!(
        cks.iter().all(|c| c.as_str() >= "checkpoint-000002"),
        "the newest kept: {cks:?}"
    );
    s.cycle(Probe::Ticks);
    s.finish();
    verify_counter(&s.outputs(), Some(0));
    let st = status_json(&w);
    assert_eq!(st["running"].as_bool(), Some(false), "{st}");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `stasis status --json DIR`.
fn status_json(w: &Work) -> serde_json::Value {
    let r = w.stasis(
        "status",
        &["status".as_ref(), "--json".as_ref(), w.ck.as_os_str()],
    );
    assert!(r.status.success(), "{r}");
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("status --json: {e}: {r}"))
}

/// (2) `--checkpoint-on USR1`: the signal (what Slurm's `--signal=B:USR1@300` sends
/// the batch shell) checkpoints the job, stops it, and stasis exits 75; the counter
/// never sees the signal. `stasis run` again with the same line resumes it (twice),
/// and the counter goes on exactly where it was.
#[test]
fn checkpoint_on_signal_then_resume_by_run() {
    let mut w = Work::new("auto_signal");
    w.run_opts = vec!["--checkpoint-on".into(), "USR1".into()];
    let mut s = Session::start(&w, &[prog("counter")]);
    for i in 1..=2 {
        s.cur().wait_more_ticks(5, T_READY);
        let before = w.checkpoints();
        signal(&mut s, libc::SIGUSR1);
        s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
        let after = w.checkpoints();
        assert_one_new_checkpoint(&before, &after, "checkpoint on USR1");
        assert!(
            s.cur().stderr().contains("(on signal 10)"),
            "no report of the checkpoint on the signal: {}",
            s.cur().stderr()
        );
        run_again(&mut s, &format!("resume{i}"));
    }
    s.finish();
    verify_counter(&s.outputs(), Some(0));
}

/// (3) A lost node: the job checkpoints every second and is killed with SIGKILL
/// (supervisor and job) between two checkpoints. `stasis run` again resumes from the
/// newest checkpoint: the counter goes back to the tick it was saved at (some ticks
/// printed before the kill are computed again, with the same hashes) and runs on.
#[test]
fn resume_after_sigkill_between_checkpoints() {
    let mut w = Work::new("auto_lost");
    w.run_opts = vec!["--interval".into(), "1".into()];
    let mut s = Session::start(&w, &[prog("counter")]);
    wait_periodic(s.cur(), 2);
    std::thread::sleep(Duration::from_millis(300));
    let last_before = s.cur().last_tick().unwrap();
    s.kill_supervisor();
    run_again(&mut s, "resume");
    let resumed = ticks(&s.cur().stdout());
    let first = resumed[0];
    assert!(
        first <= last_before + 1 && first + 60 > last_before,
        "resumed at tick {first}, the job had printed up to {last_before} and was saved less than ~1.3 s before"
    );
    s.finish();
    // The resumed run alone: consecutive from where it was saved, hashes right.
    let outputs = s.outputs();
    verify_counter(&outputs[outputs.len() - 1..], Some(first));
}

/// (4) A damaged newest checkpoint (a flipped byte in a page file) is passed over
/// with a warning naming it: `stasis run` resumes from the one before, exactly. Then
/// `--fresh` starts the command anew, from tick 0.
#[test]
fn damaged_newest_falls_back_and_fresh_starts_anew() {
    let w = Work::new("auto_damaged");
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(5, T_READY);
    w.checkpoint_ok(false, s.cur());
    let saved_first = last_checkpoint_tick(&w);
    s.cur().wait_more_ticks(5, T_READY);
    let newest = s.checkpoint_kill();
    let page = std::fs::read_dir(&newest)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("pages-") && std::fs::metadata(p).is_ok_and(|m| m.len() > 0)
            })
        })
        .expect("a page file");
    let mut bytes = std::fs::read(&page).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&page, bytes).unwrap();
    run_again(&mut s, "resume");
    let err = s.cur().stderr();
    assert!(
        err.contains("warning") && err.contains(&newest.display().to_string()),
        "no warning naming the damaged {}: {err}",
        newest.display()
    );
    // Resumed from the first checkpoint: its tick, then on.
    let resumed = ticks(&s.cur().stdout());
    assert!(
        resumed[0] <= saved_first + 1,
        "resumed at tick {}, the older checkpoint was taken at tick <= {saved_first}",
        resumed[0]
    );
    s.finish();
    let outputs = s.outputs();
    verify_counter(&outputs[outputs.len() - 1..], Some(resumed[0]));
    // --fresh: a new start although checkpoints are there.
    std::fs::remove_file(w.path("go")).unwrap();
    let counter = prog("counter");
    let cmd = w.stasis_cmd(&[
        "run".as_ref(),
        "--dir".as_ref(),
        w.ck.as_os_str(),
        "--fresh".as_ref(),
        "--".as_ref(),
        counter.as_os_str(),
    ]);
    let mut fresh = w.spawn("fresh", cmd, std::process::Stdio::null());
    fresh.wait_tick(3, T_READY);
    assert_eq!(ticks(&fresh.stdout())[0], 0, "--fresh did not start anew");
    assert!(!fresh.stderr().contains("resuming"), "{}", fresh.stderr());
    w.go();
    let st = fresh.wait(T_CMD);
    assert_eq!(st.code(), Some(0), "{}", fresh.diag());
}

/// The tick the counter had printed last when the newest checkpoint was taken (read
/// back from the ticks printed so far: an upper bound).
fn last_checkpoint_tick(w: &Work) -> u64 {
    let out = std::fs::read_dir(&w.dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "out"))
        .map(|p| read_lossy(&p))
        .collect::<String>();
    ticks(&out).last().copied().unwrap_or(0)
}

/// (5) A job holding a TCP connection to a server outside it (here the test itself):
/// its periodic checkpoints fail by default, each saying why, while the job runs on
/// and nothing is published; with `stasis run --tcp-external reset` they succeed.
#[test]
fn periodic_checkpoints_and_an_outside_connection() {
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    // Accept and hold every connection until the test ends.
    std::thread::spawn(move || {
        let mut held = vec![];
        for c in server.incoming().flatten() {
            held.push(c);
        }
    });
    let client = format!(
        "import socket, time\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         print('ready', flush=True)\n\
         i = 0\n\
         while True:\n    print('tick', i, flush=True); i += 1; time.sleep(0.05)\n"
    );
    for reset in [false, true] {
        let mut w = Work::new(if reset { "auto_ext_reset" } else { "auto_ext" });
        w.run_opts = vec!["--interval".into(), "1".into()];
        if reset {
            w.run_opts
                .extend(["--tcp-external".to_string(), "reset".to_string()]);
        }
        let mut s = Session::start(&w, &["python3", "-c", client.as_str()]);
        if reset {
            wait_periodic(s.cur(), 2);
            assert!(!w.checkpoints().is_empty());
        } else {
            let t0 = Instant::now();
            while !s.cur().stderr().contains("periodic: checkpoint failed") {
                assert!(t0.elapsed() < T_READY, "{}", s.diag());
                std::thread::sleep(Duration::from_millis(50));
            }
            let err = s.cur().stderr();
            assert!(
                err.contains(&format!("127.0.0.1:{port}"))
                    && err.contains("outside the checkpoint"),
                "the failure does not name the outside peer: {err}"
            );
            let t = s.cur().wait_more_ticks(5, T_READY);
            assert!(t > 5 && s.cur().running(), "{}", s.diag());
            assert!(w.checkpoints().is_empty(), "{:?}", w.checkpoints());
        }
    }
}
