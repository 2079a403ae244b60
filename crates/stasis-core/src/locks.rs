//! File locks: POSIX record locks (fcntl F_SETLK/F_SETLKW), open-file-description
//! locks (F_OFD_SETLK) and flock(2).
//!
//! Dump: `/proc/PID/fdinfo/N` lists, in `lock:` lines, the locks held through fd N: the
//! POSIX locks its process took through that open file description, and the OFD and
//! flock locks the description owns (shown by every fd of it). Each lock is recorded
//! once, on the first fd that shows it: POSIX locks per (process, description), with
//! the process as owner (a line naming another PID belongs to a process sharing the fd
//! table, which records it itself); OFD and flock locks per description. Leases,
//! mandatory and unknown locks, and locks on a stdio stream from outside stasis (bound
//! to another file at restart) refuse the checkpoint naming the process and the fd.
//! Then [`Collector::check`] reads `/proc/locks` (read while the job is frozen): a POSIX
//! or flock lock that a process of the job took and that no fd of the job showed is
//! held through a description the job keeps only in a memory mapping (or outside the
//! job): it could not be taken back, and the checkpoint is refused naming the process
//! and the file. OFD locks carry no PID; one not shown by any fd of the job, on a file
//! the job maps, only earns a warning (it may be another program's). Blocked waiters
//! (`->` lines) are nothing to save: the waiting syscall is restarted after restore
//! and waits again.
//!
//! Restore: OFD and flock locks belong to the description: [`take_shared`] takes each
//! once in the restorer on the restored description, before it is passed to the
//! processes. POSIX locks belong to the process: [`take_posix`] makes the process take
//! them itself by an injected `fcntl(F_SETLK)`, after the restorer's helper fds are
//! closed (closing any fd of a file drops the process's POSIX locks on it). All are
//! taken before any restored process runs, so a restored waiter blocks again.

use crate::error::{Error, Result};
use crate::inject::{Injector, Scratch};
use stasis_image::{Checkpoint, Fd, FdKind, FileLock, LockKind, Process};
use std::collections::{HashMap, HashSet};
use std::os::unix::io::{AsRawFd, OwnedFd};

/// One line of `/proc/locks` or a `lock:` line of fdinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// A request waiting for this lock (`->`), not a lock held.
    blocked: bool,
    /// POSIX, OFDLCK, FLOCK, LEASE, DELEG, ACCESS, UNKNOWN.
    class: String,
    /// ADVISORY, MANDATORY, ACTIVE, BREAKING...
    mode: String,
    /// WRITE, READ, UNLCK.
    ty: String,
    /// The locking process as the reader's /proc sees it (-1 for OFD locks).
    pid: i32,
    /// `MAJOR:MINOR:INODE` (hex device numbers, as /proc/PID/maps shows them).
    file: String,
    start: u64,
    /// Last byte, inclusive; None: EOF.
    end: Option<u64>,
}

/// What identifies a lock in `/proc/locks`.
type Key = (String, String, i32, String, u64, Option<u64>);

impl Entry {
    fn parse(line: &str) -> Option<Entry> {
        let mut t = line.split_whitespace();
        t.next()?.strip_suffix(':')?;
        let mut class = t.next()?;
        let blocked = class == "->";
        if blocked {
            class = t.next()?;
        }
        let mode = t.next()?;
        let ty = t.next()?;
        let pid = t.next()?.parse().ok()?;
        let file = t.next()?;
        let start = t.next()?.parse().ok()?;
        let end = match t.next()? {
            "EOF" => None,
            e => Some(e.parse().ok()?),
        };
        Some(Entry {
            blocked,
            class: class.to_string(),
            mode: mode.to_string(),
            ty: ty.to_string(),
            pid,
            file: file.to_string(),
            start,
            end,
        })
    }

    fn key(&self) -> Key {
        (
            self.class.clone(),
            self.ty.clone(),
            self.pid,
            self.file.clone(),
            self.start,
            self.end,
        )
    }

    fn kind(&self) -> Option<LockKind> {
        if self.mode != "ADVISORY" || !matches!(self.ty.as_str(), "READ" | "WRITE") {
            return None;
        }
        match self.class.as_str() {
            "POSIX" => Some(LockKind::Posix),
            "OFDLCK" => Some(LockKind::Ofd),
            "FLOCK" => Some(LockKind::Flock),
            _ => None,
        }
    }

    /// "a flock write lock" and the like, for messages.
    fn describe(&self) -> String {
        let kind = match self.class.as_str() {
            "POSIX" => "POSIX record",
            "OFDLCK" => "open-file-description",
            "FLOCK" => "flock",
            c => c,
        };
        format!(
            "a {kind} {} lock ({})",
            self.ty.to_lowercase(),
            range(self.start, self.end)
        )
    }
}

fn range(start: u64, end: Option<u64>) -> String {
    match end {
        Some(e) => format!("bytes {start}-{e}"),
        None if start == 0 => "the whole file".into(),
        None => format!("bytes {start} to the end"),
    }
}

fn kind_name(k: LockKind) -> &'static str {
    match k {
        LockKind::Posix => "POSIX record",
        LockKind::Ofd => "open-file-description",
        LockKind::Flock => "flock",
    }
}

/// The file locks of one checkpoint's processes, gathered fd by fd.
#[derive(Default)]
pub struct Collector {
    job: HashSet<i32>,
    by_pid: HashMap<i32, Vec<FileLock>>,
    /// Descriptions whose OFD and flock locks are recorded.
    shared_done: HashSet<u64>,
    /// (process, description) whose POSIX locks are recorded.
    posix_done: HashSet<(i32, u64)>,
    /// Recorded locks as `/proc/locks` shows them, with how many of each.
    claimed: HashMap<Key, usize>,
    /// `MAJOR:MINOR:INODE` -> path, of the files the job's fds lock.
    paths: HashMap<String, String>,
    /// `/proc/locks`, being read by a thread of its own (see [`Collector::new`]).
    proc_locks: Option<std::thread::JoinHandle<std::io::Result<String>>>,
}

impl Collector {
    /// A collector for the processes `job` (PIDs as this /proc shows them), made
    /// once they are frozen. It starts reading `/proc/locks` at once, in a thread:
    /// the read takes the kernel's file-lock semaphore for writing, which waits for an
    /// RCU grace period (8-25 ms here, spent asleep), while the processes are read.
    /// The job is frozen, so the text is what [`Collector::check`] would read.
    pub fn new(job: &[i32]) -> Collector {
        Collector {
            job: job.iter().copied().collect(),
            proc_locks: Some(std::thread::spawn(|| {
                std::fs::read_to_string("/proc/locks")
            })),
            ..Collector::default()
        }
    }

    /// Records the locks fdinfo `text` of fd `fd` of `pid` shows (`target`: the fd's
    /// link, `kind`: how it is saved, `desc`: its description id).
    pub fn add_fd(
        &mut self,
        pid: i32,
        fd: i32,
        target: &str,
        kind: &FdKind,
        desc: u64,
        text: &str,
    ) -> Result<()> {
        let entries: Vec<Entry> = text
            .lines()
            .filter_map(|l| l.strip_prefix("lock:"))
            .filter_map(Entry::parse)
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        let refuse = |what: String| Error::Unsupported {
            pid,
            what: format!("fd {fd} ({target}): {what}"),
        };
        let posix_new = !self.posix_done.contains(&(pid, desc));
        let shared_new = !self.shared_done.contains(&desc);
        for e in entries {
            let Some(lk) = e.kind() else {
                if e.class == "ACCESS" {
                    continue; // a transient check, not a lock
                }
                return Err(refuse(match (e.class.as_str(), e.mode.as_str()) {
                    ("LEASE", _) => format!("a {} lease (F_SETLEASE)", e.ty.to_lowercase()),
                    ("DELEG", _) => "a file delegation".into(),
                    (_, "MANDATORY") => format!("{} that is mandatory", e.describe()),
                    (c, m) => format!("a {c} {m} {} lock", e.ty),
                }));
            };
            let new = match lk {
                // Another process sharing this fd table took it: recorded there.
                LockKind::Posix if e.pid != pid => continue,
                LockKind::Posix => posix_new,
                LockKind::Ofd | LockKind::Flock => shared_new,
            };
            if !new {
                continue;
            }
            if matches!(kind, FdKind::Stdio { .. }) {
                return Err(refuse(format!(
                    "{} on a standard stream that came from outside stasis (restart binds \
                     the stream to its own, another file)",
                    e.describe()
                )));
            }
            *self.claimed.entry(e.key()).or_default() += 1;
            self.paths
                .entry(e.file.clone())
                .or_insert_with(|| target.to_string());
            self.by_pid.entry(pid).or_default().push(FileLock {
                fd,
                kind: lk,
                write: e.ty == "WRITE",
                start: e.start,
                end: e.end,
                mapped: None,
            });
        }
        self.posix_done.insert((pid, desc));
        self.shared_done.insert(desc);
        Ok(())
    }

    /// The locks recorded for `pid`.
    pub fn take(&mut self, pid: i32) -> Vec<FileLock> {
        self.by_pid.remove(&pid).unwrap_or_default()
    }

    /// Reads `/proc/locks` (the job frozen) and refuses a lock a process of the job
    /// holds through no fd of the job; see the module documentation. A flock or OFD
    /// lock a process of the job took on a file the job maps, held through no fd, is
    /// held through that mapping: it is returned, by process, to be taken again on the
    /// restored mapping's file.
    pub fn check(&mut self) -> Result<Vec<(i32, FileLock)>> {
        let mut through_maps = Vec::new();
        let read = match self.proc_locks.take() {
            Some(reading) => reading
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the reading thread panicked"))),
            None => std::fs::read_to_string("/proc/locks"),
        };
        let text = match read {
            Ok(t) => t,
            Err(e) => {
                // Without it the fds' own lock lines are all there is.
                tracing::warn!("cannot read /proc/locks ({e}): locks held only through a mapping are not detected");
                return Ok(through_maps);
            }
        };
        let mut left = self.claimed.clone();
        let mut maps: Option<HashMap<String, (i32, String)>> = None;
        for e in text.lines().filter_map(Entry::parse) {
            if e.blocked || e.class == "ACCESS" {
                continue;
            }
            if let Some(n) = left.get_mut(&e.key()).filter(|n| **n > 0) {
                *n -= 1;
                continue;
            }
            // A flock a process of the job took (its pid is shown; an OFD lock shows
            // none, and could be another program's) on a file the job maps.
            if e.class == "FLOCK" && self.job.contains(&e.pid) {
                let maps = maps.get_or_insert_with(|| self.mapped_files());
                if let (Some((pid, path)), Some(kind)) = (maps.get(&e.file), e.kind()) {
                    through_maps.push((
                        *pid,
                        FileLock {
                            fd: -1,
                            kind,
                            write: e.ty == "WRITE",
                            start: e.start,
                            end: e.end,
                            mapped: Some(path.clone()),
                        },
                    ));
                    continue;
                }
            }
            if self.job.contains(&e.pid) {
                let maps = maps.get_or_insert_with(|| self.mapped_files());
                let name = self
                    .paths
                    .get(&e.file)
                    .or_else(|| maps.get(&e.file).map(|m| &m.1))
                    .cloned()
                    .unwrap_or_else(|| format!("the file with device:inode {}", e.file));
                let what = match e.class.as_str() {
                    "LEASE" => format!("a lease (F_SETLEASE) on {name}"),
                    _ => format!(
                        "{} on {name}, held through no file descriptor of the job (only \
                         a memory mapping or a process outside the job keeps its open file \
                         description: restart could not take it back),",
                        e.describe()
                    ),
                };
                return Err(Error::Unsupported { pid: e.pid, what });
            }
            if e.class == "OFDLCK" {
                let maps = maps.get_or_insert_with(|| self.mapped_files());
                if let Some((pid, path)) = maps.get(&e.file) {
                    tracing::warn!(
                        "process {pid} maps {path}, on which {} is held by no fd of the job: \
                         if the job holds it through the mapping, it is not restored",
                        e.describe()
                    );
                }
            }
        }
        Ok(through_maps)
    }

    /// `MAJOR:MINOR:INODE` -> (process, path) of every file the job maps.
    fn mapped_files(&self) -> HashMap<String, (i32, String)> {
        let mut out = HashMap::new();
        for &pid in &self.job {
            let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
                continue;
            };
            for line in maps.lines() {
                let mut t = line.split_whitespace();
                let (Some(dev), Some(ino)) = (t.nth(3), t.next()) else {
                    continue;
                };
                let path = t.collect::<Vec<_>>().join(" ");
                if ino != "0" && path.starts_with('/') {
                    out.entry(format!("{dev}:{ino}")).or_insert((pid, path));
                }
            }
        }
        out
    }
}

/// The `struct flock` that takes `l` (F_SETLK, F_OFD_SETLK).
fn flock_struct(l: &FileLock) -> libc::flock {
    // SAFETY: struct flock is plain data; all-zero is a valid value (l_pid must be 0
    // for OFD locks).
    let mut f: libc::flock = unsafe { std::mem::zeroed() };
    f.l_type = if l.write {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    } as libc::c_short;
    f.l_whence = libc::SEEK_SET as libc::c_short;
    f.l_start = l.start as libc::off_t;
    f.l_len = match l.end {
        Some(e) => (e - l.start + 1) as libc::off_t,
        None => 0,
    };
    f
}

/// A name for fd `fd` of `p` in messages: its path where it has one.
fn fd_name(p: &Process, fd: i32) -> String {
    let path = p
        .fds
        .iter()
        .find(|f| f.fd == fd)
        .and_then(|f| match &f.kind {
            FdKind::File { file, .. } => Some(file.path.clone()),
            FdKind::Deleted { path, .. } => Some(format!("{path} (deleted)")),
            FdKind::Device { path, .. } | FdKind::Fifo { path, .. } => Some(path.clone()),
            _ => None,
        });
    match path {
        Some(p) => format!("fd {fd} ({p})"),
        None => format!("fd {fd}"),
    }
}

fn lock_text(l: &FileLock) -> String {
    format!(
        "{} {} lock ({})",
        kind_name(l.kind),
        if l.write { "write" } else { "read" },
        range(l.start, l.end)
    )
}

/// Who holds a record lock conflicting with `l` on our fd `fd` (F_OFD_GETLK), for
/// messages; nothing for flock, which has no such query.
fn holder(fd: i32, l: &FileLock) -> String {
    if l.kind == LockKind::Flock {
        return String::new();
    }
    let mut f = flock_struct(l);
    // SAFETY: F_OFD_GETLK on a descriptor we own fills the struct we pass.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut f) };
    if r == 0 && f.l_type != libc::F_UNLCK as libc::c_short {
        if f.l_pid > 0 {
            format!(" (held by process {} here)", f.l_pid)
        } else {
            " (held by another open file description)".into()
        }
    } else {
        String::new()
    }
}

/// Takes the OFD and flock locks of every process once, on the restored descriptions
/// `descs` (by description id), in the restorer.
pub fn take_shared(meta: &Checkpoint, descs: &HashMap<u64, OwnedFd>) -> Result<()> {
    for p in &meta.processes {
        for l in p
            .locks
            .iter()
            .filter(|l| l.kind != LockKind::Posix && l.mapped.is_none())
        {
            let restore_err = |msg: String| Error::Restore {
                pid: p.pid,
                msg: format!("{}: {msg}", fd_name(p, l.fd)),
            };
            let desc = p
                .fds
                .iter()
                .find(|f: &&Fd| f.fd == l.fd)
                .and_then(|f| descs.get(&f.desc))
                .ok_or_else(|| restore_err(format!("no restored file for its {}", lock_text(l))))?;
            let fd = desc.as_raw_fd();
            let r = if l.kind == LockKind::Flock {
                let op = if l.write {
                    libc::LOCK_EX
                } else {
                    libc::LOCK_SH
                };
                // SAFETY: flock on a descriptor we own.
                unsafe { libc::flock(fd, op | libc::LOCK_NB) }
            } else {
                let f = flock_struct(l);
                // SAFETY: F_OFD_SETLK on a descriptor we own with a valid struct flock.
                unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &f) }
            };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                return Err(restore_err(format!(
                    "cannot take back its {}: {e}{}",
                    lock_text(l),
                    holder(fd, l)
                )));
            }
        }
    }
    Ok(())
}

/// Takes the locks process `p` held through mappings (`FileLock::mapped`) on the files
/// its mappings are about to be made from (`map_files`: path -> our fd), in the
/// restoring process: the mappings keep those open file descriptions, and with them
/// the locks, once the fds are closed.
pub fn take_mapped(
    p: &Process,
    map_files: &HashMap<String, i32>,
) -> std::result::Result<(), String> {
    for l in &p.locks {
        let Some(path) = &l.mapped else { continue };
        let fd = *map_files.get(path).ok_or_else(|| {
            format!(
                "{path}: its {} is held through a mapping the image lacks",
                lock_text(l)
            )
        })?;
        let r = if l.kind == LockKind::Flock {
            let op = if l.write {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            };
            // SAFETY: flock on a descriptor we own.
            unsafe { libc::flock(fd, op | libc::LOCK_NB) }
        } else {
            let f = flock_struct(l);
            // SAFETY: F_OFD_SETLK on a descriptor we own with a valid struct flock.
            unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &f) }
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!(
                "{path}: cannot take back the {} held through its mapping: {e}{}",
                lock_text(l),
                holder(fd, l)
            ));
        }
    }
    Ok(())
}

/// Makes stopped process `pid` (restored from `p`) take its POSIX record locks again
/// by injected `fcntl(F_SETLK)`; `scratch` is writable memory of the process.
pub fn take_posix(inj: &Injector, pid: i32, p: &Process, scratch: &Scratch) -> Result<()> {
    for l in p.locks.iter().filter(|l| l.kind == LockKind::Posix) {
        let f = flock_struct(l);
        // SAFETY: `f` is plain data that lives across the call; the slice covers exactly
        // its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&f as *const libc::flock).cast::<u8>(),
                std::mem::size_of::<libc::flock>(),
            )
        };
        scratch.write(bytes)?;
        let r = inj.raw(
            libc::SYS_fcntl,
            &[l.fd as u64, libc::F_SETLK as u64, scratch.addr],
        )?;
        if r < 0 {
            let e = std::io::Error::from_raw_os_error((-r) as i32);
            // Who holds it: the same request as F_GETLK, answered in place.
            let mut who = String::new();
            if inj
                .raw(
                    libc::SYS_fcntl,
                    &[l.fd as u64, libc::F_GETLK as u64, scratch.addr],
                )
                .is_ok_and(|r| r == 0)
            {
                let got = scratch.read(std::mem::size_of::<libc::flock>())?;
                // l_pid follows l_type, l_whence, l_start and l_len.
                let off = std::mem::offset_of!(libc::flock, l_pid);
                if let Some(b) = got.get(off..off + 4) {
                    let holder = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                    if holder > 0 {
                        who = format!(" (held by process {holder})");
                    } else if holder == -1 {
                        who = " (held by an open file description)".into();
                    }
                }
            }
            return Err(Error::Restore {
                pid,
                msg: format!(
                    "{}: cannot take back its {}: {e}{who}",
                    fd_name(p, l.fd),
                    lock_text(l)
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_locks_lines() {
        let e = Entry::parse("1: POSIX  ADVISORY  WRITE 15531 fe:00:10010849 10 29").unwrap();
        assert_eq!(e.kind(), Some(LockKind::Posix));
        assert_eq!((e.pid, e.start, e.end), (15531, 10, Some(29)));
        assert_eq!(e.file, "fe:00:10010849");
        assert!(!e.blocked);
        let b = Entry::parse("4: -> POSIX  ADVISORY  WRITE 15532 fe:00:10010849 10 14").unwrap();
        assert!(b.blocked);
        let o = Entry::parse("2: OFDLCK ADVISORY  READ -1 fe:00:10010849 50 EOF").unwrap();
        assert_eq!((o.kind(), o.pid, o.end), (Some(LockKind::Ofd), -1, None));
        let f = Entry::parse("\t1: FLOCK  ADVISORY  WRITE 15531 fe:00:10010871 0 EOF").unwrap();
        assert_eq!(f.kind(), Some(LockKind::Flock));
        let l = Entry::parse("1: LEASE  ACTIVE    READ 77 08:01:12 0 EOF").unwrap();
        assert_eq!(l.kind(), None);
        let m = Entry::parse("1: POSIX  MANDATORY WRITE 77 08:01:12 0 EOF").unwrap();
        assert_eq!(m.kind(), None);
        assert!(Entry::parse("garbage").is_none());
    }

    #[test]
    fn records_each_lock_once() {
        let mut c = Collector::new(&[10, 11]);
        let file = FdKind::Device {
            path: "/x".into(),
            flags: 2,
        };
        let text = "pos:\t0\nlock:\t1: POSIX  ADVISORY  WRITE 10 fe:00:5 0 9\n\
                    lock:\t2: FLOCK  ADVISORY  READ 11 fe:00:5 0 EOF\n";
        c.add_fd(10, 3, "/x", &file, 1, text).unwrap();
        // a dup of fd 3 shows the same
        c.add_fd(10, 4, "/x", &file, 1, text).unwrap();
        // the child shares the description: only the flock, already recorded
        c.add_fd(11, 3, "/x", &file, 1, text).unwrap();
        let l = c.take(10);
        assert_eq!(l.len(), 2, "{l:?}");
        assert!(c.take(11).is_empty());
        let stdio = FdKind::Stdio { index: 1 };
        assert!(c.add_fd(10, 1, "/y", &stdio, 2, text).is_err());
        let lease = "lock:\t1: LEASE  ACTIVE    READ 10 fe:00:6 0 EOF\n";
        let e = c.add_fd(10, 5, "/z", &file, 3, lease).unwrap_err();
        assert!(e.to_string().contains("fd 5 (/z)"), "{e}");
    }
}
