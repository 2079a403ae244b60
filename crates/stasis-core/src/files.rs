//! File descriptors.
//!
//! Dump: each entry of `/proc/PID/fd` is classified by its link target and `stat`:
//! stdio that came from outside stasis (matched by device and inode against the
//! streams stasis itself was given), regular files and directories (path, flags, offset
//! from `/proc/PID/fdinfo`), files deleted while open (content saved in the image),
//! harmless character devices (/dev/null...). Anything else refuses the checkpoint with
//! an error naming the fd.
//!
//! Restore runs inside the new process before its address space is replaced, as plain
//! Rust: every fd is reopened and moved to its number.

use crate::error::{Error, Result, SysContext};
use crate::proc::{fdinfo, file_id, ProcDir};
use stasis_image::{CheckpointReader, CheckpointWriter, Fd, FdKind};
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::{AsRawFd, IntoRawFd};

/// Devices that are reopened by path: (major, minor, path).
const SIMPLE_DEVICES: &[(u32, u32, &str)] = &[
    (1, 3, "/dev/null"),
    (1, 5, "/dev/zero"),
    (1, 7, "/dev/full"),
    (1, 8, "/dev/random"),
    (1, 9, "/dev/urandom"),
];

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

/// Identities of fds 0, 1 and 2 of another process.
pub fn stdio_ids_of(proc: &ProcDir) -> StdioIds {
    (0..3u8)
        .filter_map(|i| {
            std::fs::metadata(proc.file(&format!("fd/{i}")))
                .ok()
                .map(|m| (i, m.dev(), m.ino()))
        })
        .collect()
}

/// Saves the fds of a process. Contents of deleted files go into `writer`.
pub fn dump_fds(
    proc: &ProcDir,
    stdio: &StdioIds,
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
        let link = proc.file(&format!("fd/{fd}"));
        let target = match std::fs::read_link(&link) {
            Ok(t) => t.to_string_lossy().into_owned(),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue, // closed meanwhile
            Err(e) => return Err(e).ctx(pid, || format!("readlink of fd {fd}")),
        };
        let md = std::fs::metadata(&link).ctx(pid, || format!("stat of fd {fd} ({target})"))?;
        let info = fdinfo(proc, fd)?;
        let cloexec = info.flags & libc::O_CLOEXEC != 0;
        let flags = info.flags & !libc::O_CLOEXEC;
        let kind = if let Some(&(index, ..)) =
            stdio.iter().find(|s| s.1 == md.dev() && s.2 == md.ino())
        {
            FdKind::Stdio { index }
        } else if let Some(kind) = classify_special(&target) {
            return Err(Error::Unsupported {
                pid,
                what: format!("fd {fd}, a {kind} ({target})"),
            });
        } else if md.is_file() && md.nlink() == 0 {
            let path = target
                .strip_suffix(" (deleted)")
                .unwrap_or(&target)
                .to_string();
            let data_file = format!("file-{pid}-{fd}.img");
            save_content(pid, fd, &link, &data_file, writer)?;
            FdKind::Deleted {
                path,
                flags,
                pos: info.pos,
                mode: md.mode() & 0o7777,
                data_file,
                size: md.size(),
            }
        } else if md.is_file() || md.is_dir() {
            FdKind::File {
                file: file_id(&target, &md),
                flags,
                pos: info.pos,
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
            return Err(Error::Unsupported {
                pid,
                what: format!("fd {fd}, a named pipe (FIFO) {target}"),
            });
        } else {
            return Err(Error::Unsupported {
                pid,
                what: format!("fd {fd} ({target})"),
            });
        };
        out.push(Fd { fd, cloexec, kind });
    }
    Ok(out)
}

/// Names the kind of a pseudo-file link target that is not supported yet.
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

fn save_content(
    pid: i32,
    fd: i32,
    link: &std::path::Path,
    name: &str,
    writer: &mut CheckpointWriter,
) -> Result<()> {
    let mut src =
        std::fs::File::open(link).ctx(pid, || format!("opening deleted file of fd {fd}"))?;
    let mut w = writer.data_file(name)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src
            .read(&mut buf)
            .ctx(pid, || format!("reading deleted file of fd {fd}"))?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n])?;
    }
    writer.finish_data(w)?;
    Ok(())
}

/// Recreates the fds of a process inside it (restore side, runs in the new process).
///
/// `stdio` are descriptors of the restarting stasis's own stdio streams (None where
/// closed); they must be numbered above every fd in `fds`.
pub fn restore_fds(
    fds: &[Fd],
    stdio: &[Option<i32>; 3],
    image: &CheckpointReader,
) -> std::result::Result<(), String> {
    for f in fds {
        let src = match &f.kind {
            FdKind::Stdio { index } => match stdio.get(*index as usize).copied().flatten() {
                Some(s) => Source::Borrowed(s),
                None => Source::Owned(open(f.fd, "/dev/null", libc::O_RDWR)?),
            },
            FdKind::File { file, flags, pos } => {
                let fd = open(f.fd, &file.path, *flags)?;
                seek(f.fd, fd, *pos, &file.path)?;
                Source::Owned(fd)
            }
            FdKind::Device { path, flags } => Source::Owned(open(f.fd, path, *flags)?),
            FdKind::Deleted {
                path,
                flags,
                pos,
                mode,
                data_file,
                ..
            } => Source::Owned(recreate_deleted(
                f.fd, path, *flags, *pos, *mode, data_file, image,
            )?),
        };
        let raw = src.fd();
        if raw != f.fd {
            let flags = if f.cloexec { libc::O_CLOEXEC } else { 0 };
            // SAFETY: dup3 on descriptors we own; the target number is meant to be replaced.
            if unsafe { libc::dup3(raw, f.fd, flags) } < 0 {
                return Err(format!(
                    "fd {}: dup3: {}",
                    f.fd,
                    std::io::Error::last_os_error()
                ));
            }
            if let Source::Owned(o) = src {
                // SAFETY: closing a descriptor we opened and no longer need.
                unsafe { libc::close(o) };
            }
        } else if f.cloexec {
            // SAFETY: fcntl on a descriptor we own.
            unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    Ok(())
}

enum Source {
    Owned(i32),
    Borrowed(i32),
}

impl Source {
    fn fd(&self) -> i32 {
        match self {
            Source::Owned(f) | Source::Borrowed(f) => *f,
        }
    }
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
    let fd = open(num, &format!("/proc/self/fd/{}", tmp.as_raw_fd()), flags)?;
    drop(tmp);
    seek(num, fd, pos, path)?;
    Ok(fd)
}

use std::os::unix::fs::OpenOptionsExt;

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
