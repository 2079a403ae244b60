//! inotify instances and their watches (inotify(7)).
//!
//! Dump: `/proc/PID/fdinfo` lists each watch (number, mask, and the watched inode as
//! device + inode number). The kernel gives no path, and reopening by file handle
//! needs privilege, so stasis finds the inode again by path near where the process
//! works (its cwd and the directories of its files, a few levels deep, and their
//! parents); a watch it cannot find refuses the checkpoint. Events already queued
//! cannot be read without consuming them: the checkpoint is retried a moment later.
//!
//! Restore: a new instance gets the watches added in ascending number, which gives
//! back the same watch descriptors when they were numbered without gaps (the usual
//! case); otherwise the restore says so.

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
pub fn dump(proc: &ProcDir, fd: i32, flags: i32, info: &str) -> Result<FdKind> {
    let pid = proc.pid;
    let pending = pending_bytes(pid, fd)?;
    if pending > 0 {
        return Err(Error::Transient {
            pid,
            what: format!("fd {fd}, an inotify instance, holds {pending} bytes of unread events"),
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
        let path = find_inode(&roots, dev, ino).ok_or_else(|| Error::Unsupported {
            pid,
            what: format!("fd {fd}, an inotify watch (number {wd}) on an inode stasis could not find by path near the process's working directory"),
        })?;
        watches.push(InotifyWatch {
            wd,
            mask,
            path: path.to_string_lossy().into_owned(),
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

/// Creates the instance with its watches (in the restorer). Returns the new fd.
pub fn create(flags: i32, watches: &[InotifyWatch]) -> std::result::Result<i32, String> {
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
        let c = std::ffi::CString::new(w.path.as_bytes())
            .map_err(|_| format!("bad path {:?}", w.path))?;
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
