//! Opening every open file description of the image once, in the restorer: files
//! reopened and positioned, deleted files through their recreated object, removed
//! directories, pipes, pseudo-terminals, inotify instances last.

use super::paths::open_path;
use super::pipes::{new_pipe, open_fifo};
use super::{is_late, make_removed_dir};
use stasis_image::{Checkpoint, CheckpointReader, Fd, FdKind};
use std::collections::HashMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

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

pub(super) fn open(num: i32, path: &str, flags: i32) -> std::result::Result<i32, String> {
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
pub(super) fn reopen(num: i32, ours: i32, flags: i32) -> std::result::Result<i32, String> {
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
