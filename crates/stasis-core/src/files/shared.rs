//! Sharing found with `kcmp(2)`: fds of one open file description (KCMP_FILE), the
//! file an epoll item watches under an fd number that no longer holds it
//! (KCMP_EPOLL_TFD), and processes sharing a whole fd table (KCMP_FILES).

use super::Registry;
use crate::error::{Error, Result, SysContext};
use std::collections::HashMap;

const KCMP_FILE: i32 = 0;
const KCMP_FILES: i32 = 2;
const KCMP_EPOLL_TFD: i32 = 7;

/// `struct kcmp_epoll_slot` (include/uapi/linux/kcmp.h).
#[repr(C)]
struct KcmpEpollSlot {
    efd: u32,
    tfd: u32,
    toff: u32,
}

/// True when fd `a` of `pa` and fd `b` of `pb` are the same open file description.
pub(super) fn same_description(pa: i32, a: i32, pb: i32, b: i32) -> bool {
    // SAFETY: kcmp only compares kernel objects; no memory is passed.
    unsafe { libc::syscall(libc::SYS_kcmp, pa, pb, KCMP_FILE, a, b) == 0 }
}

/// True when fd `fd` of `p` is the file that epoll `slot` of `epoll_pid` watches.
fn same_watched(p: i32, fd: i32, epoll_pid: i32, slot: &KcmpEpollSlot) -> bool {
    // SAFETY: kcmp reads the slot struct we pass and compares kernel objects.
    unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            p,
            epoll_pid,
            KCMP_EPOLL_TFD,
            fd as libc::c_ulong,
            slot as *const KcmpEpollSlot as libc::c_ulong,
        ) == 0
    }
}

/// Marks the processes that share their file descriptor table with their parent
/// (clone(2) with CLONE_FILES; found with kcmp KCMP_FILES): restored sharing it again.
/// A table shared with a process other than the parent is refused.
pub fn mark_shared_tables<'a>(
    procs: impl Iterator<Item = &'a mut stasis_image::Process>,
) -> Result<()> {
    let mut procs: Vec<&mut stasis_image::Process> = procs.collect();
    let pids: Vec<(i32, i32)> = procs.iter().map(|p| (p.pid, p.ppid)).collect();
    for p in procs.iter_mut() {
        let sharing: Vec<i32> = pids
            .iter()
            .map(|x| x.0)
            .filter(|&q| q != p.pid)
            // SAFETY: kcmp only compares kernel objects; no memory is passed.
            .filter(|&q| unsafe { libc::syscall(libc::SYS_kcmp, q, p.pid, KCMP_FILES, 0, 0) } == 0)
            .collect();
        if sharing.is_empty() {
            continue;
        }
        if sharing.contains(&p.ppid) {
            p.fd_table_of = Some(p.ppid);
        } else if !sharing
            .iter()
            .any(|q| pids.iter().any(|x| x.0 == *q && x.1 == p.pid))
        {
            return Err(Error::Unsupported {
                pid: p.pid,
                what: format!(
                    "its file descriptor table, shared (clone CLONE_FILES) with process {}, which is neither its parent nor its child",
                    sharing[0]
                ),
            });
        }
    }
    Ok(())
}

impl Registry {
    /// Finds the file each item of epoll fd `epfd` of `pid` watches, where fd
    /// `item.fd` of `pid` no longer holds it (closed, or reused for another file): in
    /// any fd of the checkpoint's processes (kcmp KCMP_EPOLL_TFD), whose description
    /// it records. A file no fd holds any more is refused.
    pub(super) fn find_watched(
        &mut self,
        pid: i32,
        epfd: i32,
        items: &mut [stasis_image::EpollItem],
    ) -> Result<()> {
        let mut seen_fds: HashMap<i32, u32> = HashMap::new();
        for item in items.iter_mut() {
            let tfd = item.fd;
            let toff = seen_fds.entry(tfd).or_insert(0);
            let slot = KcmpEpollSlot {
                efd: epfd as u32,
                tfd: tfd as u32,
                toff: *toff,
            };
            *toff += 1;
            if same_watched(pid, tfd, pid, &slot) {
                continue;
            }
            let mut found = None;
            'search: for &q in std::iter::once(&pid).chain(self.job.iter().filter(|&&q| q != pid)) {
                let Ok(rd) = std::fs::read_dir(format!("/proc/{q}/fd")) else {
                    continue;
                };
                let mut nums: Vec<i32> = rd
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect();
                nums.sort();
                for n in nums {
                    if same_watched(q, n, pid, &slot) {
                        found = Some((q, n));
                        break 'search;
                    }
                }
            }
            let Some((q, n)) = found else {
                return Err(Error::Unsupported {
                    pid,
                    what: format!(
                        "fd {epfd}, an epoll set watching a file registered as fd {tfd} that no fd of the checkpoint holds any more"
                    ),
                });
            };
            let link = format!("/proc/{q}/fd/{n}");
            let late = std::fs::read_link(&link).is_ok_and(|t| {
                let t = t.to_string_lossy();
                t == "anon_inode:[pidfd]" || t.starts_with("pidfd:") || t.starts_with("/proc/")
            });
            if late {
                return Err(Error::Unsupported {
                    pid,
                    what: format!(
                        "fd {epfd}, an epoll set watching a pidfd or /proc file registered as fd {tfd}, a number that no longer holds it"
                    ),
                });
            }
            let md = std::fs::metadata(&link).ctx(q, || {
                format!("stat of fd {n} (watched by epoll fd {epfd} of process {pid})")
            })?;
            item.desc = Some(self.describe(q, n, &md));
        }
        Ok(())
    }
}
