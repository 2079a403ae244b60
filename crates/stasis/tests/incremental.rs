//! Incremental checkpoints (`checkpoint --incremental`): only pages whose content
//! changed since the newest checkpoint are stored, the rest refer to earlier
//! checkpoints. Restart from a chain gives back exactly the memory (the programs
//! check every byte), `--keep` never removes a checkpoint a kept one needs, and a
//! damaged link of the chain refuses the restart.
mod common;
use common::*;
use std::ffi::OsStr;

const MIB: u64 = 1 << 20;

fn stored_bytes(w: &Work) -> u64 {
    w.inspect_json()["timings"]["pages_bytes"].as_u64().unwrap()
}

fn depends_on(w: &Work) -> Vec<u64> {
    w.inspect_json()["depends_on"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default()
}

/// Makes dirtyset.c change its pages for step `n` and waits until it has.
fn dirtyset_step(w: &Work, s: &mut Session, n: u32) {
    std::fs::write(w.path(&format!("step-{n}")), b"").unwrap();
    let want = format!("stepped {n}");
    s.cur().wait_line(&want, T_READY, |l| l == want);
}

fn checkpoint_with(w: &Work, extra: &[&str]) -> CmdOut {
    let mut args: Vec<&OsStr> = vec![OsStr::new("checkpoint")];
    args.extend(extra.iter().map(OsStr::new));
    args.push(w.ck.as_os_str());
    w.stasis("ckpt-incr", &args)
}

/// memory.c (64 MiB random + 16 MiB zero + an 8 GiB sparse mapping...): a full
/// checkpoint, then an incremental one with --kill that stores a tiny fraction; the
/// restart from the chain passes the program's own checksums of all its memory.
#[test]
fn incremental_chain_restores_all_memory() {
    let w = Work::new("incr_memory");
    let mut s = Session::start(&w, &[prog("memory")]);
    // The first --incremental checkpoint has nothing to refer to (it is full) but
    // arms dirty-page tracking for the next one.
    let r = checkpoint_with(&w, &["--incremental"]);
    assert!(r.status.success(), "{r}");
    let full = w.newest_checkpoint();
    let full_bytes = stored_bytes(&w);
    assert!(
        full_bytes >= 64 * MIB,
        "full checkpoint stored only {full_bytes} bytes"
    );
    let r = checkpoint_with(&w, &["--incremental", "--kill"]);
    assert!(r.status.success(), "{r}");
    s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
    let incr_bytes = stored_bytes(&w);
    eprintln!(
        "full {} KiB, incremental {} KiB",
        full_bytes / 1024,
        incr_bytes / 1024
    );
    assert!(
        incr_bytes * 20 < full_bytes,
        "incremental stored {incr_bytes} bytes, full {full_bytes}: not incremental"
    );
    assert_eq!(
        depends_on(&w),
        vec![1],
        "the incremental checkpoint must refer to the first"
    );
    let (du, _) = Work::usage(&w.newest_checkpoint());
    assert!(
        du < 16 * MIB,
        "incremental checkpoint uses {} MiB on disk",
        du / MIB
    );
    assert!(full.exists());
    s.restart(Probe::Ping);
    let ok = s.finish();
    assert!(ok.starts_with("OK"), "{ok}");
}

/// counter.c through a chain of incremental checkpoints (plain and --kill), with
/// --keep 1: the checkpoints the newest one needs stay; ticks continue exactly.
/// Damaging the first link makes the restart fail with a checksum error.
#[test]
fn incremental_chain_keeps_its_links_and_detects_damage() {
    let w = Work::new("incr_counter");
    let mut s = Session::start(&w, &[prog("counter")]);
    s.cur().wait_tick(3, T_READY);
    let r = checkpoint_with(&w, &["--incremental"]);
    assert!(r.status.success(), "{r}");
    for _ in 0..2 {
        s.cur().wait_more_ticks(3, T_READY);
        let r = checkpoint_with(&w, &["--incremental", "--keep", "1"]);
        assert!(r.status.success(), "{r}");
    }
    s.cur().wait_more_ticks(3, T_READY);
    let r = checkpoint_with(&w, &["--incremental", "--kill", "--keep", "1"]);
    assert!(r.status.success(), "{r}");
    s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
    let deps = depends_on(&w);
    assert!(
        !deps.is_empty(),
        "the newest incremental checkpoint refers to nothing"
    );
    let names = w.checkpoints();
    for d in &deps {
        assert!(
            names.contains(&format!("checkpoint-{d:06}")),
            "--keep 1 removed checkpoint {d}, which the newest needs: {names:?}"
        );
    }
    // A copy of the chain with its oldest needed link damaged must be refused.
    let damaged = w.path("ck-damaged");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&w.ck)
        .arg(&damaged)
        .status()
        .unwrap();
    assert!(cp.success());
    let first = damaged.join(format!("checkpoint-{:06}", deps[0]));
    let page = std::fs::read_dir(&first)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
        })
        .unwrap();
    let mut bytes = std::fs::read(&page).unwrap();
    let at = bytes.iter().position(|&b| b != 0).unwrap();
    bytes[at] ^= 1;
    std::fs::write(&page, &bytes).unwrap();
    let restart = w.stasis(
        "restart-damaged",
        &[OsStr::new("restart"), damaged.as_os_str()],
    );
    assert!(
        !restart.status.success(),
        "restart from a damaged chain succeeded: {restart}"
    );
    assert!(restart.stderr.contains("checksum"), "{restart}");

    // The intact chain restarts and the computation continues exactly.
    s.restart(Probe::Ticks);
    s.checkpoint_kill();
    s.restart(Probe::Ticks);
    s.finish();
    assert_ticks_consecutive(&s.outputs(), Some(0));
}

/// dirtyset.c: after a full `--incremental` checkpoint, each step rewrites a few
/// pages, discards others (MADV_DONTNEED) and populates a discarded one again. So
/// few pages are written that each incremental checkpoint copies them while the
/// process stays frozen (no snapshot fork), storing about what was written. Before
/// the last one the program gives MADV_DONTFORK to a whole mapping (same bounds,
/// new flags, so the flags remembered from the previous checkpoint are stale): the
/// flags read while the pages are copied catch it. Restarted from the chain, the program finds every page
/// (discarded ones as zeros) and the advice in force.
#[test]
fn small_changes_are_copied_while_frozen() {
    copied_while_frozen("incr_frozen", &[prog("dirtyset").into_os_string()]);
}

/// The same in a tree: dirtyset.c is a child of a shell. Every process of a tree is
/// armed for dirty tracking before the freeze and its remembered mapping flags are
/// used, so the small changes are still copied while frozen, and the `MADV_DONTFORK`
/// of step 3 (a change of flags the remembered ones miss) is caught by the flags read
/// while the pages are copied.
#[test]
fn small_changes_of_a_tree_are_copied_while_frozen() {
    let script = format!("{} & wait", prog("dirtyset").display());
    copied_while_frozen(
        "incr_frozen_tree",
        &["/bin/sh".into(), "-c".into(), script.into()],
    );
}

fn copied_while_frozen(name: &str, cmd: &[std::ffi::OsString]) {
    let w = Work::new(name);
    let mut s = Session::start(&w, cmd);
    let r = checkpoint_with(&w, &["--incremental"]);
    assert!(r.status.success(), "{r}");
    let full_bytes = stored_bytes(&w);
    assert!(
        full_bytes >= 32 * MIB,
        "full checkpoint stored {full_bytes} bytes"
    );
    for step in 1..=3 {
        dirtyset_step(&w, &mut s, step);
        if step == 3 {
            std::fs::write(w.path("advise"), b"").unwrap();
            s.cur().wait_line("`advised`", T_READY, |l| l == "advised");
        }
        let r = checkpoint_with(&w, &["--incremental"]);
        assert!(r.status.success(), "step {step}: {r}");
        let t = &w.inspect_json()["timings"];
        assert_eq!(t["frozen_copy"], true, "step {step}: {t}");
        assert_eq!(t["snapshot"], false, "step {step}: {t}");
        // 85 pages rewritten (every 97th of 8192) and one populated again, plus a
        // few pages of the program's own data.
        let bytes = stored_bytes(&w);
        assert!(
            (86 * 4096..2 * MIB).contains(&bytes),
            "step {step}: stored {bytes} bytes"
        );
        assert!(
            r.stderr.contains("copied while frozen"),
            "step {step}: {}",
            r.stderr
        );
    }
    s.kill_supervisor();
    s.restart(Probe::Ping);
    let ok = s.finish();
    assert_eq!(ok, "OK pages=8192 steps=3 advised=1");
}

/// Checkpoints back to back, a plain one then `--incremental` ones: each is of the
/// one process (no zombie in it), from a snapshot of its own, and the dirty tracking
/// that the first `--incremental` one arms makes the following one store only what
/// changed. (The snapshot of one checkpoint is still being torn down, as a child of
/// the stasis init like orphans of the job, when the next begins: with a release
/// build and a large process it was taken for an orphan, which made the next
/// checkpoint a two-process tree without tracking. This debug build is usually too
/// slow to meet it here.)
#[test]
fn back_to_back_checkpoints_are_of_the_job_alone() {
    let w = Work::new("incr_b2b");
    let mut s = Session::start(&w, &[prog("dirtyset").into_os_string(), "256".into()]);
    let r = checkpoint_with(&w, &[]);
    assert!(r.status.success(), "{r}");
    let r = checkpoint_with(&w, &["--incremental"]);
    assert!(r.status.success(), "{r}");
    let j = w.inspect_json();
    assert_eq!(j["processes"].as_array().map(Vec::len), Some(1));
    let zombies = j["zombies"].as_array().map_or(0, Vec::len);
    assert_eq!(zombies, 0, "{}", j["zombies"]);
    assert_eq!(j["timings"]["snapshot"], true, "{}", j["timings"]);
    dirtyset_step(&w, &mut s, 1);
    let r = checkpoint_with(&w, &["--incremental"]);
    assert!(r.status.success(), "{r}");
    // 676 pages written (every 97th of 65536, and one populated again), and a few
    // of the program's own data.
    let bytes = stored_bytes(&w);
    assert!(
        bytes < 8 * MIB,
        "the incremental checkpoint stored {bytes} bytes"
    );
    s.kill_supervisor();
    s.restart(Probe::Ping);
    let ok = s.finish();
    assert_eq!(ok, "OK pages=65536 steps=1 advised=0");
}

/// The previous checkpoint's page runs are damaged between two `--incremental`
/// checkpoints (a flipped byte in its `runs-PID.bin`): the next one cannot refer to
/// them, so it does not rely on dirty tracking and stores every page itself (it
/// depends on nothing); restarted from it, the program finds every page.
#[test]
fn damaged_previous_runs_are_not_relied_on() {
    let w = Work::new("incr_damaged_prev");
    let mut s = Session::start(&w, &[prog("dirtyset")]);
    let r = checkpoint_with(&w, &["--incremental"]);
    assert!(r.status.success(), "{r}");
    let first = w.newest_checkpoint();
    let full_bytes = stored_bytes(&w);
    dirtyset_step(&w, &mut s, 1);
    let runs = std::fs::read_dir(&first)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("runs-"))
        })
        .expect("a runs file in the first checkpoint");
    let mut bytes = std::fs::read(&runs).unwrap();
    bytes[0] ^= 0x40;
    std::fs::write(&runs, &bytes).unwrap();
    let r = checkpoint_with(&w, &["--incremental"]);
    assert!(r.status.success(), "{r}");
    assert_eq!(
        depends_on(&w),
        Vec::<u64>::new(),
        "it must not refer to the damaged one"
    );
    let stored = stored_bytes(&w);
    assert!(
        stored * 10 >= full_bytes * 9,
        "stored {stored} bytes of {full_bytes}: pages were referred to the damaged checkpoint"
    );
    s.kill_supervisor();
    s.restart(Probe::Ping);
    let ok = s.finish();
    assert_eq!(ok, "OK pages=8192 steps=1 advised=0");
}
