//! The snapshots not reaped yet, and those left as zombies of a process of the job
//! (reaped by an injected `wait4` in that process at its next checkpoint).

use crate::error::Result;
use crate::inject::Injector;

/// Snapshots of tree processes, dead and reaped by us as their tracer, left as
/// zombies of their parent in the job: snapshot -> parent.
static LEFT: std::sync::Mutex<std::collections::BTreeMap<i32, i32>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// In the frozen process `inj` runs in: reaps the zombies our snapshots left as its
/// children (an injected `wait4(pid, WNOHANG | __WALL)` each).
pub fn reap_left(inj: &Injector) -> Result<()> {
    let pid = inj.tid();
    let mine: Vec<i32> = LEFT
        .lock()
        .map(|l| l.iter().filter(|e| *e.1 == pid).map(|e| *e.0).collect())
        .unwrap_or_default();
    for s in mine {
        let r = inj.raw(
            libc::SYS_wait4,
            &[s as u64, 0, (libc::WNOHANG | libc::__WALL) as u64, 0],
        )?;
        // ECHILD: not its child any more (reaped by us after its parent died).
        if r == s as i64 || r == -(libc::ECHILD as i64) {
            if let Ok(mut left) = LEFT.lock() {
                left.remove(&s);
            }
        }
    }
    Ok(())
}

/// Whether snapshot `pid` has died (it is a zombie, ours to reap, or gone).
pub fn is_dead(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .is_none_or(|state| matches!(state, 'Z' | 'X'))
}

/// `pid` was reaped: if it was one of our snapshots, it is no longer.
pub fn forget_reaped(pid: i32) {
    if let Ok(mut ours) = SNAPSHOTS.lock() {
        ours.remove(&pid);
    }
}

/// A left snapshot zombie reaped by us (its parent in the job exited).
pub fn forget_left(pid: i32) {
    if let Ok(mut left) = LEFT.lock() {
        left.remove(&pid);
    }
}

/// The snapshots not reaped yet (a dying one takes a while to tear down, and is our
/// child like the job's orphans).
static SNAPSHOTS: std::sync::Mutex<std::collections::BTreeSet<i32>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Whether `pid` is one of our snapshots (not part of any job).
pub fn is_snapshot(pid: i32) -> bool {
    SNAPSHOTS.lock().is_ok_and(|s| s.contains(&pid))
        || LEFT.lock().is_ok_and(|l| l.contains_key(&pid))
}

/// `pid` is one of our snapshots (until reaped).
pub(super) fn note_snapshot(pid: i32) {
    if let Ok(mut ours) = SNAPSHOTS.lock() {
        ours.insert(pid);
    }
}

/// Snapshot `pid`, reaped by us, is left as a zombie of `parent`.
pub(super) fn note_left(pid: i32, parent: i32) {
    if let Ok(mut left) = LEFT.lock() {
        left.insert(pid, parent);
    }
}
