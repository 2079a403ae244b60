//! Tracking which pages a process writes between checkpoints, so that an
//! incremental checkpoint need not even read the others.
//!
//! When a checkpoint is taken with `--incremental`, the process's memory is
//! write-protected with a userfaultfd in asynchronous mode (created by an injected
//! `userfaultfd(2)` in the process, taken out with `pidfd_getfd`, and closed in the
//! process again): the kernel resolves the first write to each page by itself (one
//! minor fault per page per checkpoint interval) and remembers it. The next
//! incremental checkpoint asks PAGEMAP_SCAN which pages were written; the others are
//! the previous checkpoint's, unread. Mappings that are not registered (created since,
//! or of a kind uffd-wp does not support) count as written. Tracking lives in the
//! checkpointing process (the stasis init) and ends with it; without it, incremental
//! checkpoints compare content hashes of every page.

use crate::error::{Result, SysContext};
use crate::inject::Injector;
use crate::memory::Vma;
use crate::proc::ProcDir;
use procfs::process::VmFlags;
use stasis_sys::dirty;
use std::collections::BTreeMap;
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::sync::Mutex;

struct Tracker {
    uffd: OwnedFd,
    /// Checkpoint the protection was armed at.
    armed_at: u64,
    /// Every registered mapping was write-protected before this checkpoint's freeze
    /// (by `prearm`).
    protected: bool,
}

static TRACKERS: Mutex<BTreeMap<i32, Tracker>> = Mutex::new(BTreeMap::new());

/// `armed_at` of a tracker whose protection belongs to no checkpoint.
const NOT_ARMED: u64 = u64::MAX;

/// Written page ranges of `vmas` since checkpoint `prev_seq`, or None when the process
/// was not being tracked since then (everything must be read). The written pages are
/// write-protected again as they are found: [`arm`] then only has mappings that are
/// new to protect. Until `arm` says which checkpoint the protection belongs to, the
/// tracker is marked as belonging to none (a checkpoint failing in between must not
/// leave pages looking unwritten since `prev_seq`).
pub fn written(proc: &ProcDir, vmas: &[Vma], prev_seq: u64) -> Option<Vec<(u64, u64)>> {
    let mut trackers = TRACKERS.lock().ok()?;
    let t = trackers.get_mut(&proc.pid)?;
    if t.armed_at != prev_seq {
        return None;
    }
    t.armed_at = NOT_ARMED;
    let pagemap = std::fs::File::open(proc.file("pagemap")).ok()?;
    let mut out = Vec::new();
    for v in vmas {
        if !v.saves_pages() {
            continue;
        }
        if !v.flags().contains(VmFlags::UW) {
            // Not write-protect tracked (new since, or unsupported): all of it.
            out.push((v.map.start, v.map.end));
            continue;
        }
        match dirty::written_ranges(pagemap.as_raw_fd(), v.map.start, v.map.end, true) {
            Ok(r) => out.extend(r),
            Err(e) => {
                tracing::debug!(
                    "process {}: PAGEMAP_SCAN failed ({e}); reading everything",
                    proc.pid
                );
                return None;
            }
        }
    }
    out.sort_unstable();
    tracing::debug!(
        "process {}: {} KiB written since checkpoint {prev_seq} ({} mappings not tracked)",
        proc.pid,
        out.iter().map(|(a, b)| b - a).sum::<u64>() >> 10,
        vmas.iter()
            .filter(|v| v.saves_pages() && !v.flags().contains(VmFlags::UW))
            .count()
    );
    Some(out)
}

/// Arms write-protection of the process's memory for the next incremental
/// checkpoint. Best effort: where the kernel does not allow it, the next
/// incremental checkpoint compares content instead. `rescanned`: [`written`] has
/// just write-protected again every page written in the tracked mappings.
/// Returns whether mappings were registered that `vmas` does not show as registered
/// (their VmFlags lack `uw`): flags remembered from `vmas` would then be stale.
/// Errs only for a fault injected for a test (see `stasis_sys::fault`).
pub fn arm(
    proc: &ProcDir,
    vmas: &[Vma],
    inj: &Injector,
    seq: u64,
    rescanned: bool,
) -> Result<bool> {
    match try_arm(proc, vmas, inj, seq, rescanned) {
        Ok(fresh) => Ok(fresh),
        Err(e @ crate::Error::Fault(_)) => {
            if let Ok(mut t) = TRACKERS.lock() {
                t.remove(&proc.pid);
            }
            Err(e)
        }
        Err(e) => {
            tracing::debug!("process {}: no dirty-page tracking: {e}", proc.pid);
            if let Ok(mut t) = TRACKERS.lock() {
                t.remove(&proc.pid);
            }
            Ok(false)
        }
    }
}

fn try_arm(
    proc: &ProcDir,
    vmas: &[Vma],
    inj: &Injector,
    seq: u64,
    rescanned: bool,
) -> Result<bool> {
    let pid = proc.pid;
    let mut trackers = TRACKERS.lock().map_err(|_| crate::Error::Gone { pid })?;
    if let std::collections::btree_map::Entry::Vacant(slot) = trackers.entry(pid) {
        slot.insert(Tracker {
            uffd: create_uffd(pid, inj)?,
            armed_at: seq,
            protected: false,
        });
    }
    let t = trackers.get_mut(&pid).ok_or(crate::Error::Gone { pid })?;
    // Registered mappings are protected already: just now by the scan, or before the
    // freeze by `prearm`.
    let protected = rescanned || t.protected;
    t.protected = false;
    let mut fresh = false;
    for v in vmas.iter().filter(|v| v.saves_pages()) {
        if protected && v.flags().contains(VmFlags::UW) {
            continue;
        }
        let (s, len) = (v.map.start, v.map.len());
        // Register (again: harmless for the same userfaultfd), then protect it all.
        if dirty::uffd_register_wp(t.uffd.as_raw_fd(), s, len).is_ok() {
            fresh |= !v.flags().contains(VmFlags::UW);
            let _ = dirty::uffd_write_protect(t.uffd.as_raw_fd(), s, len);
        }
    }
    t.armed_at = seq;
    tracing::debug!("process {pid}: dirty tracking armed at checkpoint {seq} (fresh registrations: {fresh}, protected before: {protected})");
    Ok(fresh)
}

/// Before the first `--incremental` checkpoint of a process that is not tracked yet:
/// creates its userfaultfd (which needs the process stopped for a moment, to inject
/// the syscall) and write-protects its memory while it runs, so that the checkpoint's
/// pause does not include write-protecting the whole address space. Pages written
/// between now and the checkpoint's snapshot count as written: a superset, harmless.
/// Best effort, like [`arm`] (errs only for a fault injected for a test).
pub fn prearm(proc: &ProcDir) -> Result<()> {
    match try_prearm(proc) {
        Err(e @ crate::Error::Fault(_)) => Err(e),
        Err(e) => {
            tracing::debug!("process {}: no early write-protection: {e}", proc.pid);
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

fn try_prearm(proc: &ProcDir) -> Result<()> {
    let pid = proc.pid;
    if TRACKERS
        .lock()
        .map_err(|_| crate::Error::Gone { pid })?
        .contains_key(&pid)
    {
        return Ok(()); // tracked: the next scan re-protects what was written
    }
    let mut frozen = crate::freeze::Frozen::freeze(proc)?;
    // The flags do not matter here: the cheap /proc/PID/maps will do.
    let layout = crate::memory::read_layout_unflagged(proc)?;
    let insn = crate::inject::find_syscall_insn(pid, &crate::memory::exec_ranges(&layout))?;
    let injection = crate::inject::Injection::prepare(&mut frozen, &layout, insn)?;
    let uffd = create_uffd(pid, injection.leader().0)?;
    injection.finish()?;
    frozen.release()?;
    drop(frozen);
    for v in layout.iter().filter(|v| v.saves_pages()) {
        let (s, len) = (v.map.start, v.map.len());
        if dirty::uffd_register_wp(uffd.as_raw_fd(), s, len).is_ok() {
            let _ = dirty::uffd_write_protect(uffd.as_raw_fd(), s, len);
        }
    }
    let mut trackers = TRACKERS.lock().map_err(|_| crate::Error::Gone { pid })?;
    trackers.insert(
        pid,
        Tracker {
            uffd,
            armed_at: NOT_ARMED,
            protected: true,
        },
    );
    // Flags remembered from an earlier checkpoint do not show these registrations.
    crate::memory::forget_flags(pid);
    Ok(())
}

/// A userfaultfd of process `pid`'s memory in asynchronous write-protect mode:
/// created by an injected userfaultfd(2), taken with pidfd_getfd, closed there again.
fn create_uffd(pid: i32, inj: &Injector) -> Result<OwnedFd> {
    let flags = (libc::O_CLOEXEC as u64) | dirty::UFFD_USER_MODE_ONLY;
    let uffd = inj.call_closing("userfaultfd", libc::SYS_userfaultfd, &[flags], |theirs| {
        crate::proc::borrow_fd(pid, theirs)
    })?;
    dirty::uffd_enable_wp_async(uffd.as_raw_fd())
        .ctx(pid, || "enabling asynchronous write-protection".into())?;
    Ok(uffd)
}

/// Whether the writes of `pid` are being tracked (it has a userfaultfd of ours).
pub fn is_tracked(pid: i32) -> bool {
    TRACKERS.lock().is_ok_and(|t| t.contains_key(&pid))
}

/// Forgets a process that is gone (killed after a checkpoint, exited).
pub fn forget(pid: i32) {
    if let Ok(mut t) = TRACKERS.lock() {
        t.remove(&pid);
    }
}
