//! Files deleted while open, and mappings of deleted files and memfds (issue #11),
//! each kind set up by a small program that checks its own state after `go`:
//! deleted.c (one deleted inode opened twice, inherited by a child, and one with
//! two hard links both removed: after the restarts each is still one inode, writes
//! through one fd are read through the other, offsets, flags, size, mode, times
//! and holes are as they were), delmap.c (MAP_SHARED and MAP_PRIVATE mappings of a
//! deleted file held as an fd, and of deleted files only mapped: content, sharing
//! with the fd, private copied-on-write pages) and memfdx.c (memfds: name, mode,
//! seals, content, MAP_SHARED and MAP_PRIVATE mappings, and fexecve of a memfd
//! holding a program), delmisc.c (a file unlinked while another hard link remains
//! is the inode of that link, also mapped; a file whose directory was removed; a
//! directory opened and removed; a removed working directory; and, with its other
//! link beyond what stasis searches, a refused checkpoint).
//!
//! Every program runs under `stasis run` through a checkpoint it survives, two
//! `checkpoint --kill` / restart cycles at random moments (seed printed;
//! STASIS_TEST_SEED repeats it) and a checkpoint of the restored job, as root and as a
//! plain user; and started outside stasis through `checkpoint --pid P --dir D`,
//! `--kill`, `stasis restart D` and a supervised cycle. The images are inspected: each
//! inode is saved once, and every fd and mapping of it refers to that one object.
//! (Helpers copied from procstate2.rs.)
mod common;
use common::cycles::*;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;

/// The objects of an image's `shared_memory`, by id.
fn objects(meta: &Value) -> BTreeMap<u64, &Value> {
    meta["shared_memory"]
        .as_array()
        .expect("no shared_memory array")
        .iter()
        .map(|o| (o["id"].as_u64().expect("object without id"), o))
        .collect()
}

/// The objects that the fds of kind `kind` of process `pid` refer to, by fd number.
fn fd_objects(meta: &Value, pid: i64, kind: &str, key: &str) -> BTreeMap<i64, u64> {
    image_proc(meta, pid)["fds"]
        .as_array()
        .expect("no fds")
        .iter()
        .filter(|f| f["kind"]["type"] == kind)
        .map(|f| {
            (
                f["fd"].as_i64().expect("fd without number"),
                f["kind"][key].as_u64().expect("fd without object"),
            )
        })
        .collect()
}

/// The objects that process `pid` maps (ids, in mapping order).
fn mapped_objects(meta: &Value, pid: i64) -> Vec<u64> {
    image_proc(meta, pid)["mappings"]
        .as_array()
        .expect("no mappings")
        .iter()
        .filter(|m| m["kind"]["type"] == "shared_memory")
        .map(|m| m["kind"]["id"].as_u64().expect("mapping without id"))
        .collect()
}

// ---------------------------------------------------------------------------
// deleted.c: deleted files opened several times
// ---------------------------------------------------------------------------

/// R's four fds of deleted files refer to two objects (a twice, b twice), each saved
/// once as a deleted file with its mode; C's inherited a1, b1 and b2 are the same
/// objects.
fn check_deleted(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let id = |k: &str| -> i64 { f[k].parse().unwrap() };
    let objs = objects(meta);
    let r = fd_objects(meta, id("pid"), "deleted", "object");
    let distinct: BTreeSet<u64> = r.values().copied().collect();
    assert_eq!(r.len(), 4, "{what}: R's deleted fds: {r:?}");
    assert_eq!(distinct.len(), 2, "{what}: R's deleted fds' objects: {r:?}");
    for o in &distinct {
        let obj = objs
            .get(o)
            .unwrap_or_else(|| panic!("{what}: object {o} missing from shared_memory"));
        assert!(obj["deleted"].is_object(), "{what}: object {o}: {obj}");
    }
    assert!(
        distinct.iter().any(|o| objs[o]["mode"] == 0o640),
        "{what}: no object with mode 0640: {objs:?}"
    );
    let c = fd_objects(meta, id("child"), "deleted", "object");
    assert_eq!(c.len(), 3, "{what}: C's deleted fds (a1, b1, b2): {c:?}");
    assert!(
        c.values().all(|o| distinct.contains(o)),
        "{what}: C's fds are other objects: {c:?} vs {r:?}"
    );
}

#[test]
fn deleted_files_under_run() {
    run_cycles("del_files", "deleted", &[], false, check_deleted);
}

#[test]
fn deleted_files_under_run_as_unprivileged_user() {
    run_cycles("del_files_user", "deleted", &[], true, check_deleted);
}

#[test]
fn deleted_files_by_pid() {
    pid_cycles("del_files_pid", "deleted", &[], false, check_deleted);
}

#[test]
fn deleted_files_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles("del_files_pid_user", "deleted", &[], true, check_deleted);
}

// ---------------------------------------------------------------------------
// delmap.c: mappings of deleted files
// ---------------------------------------------------------------------------

/// R maps three deleted files (m twice, shared and private; n; p), each one object
/// marked deleted; m's object is also its fd's.
fn check_delmap(meta: &Value, ready: &str, what: &str) {
    let pid = field_num(ready, "pid") as i64;
    let objs = objects(meta);
    let mapped = mapped_objects(meta, pid);
    let distinct: BTreeSet<u64> = mapped.iter().copied().collect();
    assert_eq!(mapped.len(), 4, "{what}: R's object mappings: {mapped:?}");
    assert_eq!(distinct.len(), 3, "{what}: R's mapped objects: {mapped:?}");
    for o in &distinct {
        let obj = objs
            .get(o)
            .unwrap_or_else(|| panic!("{what}: object {o} missing from shared_memory"));
        assert!(obj["deleted"].is_object(), "{what}: object {o}: {obj}");
    }
    let fds = fd_objects(meta, pid, "deleted", "object");
    assert_eq!(fds.len(), 1, "{what}: R's deleted fds: {fds:?}");
    assert!(
        fds.values().all(|o| distinct.contains(o)),
        "{what}: the fd of m is not a mapped object: {fds:?} vs {mapped:?}"
    );
}

#[test]
fn deleted_file_mappings_under_run() {
    run_cycles("del_maps", "delmap", &[], false, check_delmap);
}

#[test]
fn deleted_file_mappings_under_run_as_unprivileged_user() {
    run_cycles("del_maps_user", "delmap", &[], true, check_delmap);
}

#[test]
fn deleted_file_mappings_by_pid() {
    pid_cycles("del_maps_pid", "delmap", &[], false, check_delmap);
}

#[test]
fn deleted_file_mappings_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles("del_maps_pid_user", "delmap", &[], true, check_delmap);
}

// ---------------------------------------------------------------------------
// memfdx.c: memfds
// ---------------------------------------------------------------------------

/// The three memfds are objects with their names, modes and seals.
fn check_memfdx(meta: &Value, ready: &str, what: &str) {
    let objs = objects(meta);
    let named = |name: &str| -> &Value {
        objs.values()
            .find(|o| o["name"] == name)
            .unwrap_or_else(|| panic!("{what}: no object named {name}: {objs:?}"))
    };
    let sealed = named("stasis-sealed");
    assert_eq!(sealed["mode"], 0o640, "{what}: {sealed}");
    assert_eq!(
        sealed["seals"].as_u64(),
        Some(field_num(ready, "seals")),
        "{what}: {sealed}"
    );
    let plain = named("stasis-plain");
    assert_eq!(
        plain["seals"].as_u64(),
        Some(field_num(ready, "pseals")),
        "{what}: {plain}"
    );
    assert_eq!(named("stasis-exe")["mode"], 0o755, "{what}");
    assert!(sealed["deleted"].is_null(), "{what}: {sealed}");
}

#[test]
fn memfds_under_run() {
    run_cycles("del_memfd", "memfdx", &[], false, check_memfdx);
}

#[test]
fn memfds_under_run_as_unprivileged_user() {
    run_cycles("del_memfd_user", "memfdx", &[], true, check_memfdx);
}

#[test]
fn memfds_by_pid() {
    pid_cycles("del_memfd_pid", "memfdx", &[], false, check_memfdx);
}

#[test]
fn memfds_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles("del_memfd_pid_user", "memfdx", &[], true, check_memfdx);
}

// ---------------------------------------------------------------------------
// delmisc.c: removed names whose files or directories live on
// ---------------------------------------------------------------------------

/// R's fd of H is saved as a file under its remaining name misc/deep/er/h2, and so is
/// its mapping; D is a removed directory; C's working directory was removed.
fn check_delmisc(meta: &Value, ready: &str, what: &str) {
    let f = fields(ready);
    let id = |k: &str| -> i64 { f[k].parse().unwrap() };
    let r = image_proc(meta, id("pid"));
    let fds = r["fds"].as_array().expect("no fds");
    assert!(
        fds.iter().any(|fd| fd["kind"]["type"] == "file"
            && fd["kind"]["file"]["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("misc/deep/er/h2"))),
        "{what}: no fd of misc/deep/er/h2: {fds:?}"
    );
    assert!(
        fds.iter().any(|fd| fd["kind"]["type"] == "removed_dir"),
        "{what}: no removed directory fd: {fds:?}"
    );
    let maps = r["mappings"].as_array().expect("no mappings");
    assert!(
        maps.iter().any(|m| m["kind"]["type"] == "file"
            && m["name"]
                .as_str()
                .is_some_and(|p| p.ends_with("misc/deep/er/h2"))),
        "{what}: no mapping of misc/deep/er/h2"
    );
    let c = image_proc(meta, id("child"));
    assert_eq!(c["cwd_removed"], true, "{what}: C's cwd {}", c["cwd"]);
}

#[test]
fn removed_names_under_run() {
    run_cycles("del_misc", "delmisc", &[], false, check_delmisc);
}

#[test]
fn removed_names_under_run_as_unprivileged_user() {
    run_cycles("del_misc_user", "delmisc", &[], true, check_delmisc);
}

#[test]
fn removed_names_by_pid() {
    pid_cycles("del_misc_pid", "delmisc", &[], false, check_delmisc);
}

#[test]
fn removed_names_by_pid_as_unprivileged_user() {
    if !user_may_ptrace() {
        eprintln!("skipped: kernel.yama.ptrace_scope forbids a user to trace a non-descendant");
        return;
    }
    pid_cycles("del_misc_pid_user", "delmisc", &[], true, check_delmisc);
}

/// A file unlinked while open whose other link stasis does not find (beyond the
/// entries it searches) is refused at checkpoint time, with and without --kill, with
/// an error naming it and its fd; nothing is published, the job runs on and ends
/// well.
fn far_link_refused(name: &str, as_user: bool) {
    let (w, exe) = work_for(name, "delmisc", as_user);
    let mut s = Session::start(&w, &[exe.as_os_str(), OsStr::new("far")]);
    let ready = s.cur().lines()[0].clone();
    let hf = field_num(&ready, "hf") as i64;
    s.cur().wait_tick(3, T_READY);
    for kill in [false, true] {
        let before = s.cur().last_tick().unwrap();
        let r = w.checkpoint(kill);
        eprintln!("{name} (kill={kill}): {}", r.stderr.trim());
        assert!(!r.status.success(), "checkpoint succeeded: {r}");
        assert!(
            r.stderr.contains("other link") && r.stderr.contains("misc/h1"),
            "the error does not name misc/h1 and its other link: {r}"
        );
        assert!(
            r.stderr.contains("mapping") || mentions_number(&r.stderr, hf),
            "the error names neither the mapping nor fd {hf}: {r}"
        );
        assert!(
            w.checkpoints().is_empty(),
            "a checkpoint was published: {:?}",
            w.checkpoints()
        );
        let after = s.cur().wait_more_ticks(3, T_READY);
        assert!(after > before);
    }
    let ok = s.finish();
    eprintln!("{name}: {ok}");
}

#[test]
fn unlinked_file_with_unfound_link_is_refused() {
    far_link_refused("del_far", false);
}

#[test]
fn unlinked_file_with_unfound_link_is_refused_as_unprivileged_user() {
    far_link_refused("del_far_user", true);
}
