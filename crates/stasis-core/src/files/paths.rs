//! O_PATH fds, and files whose name changed since they were opened: an O_PATH fd
//! saved by path or through its object (dump) and reopened with O_PATH (restore); a
//! file unlinked under the name /proc shows, found under another of its links; a
//! directory removed while open, made again to be opened.

use super::restore::{open, reopen};
use crate::error::{Error, Result};
use stasis_image::{CheckpointWriter, FdKind};
use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::{AsRawFd, OwnedFd};

/// An fd opened with O_PATH (`flags`): the file it names, by path (`target`, after
/// checking that the path still leads to that very inode, not following a final
/// symbolic link), or, for a file deleted since (or a memfd), the object of
/// [`crate::shm`] for its inode; a file unlinked under this name with other links
/// left, by one of those ([`relinked`]); a removed directory, by its mode. Anything
/// else (an O_PATH fd of a socket, a pipe or an anonymous inode, of a pseudo-terminal,
/// of a FIFO or device node removed since) is refused, naming the fd.
#[allow(clippy::too_many_arguments)]
pub(super) fn path_fd(
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
pub(super) fn relinked(pid: i32, fd: i32, target: &str, md: &std::fs::Metadata) -> Result<String> {
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

/// Opens an O_PATH description (see [`FdKind::Path`]) and checks its file type.
pub(super) fn open_path(
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
