//! Shared memory objects: MAP_SHARED|MAP_ANONYMOUS regions, memfds and unlinked
//! POSIX shared memory (/dev/shm), shared between the processes of a tree.
//!
//! Dump: each object (a shmem inode) is saved once, however many processes map it:
//! the pages that some process has populated are copied into `shm-ID.img` at their
//! offset in the object (pages nobody populated stay holes); a memfd that is also held
//! as an fd is read whole through that fd.
//!
//! Restore: the restorer creates one memfd per object with the saved size and
//! content; every process inherits it, maps it MAP_SHARED where the object was mapped,
//! and fds to it get a description of their own on the same object. Processes share
//! the memory again; the kernel name of an anonymous region becomes "/memfd:stasis-shm".

use crate::error::{Error, Result, SysContext};
use crate::inject::{Injector, Scratch};
use crate::memory::Vma;
use crate::proc::ProcDir;
use stasis_image::{
    CheckpointReader, CheckpointWriter, MappingKind, PositionedFile, SharedObject, PAGE_SIZE,
};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

struct Object {
    name: String,
    file: PositionedFile,
    saved: HashSet<u64>,
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
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for v in vmas {
            let MappingKind::SharedMemory { id, offset } = v.map.kind else {
                continue;
            };
            let obj = self.object(id, &memfd_name(&v.map.name), offset + v.map.len(), writer)?;
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
                for (i, r) in resident.iter().enumerate() {
                    let obj_off = offset + (first + i as u64) * PAGE_SIZE;
                    if r & 1 == 0 || !obj.saved.insert(obj_off) {
                        continue;
                    }
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
        let src = std::fs::File::open(link).ctx(pid, || format!("opening the memfd of fd {fd}"))?;
        for_each_extent(&src, |off, data| {
            for (k, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
                let o = off + (k as u64) * PAGE_SIZE;
                if obj.saved.insert(o) && page.iter().any(|&b| b != 0) {
                    obj.file.file().write_all_at(page, o)?;
                }
            }
            Ok(())
        })
        .ctx(pid, || format!("saving the memfd of fd {fd}"))?;
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
                size: o.file.size(),
                data_file: format!("shm-{id}.img"),
            };
            writer.finish_positioned_by_reading(o.file)?;
            out.push(record);
        }
        Ok(out)
    }
}

/// Calls `f(offset, bytes)` for the populated parts of a file, in pieces of at most
/// 1 MiB, skipping holes (SEEK_DATA).
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
        let n = src.read_at(&mut buf, off)?;
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
        let name = if o.name.is_empty() {
            "stasis-shm".to_string()
        } else {
            o.name.clone()
        };
        let cname = std::ffi::CString::new(name).map_err(|_| "bad memfd name".to_string())?;
        // SAFETY: memfd_create with a valid C string.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just created and is owned here.
        let obj = unsafe { std::fs::File::from_raw_fd(fd) };
        obj.set_len(o.size)
            .map_err(|e| format!("sizing shared memory {}: {e}", o.id))?;
        let path = image.data_path(&o.data_file).map_err(|e| e.to_string())?;
        let src = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Only the populated parts: holes stay unallocated.
        for_each_extent(&src, |off, data| obj.write_all_at(data, off)).map_err(|e| {
            format!(
                "filling shared memory {} from {}: {e}",
                o.id,
                path.display()
            )
        })?;
        out.insert(o.id, OwnedFd::from(obj));
    }
    Ok(out)
}
