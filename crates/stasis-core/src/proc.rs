//! Reading `/proc/PID` of a process, under a chosen proc root (the PID namespace's own
//! /proc when stasis runs as its init, the host's with `--pid`).

use crate::error::{Result, SysContext};
use stasis_image::FileId;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `/proc/PID` of one process.
#[derive(Debug, Clone)]
pub struct ProcDir {
    pub pid: i32,
    pub path: PathBuf,
}

impl ProcDir {
    /// `/proc/PID` under `/proc`.
    pub fn new(pid: i32) -> ProcDir {
        ProcDir {
            pid,
            path: PathBuf::from(format!("/proc/{pid}")),
        }
    }

    /// A file under `/proc/PID`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The procfs crate's view of this process.
    pub fn process(&self) -> Result<procfs::process::Process> {
        procfs::process::Process::new_with_root(self.path.clone())
            .map_err(std::io::Error::other)
            .ctx(self.pid, || "reading /proc".into())
    }

    /// Reads a file under `/proc/PID` as text.
    pub fn read_string(&self, name: &str) -> Result<String> {
        std::fs::read_to_string(self.file(name))
            .ctx(self.pid, || format!("reading /proc/{}/{name}", self.pid))
    }

    /// Reads a file under `/proc/PID` as bytes.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        std::fs::read(self.file(name))
            .ctx(self.pid, || format!("reading /proc/{}/{name}", self.pid))
    }

    /// Target of a symlink under `/proc/PID`.
    pub fn readlink(&self, name: &str) -> Result<String> {
        std::fs::read_link(self.file(name))
            .map(|p| p.to_string_lossy().into_owned())
            .ctx(self.pid, || format!("readlink /proc/{}/{name}", self.pid))
    }

    /// Thread IDs of the process.
    pub fn tids(&self) -> Result<Vec<i32>> {
        let mut out = Vec::new();
        let dir = self.file("task");
        for ent in std::fs::read_dir(&dir).ctx(self.pid, || "listing threads".into())? {
            let ent = ent.ctx(self.pid, || "listing threads".into())?;
            if let Ok(t) = ent.file_name().to_string_lossy().parse() {
                out.push(t);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Children of the process (all threads).
    pub fn children(&self) -> Result<Vec<i32>> {
        let mut out = Vec::new();
        for tid in self.tids()? {
            let s = self
                .read_string(&format!("task/{tid}/children"))
                .unwrap_or_default();
            out.extend(s.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
        }
        Ok(out)
    }
}

/// Parsed `/proc/PID/fdinfo/N`.
#[derive(Debug, Clone, Default)]
pub struct FdInfo {
    pub pos: u64,
    pub flags: i32,
    /// The whole text, for kind-specific lines.
    pub text: String,
}

/// Reads `/proc/PID/fdinfo/FD`.
pub fn fdinfo(proc: &ProcDir, fd: i32) -> Result<FdInfo> {
    let text = proc.read_string(&format!("fdinfo/{fd}"))?;
    let mut info = FdInfo {
        text: text.clone(),
        ..FdInfo::default()
    };
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            info.pos = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("flags:") {
            info.flags = i32::from_str_radix(v.trim(), 8).unwrap_or(0);
        }
    }
    Ok(info)
}

/// Identity of a file (path, device, inode, size, mtime) from its metadata.
pub fn file_id(path: &str, md: &std::fs::Metadata) -> FileId {
    FileId {
        path: path.to_string(),
        dev: md.dev(),
        ino: md.ino(),
        size: md.size(),
        mtime_ns: md
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(md.mtime_nsec()),
    }
}

/// Checks that `path` still is the file described by `id` (same size and mtime), as it
/// was at checkpoint time. Returns a human-readable reason when it is not.
pub fn check_unchanged(id: &FileId) -> std::result::Result<(), String> {
    let md = std::fs::metadata(Path::new(&id.path)).map_err(|e| format!("{}: {e}", id.path))?;
    let now = file_id(&id.path, &md);
    if now.size != id.size || now.mtime_ns != id.mtime_ns {
        return Err(format!(
            "{} changed since the checkpoint (size {} -> {}, mtime changed: {})",
            id.path,
            id.size,
            now.size,
            now.mtime_ns != id.mtime_ns
        ));
    }
    Ok(())
}

/// A copy of fd `fd` of process `pid` (pidfd_getfd(2); needs ptrace access to it): the
/// same open file description, to read its state from here without disturbing it. The pidfd of the last process asked
/// about is kept (a checkpoint borrows many fds of one process in a row); a pidfd
/// whose process has gone is replaced.
pub fn borrow_fd(pid: i32, fd: i32) -> Result<std::os::unix::io::OwnedFd> {
    use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
    thread_local! {
        static PIDFD: std::cell::RefCell<Option<(i32, OwnedFd)>> = const { std::cell::RefCell::new(None) };
    }
    let open = || -> Result<OwnedFd> {
        // SAFETY: pidfd_open returns a new descriptor or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        if pidfd < 0 {
            return Err(stasis_sys::SysError::last("pidfd_open", pid))
                .ctx(pid, || format!("borrowing fd {fd}"));
        }
        // SAFETY: pidfd was just created and is owned here.
        Ok(unsafe { OwnedFd::from_raw_fd(pidfd) })
    };
    let getfd = |pidfd: &OwnedFd| {
        // SAFETY: pidfd_getfd returns a new descriptor or -1.
        let ours = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) } as i32;
        // SAFETY: a new descriptor, owned here.
        (ours >= 0).then(|| unsafe { OwnedFd::from_raw_fd(ours) })
    };
    let cached = PIDFD.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|(p, _)| *p == pid)
            .and_then(|(_, pidfd)| getfd(pidfd))
    });
    if let Some(ours) = cached {
        return Ok(ours);
    }
    let pidfd = open()?;
    let ours = getfd(&pidfd).ok_or_else(|| stasis_sys::SysError::last("pidfd_getfd", pid));
    PIDFD.with(|c| *c.borrow_mut() = Some((pid, pidfd)));
    ours.ctx(pid, || format!("borrowing fd {fd}"))
}

/// What thread `tid` is doing, for messages about a thread that does not stop or
/// exit: its state letter and, where the kernel tells, where it sleeps (e.g.
/// `state D, in wait_for_vfork_done`).
pub fn thread_state(tid: i32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{tid}/stat")).unwrap_or_default();
    let Some(state) = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
    else {
        return "gone".into();
    };
    let wchan = std::fs::read_to_string(format!("/proc/{tid}/wchan")).unwrap_or_default();
    let wchan = wchan.trim();
    if wchan.is_empty() || wchan == "0" {
        format!("state {state}")
    } else {
        format!("state {state}, in {wchan}")
    }
}

/// Whether process `pid` is not dumpable (PR_SET_DUMPABLE 0, or it changed its user or
/// group IDs), as far as can be seen from outside without tracing it: the files of
/// its /proc/PID (not the directory) then belong to root (of the user namespace of its
/// memory), not to its effective user.
pub fn looks_not_dumpable(pid: i32) -> bool {
    let status = PathBuf::from(format!("/proc/{pid}/status"));
    let (Ok(md), Ok(status)) = (std::fs::metadata(&status), std::fs::read_to_string(&status))
    else {
        return false;
    };
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|u| u.parse::<u32>().ok());
    euid.is_some_and(|u| u != md.uid())
}
