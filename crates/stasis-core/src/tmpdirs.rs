//! The job's private /tmp and /dev/shm (`stasis run --tmp private`, the default).
//!
//! Every job under `stasis run` gets PIDs from 2, so names built from PIDs (OpenMPI's
//! session directory `/tmp/ompi.HOST.UID/pid.2`, its `/dev/shm/vader_segment.*`) are
//! the same in every job: the namespace init mounts a tmpfs of the job's own on each,
//! as Slurm's job_container/tmpfs does ([`mount_private`]).
//!
//! Dump: while the job is frozen, everything in them is saved ([`save`]): directories,
//! regular files (their data ranges, holes skipped, found with SEEK_DATA/SEEK_HOLE;
//! hard links once), symbolic links and FIFOs, with modes, owners and modification
//! times; the bytes go to one data file. Sockets are not saved: a listener of the job
//! binds its name again.
//!
//! Restore: the init of the restart mounts new ones and recreates the content
//! ([`recreate`]) before any process is restored, so that files the processes had
//! open, mapped or as working directory are there, on this node or another.

use crate::error::{Error, Result, SysContext};
use stasis_image::{CheckpointReader, CheckpointWriter, DirEntry, DirEntryKind, PrivateDir};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The directories a job gets its own of.
pub const DIRS: [&str; 2] = ["/tmp", "/dev/shm"];
const DATA_FILE: &str = "tmpdirs.img";

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Restore {
        pid: 0,
        msg: format!("{} contains a NUL byte", p.display()),
    })
}

/// Mounts an empty tmpfs (mode 1777, nosuid, nodev) on each of [`DIRS`], in the
/// calling process's mount namespace (the init's: it must hold CAP_SYS_ADMIN there).
pub fn mount_private() -> Result<()> {
    for dir in DIRS {
        let target = cstr(Path::new(dir))?;
        // SAFETY: mount with valid NUL-terminated strings.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=1777".as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error())
                .ctx(0, || format!("mounting the job's private {dir} (a tmpfs)"));
        }
    }
    Ok(())
}

/// Saves everything in the private directories (seen from the calling process: the
/// init, in the job's mount namespace) into the checkpoint.
pub fn save(writer: &mut CheckpointWriter) -> Result<Vec<PrivateDir>> {
    let mut data = writer.data_file(DATA_FILE)?;
    let mut offset = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut out = Vec::new();
    for dir in DIRS {
        let root = Path::new(dir);
        let mut entries = Vec::new();
        let mut links: HashMap<(u64, u64), usize> = HashMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let path = root.join(&rel);
            let md = std::fs::symlink_metadata(&path)
                .ctx(0, || format!("reading {} of the job", path.display()))?;
            let ft = md.file_type();
            let name = rel.to_str().ok_or_else(|| Error::Unsupported {
                pid: 0,
                what: format!(
                    "a file name that is not UTF-8 in {dir} ({})",
                    path.display()
                ),
            })?;
            let mut e = DirEntry {
                path: name.to_string(),
                kind: DirEntryKind::Dir,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: (md.mtime(), md.mtime_nsec() as u32),
                size: 0,
                extents: Vec::new(),
                data_offset: 0,
                target: None,
                link_of: None,
            };
            if ft.is_dir() {
                let mut children: Vec<PathBuf> = std::fs::read_dir(&path)
                    .ctx(0, || format!("listing {} of the job", path.display()))?
                    .filter_map(|c| c.ok())
                    .map(|c| rel.join(c.file_name()))
                    .collect();
                // Popped in name order.
                children.sort_unstable_by(|a, b| b.cmp(a));
                stack.extend(children);
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&path)
                    .ctx(0, || format!("reading the link {}", path.display()))?;
                e.kind = DirEntryKind::Symlink;
                e.target = Some(
                    t.to_str()
                        .ok_or_else(|| Error::Unsupported {
                            pid: 0,
                            what: format!("a link target that is not UTF-8 ({})", path.display()),
                        })?
                        .to_string(),
                );
            } else if ft.is_fifo() {
                e.kind = DirEntryKind::Fifo;
            } else if ft.is_file() {
                e.kind = DirEntryKind::File;
                e.size = md.len();
                let key = (md.dev(), md.ino());
                if md.nlink() > 1 {
                    if let Some(&first) = links.get(&key) {
                        e.link_of = Some(first);
                        entries.push(e);
                        continue;
                    }
                    links.insert(key, entries.len());
                }
                let mut f = File::open(&path)
                    .ctx(0, || format!("opening {} of the job", path.display()))?;
                e.data_offset = offset;
                e.extents = data_ranges(&mut f, md.len())
                    .ctx(0, || format!("finding the data of {}", path.display()))?;
                for &(start, len) in &e.extents {
                    f.seek(SeekFrom::Start(start))
                        .ctx(0, || format!("reading {}", path.display()))?;
                    let mut left = len;
                    while left > 0 {
                        let n = buf.len().min(left as usize);
                        f.read_exact(&mut buf[..n]).ctx(0, || {
                            format!(
                                "reading {} (changed while the job was frozen?)",
                                path.display()
                            )
                        })?;
                        data.write_all(&buf[..n])?;
                        left -= n as u64;
                    }
                    offset += len;
                }
            } else {
                // Sockets (bound again by their listener) and device nodes.
                continue;
            }
            entries.push(e);
        }
        out.push(PrivateDir {
            path: dir.to_string(),
            entries,
            data_file: DATA_FILE.to_string(),
        });
    }
    writer.finish_data(data)?;
    Ok(out)
}

/// The (offset, length) ranges of `f` (of `size` bytes) that hold data.
fn data_ranges(f: &mut File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::unix::io::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        // SAFETY: lseek on an fd we own.
        let start = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if start < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(vec![(0, size)]); // no SEEK_DATA here: all of it
            }
            return Err(e);
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = (end as u64).min(size);
        if end > start as u64 {
            out.push((start as u64, end - start as u64));
        }
        pos = end as i64;
    }
    Ok(out)
}

/// Recreates the saved content of the private directories (mounted anew by the
/// caller, [`mount_private`]). Owners that cannot be given (IDs the namespace does not
/// map) are left to the restarting user.
pub fn recreate(image: &CheckpointReader, dirs: &[PrivateDir]) -> Result<()> {
    for d in dirs {
        let root = PathBuf::from(&d.path);
        let data = image.data_path(&d.data_file)?;
        let mut data = File::open(&data).ctx(0, || format!("opening {}", data.display()))?;
        let mut paths: Vec<PathBuf> = Vec::with_capacity(d.entries.len());
        for e in &d.entries {
            let path = root.join(&e.path);
            // Nothing saved may point outside the directory.
            if Path::new(&e.path)
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(Error::Restore {
                    pid: 0,
                    msg: format!("a damaged image names {:?} in {}", e.path, d.path),
                });
            }
            recreate_one(&path, e, &paths, &mut data)?;
            paths.push(path);
        }
        // Modes and times last, deepest first: creating an entry changes its
        // directory's modification time, and a read-only directory refuses entries.
        for (e, path) in d.entries.iter().zip(&paths).rev() {
            finish_one(path, e)?;
        }
    }
    Ok(())
}

fn recreate_one(path: &Path, e: &DirEntry, earlier: &[PathBuf], data: &mut File) -> Result<()> {
    let what = || format!("recreating {} of the job", path.display());
    match e.kind {
        DirEntryKind::Dir => {
            if !e.path.is_empty() {
                std::fs::create_dir(path).ctx(0, what)?;
            }
        }
        DirEntryKind::Symlink => {
            let t = e.target.as_deref().unwrap_or_default();
            std::os::unix::fs::symlink(t, path).ctx(0, what)?;
        }
        DirEntryKind::Fifo => {
            let c = cstr(path)?;
            // SAFETY: mkfifo with a valid path.
            if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                return Err(std::io::Error::last_os_error()).ctx(0, what);
            }
        }
        DirEntryKind::File => {
            if let Some(first) = e.link_of {
                let src = earlier.get(first).ok_or_else(|| Error::Restore {
                    pid: 0,
                    msg: format!("a damaged image links {} to a later entry", e.path),
                })?;
                return std::fs::hard_link(src, path).ctx(0, what);
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .ctx(0, what)?;
            f.set_len(e.size).ctx(0, what)?;
            let mut src = e.data_offset;
            let mut buf = vec![0u8; 1 << 20];
            for &(start, len) in &e.extents {
                let mut done = 0u64;
                while done < len {
                    use std::os::unix::fs::FileExt;
                    let n = buf.len().min((len - done) as usize);
                    data.read_exact_at(&mut buf[..n], src)
                        .ctx(0, || format!("reading the saved content of {}", e.path))?;
                    f.write_all_at(&buf[..n], start + done).ctx(0, what)?;
                    done += n as u64;
                    src += n as u64;
                }
            }
        }
    }
    Ok(())
}

fn finish_one(path: &Path, e: &DirEntry) -> Result<()> {
    let c = cstr(path)?;
    // SAFETY: lchown, chmod and utimensat with a valid path and times.
    unsafe {
        // Owners the namespace does not map (EINVAL) or may not give (EPERM) are left.
        libc::lchown(c.as_ptr(), e.uid, e.gid);
        if e.kind != DirEntryKind::Symlink
            && e.link_of.is_none()
            && libc::chmod(c.as_ptr(), e.mode) != 0
        {
            return Err(std::io::Error::last_os_error())
                .ctx(0, || format!("setting the mode of {}", path.display()));
        }
        let t = libc::timespec {
            tv_sec: e.mtime.0,
            tv_nsec: e.mtime.1 as _,
        };
        let times = [t, t];
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        );
    }
    Ok(())
}
