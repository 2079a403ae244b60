//! The application interface (docs/API.md): programs that ask for checkpoints and
//! have hooks run before each checkpoint and after each restart.
//!
//! * progs/appapi.c (the C library, include/stasis.h): its pre-checkpoint hook writes
//!   out a fully buffered file, its post-restart hook reads the restarting stasis's
//!   environment. Checkpoints from the command line and from the program itself,
//!   `checkpoint --kill` and a restart, a checkpoint the program asked for followed by
//!   the loss of the job (SIGKILL of stasis) and a restart from it, where the program's
//!   request returns "restarted"; as root and as a plain user. Every hook ran before
//!   its checkpoint's freeze (the counts restored show it, and the file holds what the
//!   hook wrote out when the checkpoint command returns), the post-restart hook ran
//!   exactly once per restart, and the count went on exactly, file included.
//! * stasis-app/examples/appcounter.rs (the Rust crate), built here with rustc: the
//!   same with a checkpoint it asks for, a lost job, and a `--kill` cycle.
//! * A program whose pre-checkpoint hook does not return: each checkpoint is taken
//!   after `--hook-timeout` with a warning naming the process; once the hook returns,
//!   in the restarted job, everything goes on.
//! * A process stopped by job control is not waited for.
//! * Two processes, each with its own connection.
//! * `--interval` checkpoints run the hooks too.
mod common;
use common::*;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A work dir; with `as_user`, stasis and the program run as the unprivileged test
/// user (both copied into the work dir, which the user owns). Returns the program's
/// path to run.
fn work_for(name: &str, exe: &Path, as_user: bool) -> (Work, PathBuf) {
    if !as_user {
        return (Work::new(name), exe.to_path_buf());
    }
    let (uid, gid, prefix) = unprivileged_user();
    let mut w = Work::new(name);
    let bin = w.path("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    w.stasis = install(Path::new(STASIS), &bin, "stasis");
    let file_name = exe.file_name().unwrap().to_string_lossy().into_owned();
    let exe = install(exe, &bin, &file_name);
    w.give_to(uid, gid);
    w.prefix = prefix;
    (w, exe)
}

/// crates/stasis-app/examples/appcounter.rs built with rustc against the stasis-app
/// crate (std only: no cargo needed), once per test binary, cached on disk by the
/// sources' hash.
fn rust_prog() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        use std::hash::{Hash, Hasher};
        let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("../stasis-app");
        let lib = app.join("src/lib.rs");
        let example = app.join("examples/appcounter.rs");
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for f in [&lib, &app.join("src/protocol.rs"), &example] {
            std::fs::read(f).unwrap().hash(&mut h);
        }
        let outdir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stasis-progs");
        let exe = outdir.join(format!("appcounter-{:016x}", h.finish()));
        if exe.exists() {
            return exe;
        }
        let tmp = outdir.join(format!(".appcounter-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let rlib = tmp.join("libstasis_app.rlib");
        let rustc = |args: &[&OsStr]| {
            let out = Command::new("rustc")
                .args(["--edition", "2021"])
                .args(args)
                .output()
                .expect("cannot run rustc");
            assert!(
                out.status.success(),
                "rustc {args:?} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        rustc(&[
            "--crate-type".as_ref(),
            "rlib".as_ref(),
            "--crate-name".as_ref(),
            "stasis_app".as_ref(),
            "-o".as_ref(),
            rlib.as_os_str(),
            lib.as_os_str(),
        ]);
        let built = tmp.join("appcounter");
        let extern_ = format!("stasis_app={}", rlib.display());
        rustc(&[
            "--crate-name".as_ref(),
            "appcounter".as_ref(),
            "--extern".as_ref(),
            extern_.as_ref(),
            "-o".as_ref(),
            built.as_os_str(),
            example.as_os_str(),
        ]);
        std::fs::rename(&built, &exe).unwrap();
        let _ = std::fs::remove_dir_all(&tmp);
        exe
    })
    .clone()
}

/// The lines of `p` starting with `prefix`.
fn lines_with(p: &Proc, prefix: &str) -> Vec<String> {
    p.lines()
        .into_iter()
        .filter(|l| l.starts_with(prefix))
        .collect()
}

/// Waits until `p` has printed more than `seen` lines starting with `prefix`;
/// returns the next one.
fn wait_new(p: &mut Proc, prefix: &str, seen: usize) -> String {
    let t0 = Instant::now();
    loop {
        if let Some(l) = lines_with(p, prefix).into_iter().nth(seen) {
            return l;
        }
        if !p.running() || t0.elapsed() > T_READY {
            let d = p.diag();
            panic!(
                "{}: no line `{prefix}...` number {}\n{d}",
                p.label,
                seen + 1
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `key=value` of a line, as text.
fn field(line: &str, key: &str) -> String {
    fields(line)
        .remove(key)
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Index of the first line of `p` starting with `prefix`.
fn position(p: &Proc, prefix: &str) -> usize {
    p.lines()
        .iter()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("{}: no line `{prefix}...`", p.label))
}

/// The STASIS_TEST_PHASE the harness gave the stasis command of phase `p`
/// (`cmdN`, N the number its label starts with).
fn phase_of(p: &Proc) -> String {
    let n: usize = p.label[..2].parse().unwrap();
    format!("cmd{n}")
}

/// Asks the program to checkpoint itself (file `self-ckpt`) and waits for its
/// `self ...` line; asserts that exactly one checkpoint was published meanwhile.
fn self_checkpoint(w: &Work, p: &mut Proc) -> String {
    let before = w.checkpoints();
    let seen = lines_with(p, "self ").len();
    std::fs::write(w.path("self-ckpt"), b"").unwrap();
    let line = wait_new(p, "self ", seen);
    assert_one_new_checkpoint(
        &before,
        &w.checkpoints(),
        "a checkpoint the program asked for",
    );
    line
}

/// The records in data.txt (as appapi.c writes them), checked one by one.
fn records_on_disk(w: &Work) -> u64 {
    let text = w.read("data.txt");
    let mut h = FNV_OFFSET;
    let mut n = 0u64;
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        h = (h ^ n).wrapping_mul(FNV_PRIME);
        assert_eq!(line, format!("rec {n} {h:016x}\n"), "data.txt record {n}");
        n += 1;
    }
    n
}

/// The fd of the image's process `pid` that is the interface's connection, whether
/// it asked for pre-checkpoint events.
fn image_api_fd(w: &Work, pid: i64) -> bool {
    let meta = w.inspect_json();
    let procs = meta["processes"].as_array().expect("processes");
    let p = procs
        .iter()
        .find(|p| p["pid"].as_i64() == Some(pid))
        .unwrap_or_else(|| panic!("process {pid} is not in the image"));
    let fds: Vec<&serde_json::Value> = p["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .filter(|f| f["kind"]["type"] == "app_api")
        .collect();
    assert_eq!(fds.len(), 1, "app_api fds of process {pid}: {fds:?}");
    fds[0]["kind"]["pre_checkpoint"]
        .as_bool()
        .expect("pre_checkpoint")
}

/// The ticks of a lineage of phases: `cut`, if given, is (phase index, line prefix)
/// where the saved state left that phase (it ran on past a checkpoint it was later
/// restarted from).
fn lineage(s: &Session, cut: Option<(usize, &str)>) -> Vec<(String, String)> {
    let mut outputs = s.outputs();
    if let Some((i, prefix)) = cut {
        let text = &outputs[i].1;
        let at = text
            .find(&format!("\n{prefix}"))
            .unwrap_or_else(|| panic!("{}: no line `{prefix}...`", outputs[i].0));
        outputs[i].1 = text[..at + 1].to_string();
    }
    outputs
}

/// The C program through every kind of checkpoint and two restarts, under `stasis run
/// RUN_OPTS`.
fn c_program(name: &str, as_user: bool, run_opts: &[&str]) {
    let t0 = Instant::now();
    let (mut w, exe) = work_for(name, &prog("appapi"), as_user);
    w.run_opts = run_opts.iter().map(|o| o.to_string()).collect();
    let mut s = Session::start(&w, &[&exe]);
    let pid: i64 = s.ready_field("pid").parse().unwrap();
    assert_eq!(s.ready_field("phase"), phase_of(&s.phases[0]));
    s.cur().wait_tick(3, T_READY);

    // (1) From the command line: the hook ran before, and wrote the buffer out.
    w.checkpoint_ok(false, s.cur());
    let pre = lines_with(s.cur(), "pre ");
    assert_eq!(pre.len(), 1, "pre-checkpoint hook lines: {pre:?}");
    assert_eq!(field(&pre[0], "n"), "1");
    let flushed = field_num(&pre[0], "records");
    assert!(flushed >= 3, "{pre:?}");
    assert_eq!(
        records_on_disk(&w),
        flushed,
        "data.txt after the checkpoint should hold what the hook wrote out"
    );
    assert!(
        image_api_fd(&w, pid),
        "the image says no pre-checkpoint hook"
    );

    // (2) Asked for by the program: its own hook first, then it continues.
    let line = self_checkpoint(&w, s.cur());
    assert_eq!(field(&line, "r"), "0", "{line}");
    assert_eq!(field(&line, "pre"), "2", "{line}");
    assert_eq!(field(&line, "post"), "0", "{line}");
    assert!(position(s.cur(), "pre n=2 ") < position(s.cur(), "self "));

    // (3) --kill, then restart: the hook's count is the image's (it ran before the
    // freeze), the post-restart hook runs once with the new stasis's environment.
    s.checkpoint_kill();
    assert_eq!(lines_with(&s.phases[0], "pre ").len(), 3);
    s.restart(Probe::Ticks);
    let post = wait_new(s.cur(), "post ", 0);
    assert_eq!(field(&post, "n"), "1", "{post}");
    assert_eq!(field(&post, "pre"), "3", "{post}");
    assert_eq!(field(&post, "phase"), phase_of(s.cur()), "{post}");

    // (4) A checkpoint the restarted program asks for, then the job is lost: the
    // restart from it returns from stasis_checkpoint() with STASIS_RESTARTED, after
    // its post-restart hook.
    let line = self_checkpoint(&w, s.cur());
    assert_eq!(field(&line, "r"), "0", "{line}");
    assert_eq!(field(&line, "pre"), "4", "{line}");
    assert_eq!(field(&line, "post"), "1", "{line}");
    let saved_tick = field(&line, "tick");
    s.cur().wait_more_ticks(3, T_READY);
    s.kill_supervisor();
    s.restart(Probe::Ticks);
    let post = wait_new(s.cur(), "post ", 0);
    assert_eq!(field(&post, "n"), "2", "{post}");
    assert_eq!(field(&post, "pre"), "4", "{post}");
    assert_eq!(field(&post, "phase"), phase_of(s.cur()), "{post}");
    let line = wait_new(s.cur(), "self ", 0);
    assert_eq!(field(&line, "r"), "1", "{line}");
    assert_eq!(field(&line, "tick"), saved_tick, "{line}");
    assert_eq!(field(&line, "post"), "2", "{line}");
    assert!(position(s.cur(), "post ") < position(s.cur(), "self "));

    // (5) The restarted job's checkpoints run the hook too.
    w.checkpoint_ok(false, s.cur());
    let pre = lines_with(s.cur(), "pre ");
    assert_eq!(pre.len(), 1, "{pre:?}");
    assert_eq!(field(&pre[0], "n"), "5");
    assert_eq!(records_on_disk(&w), field_num(&pre[0], "records"));
    assert!(image_api_fd(&w, pid));

    s.finish();
    let stats = lines_with(s.cur(), "stats ");
    assert_eq!(stats.len(), 1);
    assert_eq!(field(&stats[0], "pre"), "5", "{stats:?}");
    assert_eq!(field(&stats[0], "post"), "2", "{stats:?}");
    // Exactly one post-restart hook per restart.
    let posts: Vec<usize> = s
        .phases
        .iter()
        .map(|p| lines_with(p, "post ").len())
        .collect();
    assert_eq!(posts, vec![0, 1, 1], "post-restart hooks per phase");
    s.assert_no_rerun();
    // The count went on exactly: the first restart's phase ends where its own
    // checkpoint was taken (the second restart is of it).
    verify_counter(&lineage(&s, Some((1, "self r=0"))), Some(0));
    elapsed(t0, name);
}

#[test]
fn c_library_hooks_and_requests() {
    c_program("api_c", false, &[]);
}

#[test]
fn c_library_hooks_and_requests_as_unprivileged_user() {
    c_program("api_c_user", true, &[]);
}

/// With a network namespace of the job's own, where the interface's socket then is.
#[test]
fn c_library_hooks_and_requests_in_a_private_network() {
    c_program("api_c_net", false, &["--network", "private"]);
}

/// The Rust crate: a checkpoint it asks for, the job lost and restarted from it, a
/// `--kill` cycle.
fn rust_program(name: &str, as_user: bool) {
    let t0 = Instant::now();
    let (w, exe) = work_for(name, &rust_prog(), as_user);
    let mut s = Session::start(&w, &[&exe]);
    s.cur().wait_tick(3, T_READY);
    let line = self_checkpoint(&w, s.cur());
    assert_eq!(field(&line, "r"), "continued", "{line}");
    assert_eq!(field(&line, "pre"), "1", "{line}");
    assert!(position(s.cur(), "pre n=1") < position(s.cur(), "self "));
    let saved_tick = field(&line, "tick");
    s.cur().wait_more_ticks(3, T_READY);
    s.kill_supervisor();
    s.restart(Probe::Ticks);
    let post = wait_new(s.cur(), "post ", 0);
    assert_eq!(field(&post, "n"), "1", "{post}");
    assert_eq!(field(&post, "pre"), "1", "{post}");
    assert_eq!(field(&post, "phase"), phase_of(s.cur()), "{post}");
    let line = wait_new(s.cur(), "self ", 0);
    assert_eq!(field(&line, "r"), "restarted", "{line}");
    assert_eq!(field(&line, "tick"), saved_tick, "{line}");
    assert_eq!(field(&line, "post"), "1", "{line}");
    assert!(position(s.cur(), "post ") < position(s.cur(), "self "));

    s.checkpoint_kill();
    assert_eq!(
        lines_with(&s.phases[1], "pre "),
        vec!["pre n=2".to_string()]
    );
    s.restart(Probe::Ticks);
    let post = wait_new(s.cur(), "post ", 0);
    assert_eq!(field(&post, "n"), "2", "{post}");
    assert_eq!(field(&post, "pre"), "2", "{post}");
    assert_eq!(field(&post, "phase"), phase_of(s.cur()), "{post}");
    s.finish();
    let stats = lines_with(s.cur(), "stats ");
    assert_eq!(stats, vec!["stats pre=2 post=2".to_string()]);
    let posts: Vec<usize> = s
        .phases
        .iter()
        .map(|p| lines_with(p, "post ").len())
        .collect();
    assert_eq!(posts, vec![0, 1, 1], "post-restart hooks per phase");
    s.assert_no_rerun();
    verify_counter(&lineage(&s, Some((0, "self r=continued"))), Some(0));
    elapsed(t0, name);
}

#[test]
fn rust_crate_hooks_and_requests() {
    rust_program("api_rust", false);
}

#[test]
fn rust_crate_hooks_and_requests_as_unprivileged_user() {
    rust_program("api_rust_user", true);
}

/// Two processes, each with its own connection (a forked child has none until it
/// makes one): both hooks run before every checkpoint, both post-restart hooks once.
#[test]
fn two_processes_each_with_hooks() {
    let t0 = Instant::now();
    let w = Work::new("api_fork");
    let mut s = Session::start(&w, &[prog("appfork")]);
    let parent: i64 = s.ready_field("pid").parse().unwrap();
    let child: i64 = s.ready_field("child").parse().unwrap();
    s.cur()
        .wait_line("child ready", T_READY, |l| l == "child ready");
    s.cur().wait_tick(3, T_READY);
    let hooks = |p: &Proc, what: &str, who: &str| -> Vec<String> {
        lines_with(p, &format!("{what} who={who} "))
    };
    w.checkpoint_ok(false, s.cur());
    for who in ["parent", "child"] {
        assert_eq!(
            hooks(s.cur(), "pre", who),
            vec![format!("pre who={who} n=1")]
        );
    }
    assert!(image_api_fd(&w, parent) && image_api_fd(&w, child));
    s.checkpoint_kill();
    for who in ["parent", "child"] {
        assert_eq!(hooks(&s.phases[0], "pre", who).len(), 2, "{who}");
    }
    s.restart(Probe::Ticks);
    for who in ["parent", "child"] {
        let post = wait_new(s.cur(), &format!("post who={who} "), 0);
        assert_eq!(post, format!("post who={who} n=1 pre=2"));
    }
    w.checkpoint_ok(false, s.cur());
    for who in ["parent", "child"] {
        assert_eq!(
            hooks(s.cur(), "pre", who),
            vec![format!("pre who={who} n=3")]
        );
        assert_eq!(hooks(s.cur(), "post", who).len(), 1, "{who}");
    }
    s.finish();
    verify_counter(&s.outputs(), Some(0));
    elapsed(t0, "api_fork");
}

/// The warning of a checkpoint whose pre-checkpoint event `pid` did not answer.
fn unanswered(pid: i64) -> String {
    format!("process {pid} did not acknowledge the pre-checkpoint event within 2 s")
}

/// A pre-checkpoint hook that does not return (until a file `release` exists): the
/// checkpoints are taken after --hook-timeout, with a warning; the program runs on,
/// and once the hook returns, in the restarted job, the late hook and the
/// post-restart hook run and later checkpoints wait for the hook again.
#[test]
fn unanswered_pre_checkpoint_event_times_out() {
    let t0 = Instant::now();
    let mut w = Work::new("api_hang");
    w.run_opts = vec!["--hook-timeout".into(), "2".into()];
    let mut s = Session::start(&w, &[prog("appapi"), "hang".into()]);
    let pid: i64 = s.ready_field("pid").parse().unwrap();
    s.cur().wait_tick(3, T_READY);
    let t = Instant::now();
    let r = w.checkpoint(false);
    let took = t.elapsed();
    assert!(r.status.success(), "{r}\n{}", s.diag());
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(9),
        "the checkpoint took {took:?}, the hook timeout is 2 s"
    );
    assert!(r.stderr.contains(&unanswered(pid)), "{r}");
    assert!(s.cur().stderr().contains(&unanswered(pid)), "{}", s.diag());
    assert_eq!(lines_with(s.cur(), "pre-waiting").len(), 1);
    assert!(lines_with(s.cur(), "pre ").is_empty());
    s.cur().wait_more_ticks(3, T_READY);

    let r = w.checkpoint(true);
    assert!(r.status.success(), "{r}\n{}", s.diag());
    assert!(r.stderr.contains(&unanswered(pid)), "{r}");
    s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);

    // Restarted with the hook still waiting: nothing of the interface runs yet.
    s.restart(Probe::Ticks);
    assert!(lines_with(s.cur(), "post ").is_empty(), "{}", s.diag());
    std::fs::write(w.path("release"), b"").unwrap();
    let pre = wait_new(s.cur(), "pre ", 0);
    assert_eq!(field(&pre, "n"), "1", "{pre}");
    let post = wait_new(s.cur(), "post ", 0);
    assert_eq!(field(&post, "n"), "1", "{post}");
    assert_eq!(field(&post, "pre"), "1", "{post}");
    assert_eq!(field(&post, "phase"), phase_of(s.cur()), "{post}");

    // The hook answers now: no warning, and it ran.
    let r = w.checkpoint(false);
    assert!(r.status.success(), "{r}\n{}", s.diag());
    assert!(!r.stderr.contains("did not acknowledge"), "{r}");
    let pre = wait_new(s.cur(), "pre ", 1);
    assert_eq!(field(&pre, "n"), "2", "{pre}");
    assert_eq!(records_on_disk(&w), field_num(&pre, "records"));
    let ok = s.finish();
    assert_eq!(
        lines_with(s.cur(), "stats "),
        vec![format!(
            "stats pre=2 post=1 records={}",
            field(&ok, "ticks")
        )]
    );
    verify_counter(&s.outputs(), Some(0));
    elapsed(t0, "api_hang");
}

/// A process stopped by job control cannot run its hook: the checkpoint does not wait
/// for it (the default timeout is 10 s), says so, and the process runs its hooks
/// again once continued.
#[test]
fn stopped_process_is_not_waited_for() {
    let t0 = Instant::now();
    let w = Work::new("api_stopped");
    let exe = prog("appapi");
    let mut s = Session::start(&w, &[&exe]);
    let pid: i64 = s.ready_field("pid").parse().unwrap();
    s.cur().wait_tick(3, T_READY);
    let host = pids_of_exe(&w.dir, &exe);
    assert_eq!(host.len(), 1, "{host:?}");
    // SAFETY: stopping and continuing the test's own application process.
    unsafe { libc::kill(host[0], libc::SIGSTOP) };
    let t = Instant::now();
    let r = w.checkpoint(false);
    assert!(r.status.success(), "{r}\n{}", s.diag());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the checkpoint took {:?}",
        t.elapsed()
    );
    let warning = format!("process {pid} is stopped: its pre-checkpoint hook cannot run");
    assert!(r.stderr.contains(&warning), "{r}");
    assert!(lines_with(s.cur(), "pre ").is_empty());
    // SAFETY: as above.
    unsafe { libc::kill(host[0], libc::SIGCONT) };
    s.cur().wait_more_ticks(3, T_READY);
    let r = w.checkpoint(false);
    assert!(r.status.success() && !r.stderr.contains("warning"), "{r}");
    assert_eq!(field(&wait_new(s.cur(), "pre ", 0), "n"), "1");
    s.finish();
    verify_counter(&s.outputs(), Some(0));
    elapsed(t0, "api_stopped");
}

/// The checkpoints `stasis run --interval` take run the hooks too.
#[test]
fn interval_checkpoints_run_the_hooks() {
    let t0 = Instant::now();
    let mut w = Work::new("api_interval");
    w.run_opts = vec!["--interval".into(), "1".into()];
    let mut s = Session::start(&w, &[prog("appapi")]);
    let periodic = |p: &Proc| {
        p.stderr()
            .lines()
            .filter(|l| l.ends_with("(periodic)"))
            .count()
    };
    let t = Instant::now();
    while periodic(s.cur()) < 2 {
        assert!(t.elapsed() < T_READY && s.cur().running(), "{}", s.diag());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every periodic checkpoint reported so far ran the hook first.
    let reported = periodic(s.cur());
    let hooks = lines_with(s.cur(), "pre ").len();
    assert!(
        hooks >= reported,
        "{reported} periodic checkpoints but {hooks} pre-checkpoint hooks\n{}",
        s.diag()
    );
    // (Not checkpoint_kill: periodic checkpoints may be published meanwhile.)
    let r = w.checkpoint(true);
    assert!(r.status.success(), "{r}\n{}", s.diag());
    s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
    let hooks = lines_with(&s.phases[0], "pre ").len();
    s.restart(Probe::Ticks);
    let post = wait_new(s.cur(), "post ", 0);
    assert_eq!(field(&post, "pre"), hooks.to_string(), "{post}");
    s.finish();
    verify_counter(&s.outputs(), Some(0));
    elapsed(t0, "api_interval");
}
