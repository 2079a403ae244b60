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
//! O_PATH ([`paths::path_fd`]: by path, deleted files and memfds through their object,
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
//! reopened and positioned, O_PATH descriptions reopened with O_PATH ([`paths::open_path`]),
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
//!
//! The code is in one file per concern:
//!
//! - this file: the [`Registry`] that collects a checkpoint's fds, and the
//!   classification of each fd ([`Registry::dump_fds`]);
//! - [`stdio`]: the standard streams that came from outside stasis;
//! - [`shared`]: sharing found with `kcmp(2)` (descriptions, epoll items, fd tables);
//! - [`pipes`]: pipes and FIFOs, dump and restore;
//! - [`paths`]: O_PATH fds and names removed or relinked since the file was opened;
//! - [`procfiles`]: pidfds and /proc files, opened late by the restored process;
//! - [`restore`](mod@restore): opening every description in the restorer;
//! - [`passing`]: handing each process its fds over SCM_RIGHTS.

mod passing;
mod paths;
mod pipes;
mod procfiles;
mod restore;
mod shared;
mod stdio;

use paths::{path_fd, relinked};
use shared::same_description;

pub use passing::{epoll_temps, receive_fds, send_fds};
pub use paths::{find_other_link, make_removed_dir, LINK_SEARCH_LIMIT};
pub use procfiles::{is_late, open_late, seek_proc_files};
pub use restore::{open_descriptions, open_high};
pub use shared::mark_shared_tables;
pub use stdio::{
    inherit_stdio, inherit_unopenable_stdio, own_stdio_ids, stdio_files_of, stdio_ids_of, StdioIds,
};

use crate::error::{Error, Result, SysContext};
use crate::proc::{fdinfo, file_id, ProcDir};
use stasis_image::{CheckpointWriter, Fd, FdKind, Pipe};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::{AsRawFd, OwnedFd};

/// Devices that are reopened by path: (major, minor, path).
const SIMPLE_DEVICES: &[(u32, u32, &str)] = &[
    (1, 3, "/dev/null"),
    (1, 5, "/dev/zero"),
    (1, 7, "/dev/full"),
    (1, 8, "/dev/random"),
    (1, 9, "/dev/urandom"),
];

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
        // The slowest fds, for the debug log (a launcher's fds are much of a pause).
        let timed = tracing::enabled!(tracing::Level::DEBUG);
        let mut took: Vec<(std::time::Duration, i32)> = Vec::new();
        let t0 = std::time::Instant::now();
        for fd in nums {
            stasis_sys::fault::step("saving an fd")?;
            let t = std::time::Instant::now();
            if let Some(f) = self.dump_one(proc, fd, stdio, shm, writer, false)? {
                out.push(f);
            }
            self.dump_in_flight(stdio, shm, writer)?;
            if timed {
                took.push((t.elapsed(), fd));
            }
        }
        if !took.is_empty() {
            took.sort_unstable_by(|a, b| b.cmp(a));
            let slowest: Vec<String> = took
                .iter()
                .take(4)
                .map(|(d, fd)| {
                    let target = std::fs::read_link(proc.file(&format!("fd/{fd}")))
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    format!("fd {fd} ({target}) {:.2} ms", d.as_secs_f64() * 1e3)
                })
                .collect();
            tracing::debug!(
                "process {pid}: {} fds in {:.1} ms; slowest: {}",
                took.len(),
                t0.elapsed().as_secs_f64() * 1e3,
                slowest.join(", ")
            );
        }
        Ok(out)
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
