//! Objects with no file name left, shared between the processes of a tree:
//! MAP_SHARED|MAP_ANONYMOUS regions, memfds, and regular files deleted while open
//! (also unlinked POSIX shared memory in /dev/shm).
//!
//! Dump: each object (an inode) is saved once, however many fds and mappings of
//! however many processes refer to it. The pages some process has populated are read
//! through its mappings into `shm-ID.img` at their offset in the object (pages nobody
//! populated stay holes; the copied-on-write pages of a MAP_PRIVATE mapping are not
//! the object's and are left to the mapping's own saved pages); an object also held
//! as an fd is read whole through that fd, data ranges only (SEEK_DATA), so sparse
//! files stay sparse, and its mode, a memfd's seals and a deleted file's owner and
//! times are recorded. A deleted regular file's id is its inode number with its
//! device folded in ([`deleted_id`]); others keep their inode number.
//!
//! Restore: the restorer creates each object once, with the saved size, content
//! (data ranges only) and mode: a memfd with the saved name and seals, or for a
//! deleted file an unnamed file (O_TMPFILE) in the directory it was in (or the
//! nearest ancestor still there), briefly linked under its old name and unlinked
//! again where that name is free so that /proc shows it, with its owner (where the
//! user may) and times. Every process inherits it, maps it (MAP_SHARED or
//! MAP_PRIVATE) where it was mapped, and fds to it get a description of their own on
//! the same object (flags, offset): writes through one are seen through all. The
//! kernel name of an anonymous region becomes "/memfd:stasis-shm".

use crate::error::{Error, Result, SysContext};
use crate::inject::{Injector, Scratch};
use crate::memory::Vma;
use crate::proc::ProcDir;
use stasis_image::{
    CheckpointReader, CheckpointWriter, DeletedFile, MappingKind, PositionedFile, SharedObject,
    PAGE_SIZE,
};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

struct Object {
    name: String,
    file: PositionedFile,
    saved: HashSet<u64>,
    /// The size read from an fd's stat (the data file may have grown larger, to the
    /// end of a mapping).
    exact_size: Option<u64>,
    mode: Option<u32>,
    seals: Option<u32>,
    deleted: Option<DeletedFile>,
}

/// The object id of a regular file deleted while open, from its device (st_dev, or
/// makedev of /proc/PID/maps's major:minor) and inode number: the inode number with
/// the device folded into its top bits, so that files of different filesystems do
/// not collide with each other or with memfds and anonymous regions (ids: inode
/// numbers of the kernel's internal shmem mount).
pub fn deleted_id(dev: u64, ino: u64) -> u64 {
    ino ^ dev.rotate_right(24)
}

/// True when a mapped path marked " (deleted)" names an object of the kernel's
/// internal shmem mount (memfd, MAP_SHARED|MAP_ANONYMOUS), not a deleted file.
pub fn is_internal(path: &str) -> bool {
    path.starts_with("/memfd:") || path.starts_with("/dev/zero")
}

/// Collects the shared memory objects of a checkpoint.
#[derive(Default)]
pub struct Collector {
    objs: HashMap<u64, Object>,
    order: Vec<u64>,
}

fn memfd_name(path: &str) -> String {
    path.strip_prefix("/memfd:")
        .map(|r| r.strip_suffix(" (deleted)").unwrap_or(r).to_string())
        .unwrap_or_default()
}

impl Collector {
    /// A collector for one checkpoint.
    pub fn new() -> Collector {
        Collector::default()
    }

    fn object(
        &mut self,
        id: u64,
        name: &str,
        size: u64,
        writer: &CheckpointWriter,
    ) -> Result<&mut Object> {
        if let std::collections::hash_map::Entry::Vacant(e) = self.objs.entry(id) {
            let file = writer.positioned_file(&format!("shm-{id}.img"), 0)?;
            e.insert(Object {
                name: name.to_string(),
                file,
                saved: HashSet::new(),
                exact_size: None,
                mode: None,
                seals: None,
                deleted: None,
            });
            self.order.push(id);
        }
        let o = self.objs.get_mut(&id).ok_or(Error::Gone { pid: 0 })?;
        if size > o.file.size() {
            o.file.grow(size)?;
        }
        Ok(o)
    }

    /// Saves the populated pages of the shared memory mappings of a frozen process.
    /// Which pages of the object exist is asked of the process with an injected
    /// `mincore(2)`, which reports the object's resident pages whether or not this
    /// process has them mapped yet (pagemap would only show the mapped ones); holes
    /// are not read, so nothing is allocated.
    pub fn save_mappings(
        &mut self,
        proc: &ProcDir,
        vmas: &[Vma],
        inj: &Injector,
        scratch: &Scratch,
        writer: &CheckpointWriter,
    ) -> Result<()> {
        let pid = proc.pid;
        let mem =
            std::fs::File::open(proc.file("mem")).ctx(pid, || "opening /proc/PID/mem".into())?;
        let mut pagemap = None;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for v in vmas {
            let MappingKind::SharedMemory { id, offset } = v.map.kind else {
                continue;
            };
            let obj = self.object(id, &memfd_name(&v.map.name), offset + v.map.len(), writer)?;
            if obj.deleted.is_none() && !is_internal(&v.map.name) {
                obj.deleted = Some(DeletedFile {
                    path: v
                        .map
                        .name
                        .strip_suffix(" (deleted)")
                        .unwrap_or(&v.map.name)
                        .to_string(),
                    owner: None,
                    atime: None,
                    mtime: None,
                });
            }
            // In a private mapping, the pages the process has written are its own
            // (anonymous), not the object's: only its file pages are read.
            let pagemap = if v.map.shared {
                None
            } else {
                if pagemap.is_none() {
                    pagemap = Some(
                        std::fs::File::open(proc.file("pagemap"))
                            .ctx(pid, || "opening /proc/PID/pagemap".into())?,
                    );
                }
                pagemap.as_ref()
            };
            let npages = v.map.len() / PAGE_SIZE;
            let mut first = 0u64;
            while first < npages {
                let n = (npages - first).min(scratch.len);
                let addr = v.map.start + first * PAGE_SIZE;
                inj.call(
                    "mincore",
                    libc::SYS_mincore,
                    &[addr, n * PAGE_SIZE, scratch.addr],
                )?;
                let resident = scratch.read(n as usize)?;
                let mut entries = vec![0u8; 8 * n as usize];
                if let Some(pm) = pagemap {
                    pm.read_exact_at(&mut entries, addr / PAGE_SIZE * 8)
                        .ctx(pid, || format!("reading the pagemap of mapping {addr:x}"))?;
                }
                for (i, r) in resident.iter().enumerate() {
                    let obj_off = offset + (first + i as u64) * PAGE_SIZE;
                    if pagemap.is_some() {
                        let mut e = [0u8; 8];
                        e.copy_from_slice(&entries[i * 8..i * 8 + 8]);
                        let e = u64::from_le_bytes(e);
                        // Present and not a file page, or swapped out: the mapping's own.
                        if (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAP != 0 {
                            continue;
                        }
                    }
                    if r & 1 == 0 || obj.saved.contains(&obj_off) {
                        continue;
                    }
                    obj.saved.insert(obj_off);
                    let a = addr + i as u64 * PAGE_SIZE;
                    stasis_sys::vm::read_forced(&mem, pid, a, &mut page)
                        .ctx(pid, || format!("reading shared memory at {a:x}"))?;
                    if page.iter().any(|&b| b != 0) {
                        obj.file
                            .file()
                            .write_all_at(&page, obj_off)
                            .ctx(pid, || "writing shared memory into the image".into())?;
                    }
                }
                first += n;
            }
        }
        Ok(())
    }

    /// Saves a regular file deleted while open, held as fd `fd` (`path` without
    /// " (deleted)"): the whole file, read through the fd, with its size, mode, owner
    /// and times. Returns its object id.
    pub fn save_deleted(
        &mut self,
        pid: i32,
        fd: i32,
        link: &std::path::Path,
        path: &str,
        md: &std::fs::Metadata,
        writer: &CheckpointWriter,
    ) -> Result<u64> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let id = deleted_id(md.dev(), md.ino());
        let obj = self.object(id, "", md.size(), writer)?;
        obj.exact_size = Some(md.size());
        obj.mode = Some(md.mode() & 0o7777);
        obj.deleted = Some(DeletedFile {
            path: path.to_string(),
            owner: Some((md.uid(), md.gid())),
            atime: Some((md.atime(), md.atime_nsec())),
            mtime: Some((md.mtime(), md.mtime_nsec())),
        });
        // Without touching its access time where the user may (the owner).
        let src = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOATIME)
            .open(link)
            .or_else(|_| std::fs::File::open(link))
            .ctx(pid, || {
                format!("opening the deleted file {path} of fd {fd}")
            })?;
        save_extents(obj, &src)
            .ctx(pid, || format!("saving the deleted file {path} of fd {fd}"))?;
        Ok(id)
    }

    /// Saves a memfd held as fd `fd` (the whole object, read through the fd).
    pub fn save_fd(
        &mut self,
        pid: i32,
        fd: i32,
        link: &std::path::Path,
        target: &str,
        md: &std::fs::Metadata,
        writer: &CheckpointWriter,
    ) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let size = md.size();
        let obj = self.object(md.ino(), &memfd_name(target), size, writer)?;
        obj.exact_size = Some(size);
        obj.mode = Some(md.mode() & 0o7777);
        let src = std::fs::File::open(link).ctx(pid, || format!("opening the memfd of fd {fd}"))?;
        // SAFETY: fcntl query on a descriptor we own.
        let seals = unsafe { libc::fcntl(src.as_raw_fd(), libc::F_GET_SEALS) };
        obj.seals = (seals >= 0).then_some(seals as u32);
        save_extents(obj, &src).ctx(pid, || format!("saving the memfd of fd {fd}"))?;
        Ok(())
    }

    /// Completes the objects' data files and returns their records.
    pub fn finish(self, writer: &mut CheckpointWriter) -> Result<Vec<SharedObject>> {
        let mut out = Vec::new();
        let mut objs = self.objs;
        for id in self.order {
            let Some(o) = objs.remove(&id) else { continue };
            let record = SharedObject {
                id,
                name: o.name,
                size: o.exact_size.unwrap_or(o.file.size()),
                data_file: format!("shm-{id}.img"),
                mode: o.mode,
                seals: o.seals,
                deleted: o.deleted,
            };
            writer.finish_positioned_by_reading(o.file)?;
            out.push(record);
        }
        Ok(out)
    }
}

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// Copies the data ranges of `src` into the object's data file, page by page, where
/// no page was saved yet (zero pages stay holes).
fn save_extents(obj: &mut Object, src: &std::fs::File) -> std::io::Result<()> {
    for_each_extent(src, |off, data| {
        for (k, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
            let o = off + (k as u64) * PAGE_SIZE;
            if obj.saved.insert(o) && page.iter().any(|&b| b != 0) {
                if o + page.len() as u64 > obj.file.size() {
                    obj.file
                        .grow(o + page.len() as u64)
                        .map_err(std::io::Error::other)?;
                }
                obj.file.file().write_all_at(page, o)?;
            }
        }
        Ok(())
    })
}

/// Calls `f(offset, bytes)` for the populated parts of a file, in pieces of at most
/// 1 MiB, skipping holes (SEEK_DATA, SEEK_HOLE).
fn for_each_extent(
    src: &std::fs::File,
    mut f: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(src.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            return Ok(()); // ENXIO: no data past `off`
        }
        off = data as u64;
        // SAFETY: lseek on a descriptor we own; the end of the data range (EOF at most).
        let hole = unsafe { libc::lseek(src.as_raw_fd(), off as libc::off_t, libc::SEEK_HOLE) };
        let want = if hole > data {
            ((hole - data) as usize).min(buf.len())
        } else {
            buf.len()
        };
        let n = src.read_at(&mut buf[..want], off)?;
        if n == 0 {
            return Ok(());
        }
        f(off, &buf[..n])?;
        off += n as u64;
    }
}

/// Creates every shared memory object of the image, filled with its saved content.
/// Returns the restorer's descriptor of each, by id.
pub fn create_objects(
    image: &CheckpointReader,
) -> std::result::Result<HashMap<u64, OwnedFd>, String> {
    let mut out = HashMap::new();
    for o in &image.meta.shared_memory {
        let obj = match &o.deleted {
            Some(d) => create_deleted(o.id, d)?,
            None => create_memfd(o)?,
        };
        obj.set_len(o.size)
            .map_err(|e| format!("sizing shared memory {}: {e}", o.id))?;
        let path = image.data_path(&o.data_file).map_err(|e| e.to_string())?;
        let src = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Only the populated parts: holes stay unallocated.
        for_each_extent(&src, |off, data| {
            let end = o.size.saturating_sub(off).min(data.len() as u64) as usize;
            obj.write_all_at(&data[..end], off)
        })
        .map_err(|e| {
            format!(
                "filling shared memory {} from {}: {e}",
                o.id,
                path.display()
            )
        })?;
        let fd = obj.as_raw_fd();
        if let Some(mode) = o.mode {
            // SAFETY: fchmod on a descriptor we own.
            if unsafe { libc::fchmod(fd, mode) } != 0 {
                return Err(format!(
                    "shared memory {}: fchmod {mode:o}: {}",
                    o.id,
                    std::io::Error::last_os_error()
                ));
            }
        }
        if let Some(d) = &o.deleted {
            if let Some((uid, gid)) = d.owner {
                // SAFETY: fchown on a descriptor we own. Refused to a user who may
                // not give files away: the file keeps the restarting user's ids.
                unsafe { libc::fchown(fd, uid, gid) };
            }
            let t = |t: Option<(i64, i64)>| match t {
                Some((s, ns)) => libc::timespec {
                    tv_sec: s as libc::time_t,
                    tv_nsec: ns as libc::c_long,
                },
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
            };
            let times = [t(d.atime), t(d.mtime)];
            // SAFETY: futimens with two valid timespecs on a descriptor we own.
            if unsafe { libc::futimens(fd, times.as_ptr()) } != 0 {
                return Err(format!(
                    "deleted file {}: setting its times: {}",
                    d.path,
                    std::io::Error::last_os_error()
                ));
            }
        }
        if let Some(seals) = o.seals.filter(|&s| s != 0) {
            // SAFETY: fcntl on a memfd we own (created with MFD_ALLOW_SEALING).
            if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals as libc::c_int) } != 0 {
                return Err(format!(
                    "memfd {:?}: adding seals {seals:#x}: {}",
                    o.name,
                    std::io::Error::last_os_error()
                ));
            }
        }
        out.insert(o.id, OwnedFd::from(obj));
    }
    Ok(out)
}

/// A new memfd for object `o`, with its name; sealing allowed when seals were saved.
fn create_memfd(o: &SharedObject) -> std::result::Result<std::fs::File, String> {
    let name = if o.name.is_empty() {
        "stasis-shm".to_string()
    } else {
        o.name.clone()
    };
    let cname = std::ffi::CString::new(name).map_err(|_| "bad memfd name".to_string())?;
    let mut flags = libc::MFD_CLOEXEC;
    if o.seals.is_some() {
        flags |= libc::MFD_ALLOW_SEALING;
    }
    // SAFETY: memfd_create with a valid C string.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is owned here.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// A new unnamed file (O_TMPFILE) for the deleted file `d`, in its directory or, if
/// that is gone too, the nearest ancestor still there. Where its old name is free it
/// is linked there and unlinked again, so that /proc shows that name, "(deleted)".
fn create_deleted(id: u64, d: &DeletedFile) -> std::result::Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::path::Path::new(&d.path);
    let mut dir = path.parent();
    let mut first_err = None;
    let file = loop {
        let Some(at) = dir else {
            return Err(format!(
                "cannot recreate deleted file {} (object {id}): {}",
                d.path,
                first_err.unwrap_or_else(|| "no directory".to_string())
            ));
        };
        let at = if at.as_os_str().is_empty() {
            std::path::Path::new("/")
        } else {
            at
        };
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .open(at)
        {
            Ok(f) => break f,
            // Gone (or not a directory any more): try its parent.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                first_err.get_or_insert_with(|| format!("{}: {e}", at.display()));
                dir = at.parent();
            }
            Err(e) => {
                return Err(format!(
                    "cannot recreate deleted file {} in {}: {e}",
                    d.path,
                    at.display()
                ))
            }
        }
    };
    let (Ok(from), Ok(to)) = (
        std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())),
        std::ffi::CString::new(d.path.as_str()),
    ) else {
        return Ok(file);
    };
    // SAFETY: linkat and unlink with valid C strings; a failure (the name is taken,
    // or its directory gone) only leaves the file unnamed as it is.
    unsafe {
        if libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        ) == 0
        {
            libc::unlink(to.as_ptr());
        }
    }
    Ok(file)
}
