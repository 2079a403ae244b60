//! The processes of a checkpoint: the job's root and the orphans its init adopted, the
//! tree below them, frozen (every thread seized and stopped), and its zombies.

use crate::error::{Error, Result, SysContext};
use crate::freeze::Frozen;
use crate::proc::ProcDir;
use stasis_image::Zombie;

/// The processes a checkpoint of `pid` is about.
pub(super) struct Job {
    pub(super) root: ProcDir,
    /// This process (the stasis init, when it started the job).
    pub(super) me: i32,
    /// The root is our child: we are the init of its PID namespace.
    pub(super) parent_is_us: bool,
    /// The root and, under the init, the orphans it adopted (part of the job).
    pub(super) roots: Vec<i32>,
}

impl Job {
    pub(super) fn find(pid: i32) -> Result<Job> {
        let root = ProcDir::new(pid);
        if !root.path.exists() {
            return Err(Error::Attach {
                pid,
                msg: "no such process".into(),
            });
        }
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        let parent_is_us = root
            .process()
            .ok()
            .and_then(|p| p.stat().ok())
            .is_some_and(|s| s.ppid == me);
        let mut roots = vec![pid];
        if parent_is_us {
            roots.extend(orphans_of(me)?.into_iter().filter(|&c| c != pid));
        }
        Ok(Job {
            root,
            me,
            parent_is_us,
            roots,
        })
    }
}

/// The frozen processes of a tree, parents first.
pub(super) type FrozenTree = Vec<(ProcDir, Frozen)>;

/// Freezes the `roots` (the first is the application) and all their descendants,
/// parents before children, until no process of the tree is left running (a process
/// forking while we freeze is caught by the next round). Children that already
/// exited but were not reaped, or exit while being stopped, are zombies.
pub(super) fn freeze_tree(
    roots: &[i32],
    adopter: Option<i32>,
) -> Result<(FrozenTree, Vec<Zombie>)> {
    let root = roots[0];
    let mut tree: FrozenTree = Vec::new();
    let mut zombies = Vec::new();
    let mut known = std::collections::HashSet::new();
    let mut queue: std::collections::VecDeque<i32> = roots.iter().copied().collect();
    loop {
        while let Some(p) = queue.pop_front() {
            if !known.insert(p) {
                continue;
            }
            let proc = ProcDir::new(p);
            let stat = match read_stat(&proc) {
                Ok(s) => s,
                Err(_) if p != root => continue, // exited meanwhile
                Err(e) => return Err(e),
            };
            if stat.state == 'Z' {
                if p == root {
                    return Err(Error::Gone { pid: p });
                }
                zombies.push(zombie(p, &stat));
                continue;
            }
            let frozen = match Frozen::freeze(&proc) {
                Ok(f) => f,
                Err(e @ (Error::Gone { .. } | Error::Attach { .. })) if p != root => {
                    // It exited while being stopped (its parent is already frozen, so
                    // it stays a zombie until restart) or is gone altogether.
                    match exited_state(&proc) {
                        Some(Some(stat)) => zombies.push(zombie(p, &stat)),
                        Some(None) => {}
                        None => return Err(e),
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            queue.extend(job_children(&proc)?);
            tree.push((proc, frozen));
        }
        // Everything known is stopped now; children forked meanwhile are caught here.
        for (proc, _) in &tree {
            queue.extend(
                job_children(proc)?
                    .into_iter()
                    .filter(|c| !known.contains(c)),
            );
        }
        // The children of a process that exited while we froze are reparented to
        // the namespace init (us): they belong to the job as well.
        if let Some(me) = adopter {
            let orphans = orphans_of(me)?;
            queue.extend(orphans.into_iter().filter(|c| !known.contains(c)));
        }
        if queue.is_empty() {
            return Ok((tree, zombies));
        }
    }
}

/// The processes of the job below `roots` as they are now, while it runs (best
/// effort: processes come and go; the checkpoint itself finds them frozen).
pub(super) fn running_tree(roots: &[i32]) -> Vec<i32> {
    let mut out = Vec::new();
    let mut queue: std::collections::VecDeque<i32> = roots.iter().copied().collect();
    while let Some(p) = queue.pop_front() {
        if out.contains(&p) {
            continue;
        }
        out.push(p);
        queue.extend(job_children(&ProcDir::new(p)).unwrap_or_default());
    }
    out
}

/// The children of a process of the job, not counting our snapshots (alive, or
/// zombies left to it).
pub(super) fn job_children(proc: &ProcDir) -> Result<Vec<i32>> {
    let mut kids = proc.children()?;
    kids.retain(|&c| !crate::snapshot::is_snapshot(c));
    Ok(kids)
}

/// The children of the namespace init `me` (the application and the orphans it
/// adopted), not counting snapshots of earlier checkpoints still being torn down.
pub(super) fn orphans_of(me: i32) -> Result<Vec<i32>> {
    let mut kids = ProcDir::new(me).children()?;
    kids.retain(|&c| !crate::snapshot::is_snapshot(c));
    Ok(kids)
}

pub(super) fn read_stat(proc: &ProcDir) -> Result<procfs::process::Stat> {
    let p = proc.pid;
    proc.process().and_then(|pr| {
        pr.stat()
            .map_err(std::io::Error::other)
            .ctx(p, || "reading /proc/PID/stat".into())
    })
}

pub(super) fn zombie(pid: i32, stat: &procfs::process::Stat) -> Zombie {
    Zombie {
        pid,
        ppid: stat.ppid,
        pgid: stat.pgrp,
        sid: stat.session,
        status: stat.exit_code.unwrap_or(0),
    }
}

/// After a process failed to freeze: `Some(Some(stat))` if it is a zombie now,
/// `Some(None)` if it is gone, `None` if it still lives (the failure was real). An
/// exiting process takes a moment to become a zombie; that moment is waited out.
pub(super) fn exited_state(proc: &ProcDir) -> Option<Option<procfs::process::Stat>> {
    for _ in 0..100 {
        match read_stat(proc) {
            Err(_) => return Some(None),
            Ok(s) if s.state == 'Z' => return Some(Some(s)),
            Ok(s) if s.state == 'X' => return Some(None),
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
    None
}
