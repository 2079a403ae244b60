//! Pidfds and files under /proc/PID: the process they refer to must be one of the
//! checkpoint's (dump); the restored process opens them itself once every process
//! exists, and positions its /proc files at the end of its rebuild (restore).

use super::Registry;
use crate::error::{Error, Result};
use stasis_image::{Fd, FdKind};
use std::collections::HashMap;
use std::ffi::CString;

const PROC_SUPER_MAGIC: i64 = 0x9fa0;

impl Registry {
    /// The process a pidfd (fd `fd` of `pid`, fdinfo `info`) refers to: one of the
    /// checkpoint's processes (or zombies), else the checkpoint is refused.
    pub(super) fn pidfd_target(&self, pid: i32, fd: i32, info: &str) -> Result<i32> {
        let target: i32 = info
            .lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(-1);
        if target <= 0 {
            return Err(Error::Unsupported {
                pid,
                what: format!("fd {fd}, a pidfd of a process that is gone"),
            });
        }
        if !self.job.contains(&target) && !self.zombies.contains(&target) {
            return Err(Error::Unsupported {
                pid,
                what: format!(
                    "fd {fd}, a pidfd of process {target}, which is not a process of the checkpoint (a thread, or outside the job)"
                ),
            });
        }
        Ok(target)
    }

    /// For an fd under /proc/PID (PID of the checkpoint: its own /proc/self/...,
    /// a child's...): that PID. None: not a per-process /proc file (a regular
    /// file, or /proc/meminfo and the like, reopened by path). Refused: a /proc
    /// file of a process outside the checkpoint or of another thread.
    pub(super) fn proc_file_of(
        &self,
        pid: i32,
        fd: i32,
        link: &std::path::Path,
        target: &str,
    ) -> Result<Option<i32>> {
        let Some(rest) = target.strip_prefix("/proc/") else {
            return Ok(None);
        };
        let Ok(c) = CString::new(link.as_os_str().as_encoded_bytes()) else {
            return Ok(None);
        };
        // SAFETY: statfs with a valid C string and a zeroed out-struct.
        let is_proc = unsafe {
            let mut sf: libc::statfs = std::mem::zeroed();
            libc::statfs(c.as_ptr(), &mut sf) == 0 && sf.f_type as i64 == PROC_SUPER_MAGIC
        };
        let mut parts = rest.split('/');
        let Some(of) = parts.next().and_then(|p| p.parse::<i32>().ok()) else {
            return Ok(None);
        };
        if !is_proc {
            return Ok(None);
        }
        let refuse = |why: String| Error::Unsupported {
            pid,
            what: format!("fd {fd}, {target}: {why}"),
        };
        if !self.job.contains(&of) && !self.zombies.contains(&of) {
            return Err(refuse(format!(
                "process {of} is not a process of the checkpoint"
            )));
        }
        if parts.next() == Some("task") {
            if let Some(tid) = parts.next().and_then(|t| t.parse::<i32>().ok()) {
                if tid != of {
                    return Err(refuse(format!(
                        "a file of thread {tid}, which is not recreated before the fds"
                    )));
                }
            }
        }
        Ok(Some(of))
    }
}

/// Kinds of fd that the restored process opens itself once every process exists
/// ([`open_late`]): pidfds and /proc files.
pub fn is_late(kind: &FdKind) -> bool {
    matches!(kind, FdKind::Pidfd { .. } | FdKind::ProcFile { .. })
}

/// In the new process, once its other fds are in place: opens its pidfds and /proc
/// files (whose processes must exist: those not created yet are waited for, up to
/// `wait`) and puts them at their numbers. Fds of one description share one again.
/// A /proc file is positioned later ([`seek_proc_files`]): its content is made when
/// it is first read or positioned, which must be once the process is itself again.
pub fn open_late(fds: &[Fd], wait: std::time::Duration) -> std::result::Result<(), String> {
    let mut done: HashMap<u64, i32> = HashMap::new();
    let deadline = std::time::Instant::now() + wait;
    for f in fds.iter().filter(|f| is_late(&f.kind)) {
        let fd = match done.get(&f.desc) {
            // SAFETY: dup of a descriptor we just placed.
            Some(&first) => unsafe { libc::fcntl(first, libc::F_DUPFD_CLOEXEC, 0) },
            None => loop {
                let (fd, what) = match &f.kind {
                    FdKind::Pidfd { pid, flags } => (
                        // SAFETY: pidfd_open takes plain values.
                        unsafe {
                            libc::syscall(
                                libc::SYS_pidfd_open,
                                *pid,
                                (*flags & (libc::O_NONBLOCK | libc::O_EXCL)) as libc::c_uint,
                            ) as i32
                        },
                        format!("a pidfd of process {pid}"),
                    ),
                    FdKind::ProcFile { path, flags, .. } => {
                        let c = CString::new(path.as_str())
                            .map_err(|_| format!("fd {}: bad path {path:?}", f.fd))?;
                        let flags = (*flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC))
                            | libc::O_CLOEXEC
                            | libc::O_NOCTTY;
                        // SAFETY: `c` is a valid C string.
                        (unsafe { libc::open(c.as_ptr(), flags) }, path.clone())
                    }
                    _ => return Err(format!("fd {}: not a late fd", f.fd)),
                };
                if fd >= 0 {
                    break fd;
                }
                let e = std::io::Error::last_os_error();
                let absent = matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOENT));
                if !absent || std::time::Instant::now() > deadline {
                    return Err(format!("fd {}: cannot open {what} again: {e}", f.fd));
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            },
        };
        if fd < 0 {
            return Err(format!("fd {}: {}", f.fd, std::io::Error::last_os_error()));
        }
        if fd == f.fd {
            let cloexec = if f.cloexec { libc::FD_CLOEXEC } else { 0 };
            // SAFETY: fcntl on the descriptor we just opened.
            unsafe { libc::fcntl(fd, libc::F_SETFD, cloexec) };
        } else {
            let cloexec = if f.cloexec { libc::O_CLOEXEC } else { 0 };
            // SAFETY: dup3 onto the saved number, free (it was not sent) or ours.
            let r = unsafe { libc::dup3(fd, f.fd, cloexec) };
            let e = std::io::Error::last_os_error();
            // SAFETY: closing our temporary descriptor.
            unsafe { libc::close(fd) };
            if r < 0 {
                return Err(format!("fd {}: dup3: {e}", f.fd));
            }
        }
        done.entry(f.desc).or_insert(f.fd);
    }
    Ok(())
}

/// At the end of the rebuild of process `p` (its name, credentials and memory are
/// back): positions its /proc files at their saved offsets (`lseek` by the process
/// itself: the content of a /proc file is made when it is first read or positioned).
pub fn seek_proc_files(inj: &crate::inject::Injector, p: &stasis_image::Process) -> Result<()> {
    if p.fd_table_of.is_some() {
        return Ok(());
    }
    let mut done = Vec::new();
    for f in &p.fds {
        if let FdKind::ProcFile { pos, path, .. } = &f.kind {
            if *pos == 0 || done.contains(&f.desc) {
                continue;
            }
            done.push(f.desc);
            inj.call(
                &format!("lseek of fd {} ({path}) to {pos}", f.fd),
                libc::SYS_lseek,
                &[f.fd as u64, *pos, libc::SEEK_SET as u64],
            )?;
        }
    }
    Ok(())
}
