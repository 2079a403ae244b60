//! Memory: anonymous memory of all kinds (memory.c), a sparse 8 GiB mapping
//! that must not bloat the image, heap growth after restart, and private file
//! mappings (filemap.c) including refusal to restore over a changed file.
mod common;
use common::*;
use serde_json::Value;
use std::io::Write;
use std::time::Duration;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

fn num(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => s.parse().ok().or_else(|| u64::from_str_radix(s, 16).ok()),
            }
        }
        _ => None,
    }
}

/// Size of a mapping object from `inspect --json`, if it can be told.
fn mapping_size(m: &Value) -> Option<u64> {
    let get = |k: &str| m.get(k).and_then(num);
    if let (Some(s), Some(e)) = (get("start"), get("end")) {
        return Some(e.saturating_sub(s));
    }
    ["size", "len", "length"].iter().find_map(|k| get(k))
}

/// Structural checks of `inspect --json` for a checkpoint of memory.c.
fn check_inspect(w: &Work) {
    let j = w.inspect_json();
    let procs = j["processes"]
        .as_array()
        .unwrap_or_else(|| panic!("no \"processes\" array in {j}"));
    assert!(!procs.is_empty(), "inspect: empty processes array");
    let mut saw_sparse = false;
    let mut sizes_known = false;
    for p in procs {
        assert!(
            p["pid"].is_u64() || p["pid"].is_i64(),
            "process without numeric pid: {p}"
        );
        let maps = p["mappings"]
            .as_array()
            .unwrap_or_else(|| panic!("process without mappings: {p}"));
        let fds = p["fds"]
            .as_array()
            .unwrap_or_else(|| panic!("process without fds: {p}"));
        assert!(
            maps.len() >= 5,
            "implausibly few mappings ({}) for a C program",
            maps.len()
        );
        assert!(fds.len() >= 3, "stdio missing from fds: {fds:?}");
        for m in maps {
            if let Some(sz) = mapping_size(m) {
                sizes_known = true;
                saw_sparse |= sz >= 8 * GIB;
            }
        }
    }
    if sizes_known {
        assert!(saw_sparse, "inspect --json shows no mapping of >= 8 GiB");
    } else {
        eprintln!("note: cannot tell mapping sizes from inspect --json; skipped the 8 GiB lookup");
    }
    // text form works too
    let r = w.stasis("inspect-text", &["inspect".as_ref(), w.ck.as_os_str()]);
    assert!(r.status.success() && !r.stdout.trim().is_empty(), "{r}");
}

/// 64 MiB random + 16 MiB zeros + small heap chunks + protected regions with a
/// guard page + sparse 8 GiB mapping survive two cycles; the image stays
/// small; the heap can grow after restart (checked by the program).
#[test]
fn anonymous_memory_survives() {
    let w = Work::new("memory");
    let mut s = Session::start(&w, &[prog("memory")]);
    let ck = s.checkpoint_kill();
    let (du, apparent) = Work::usage(&ck);
    eprintln!(
        "checkpoint {}: du {} KiB, apparent {} KiB",
        ck.display(),
        du / 1024,
        apparent / 1024
    );
    assert!(
        du < 200 * MIB,
        "checkpoint uses {} MiB on disk (sparse 8 GiB mapping dumped?)",
        du / MIB
    );
    assert!(
        du >= 64 * MIB || apparent >= 64 * MIB,
        "checkpoint ({du} bytes) cannot hold 64 MiB of random data"
    );
    check_inspect(&w);
    s.restart(Probe::Ping);
    let ck2 = s.checkpoint_kill();
    let (du2, _) = Work::usage(&ck2);
    assert!(
        du2 < 200 * MIB,
        "second checkpoint uses {} MiB on disk",
        du2 / MIB
    );
    s.restart(Probe::Ping);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_eq!(ok, format!("OK rand={}", s.ready_field("rand")));
}

/// Private file mapping: modified pages keep the modification, untouched
/// pages show the file, the mapping is still file backed.
#[test]
fn private_file_mapping_survives() {
    let w = Work::new("filemap");
    let mut s = Session::start(&w, &[prog("filemap")]);
    s.cycle(Probe::Ping);
    s.cycle(Probe::Ping);
    s.finish();
    s.assert_no_rerun();
}

/// The mapped file changes (one byte appended) between checkpoint and
/// restart: restart must refuse, naming the file, and restore nothing.
#[test]
fn changed_mapped_file_is_refused() {
    let w = Work::new("filemap_changed");
    let mut s = Session::start(&w, &[prog("filemap")]);
    s.checkpoint_kill();
    if let Err(p) = wait_no_procs_in(&w.dir, Duration::from_secs(5)) {
        panic!(
            "app still alive after checkpoint --kill:\n{}",
            describe_procs(&p)
        );
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(w.path("mapped.dat"))
        .unwrap();
    f.write_all(b"X").unwrap();
    drop(f);
    let mut r = w.restart("restart-changed");
    let st = r.wait(T_CMD);
    let err = r.stderr();
    assert!(
        !st.success() && st.code() != Some(EXIT_CHECKPOINTED),
        "restart over a changed mapped file: {}\n{}",
        status_str(&st),
        r.diag()
    );
    assert!(
        err.contains("mapped.dat"),
        "error does not name the changed file:\n{}",
        r.diag()
    );
    eprintln!("changed mapped file: {}", err.trim());
    assert!(r.stdout().is_empty(), "the application ran:\n{}", r.diag());
    if let Err(p) = wait_no_procs_in(&w.dir, Duration::from_secs(5)) {
        panic!(
            "processes left after the failed restart:\n{}",
            describe_procs(&p)
        );
    }
}

/// Runs `memory` (with `args`), takes a checkpoint that leaves it running,
/// SIGKILLs `stasis run`, restarts from that checkpoint and lets the program
/// check every page. Returns the image's timings.
fn snapshot_checkpoint_restores(name: &str, args: &[&str]) -> Value {
    let w = Work::new(name);
    let mut argv = vec![prog("memory").into_os_string()];
    argv.extend(args.iter().map(|a| a.into()));
    let mut s = Session::start(&w, &argv);
    w.checkpoint_ok(false, s.cur());
    let timings = w.inspect_json()["timings"].clone();
    s.kill_supervisor();
    s.restart(Probe::Ping);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_eq!(ok, format!("OK rand={}", s.ready_field("rand")));
    timings
}

/// A checkpoint that leaves the process running is written from its
/// copy-on-write snapshot by the snapshot itself (one copy into the page
/// files, see snapshot.rs): the image says so, and every kind of anonymous
/// memory (64 MiB random, zeroed, heap, read-only and guard pages, a sparse
/// 8 GiB mapping) comes back exactly after restart.
#[test]
fn snapshot_writes_its_own_pages() {
    let t = snapshot_checkpoint_restores("snapshot_writer", &[]);
    assert_eq!(t["snapshot"], true, "timings: {t}");
    assert_eq!(t["one_copy"], true, "timings: {t}");
}

/// `checkpoint --kill` of a single process: it stays frozen until it is killed,
/// but its pages are still written by its snapshot (one copy); the application
/// exits with 75 and all its memory comes back exactly after restart.
#[test]
fn kill_checkpoint_is_written_by_the_snapshot() {
    let w = Work::new("snapshot_kill");
    let mut s = Session::start(&w, &[prog("memory")]);
    let r = w.checkpoint(true);
    assert!(r.status.success(), "{r}");
    assert!(r.stderr.contains("application stopped"), "{}", r.stderr);
    s.cur().expect_exit(EXIT_CHECKPOINTED, T_CMD);
    let t = w.inspect_json()["timings"].clone();
    assert_eq!(t["snapshot"], true, "timings: {t}");
    assert_eq!(t["one_copy"], true, "timings: {t}");
    s.restart(Probe::Ping);
    let ok = s.finish();
    s.assert_no_rerun();
    assert_eq!(ok, format!("OK rand={}", s.ready_field("rand")));
}

/// A snapshot that cannot open the image (the process lowered its
/// RLIMIT_NOFILE to 0, which the snapshot inherits) is copied from outside
/// instead: the checkpoint still succeeds, the image says how it was made, and
/// memory comes back exactly.
#[test]
fn snapshot_that_cannot_open_the_image_is_copied_from_outside() {
    let t = snapshot_checkpoint_restores("snapshot_nofile", &["nofile0"]);
    assert_eq!(t["snapshot"], true, "timings: {t}");
    assert_eq!(t["one_copy"], false, "timings: {t}");
}

/// Memory a fork does not copy (MADV_DONTFORK: absent from a child;
/// MADV_WIPEONFORK: zero in a child), which the copy-on-write snapshot therefore
/// cannot supply: copied while the process is frozen. A checkpoint that leaves
/// the process running, then SIGKILL and restart, and then a checkpoint --kill
/// cycle, give back every byte of both areas and of a plain one, with the
/// advice still in force.
#[test]
fn dontfork_and_wipeonfork_memory_survive_snapshots() {
    let w = Work::new("forkadvice");
    let mut s = Session::start(&w, &[prog("forkadvice")]);
    w.checkpoint_ok(false, s.cur());
    let t = w.inspect_json()["timings"].clone();
    assert_eq!(t["snapshot"], true, "timings: {t}");
    s.kill_supervisor();
    s.restart(Probe::Ping);
    s.cycle(Probe::Ping);
    let ok = s.finish();
    assert_eq!(ok, "OK areas=3");
}

/// The flags of a mapping change without its bounds changing (MADV_DONTFORK and
/// MADV_WIPEONFORK given to whole mappings after a first checkpoint): the next
/// checkpoint, which starts from the flags remembered from the first, finds the
/// change on its snapshot, starts over with fresh flags and copies both areas
/// while the process is frozen. Restarted from that checkpoint, the program finds
/// every byte (a wiped area saved as zeros would fail it) and the advice in force.
#[test]
fn advice_given_between_checkpoints_is_seen() {
    let w = Work::new("lateadvice");
    let mut s = Session::start(&w, &[prog("forkadvice").into_os_string(), "late".into()]);
    w.checkpoint_ok(false, s.cur());
    std::fs::write(w.path("advise"), b"").unwrap();
    s.cur().wait_line("`advised`", T_READY, |l| l == "advised");
    w.checkpoint_ok(false, s.cur());
    assert_eq!(w.inspect_json()["timings"]["snapshot"], true);
    s.kill_supervisor();
    s.restart(Probe::Ping);
    let ok = s.finish();
    assert_eq!(ok, "OK areas=3");
}

/// The image's mappings of `shared.dat` (sharedmap.c), one per process: (pid, its
/// saved content file).
fn shared_dat_mappings(meta: &Value) -> Vec<(i64, Option<String>)> {
    let mut out = Vec::new();
    for p in meta["processes"].as_array().expect("no processes") {
        for m in p["mappings"].as_array().into_iter().flatten() {
            let path = m["kind"]["file"]["path"].as_str().unwrap_or("");
            if m["kind"]["type"] == "file" && path.ends_with("/shared.dat") {
                out.push((
                    p["pid"].as_i64().unwrap_or(-1),
                    m["content_file"].as_str().map(str::to_string),
                ));
            }
        }
    }
    out
}

/// sharedmap.c: four processes each map one file MAP_SHARED (as MPI ranks map each
/// other's segments). The checkpoint holds the file's content once, and a restart
/// with the file gone recreates it: one file again, shared by all four (a token each
/// child writes is seen through the parent's mapping), every page holding what its
/// process last wrote, ticks continuing.
#[test]
fn shared_file_of_a_tree_is_saved_once_and_recreated() {
    let w = Work::new("sharedmap");
    let mut s = Session::start(&w, &[prog("sharedmap")]);
    s.cur().wait_tick(3, T_READY);
    s.checkpoint_kill();
    let maps = shared_dat_mappings(&w.inspect_json());
    assert_eq!(
        maps.len(),
        4,
        "one mapping of shared.dat per process: {maps:?}"
    );
    let files: std::collections::BTreeSet<_> = maps.iter().map(|m| m.1.clone()).collect();
    assert_eq!(files.len(), 1, "one saved copy for all processes: {maps:?}");
    let saved = files
        .into_iter()
        .next()
        .flatten()
        .expect("no saved content");
    assert!(
        w.newest_checkpoint().join(&saved).exists(),
        "{saved} is not in the checkpoint"
    );
    let copies = std::fs::read_dir(w.newest_checkpoint())
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            n.to_string_lossy().starts_with("shared-")
        })
        .count();
    assert_eq!(
        copies, 1,
        "the checkpoint holds {copies} saved shared files"
    );
    std::fs::remove_file(w.path("shared.dat")).unwrap();
    s.restart(Probe::Ticks);
    assert!(
        w.path("shared.dat").exists(),
        "shared.dat was not recreated"
    );
    s.cur().wait_more_ticks(3, T_READY);
    let ok = s.finish();
    assert!(ok.contains("processes=4"), "{ok}");
    assert_ticks_consecutive(&s.outputs(), Some(1));
}
