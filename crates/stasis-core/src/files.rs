//! File descriptors and open file descriptions (files, devices, deleted files, pipes).
//!
//! Dump: each entry of `/proc/PID/fd` is classified by its link target and `stat`:
//! stdio that came from outside stasis (matched by device and inode against the
//! streams stasis itself was given), regular files and directories (path, flags, offset
//! from `/proc/PID/fdinfo`), files deleted while open (saved once per inode as an
//! object of [`crate::shm`], with memfds and anonymous shared memory; one unlinked
//! under the name /proc shows while other hard links remain is saved under another
//! name, [`find_other_link`], or refused), directories removed while open, harmless
//! character devices (/dev/null...), and pipes (the bytes in flight are read without
//! consuming them: the pipe is reopened through /proc and `tee(2)`d into a pipe of
//! ours), pidfds and files under /proc/PID of processes of the checkpoint (the
//! target process must be one of the job's), pseudo-terminal ends and /dev/tty
//! ([`crate::tty`]), inotify instances ([`crate::inotify`]), and fds opened with
//! O_PATH ([`path_fd`]: by path, deleted files and memfds through their object,
//! removed directories by mode; those of /proc/PID files as other /proc files). Fds
//! that share one open file
//! description, in one process (dup) or across processes (fork), are found with
//! `kcmp(2)` and get the same description id; so are the files epoll sets watch under
//! an fd number that no longer holds them (KCMP_EPOLL_TFD), and the processes that
//! share a whole fd table (KCMP_FILES, [`mark_shared_tables`]). Descriptors in flight
//! in UNIX sockets' queues (SCM_RIGHTS), which the socket collector's peek installs in
//! our own table, are saved the same way (as fds of ours, through `/proc/self`) and
//! handed back to it. Anything else refuses the checkpoint with an error naming the fd.
//!
//! Restore: the restorer opens every description once ([`open_descriptions`]: files
//! reopened and positioned, O_PATH descriptions reopened with O_PATH ([`open_path`]),
//! deleted files and memfds reopened through the one object
//! [`crate::shm`] recreated for their inode, removed directories made, opened and
//! removed again, pipes created, refilled and resized, a pipe end with several
//! descriptions reopened through /proc for each, pty pairs made with their waiting
//! bytes, inotify instances last, as a watch may be on a deleted file recreated here;
//! those in flight too, which the UNIX sockets' refill then sends again) and passes
//! each process its fds over a UNIX
//! socket with SCM_RIGHTS ([`send_fds`]); the process puts them at their numbers
//! ([`receive_fds`]). Sharing is preserved because the very same descriptions are
//! passed. Pidfds and /proc files need their processes to exist: the process opens them
//! itself ([`open_late`]) and positions /proc files at the end of its rebuild
//! ([`seek_proc_files`]). A process sharing its parent's table receives nothing: it is
//! forked with CLONE_FILES once the parent's fds are in place.

use crate::error::{Error, Result, SysContext};
use crate::proc::{fdinfo, file_id, ProcDir};
use stasis_image::{Checkpoint, CheckpointReader, CheckpointWriter, Fd, FdKind, Pipe};
use std::collections::HashMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

/// Devices that are reopened by path: (major, minor, path).
const SIMPLE_DEVICES: &[(u32, u32, &str)] = &[
    (1, 3, "/dev/null"),
    (1, 5, "/dev/zero"),
    (1, 7, "/dev/full"),
    (1, 8, "/dev/random"),
    (1, 9, "/dev/urandom"),
];

const KCMP_FILE: i32 = 0;
const KCMP_FILES: i32 = 2;
const KCMP_EPOLL_TFD: i32 = 7;
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// `struct kcmp_epoll_slot` (include/uapi/linux/kcmp.h).
#[repr(C)]
struct KcmpEpollSlot {
    efd: u32,
    tfd: u32,
    toff: u32,
}

/// Identity (device, inode) of the stdio streams that came from outside stasis, by
/// index 0, 1, 2.
pub type StdioIds = Vec<(u8, u64, u64)>;

/// Identities of this process's own fds 0, 1 and 2.
pub fn own_stdio_ids() -> StdioIds {
    (0..3u8)
        .filter_map(|i| {
            std::fs::metadata(format!("/proc/self/fd/{i}"))
                .ok()
                .map(|m| (i, m.dev(), m.ino()))
        })
        .collect()
}

/// Identities of fds 0, 1 and 2 of another process (`checkpoint --pid`) that cannot
/// be reopened (a terminal, a pipe or socket from outside: bound to the restart's own
/// streams), and of those that are regular files (`nohup ./sim >out.log`: reopened at
/// their offsets like any file, or bound with `restart --stdio inherit`).
pub fn stdio_ids_of(proc: &ProcDir) -> (StdioIds, StdioIds) {
    let all: Vec<(u8, std::fs::Metadata)> = (0..3u8)
        .filter_map(|i| Some((i, std::fs::metadata(proc.file(&format!("fd/{i}"))).ok()?)))
        .collect();
    let ids = |files: bool| {
        all.iter()
            .filter(|(_, m)| m.is_file() == files)
            .map(|(i, m)| (*i, m.dev(), m.ino()))
            .collect()
    };
    (ids(false), ids(true))
}

/// The standard streams of `meta`'s processes saved as files (from a `--pid` image),
/// as they are on disk now: what the next checkpoint keeps marked.
pub fn stdio_files_of(meta: &stasis_image::Checkpoint) -> StdioIds {
    let mut out: StdioIds = Vec::new();
    for f in meta.processes.iter().flat_map(|p| &p.fds) {
        if let FdKind::File {
            file,
            stdio: Some(index),
            ..
        } = &f.kind
        {
            if let Ok(m) = std::fs::metadata(&file.path) {
                if !out.iter().any(|s| s.1 == m.dev() && s.2 == m.ino()) {
                    out.push((*index, m.dev(), m.ino()));
                }
            }
        }
    }
    out
}

/// The standard streams a `--pid` image reopens as files, that cannot be reopened
/// now (removed, or not writable by the restarting user): bound to the restart's own
/// streams instead. Returns a warning for each.
pub fn inherit_unopenable_stdio(meta: &mut stasis_image::Checkpoint) -> Vec<String> {
    let mut warnings = Vec::new();
    for p in &mut meta.processes {
        for f in &mut p.fds {
            let FdKind::File {
                file,
                flags,
                stdio: Some(index),
                ..
            } = &f.kind
            else {
                continue;
            };
            let index = *index;
            let mut o = std::fs::OpenOptions::new();
            match flags & libc::O_ACCMODE {
                libc::O_WRONLY => o.write(true),
                libc::O_RDWR => o.read(true).write(true),
                _ => o.read(true),
            };
            if let Err(e) = o.open(&file.path) {
                warnings.push(format!(
                    "process {}: fd {} ({}) cannot be reopened ({e}): it gets the restart's own standard stream {index}",
                    p.pid, f.fd, file.path
                ));
                f.kind = FdKind::Stdio { index };
            }
        }
    }
    warnings
}

/// `stasis restart --stdio inherit`: the standard streams a `--pid` image reopens as
/// files are bound to the restart's own streams instead.
pub fn inherit_stdio(meta: &mut stasis_image::Checkpoint) {
    for p in &mut meta.processes {
        for f in &mut p.fds {
            if let FdKind::File {
                stdio: Some(index), ..
            } = f.kind
            {
                f.kind = FdKind::Stdio { index };
            }
        }
    }
}

/// True when fd `a` of `pa` and fd `b` of `pb` are the same open file description.
fn same_description(pa: i32, a: i32, pb: i32, b: i32) -> bool {
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

/// What a checkpoint's fds hold besides files: pipes, sockets, pseudo-terminals.
pub struct Found {
    pub pipes: Vec<Pipe>,
    pub unix: Vec<stasis_image::UnixSocket>,
    pub inet: Vec<stasis_image::InetSocket>,
    pub ptys: Vec<stasis_image::Pty>,
}

/// Collects the fds of every process of a checkpoint, assigning description ids and
/// saving pipe contents.
#[derive(Default)]
pub struct Registry {
    /// Sockets found so far.
    pub sockets: crate::sockets::Collector,
    /// Pseudo-terminal pairs found so far.
    pub ptys: crate::tty::Collector,
    /// File locks found so far.
    pub locks: crate::locks::Collector,
    /// The processes of the checkpoint.
    job: Vec<i32>,
    /// Its zombies (pidfds and /proc files may refer to them).
    pub zombies: Vec<i32>,
    next: u64,
    /// (dev, ino, pid, fd, desc) of every fd seen so far.
    seen: Vec<(u64, u64, i32, i32, u64)>,
    pipes: Vec<Pipe>,
    /// Standard streams of a `--pid` root that are regular files (see
    /// [`stdio_ids_of`]): saved as files marked with their stream number.
    pub stdio_files: StdioIds,
    /// Our descriptors of the files in flight in UNIX sockets, kept until the end.
    in_flight_held: Vec<OwnedFd>,
}

impl Registry {
    /// A registry for one checkpoint of the processes `job`.
    pub fn new(
        job: Vec<i32>,
        tcp_external: crate::sockets::TcpExternal,
        repair: bool,
        drain: bool,
    ) -> Registry {
        Registry {
            locks: crate::locks::Collector::new(&job),
            sockets: crate::sockets::Collector::new(job.clone(), tcp_external, repair, drain),
            job,
            ..Registry::default()
        }
    }

    /// The pipes found (with their saved contents) and the sockets, checked to stay
    /// inside the checkpoint.
    pub fn finish(self, writer: &mut CheckpointWriter) -> Result<Found> {
        let (unix, inet) = self.sockets.finish(writer)?;
        Ok(Found {
            pipes: self.pipes,
            unix,
            inet,
            ptys: self.ptys.finish()?,
        })
    }

    fn describe(&mut self, pid: i32, fd: i32, md: &std::fs::Metadata) -> u64 {
        let key = (md.dev(), md.ino());
        let found = self
            .seen
            .iter()
            .find(|s| (s.0, s.1) == key && same_description(s.2, s.3, pid, fd))
            .map(|s| s.4);
        let desc = found.unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        self.seen.push((key.0, key.1, pid, fd, desc));
        desc
    }

    /// Saves the fds of a stopped process. Contents of pipes go into `writer`, those
    /// of deleted files and memfds into `shm`.
    pub fn dump_fds(
        &mut self,
        proc: &ProcDir,
        stdio: &StdioIds,
        shm: &mut crate::shm::Collector,
        writer: &mut CheckpointWriter,
    ) -> Result<Vec<Fd>> {
        let pid = proc.pid;
        let mut nums: Vec<i32> = std::fs::read_dir(proc.file("fd"))
            .ctx(pid, || "listing /proc/PID/fd".into())?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        nums.sort();
        let mut out = Vec::new();
        for fd in nums {
            stasis_sys::fault::step("saving an fd")?;
            if let Some(f) = self.dump_one(proc, fd, stdio, shm, writer, false)? {
                out.push(f);
            }
            self.dump_in_flight(stdio, shm, writer)?;
        }
        Ok(out)
    }

    /// The process a pidfd (fd `fd` of `pid`, fdinfo `info`) refers to: one of the
    /// checkpoint's processes (or zombies), else the checkpoint is refused.
    fn pidfd_target(&self, pid: i32, fd: i32, info: &str) -> Result<i32> {
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
    fn proc_file_of(
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

    /// Finds the file each item of epoll fd `epfd` of `pid` watches, where fd
    /// `item.fd` of `pid` no longer holds it (closed, or reused for another file): in
    /// any fd of the checkpoint's processes (kcmp KCMP_EPOLL_TFD), whose description
    /// it records. A file no fd holds any more is refused.
    fn find_watched(
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

    /// Saves the descriptors in flight found in the queues of the UNIX sockets saved
    /// so far (the peek installed them in our own table), like any fd; a socket among
    /// them is read in turn, so descriptors several levels deep are saved too. Our
    /// descriptors are kept until the checkpoint ends, so that their numbers are not
    /// reused while descriptions are told apart by (pid, fd).
    fn dump_in_flight(
        &mut self,
        stdio: &StdioIds,
        shm: &mut crate::shm::Collector,
        writer: &mut CheckpointWriter,
    ) -> Result<()> {
        // Our own /proc directory by /proc/self: /proc may belong to another PID
        // namespace than our pid (the job's init).
        let me = ProcDir {
            pid: std::process::id() as i32,
            path: std::path::PathBuf::from("/proc/self"),
        };
        loop {
            let found = self.sockets.take_in_flight();
            if found.is_empty() {
                return Ok(());
            }
            for (sock, message, fds) in found {
                let mut saved = Vec::with_capacity(fds.len());
                for (i, ours) in fds.iter().enumerate() {
                    let f = self
                        .dump_one(&me, ours.as_raw_fd(), stdio, shm, writer, true)
                        .and_then(|f| {
                            f.ok_or_else(|| Error::Unsupported {
                                pid: me.pid,
                                what: format!("fd {}: closed meanwhile", ours.as_raw_fd()),
                            })
                        });
                    let (pid, fd) = self.sockets.unix_holder(sock);
                    let mut f = match f {
                        Ok(f) => f,
                        Err(Error::Unsupported { what, .. }) => {
                            return Err(Error::Unsupported {
                                pid,
                                what: format!(
                                    "fd {fd}, a UNIX socket with a file descriptor in flight (SCM_RIGHTS) that cannot be saved: {}",
                                    what.split_once(", ").map_or(what.as_str(), |w| w.1)
                                ),
                            })
                        }
                        Err(e) => return Err(e),
                    };
                    f.fd = i as i32;
                    saved.push(f);
                }
                self.in_flight_held.extend(fds);
                self.sockets.set_unix_in_flight(sock, message, saved);
            }
        }
    }

    /// Saves fd `fd` of `proc` (with `in_flight`: one of ours, a descriptor in flight
    /// in a socket's queue); None when it was closed meanwhile.
    fn dump_one(
        &mut self,
        proc: &ProcDir,
        fd: i32,
        stdio: &StdioIds,
        shm: &mut crate::shm::Collector,
        writer: &mut CheckpointWriter,
        in_flight: bool,
    ) -> Result<Option<Fd>> {
        let pid = proc.pid;
        let link = proc.file(&format!("fd/{fd}"));
        let target = match std::fs::read_link(&link) {
            Ok(t) => t.to_string_lossy().into_owned(),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None), // closed meanwhile
            Err(e) => return Err(e).ctx(pid, || format!("readlink of fd {fd}")),
        };
        let md = std::fs::metadata(&link).ctx(pid, || format!("stat of fd {fd} ({target})"))?;
        // A file unlinked under this name while other hard links remain is the
        // same inode under one of its other names.
        let target = if md.is_file() && md.nlink() > 0 && target.ends_with(" (deleted)") {
            relinked(pid, fd, &target, &md)?
        } else {
            target
        };
        let info = fdinfo(proc, fd)?;
        let cloexec = info.flags & libc::O_CLOEXEC != 0;
        let flags = info.flags & !libc::O_CLOEXEC;
        // /dev/null and friends opened by the job itself are the same device as an
        // outside stdio of /dev/null: above fd 2 they are the job's own.
        let simple_device = md.file_type().is_char_device()
            && SIMPLE_DEVICES
                .iter()
                .any(|d| d.0 == libc::major(md.rdev()) && d.1 == libc::minor(md.rdev()));
        let kind = if flags & libc::O_PATH != 0 {
            // A file under /proc/PID is opened again (with O_PATH) by the process
            // itself once PID exists, as other /proc files.
            match self.proc_file_of(pid, fd, &link, &target)? {
                Some(pid_of) => FdKind::ProcFile {
                    path: target.clone(),
                    pid: pid_of,
                    flags,
                    pos: 0,
                },
                None => path_fd(pid, fd, &link, &target, &md, flags, shm, writer)?,
            }
        } else if let Some(&(index, ..)) = stdio
            .iter()
            .find(|s| s.1 == md.dev() && s.2 == md.ino())
            .filter(|_| fd <= 2 || !simple_device)
        {
            FdKind::Stdio { index }
        } else if target.starts_with("socket:") {
            self.sockets.dump_fd(pid, fd, md.ino(), flags, writer)?
        } else if target.starts_with("pipe:") {
            self.save_pipe(pid, fd, &link, md.ino(), writer)?;
            FdKind::Pipe {
                pipe: md.ino(),
                write: flags & libc::O_ACCMODE == libc::O_WRONLY,
                flags,
            }
        } else if target.starts_with("/memfd:") {
            shm.save_fd(pid, fd, &link, &target, &md, writer)?;
            FdKind::SharedMemory {
                id: md.ino(),
                flags,
                pos: info.pos,
            }
        } else if target == "anon_inode:[pidfd]" || target.starts_with("pidfd:") {
            FdKind::Pidfd {
                pid: self.pidfd_target(pid, fd, &info.text)?,
                flags,
            }
        } else if target == "anon_inode:inotify" {
            crate::inotify::dump(proc, fd, flags, &info.text, &self.job)?
        } else if let Some(k) = target
            .strip_prefix("anon_inode:")
            .and_then(|a| crate::eventfds::dump(a.trim_matches(['[', ']']), flags, &info.text))
        {
            k
        } else if let Some(kind) = classify_special(&target) {
            return Err(Error::Unsupported {
                pid,
                what: format!("fd {fd}, a {kind} ({target})"),
            });
        } else if let Some(pid_of) = self.proc_file_of(pid, fd, &link, &target)? {
            FdKind::ProcFile {
                path: target.clone(),
                pid: pid_of,
                flags,
                pos: info.pos,
            }
        } else if md.is_dir() && md.nlink() == 0 {
            FdKind::RemovedDir {
                path: target
                    .strip_suffix(" (deleted)")
                    .unwrap_or(&target)
                    .to_string(),
                flags,
                mode: md.mode() & 0o7777,
            }
        } else if md.is_file() && md.nlink() == 0 {
            let path = target
                .strip_suffix(" (deleted)")
                .unwrap_or(&target)
                .to_string();
            let object = shm.save_deleted(pid, fd, &link, &path, &md, writer)?;
            FdKind::Deleted {
                path,
                flags,
                pos: info.pos,
                mode: md.mode() & 0o7777,
                data_file: String::new(),
                size: md.size(),
                object: Some(object),
            }
        } else if md.is_file() || md.is_dir() {
            FdKind::File {
                file: file_id(&target, &md),
                flags,
                pos: info.pos,
                stdio: self
                    .stdio_files
                    .iter()
                    .find(|s| s.1 == md.dev() && s.2 == md.ino())
                    .map(|s| s.0),
            }
        } else if md.file_type().is_char_device()
            && crate::tty::is_dev_tty(libc::major(md.rdev()), libc::minor(md.rdev()))
        {
            let index = crate::tty::dev_tty_index(pid, fd)?;
            FdKind::Pty {
                pty: self.ptys.dump_fd(pid, fd, false, index)?,
                master: false,
                flags,
                dev_tty: true,
            }
        } else if let Some((master, index)) = md
            .file_type()
            .is_char_device()
            .then(|| crate::tty::classify(libc::major(md.rdev()), libc::minor(md.rdev())))
            .flatten()
        {
            FdKind::Pty {
                pty: self.ptys.dump_fd(pid, fd, master, index)?,
                master,
                flags,
                dev_tty: false,
            }
        } else if md.file_type().is_char_device() {
            let (maj, min) = (libc::major(md.rdev()), libc::minor(md.rdev()));
            match SIMPLE_DEVICES.iter().find(|d| d.0 == maj && d.1 == min) {
                Some(d) => FdKind::Device {
                    path: d.2.to_string(),
                    flags,
                },
                None => {
                    return Err(Error::Unsupported {
                        pid,
                        what: format!("fd {fd}, the character device {target} (not one of stasis's stdio streams)"),
                    })
                }
            }
        } else if md.file_type().is_fifo() {
            self.save_pipe(pid, fd, &link, md.ino(), writer)?;
            FdKind::Fifo {
                path: target.clone(),
                pipe: md.ino(),
                flags,
            }
        } else {
            return Err(Error::Unsupported {
                pid,
                what: format!("fd {fd} ({target})"),
            });
        };
        let mut kind = kind;
        if let FdKind::Epoll { items, .. } = &mut kind {
            self.find_watched(pid, fd, items)?;
        }
        let desc = self.describe(pid, fd, &md);
        if in_flight {
            // Ours, not the job's: no locks or owner of ours to save.
            return Ok(Some(Fd {
                fd,
                cloexec: false,
                kind,
                desc,
                owner: None,
            }));
        }
        self.locks
            .add_fd(pid, fd, &target, &kind, desc, &info.text)?;
        // fcntl(F_GETOWN) is refused on O_PATH fds, which have no owner.
        let owner = if matches!(kind, FdKind::InetSocket { .. } | FdKind::Path { .. }) {
            None
        } else {
            crate::fdowner::dump(pid, fd, flags)?
        };
        Ok(Some(Fd {
            fd,
            cloexec,
            kind,
            desc,
            owner,
        }))
    }

    /// Saves the bytes in flight in a pipe, once per pipe, without consuming them.
    fn save_pipe(
        &mut self,
        pid: i32,
        fd: i32,
        link: &std::path::Path,
        ino: u64,
        writer: &mut CheckpointWriter,
    ) -> Result<()> {
        if self.pipes.iter().any(|p| p.id == ino) {
            return Ok(());
        }
        let ctx = || format!("reading the pipe of fd {fd}");
        // A new read end of the same pipe.
        let rd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(link)
            .ctx(pid, ctx)?;
        // SAFETY: fcntl queries on a descriptor we own.
        let capacity = unsafe { libc::fcntl(rd.as_raw_fd(), libc::F_GETPIPE_SZ) }.max(4096) as u64;
        let mut p = [0i32; 2];
        // SAFETY: pipe2 fills the array with two new descriptors.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error()).ctx(pid, ctx);
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (mut tr, tw) =
            unsafe { (std::fs::File::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        // SAFETY: resizing our own pipe.
        unsafe { libc::fcntl(tw.as_raw_fd(), libc::F_SETPIPE_SZ, capacity as libc::c_int) };
        // SAFETY: tee between two pipes we hold; it copies without consuming.
        let n = unsafe {
            libc::tee(
                rd.as_raw_fd(),
                tw.as_raw_fd(),
                capacity as usize,
                libc::SPLICE_F_NONBLOCK,
            )
        };
        let mut data = Vec::new();
        if n > 0 {
            drop(tw);
            tr.read_to_end(&mut data).ctx(pid, ctx)?;
        } else if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
            return Err(std::io::Error::last_os_error()).ctx(pid, ctx);
        }
        let data_file = if data.is_empty() {
            None
        } else {
            let name = format!("pipe-{ino}.img");
            let mut w = writer.data_file(&name)?;
            w.write_all(&data)?;
            writer.finish_data(w)?;
            Some(name)
        };
        self.pipes.push(Pipe {
            id: ino,
            capacity,
            data_file,
            len: data.len() as u64,
        });
        Ok(())
    }
}

/// An fd opened with O_PATH (`flags`): the file it names, by path (`target`, after
/// checking that the path still leads to that very inode, not following a final
/// symbolic link), or, for a file deleted since (or a memfd), the object of
/// [`crate::shm`] for its inode; a file unlinked under this name with other links
/// left, by one of those ([`relinked`]); a removed directory, by its mode. Anything
/// else (an O_PATH fd of a socket, a pipe or an anonymous inode, of a pseudo-terminal,
/// of a FIFO or device node removed since) is refused, naming the fd.
#[allow(clippy::too_many_arguments)]
fn path_fd(
    pid: i32,
    fd: i32,
    link: &std::path::Path,
    target: &str,
    md: &std::fs::Metadata,
    flags: i32,
    shm: &mut crate::shm::Collector,
    writer: &mut CheckpointWriter,
) -> Result<FdKind> {
    let file_type = md.mode() & libc::S_IFMT;
    let refuse = |why: &str| Error::Unsupported {
        pid,
        what: format!("fd {fd}, an O_PATH descriptor of {target}: {why}"),
    };
    let kind = |path: String, object, removed_dir| FdKind::Path {
        path,
        flags,
        file_type,
        object,
        removed_dir,
    };
    if target.starts_with("/memfd:") {
        shm.save_fd(pid, fd, link, target, md, writer)?;
        return Ok(kind(target.to_string(), Some(md.ino()), None));
    }
    if !target.starts_with('/') {
        return Err(refuse("only files with a name can be reopened with O_PATH"));
    }
    if md.file_type().is_char_device()
        && crate::tty::classify(libc::major(md.rdev()), libc::minor(md.rdev())).is_some()
    {
        return Err(refuse(
            "a pseudo-terminal, which restore makes anew (under another number)",
        ));
    }
    let at_path = |p: &str| {
        std::fs::symlink_metadata(p)
            .map(|m| m.dev() == md.dev() && m.ino() == md.ino())
            .unwrap_or(false)
    };
    if at_path(target) {
        return Ok(kind(target.to_string(), None, None));
    }
    let gone = target
        .strip_suffix(" (deleted)")
        .unwrap_or(target)
        .to_string();
    if md.is_file() && md.nlink() == 0 {
        let object = shm.save_deleted(pid, fd, link, &gone, md, writer)?;
        Ok(kind(gone, Some(object), None))
    } else if md.is_file() {
        Ok(kind(relinked(pid, fd, target, md)?, None, None))
    } else if md.is_dir() && md.nlink() == 0 {
        Ok(kind(gone, None, Some(md.mode() & 0o7777)))
    } else {
        Err(refuse(
            "it is no longer at that path (removed or replaced), and only regular files and directories removed while open are restored",
        ))
    }
}

/// The name under which stasis finds the file of fd `fd` (`target`, a name it was
/// unlinked from, " (deleted)"), which still has other hard links: the same inode
/// found by [`find_other_link`], or the name itself where a file of that very name
/// is that inode. Refused when it is not found.
fn relinked(pid: i32, fd: i32, target: &str, md: &std::fs::Metadata) -> Result<String> {
    let same = |p: &str| {
        std::fs::symlink_metadata(p)
            .map(|m| m.dev() == md.dev() && m.ino() == md.ino())
            .unwrap_or(false)
    };
    if same(target) {
        return Ok(target.to_string());
    }
    let gone = target.strip_suffix(" (deleted)").unwrap_or(target);
    find_other_link(gone, md.dev(), md.ino()).ok_or_else(|| Error::Unsupported {
        pid,
        what: format!(
            "fd {fd}, the file {gone}, unlinked while open but with {} other link(s) that stasis did not find (searched {LINK_SEARCH_LIMIT} entries around its directory on the same filesystem)",
            md.nlink()
        ),
    })
}

/// Directory entries [`find_other_link`] reads at most.
pub const LINK_SEARCH_LIMIT: usize = 20_000;

/// Another name of the inode (`dev`, `ino`) that was unlinked from `path` while it
/// has other hard links: searched in the directory of `path` and below it, then in
/// each directory above it (and below those) on the same filesystem, breadth first,
/// without following symbolic links, reading at most [`LINK_SEARCH_LIMIT`] entries.
pub fn find_other_link(path: &str, dev: u64, ino: u64) -> Option<String> {
    use std::os::unix::fs::DirEntryExt;
    let mut roots = Vec::new();
    let mut at = std::path::Path::new(path).parent();
    while let Some(d) = at {
        match std::fs::symlink_metadata(d) {
            Ok(m) if m.dev() != dev => break,
            Ok(m) if m.is_dir() => roots.push(d.to_path_buf()),
            _ => {}
        }
        at = d.parent();
    }
    let mut visited = std::collections::HashSet::new();
    let mut budget = LINK_SEARCH_LIMIT;
    for root in roots {
        let mut queue = std::collections::VecDeque::from([root]);
        while let Some(d) = queue.pop_front() {
            match std::fs::symlink_metadata(&d) {
                Ok(m) if m.dev() == dev && visited.insert(m.ino()) => {}
                _ => continue,
            }
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                if budget == 0 {
                    return None;
                }
                budget -= 1;
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_dir() {
                    queue.push_back(e.path());
                } else if ft.is_file() && e.ino() == ino {
                    let p = e.path();
                    if std::fs::symlink_metadata(&p)
                        .map(|m| m.dev() == dev && m.ino() == ino)
                        .unwrap_or(false)
                    {
                        return Some(p.to_string_lossy().into_owned());
                    }
                }
            }
        }
    }
    None
}

/// Makes a new, empty directory (mode `mode`) to stand for the removed directory
/// `path`: next to where it was, or in the nearest ancestor left. Returns its path;
/// the caller opens or enters it and removes it.
pub fn make_removed_dir(path: &str, mode: u32) -> std::result::Result<String, String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mut at = std::path::Path::new(path).parent();
    let mut first_err = None;
    while let Some(d) = at {
        let d = if d.as_os_str().is_empty() {
            std::path::Path::new("/")
        } else {
            d
        };
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let new = d.join(format!(".stasis-removed-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&new) {
            Ok(()) => {
                // Mode as it was (mkdir applies the umask).
                let _ = std::fs::set_permissions(&new, std::fs::Permissions::from_mode(mode));
                return Ok(new.to_string_lossy().into_owned());
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                first_err.get_or_insert_with(|| format!("{}: {e}", d.display()));
                at = d.parent();
            }
            Err(e) => {
                return Err(format!(
                    "cannot make a directory in place of the removed directory {path} in {}: {e}",
                    d.display()
                ))
            }
        }
    }
    Err(format!(
        "cannot make a directory in place of the removed directory {path}: {}",
        first_err.unwrap_or_default()
    ))
}

fn classify_special(target: &str) -> Option<String> {
    if target.starts_with("pipe:") {
        Some("pipe".into())
    } else if target.starts_with("socket:") {
        Some("socket".into())
    } else if let Some(rest) = target.strip_prefix("anon_inode:") {
        Some(format!("{} descriptor", rest.trim_matches(['[', ']'])))
    } else if target.starts_with("/memfd:") {
        Some("memfd".into())
    } else {
        None
    }
}
/// Opens every open file description of the image once, in the restorer. `stdio` are
/// the restorer's own streams, bound to the saved outside stdio; the restorer's ends of
/// re-made connections to the application interface go to `api`; a slave of each new
/// pseudo-terminal, by saved id, to `ttys` (session leaders take their controlling
/// terminal from it).
pub fn open_descriptions(
    meta: &Checkpoint,
    image: &CheckpointReader,
    stdio: &[Option<i32>; 3],
    shm: &HashMap<u64, OwnedFd>,
    sockets: &mut HashMap<u64, OwnedFd>,
    api: &mut Vec<crate::sockets::appapi::Remade>,
    ttys: &mut HashMap<u64, OwnedFd>,
) -> std::result::Result<HashMap<u64, OwnedFd>, String> {
    let mut descs: HashMap<u64, OwnedFd> = HashMap::new();
    // Each pipe's two ends, and whether each was handed out already.
    let mut pipes: HashMap<u64, (OwnedFd, OwnedFd, bool, bool)> = HashMap::new();
    // One read-write opening of each FIFO, so that opening either end never blocks;
    // dropped once every description exists.
    let mut fifo_keepers: HashMap<u64, OwnedFd> = HashMap::new();
    // New pty pairs, by saved index: (master not yet handed out, slave path). A slave
    // of each stays in `ttys`.
    let mut ptys: HashMap<u64, (Option<OwnedFd>, String)> = HashMap::new();
    // inotify instances, made once every other description exists.
    let mut inotify: Vec<&Fd> = Vec::new();
    // Memfds whose own (memfd_create'd) description was handed out.
    let mut memfds_given: std::collections::HashSet<u64> = std::collections::HashSet::new();
    // The processes' fds, then the descriptors in flight in UNIX sockets' queues
    // (sent again with the queues' messages once every description exists).
    let in_flight = meta
        .sockets
        .iter()
        .flat_map(|s| s.in_flight.iter())
        .flat_map(|m| m.fds.iter())
        .map(|f| (meta.root_pid, f));
    let all: Vec<(i32, &Fd)> = meta
        .processes
        .iter()
        .flat_map(|p| p.fds.iter().map(move |f| (p.pid, f)))
        .chain(in_flight)
        .collect();
    {
        for (pid, f) in all {
            if f.desc == 0 {
                return Err(format!(
                    "fd {}: no open file description id (image from an older stasis)",
                    f.fd
                ));
            }
            if descs.contains_key(&f.desc) || is_late(&f.kind) {
                continue;
            }
            let fd = match &f.kind {
                FdKind::Stdio { index } => match stdio.get(*index as usize).copied().flatten() {
                    // SAFETY: dup of a descriptor of ours.
                    Some(s) => unsafe { libc::fcntl(s, libc::F_DUPFD_CLOEXEC, 3) },
                    None => open(f.fd, "/dev/null", libc::O_RDWR)?,
                },
                FdKind::File {
                    file, flags, pos, ..
                } => {
                    let fd = open(f.fd, &file.path, *flags)?;
                    seek(f.fd, fd, *pos, &file.path)?;
                    fd
                }
                FdKind::Device { path, flags } => open(f.fd, path, *flags)?,
                FdKind::Path {
                    path,
                    flags,
                    file_type,
                    object,
                    removed_dir,
                } => open_path(f.fd, path, *flags, *file_type, *object, *removed_dir, shm)?,
                FdKind::RemovedDir { path, flags, mode } => {
                    let dir =
                        make_removed_dir(path, *mode).map_err(|e| format!("fd {}: {e}", f.fd))?;
                    let fd = open(f.fd, &dir, *flags | libc::O_DIRECTORY);
                    if let Err(e) = std::fs::remove_dir(&dir) {
                        if let Ok(fd) = fd {
                            // SAFETY: closing the descriptor just opened, ours.
                            unsafe { libc::close(fd) };
                        }
                        return Err(format!(
                            "fd {}: cannot remove {dir} (in place of the removed directory {path}): {e}",
                            f.fd
                        ));
                    }
                    fd?
                }
                FdKind::Fifo { path, pipe, flags } => {
                    if !fifo_keepers.contains_key(pipe) {
                        let info = meta.pipes.iter().find(|x| x.id == *pipe);
                        fifo_keepers.insert(*pipe, open_fifo(f.fd, path, info, image)?);
                    }
                    let fd = open(f.fd, path, (*flags & libc::O_ACCMODE) | libc::O_NONBLOCK)?;
                    // SAFETY: fcntl on the descriptor we just opened.
                    unsafe {
                        libc::fcntl(
                            fd,
                            libc::F_SETFL,
                            *flags & (libc::O_NONBLOCK | libc::O_ASYNC),
                        )
                    };
                    fd
                }
                FdKind::Pty {
                    pty,
                    master,
                    flags,
                    dev_tty,
                } => {
                    if !ptys.contains_key(pty) {
                        let saved = meta.ptys.iter().find(|x| x.id == *pty).ok_or_else(|| {
                            format!("fd {}: pseudo-terminal {pty} missing from the image", f.fd)
                        })?;
                        let (m, s, path) =
                            crate::tty::create(saved).map_err(|e| format!("fd {}: {e}", f.fd))?;
                        ptys.insert(*pty, (Some(m), path));
                        ttys.insert(*pty, s);
                    }
                    let entry = ptys.get_mut(pty).ok_or("pty vanished")?;
                    if *dev_tty {
                        let s = ttys.get(pty).ok_or("pty vanished")?;
                        crate::tty::open_dev_tty(s.as_raw_fd(), *flags)
                            .map_err(|e| format!("fd {} (/dev/tty): {e}", f.fd))?
                            .into_raw_fd()
                    } else if *master {
                        match entry.0.take() {
                            Some(m) => m.into_raw_fd(),
                            None => open(f.fd, "/dev/ptmx", *flags)?,
                        }
                    } else {
                        open(f.fd, &entry.1.clone(), *flags)?
                    }
                }
                FdKind::UnixSocket { sock, flags }
                | FdKind::InetSocket {
                    sock,
                    flags,
                    signal: _,
                    owner: _,
                } => {
                    let fd = sockets
                        .remove(sock)
                        .ok_or_else(|| {
                            format!("fd {}: socket {sock} missing from the image", f.fd)
                        })?
                        .into_raw_fd();
                    let signal = match &f.kind {
                        FdKind::InetSocket { signal, .. } => *signal,
                        _ => 0,
                    };
                    // SAFETY: fcntl on the socket we just took (an IP socket's owner is
                    // set by the process that receives it).
                    unsafe {
                        libc::fcntl(
                            fd,
                            libc::F_SETFL,
                            *flags & (libc::O_NONBLOCK | libc::O_ASYNC),
                        );
                        if signal != 0 {
                            libc::fcntl(fd, crate::sockets::inet::F_SETSIG, signal);
                        }
                    }
                    fd
                }
                FdKind::AppApi {
                    flags,
                    pre_checkpoint,
                } => crate::sockets::appapi::remake(
                    f.fd,
                    pid,
                    *flags,
                    *pre_checkpoint,
                    image.path(),
                    api,
                )?,
                FdKind::Pidfd { .. } | FdKind::ProcFile { .. } => continue,
                // After every other description (a watch may be on a deleted file
                // recreated here).
                FdKind::Inotify { .. } => {
                    inotify.push(f);
                    continue;
                }
                k @ (FdKind::EventFd { .. }
                | FdKind::TimerFd { .. }
                | FdKind::SignalFd { .. }
                | FdKind::Epoll { .. }) => {
                    crate::eventfds::create(k).map_err(|e| format!("fd {}: {e}", f.fd))?
                }
                FdKind::SharedMemory { id, flags, pos } => {
                    let obj = shm.get(id).ok_or_else(|| {
                        format!("fd {}: shared memory {id} missing from the image", f.fd)
                    })?;
                    // A description of its own (flags, offset) on the same object. The
                    // first read-write one is the memfd_create'd description itself:
                    // one reopened for writing through /proc counts as a writer, and
                    // exec of the memfd (fexecve) would fail with ETXTBSY.
                    let fd = if *flags & libc::O_ACCMODE == libc::O_RDWR && memfds_given.insert(*id)
                    {
                        // SAFETY: dup of a descriptor of ours; its status flags are
                        // then set to the saved ones.
                        let fd = unsafe { libc::fcntl(obj.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
                        if fd >= 0 {
                            // SAFETY: fcntl on the descriptor just made.
                            unsafe { libc::fcntl(fd, libc::F_SETFL, *flags) };
                        }
                        fd
                    } else {
                        reopen(f.fd, obj.as_raw_fd(), *flags)?
                    };
                    seek(f.fd, fd, *pos, "memfd")?;
                    fd
                }
                FdKind::Deleted {
                    path,
                    flags,
                    pos,
                    object: Some(id),
                    ..
                } => {
                    let obj = shm.get(id).ok_or_else(|| {
                        format!(
                            "fd {}: deleted file {path} (object {id}) missing from the image",
                            f.fd
                        )
                    })?;
                    // A description of its own (flags, offset) on the one inode.
                    let fd = reopen(f.fd, obj.as_raw_fd(), *flags)?;
                    seek(f.fd, fd, *pos, path)?;
                    fd
                }
                FdKind::Deleted {
                    path,
                    flags,
                    pos,
                    mode,
                    data_file,
                    object: None,
                    ..
                } => recreate_deleted(f.fd, path, *flags, *pos, *mode, data_file, image)?,
                FdKind::Pipe { pipe, write, flags } => {
                    let info = meta.pipes.iter().find(|x| x.id == *pipe).ok_or_else(|| {
                        format!("fd {}: pipe {pipe} missing from the image", f.fd)
                    })?;
                    let ends = match pipes.entry(*pipe) {
                        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(new_pipe(info, image)?)
                        }
                    };
                    // The first description of each end is the end itself; another one
                    // (the pipe opened again through /proc/PID/fd, or read-write) is
                    // opened the same way, through /proc.
                    let rdwr = *flags & libc::O_ACCMODE == libc::O_RDWR;
                    let (end, used) = if *write {
                        (&ends.1, &mut ends.3)
                    } else {
                        (&ends.0, &mut ends.2)
                    };
                    let fd = if *used || rdwr {
                        reopen(f.fd, end.as_raw_fd(), *flags | libc::O_NONBLOCK)?
                    } else {
                        *used = true;
                        end.try_clone()
                            .map_err(|e| format!("fd {}: {e}", f.fd))?
                            .into_raw_fd()
                    };
                    // SAFETY: fcntl on the descriptor we just created.
                    unsafe {
                        libc::fcntl(
                            fd,
                            libc::F_SETFL,
                            *flags & (libc::O_NONBLOCK | libc::O_DIRECT | libc::O_ASYNC),
                        )
                    };
                    fd
                }
            };
            if fd < 0 {
                return Err(format!("fd {}: {}", f.fd, std::io::Error::last_os_error()));
            }
            // SAFETY: `fd` was just opened or duplicated and is owned here.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            descs.insert(f.desc, owned);
        }
    }
    for f in inotify {
        let FdKind::Inotify { flags, watches } = &f.kind else {
            continue;
        };
        if descs.contains_key(&f.desc) {
            continue;
        }
        let held = |at: [i32; 2]| {
            let desc = meta
                .processes
                .iter()
                .find(|p| p.pid == at[0])?
                .fds
                .iter()
                .find(|x| x.fd == at[1])?
                .desc;
            descs.get(&desc).map(|d| d.as_raw_fd())
        };
        let fd = crate::inotify::create(*flags, watches, held)
            .map_err(|e| format!("fd {}: {e}", f.fd))?;
        // SAFETY: `fd` was just created and is owned here.
        descs.insert(f.desc, unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(descs)
}

/// Opens an O_PATH description (see [`FdKind::Path`]) and checks its file type.
fn open_path(
    num: i32,
    path: &str,
    flags: i32,
    file_type: u32,
    object: Option<u64>,
    removed_dir: Option<u32>,
    shm: &HashMap<u64, OwnedFd>,
) -> std::result::Result<i32, String> {
    let flags = flags | libc::O_PATH;
    let fd = if let Some(id) = object {
        let obj = shm.get(&id).ok_or_else(|| {
            format!("fd {num}: the file {path} (object {id}) is missing from the image")
        })?;
        reopen(num, obj.as_raw_fd(), flags)?
    } else if let Some(mode) = removed_dir {
        let dir = make_removed_dir(path, mode).map_err(|e| format!("fd {num}: {e}"))?;
        let fd = open(num, &dir, flags | libc::O_DIRECTORY);
        if let Err(e) = std::fs::remove_dir(&dir) {
            if let Ok(fd) = fd {
                // SAFETY: closing the descriptor just opened, not handed out.
                unsafe { libc::close(fd) };
            }
            return Err(format!("fd {num}: cannot remove {dir} again: {e}"));
        }
        fd?
    } else {
        open(num, path, flags)?
    };
    // SAFETY: an all-zero `struct stat` is a valid value of that plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstatat on a descriptor we own, with an empty C string and a valid
    // out-pointer.
    let r = unsafe {
        libc::fstatat(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    let got = st.st_mode & libc::S_IFMT;
    if r != 0 || got != file_type {
        let why = if r != 0 {
            std::io::Error::last_os_error().to_string()
        } else {
            format!("it is of file type {got:o}, it was {file_type:o}")
        };
        // SAFETY: closing the descriptor just opened, not handed out.
        unsafe { libc::close(fd) };
        return Err(format!("fd {num}: O_PATH reopening of {path}: {why}"));
    }
    Ok(fd)
}

/// Opens a FIFO read-write (creating it if it is gone) and refills it.
fn open_fifo(
    num: i32,
    path: &str,
    info: Option<&Pipe>,
    image: &CheckpointReader,
) -> std::result::Result<OwnedFd, String> {
    let c = CString::new(path).map_err(|_| format!("fd {num}: bad path {path:?}"))?;
    // SAFETY: mkfifo with a valid C string; EEXIST is fine.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0
        && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
    {
        return Err(format!(
            "fd {num}: cannot recreate the FIFO {path}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let fd = open(num, path, libc::O_RDWR)?;
    // SAFETY: fd was just opened and is owned here.
    let keeper = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(info) = info {
        // SAFETY: resizing the FIFO's pipe.
        unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, info.capacity as libc::c_int) };
        if let Some(name) = &info.data_file {
            let p = image.data_path(name).map_err(|e| e.to_string())?;
            let data = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let mut wf = std::fs::File::from(keeper.try_clone().map_err(|e| e.to_string())?);
            wf.write_all(&data)
                .map_err(|e| format!("refilling FIFO {path}: {e}"))?;
        }
    }
    Ok(keeper)
}

/// A new pipe with the saved capacity and contents: (read end, write end, neither
/// handed out yet).
fn new_pipe(
    info: &Pipe,
    image: &CheckpointReader,
) -> std::result::Result<(OwnedFd, OwnedFd, bool, bool), String> {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 fills the array with two new descriptors.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    // SAFETY: resizing our own pipe.
    unsafe {
        libc::fcntl(
            w.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            info.capacity as libc::c_int,
        )
    };
    if let Some(name) = &info.data_file {
        let path = image.data_path(name).map_err(|e| e.to_string())?;
        let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut wf = std::fs::File::from(w.try_clone().map_err(|e| e.to_string())?);
        wf.write_all(&data)
            .map_err(|e| format!("refilling pipe {}: {e}", info.id))?;
    }
    Ok((r, w, false, false))
}

/// One entry of the fd-passing protocol: target fd number and FD_CLOEXEC.
const ENTRY: usize = 8;
/// Fds per message (SCM_MAX_FD is 253).
const BATCH: usize = 200;

/// Kinds of fd that the restored process opens itself once every process exists
/// ([`open_late`]): pidfds and /proc files.
pub fn is_late(kind: &FdKind) -> bool {
    matches!(kind, FdKind::Pidfd { .. } | FdKind::ProcFile { .. })
}

/// The descriptions of the files that `fds`' epoll sets watch and hold under no fd
/// number of their own (see [`stasis_image::EpollItem::desc`]), in a fixed order: sent
/// to the process beside its fds, for the registration only.
pub fn epoll_temps(fds: &[Fd]) -> Vec<u64> {
    let mut out = Vec::new();
    for f in fds {
        if let FdKind::Epoll { items, .. } = &f.kind {
            for d in items.iter().filter_map(|i| i.desc) {
                if !out.contains(&d) {
                    out.push(d);
                }
            }
        }
    }
    out
}

/// Sends process `fds` over the SOCK_SEQPACKET socket `sock`: batches of (number,
/// cloexec) entries with the descriptions as SCM_RIGHTS, then an empty message. The
/// files of [`epoll_temps`] go with them, numbered -1, -2...
pub fn send_fds(
    sock: i32,
    fds: &[Fd],
    descs: &HashMap<u64, OwnedFd>,
) -> std::result::Result<(), String> {
    let mut items: Vec<(i32, bool, i32)> = Vec::new();
    for f in fds.iter().filter(|f| !is_late(&f.kind)) {
        let d = descs
            .get(&f.desc)
            .ok_or_else(|| format!("fd {}: no description", f.fd))?;
        items.push((f.fd, f.cloexec, d.as_raw_fd()));
    }
    for (k, desc) in epoll_temps(fds).into_iter().enumerate() {
        let d = descs
            .get(&desc)
            .ok_or_else(|| format!("a file watched by epoll (description {desc}) is missing"))?;
        items.push((-(k as i32) - 1, true, d.as_raw_fd()));
    }
    for batch in items.chunks(BATCH) {
        let mut payload = Vec::with_capacity(batch.len() * ENTRY);
        for (num, cloexec, _) in batch {
            payload.extend_from_slice(&num.to_le_bytes());
            payload.extend_from_slice(&[u8::from(*cloexec), 0, 0, 0]);
        }
        let raw: Vec<i32> = batch.iter().map(|b| b.2).collect();
        send_with_fds(sock, &payload, &raw)?;
    }
    send_with_fds(sock, &[], &[])
}

fn send_with_fds(sock: i32, payload: &[u8], fds: &[i32]) -> std::result::Result<(), String> {
    let byte = [0u8; 1];
    let data: &[u8] = if payload.is_empty() {
        &byte[..]
    } else {
        payload
    };
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer is CMSG_SPACE(len) bytes, aligned, and holds one
        // header followed by the fds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<i32>(),
                fds.len(),
            );
        }
    }
    // SAFETY: msg points to live buffers for the duration of the call.
    if unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) } < 0 {
        return Err(format!("passing fds: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// In the new process: receives its fds from `sock` and puts them at their numbers.
/// Received descriptors are first moved to numbers >= `hi`, so that placing one never
/// overwrites another not yet placed. Returns the files of [`epoll_temps`], by their
/// index there, left at numbers >= `hi` (for the caller to close).
pub fn receive_fds(sock: i32, hi: i32) -> std::result::Result<HashMap<usize, i32>, String> {
    let mut temps = HashMap::new();
    let mut pending: Vec<(i32, bool, i32)> = Vec::new();
    loop {
        let mut data = vec![0u8; BATCH * ENTRY];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE((BATCH * 4) as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: msghdr is plain data; zeroed is a valid empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg points to live buffers of the sizes given.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(format!(
                "receiving fds: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut fds: Vec<i32> = Vec::new();
        // SAFETY: walking the control messages the kernel wrote into cbuf.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                    let p = libc::CMSG_DATA(c).cast::<i32>();
                    for i in 0..count {
                        fds.push(*p.add(i));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let entries = if fds.is_empty() {
            0
        } else {
            n as usize / ENTRY
        };
        if entries == 0 {
            break;
        }
        if entries != fds.len() {
            return Err("fd-passing message and descriptors do not match".into());
        }
        for (k, fd) in fds.into_iter().enumerate() {
            let e = &data[k * ENTRY..(k + 1) * ENTRY];
            let num = i32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            // SAFETY: moving a received descriptor (ours) above `hi`.
            let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, hi) };
            // SAFETY: closing the original received descriptor.
            unsafe { libc::close(fd) };
            if high < 0 {
                return Err(format!("fd {num}: {}", std::io::Error::last_os_error()));
            }
            if num < 0 {
                temps.insert((-num - 1) as usize, high);
            } else {
                pending.push((num, e[4] != 0, high));
            }
        }
    }
    for (num, cloexec, high) in pending.iter().copied() {
        let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
        // SAFETY: dup3 onto the saved number, which is free or ours to replace.
        if unsafe { libc::dup3(high, num, flags) } < 0 {
            return Err(format!(
                "fd {num}: dup3: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    for (_, _, high) in pending {
        // SAFETY: closing our temporary high copies.
        unsafe { libc::close(high) };
    }
    Ok(temps)
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

fn open(num: i32, path: &str, flags: i32) -> std::result::Result<i32, String> {
    let c = CString::new(path).map_err(|_| format!("fd {num}: bad path {path:?}"))?;
    let flags = (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_CLOEXEC))
        | libc::O_NOCTTY;
    // SAFETY: `c` is a valid C string; open has no other preconditions.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(format!(
            "fd {num}: cannot reopen {path}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

/// A new open file description of the file behind our fd `ours`, through
/// /proc/self/fd (a symbolic link: O_NOFOLLOW, which the application may have opened
/// the file with, would refuse it).
fn reopen(num: i32, ours: i32, flags: i32) -> std::result::Result<i32, String> {
    open(
        num,
        &format!("/proc/self/fd/{ours}"),
        flags & !libc::O_NOFOLLOW,
    )
}

fn seek(num: i32, fd: i32, pos: u64, path: &str) -> std::result::Result<(), String> {
    // SAFETY: lseek on a descriptor we own.
    if pos > 0 && unsafe { libc::lseek(fd, pos as i64, libc::SEEK_SET) } < 0 {
        return Err(format!(
            "fd {num}: cannot seek {path} to {pos}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A deleted file of an image from an older stasis (its content saved per fd).
fn recreate_deleted(
    num: i32,
    path: &str,
    flags: i32,
    pos: u64,
    mode: u32,
    data_file: &str,
    image: &CheckpointReader,
) -> std::result::Result<i32, String> {
    let dir = std::path::Path::new(path)
        .parent()
        .unwrap_or(std::path::Path::new("/"));
    let tmp = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .map_err(|e| {
            format!(
                "fd {num}: cannot recreate deleted file {path} in {}: {e}",
                dir.display()
            )
        })?;
    let src_path = image.data_path(data_file).map_err(|e| e.to_string())?;
    let mut src =
        std::fs::File::open(&src_path).map_err(|e| format!("{}: {e}", src_path.display()))?;
    let mut dst = &tmp;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", src_path.display()))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])
            .map_err(|e| format!("fd {num}: writing deleted file {path}: {e}"))?;
    }
    // SAFETY: fchmod on a descriptor we own.
    unsafe { libc::fchmod(tmp.as_raw_fd(), mode) };
    // Reopen through /proc to get the saved access mode and flags.
    let fd = reopen(num, tmp.as_raw_fd(), flags)?;
    drop(tmp);
    seek(num, fd, pos, path)?;
    Ok(fd)
}

/// Opens a file for the restorer and moves it to a number at least `min`.
pub fn open_high(path: &str, flags: i32, min: i32) -> std::result::Result<i32, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(flags & libc::O_ACCMODE == libc::O_RDWR)
        .open(path)
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    let raw = f.into_raw_fd();
    // SAFETY: fcntl(F_DUPFD) on a descriptor we own.
    let high = unsafe { libc::fcntl(raw, libc::F_DUPFD, min) };
    // SAFETY: closing the original descriptor, which we own.
    unsafe { libc::close(raw) };
    if high < 0 {
        return Err(format!(
            "cannot move {path} to a high fd: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(high)
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
