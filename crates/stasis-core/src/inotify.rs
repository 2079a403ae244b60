//! inotify instances and their watches (inotify(7)).
//!
//! Dump: `/proc/PID/fdinfo` lists each watch (number, mask, and the watched inode as
//! device + inode number). The kernel gives no path, and reopening by file handle
//! needs privilege, so stasis finds the inode again by path near where the process
//! works (its cwd and the directories of its files, a few levels deep, and their
//! parents). A watched inode that has no path any more, a deleted file still open in
//! the job, is found among the job's fds and recorded as that fd. A watch found
//! neither way refuses the checkpoint. Events already queued cannot be read without
//! consuming them (inotify has no peek and no way to queue an event back): the
//! checkpoint is retried a moment later while the job runs (it may read them), and
//! refused if they are still there after the retries.
//!
//! Restore: a new instance gets the watches added in ascending number, which gives
//! back the same watch descriptors when they were numbered without gaps (the usual
//! case); otherwise the restore says so. A watch of a deleted file is added through
//! /proc/self/fd of the restorer's description of the recreated file (so instances
//! are created after every other description).

use crate::error::{Error, Result};
use crate::proc::ProcDir;
use stasis_image::{FdKind, InotifyWatch};
use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

const SEARCH_DEPTH: usize = 3;
const SEARCH_ENTRIES: usize = 50_000;

/// Saves an inotify instance held as fd `fd`.
/// `job`: the processes of the checkpoint (a deleted watched file is looked for
/// among their fds).
pub fn dump(proc: &ProcDir, fd: i32, flags: i32, info: &str, job: &[i32]) -> Result<FdKind> {
    let pid = proc.pid;
    let pending = pending_bytes(pid, fd)?;
    if pending > 0 {
        return Err(Error::Transient {
            pid,
            what: format!("fd {fd}, an inotify instance, holds {pending} bytes of unread events (queued events cannot be saved: they cannot be read without consuming them; the application did not read them while the checkpoint was retried)"),
        });
    }
    let mut watches = Vec::new();
    let roots = search_roots(proc);
    for line in info.lines().filter(|l| l.starts_with("inotify ")) {
        let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k));
        let (Some(wd), Some(ino), Some(sdev), Some(mask)) =
            (field("wd:"), field("ino:"), field("sdev:"), field("mask:"))
        else {
            continue;
        };
        let wd: i32 = wd.parse().unwrap_or(0);
        let ino = u64::from_str_radix(ino, 16).unwrap_or(0);
        let kdev = u64::from_str_radix(sdev, 16).unwrap_or(0);
        // The kernel's dev_t encoding: major << 20 | minor.
        let dev = libc::makedev((kdev >> 20) as u32, (kdev & 0xfffff) as u32);
        let mask = u32::from_str_radix(mask, 16).unwrap_or(0);
        if let Some(path) = find_inode(&roots, dev, ino) {
            watches.push(InotifyWatch {
                wd,
                mask,
                path: path.to_string_lossy().into_owned(),
                deleted_fd: None,
            });
            continue;
        }
        let held = find_deleted(job, dev, ino).ok_or_else(|| Error::Unsupported {
            pid,
            what: format!("fd {fd}, an inotify watch (number {wd}) on an inode stasis could not find by path near the process's working directory nor among the deleted files the job holds open"),
        })?;
        watches.push(InotifyWatch {
            wd,
            mask,
            path: String::new(),
            deleted_fd: Some([held.0, held.1]),
        });
    }
    watches.sort_by_key(|w| w.wd);
    Ok(FdKind::Inotify { flags, watches })
}

fn pending_bytes(pid: i32, fd: i32) -> Result<i32> {
    let ours = crate::proc::borrow_fd(pid, fd)?;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes an int.
    unsafe { libc::ioctl(ours.as_raw_fd(), libc::FIONREAD, &mut n) };
    Ok(n)
}

fn search_roots(proc: &ProcDir) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    let mut add = |p: PathBuf| {
        if !roots.contains(&p) {
            roots.push(p);
        }
    };
    if let Ok(cwd) = std::fs::read_link(proc.file("cwd")) {
        add(cwd);
    }
    if let Ok(rd) = std::fs::read_dir(proc.file("fd")) {
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_link(e.path()) {
                if t.is_absolute() {
                    if let Some(parent) = t.parent() {
                        add(parent.to_path_buf());
                    }
                }
            }
        }
    }
    if let Ok(exe) = std::fs::read_link(proc.file("exe")) {
        if let Some(parent) = exe.parent() {
            add(parent.to_path_buf());
        }
    }
    roots
}

/// An fd (pid, fd) of the job's processes that holds (dev, ino), a deleted regular
/// file.
fn find_deleted(job: &[i32], dev: u64, ino: u64) -> Option<(i32, i32)> {
    for &pid in job {
        let dir = ProcDir::new(pid).file("fd");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut fds: Vec<i32> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        fds.sort_unstable();
        for fd in fds {
            let Ok(m) = std::fs::metadata(dir.join(fd.to_string())) else {
                continue;
            };
            if m.is_file() && m.nlink() == 0 && m.dev() == dev && m.ino() == ino {
                return Some((pid, fd));
            }
        }
    }
    None
}

/// Finds a path to (dev, ino): each root, its parents, and below it a few levels.
fn find_inode(roots: &[PathBuf], dev: u64, ino: u64) -> Option<PathBuf> {
    let is =
        |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.dev() == dev && m.ino() == ino);
    for r in roots {
        let mut up = Some(r.as_path());
        while let Some(p) = up {
            if is(p) {
                return Some(p.to_path_buf());
            }
            up = p.parent();
        }
    }
    let mut seen = 0usize;
    for r in roots {
        let mut queue = VecDeque::from([(r.clone(), 0usize)]);
        while let Some((dir, depth)) = queue.pop_front() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                seen += 1;
                if seen > SEARCH_ENTRIES {
                    return None;
                }
                let p = e.path();
                let Ok(m) = e.metadata() else { continue };
                if m.dev() == dev && m.ino() == ino {
                    return Some(p);
                }
                if m.is_dir() && depth + 1 < SEARCH_DEPTH {
                    queue.push_back((p, depth + 1));
                }
            }
        }
    }
    None
}

/// Creates the instance with its watches (in the restorer). `held` gives the
/// restorer's descriptor of the fd [pid, fd] that holds a deleted watched file.
/// Returns the new fd.
pub fn create(
    flags: i32,
    watches: &[InotifyWatch],
    held: impl Fn([i32; 2]) -> Option<i32>,
) -> std::result::Result<i32, String> {
    let mut f = libc::IN_CLOEXEC;
    if flags & libc::O_NONBLOCK != 0 {
        f |= libc::IN_NONBLOCK;
    }
    // SAFETY: inotify_init1 returns a new descriptor or -1.
    let fd = unsafe { libc::inotify_init1(f) };
    if fd < 0 {
        return Err(format!(
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd was just created and is owned here.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    for w in watches {
        let path = match w.deleted_fd {
            Some(at) => format!(
                "/proc/self/fd/{}",
                held(at).ok_or_else(|| format!(
                    "the deleted file of watch {} (fd {} of process {}) was not recreated",
                    w.wd, at[1], at[0]
                ))?
            ),
            None => w.path.clone(),
        };
        let c =
            std::ffi::CString::new(path.as_bytes()).map_err(|_| format!("bad path {path:?}"))?;
        // SAFETY: inotify_add_watch with a valid C string.
        let got = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), w.mask) };
        if got < 0 {
            return Err(format!(
                "watching {}: {}",
                w.path,
                std::io::Error::last_os_error()
            ));
        }
        if got != w.wd {
            return Err(format!(
                "the inotify watch of {} came back as number {got} instead of {} (watch numbers with gaps cannot be given back)",
                w.path, w.wd
            ));
        }
    }
    Ok(std::os::unix::io::IntoRawFd::into_raw_fd(owned))
}
