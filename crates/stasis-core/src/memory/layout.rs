//! Memory layout at dump time: the mappings of a process and the flags that decide
//! how each is saved.
//!
//! The mappings come from `/proc/PID/maps`; their VM flags (VmFlags of
//! `/proc/PID/smaps`, which is slow to read) are read before the process is frozen
//! ([`read_flags`]), remembered from its last checkpoint ([`remembered_flags`]) or read
//! on its snapshot afterwards ([`fill_flags`]), and always checked against the
//! snapshot ([`check_flags`]); memory locks, which a fork does not inherit, are read
//! from the frozen process itself, with mlockall(MCL_FUTURE) probed
//! ([`read_locks`]). Mappings of objects without a name (memfds, shared
//! anonymous memory, deleted files) refer to the objects of [`crate::shm`]. Mappings
//! that cannot be saved (device memory, files replaced on disk) are refused here; the content of small shared
//! file mappings is saved with the image ([`save_shared_files`]).

use crate::error::{Error, Result, SysContext};
use crate::proc::{file_id, ProcDir};
use procfs::process::{MMPermissions, MMapPath, VmFlags};
use stasis_image::{Mapping, MappingKind};
use std::collections::{BTreeMap, HashMap};

/// One mapping as seen at dump time, with what is needed to save it.
#[derive(Debug, Clone)]
pub struct Vma {
    pub map: Mapping,
    flags: VmFlags,
}

fn prot_of(p: MMPermissions) -> u32 {
    let mut prot = 0;
    if p.contains(MMPermissions::READ) {
        prot |= libc::PROT_READ as u32;
    }
    if p.contains(MMPermissions::WRITE) {
        prot |= libc::PROT_WRITE as u32;
    }
    if p.contains(MMPermissions::EXECUTE) {
        prot |= libc::PROT_EXEC as u32;
    }
    prot
}

/// The VmFlags of each mapping (by start and end), from /proc/PID/smaps.
pub type FlagCache = HashMap<(u64, u64), VmFlags>;

/// The flags that decide how a mapping is saved and restored.
const SAVED_FLAGS: VmFlags = VmFlags::IO
    .union(VmFlags::PF)
    .union(VmFlags::DC)
    .union(VmFlags::WF)
    .union(VmFlags::DD)
    .union(VmFlags::HG)
    .union(VmFlags::NH)
    .union(VmFlags::MG)
    .union(VmFlags::SR)
    .union(VmFlags::RR)
    .union(VmFlags::GD);

/// The advice that stands for mlock(2) (VmFlags `lo`) and mlock2(MLOCK_ONFAULT)
/// (`lo` and `lf`, which the procfs crate does not know), set by [`read_locks`] from
/// the process's own smaps: a fork (the snapshot) does not inherit locks.
const LOCK_ADVICE: [&str; 2] = ["locked", "lockonfault"];

/// Reads the VmFlags of every mapping. /proc/PID/smaps walks every page table to
/// count pages (tens of milliseconds per GiB), so this is done before the process is
/// frozen; [`read_layout`] then reads the cheap /proc/PID/maps and takes the flags
/// from here, and [`check_flags`] checks them against the snapshot afterwards.
pub fn read_flags(proc: &ProcDir) -> Result<FlagCache> {
    let pid = proc.pid;
    let maps = proc
        .process()?
        .smaps()
        .map_err(std::io::Error::other)
        .ctx(pid, || "reading /proc/PID/smaps".into())?;
    Ok(maps
        .into_iter()
        .map(|m| (m.address, m.extension.vm_flags))
        .collect())
}

/// Mapping flags seen (and checked on a snapshot) at a process's last checkpoint by
/// this stasis: as long as its mappings have the same bounds, the next checkpoint
/// takes them from here instead of reading smaps (they are checked on its snapshot
/// all the same).
static REMEMBERED: std::sync::Mutex<BTreeMap<i32, FlagCache>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Remembers the flags of a checked layout (see [`remembered_flags`]).
pub fn remember_flags(pid: i32, layout: &[Vma]) {
    if let Ok(mut m) = REMEMBERED.lock() {
        m.insert(
            pid,
            layout
                .iter()
                .map(|v| ((v.map.start, v.map.end), v.flags))
                .collect(),
        );
    }
}

/// Forgets what [`remember_flags`] kept for `pid`.
pub fn forget_flags(pid: i32) {
    if let Ok(mut m) = REMEMBERED.lock() {
        m.remove(&pid);
    }
}

/// The flags remembered for `pid`, whatever its mappings are now: [`read_layout`]
/// takes them only if every mapping has its remembered bounds (no /proc read here).
pub fn remembered(pid: i32) -> Option<FlagCache> {
    REMEMBERED.lock().ok()?.get(&pid).cloned()
}

/// The remembered flags of `pid`, if its mappings (from the cheap /proc/PID/maps)
/// still have the same bounds.
pub fn remembered_flags(proc: &ProcDir) -> Option<FlagCache> {
    let cache = REMEMBERED.lock().ok()?.get(&proc.pid)?.clone();
    let maps = proc.process().ok()?.maps().ok()?;
    let mut n = 0;
    for m in maps {
        cache.get(&m.address)?;
        n += 1;
    }
    (n == cache.len()).then_some(cache)
}

/// Checks that the flags a layout was read with (early, by [`read_flags`] or
/// remembered) are those of the snapshot, forked while the process was frozen: a
/// mapping changed by madvise(2) in between would be saved wrongly. A mapping the
/// snapshot lacks must be one a fork does not copy.
pub fn check_flags(snapshot: &ProcDir, layout: &[Vma]) -> Result<()> {
    let proc = snapshot;
    let mut theirs: Vec<((u64, u64), VmFlags)> = read_flags(proc)?.into_iter().collect();
    theirs.sort_unstable_by_key(|t| t.0);
    for v in layout {
        let ours = v.flags & SAVED_FLAGS;
        // The snapshot's mapping that holds this one: mappings of equal flags may have
        // merged since (with the pages mapped to inject syscalls).
        let k = theirs.partition_point(|t| t.0 .0 <= v.map.start);
        let holder = k
            .checked_sub(1)
            .map(|k| theirs[k])
            .filter(|t| v.map.end <= t.0 .1);
        let same = match holder {
            Some((_, f)) => f & SAVED_FLAGS == ours,
            None => ours.contains(VmFlags::DC),
        };
        if !same {
            return Err(Error::Transient {
                pid: proc.pid,
                what: format!(
                    "mapping {:x}-{:x} changed (madvise) while the checkpoint began",
                    v.map.start, v.map.end
                ),
            });
        }
    }
    Ok(())
}

/// Reads the memory layout of a process from /proc/PID/maps alone, without the
/// mapping flags (smaps, which is slow, is read later on the process's snapshot:
/// see [`mark_invisible`] and [`fill_flags`]).
pub fn read_layout_unflagged(proc: &ProcDir) -> Result<Vec<Vma>> {
    layout_of(proc, read_maps(proc)?)
}

/// For a layout read without flags, marks the mappings whose content the snapshot
/// (a fork of the frozen process) does not have: mappings it lacks (MADV_DONTFORK)
/// and anonymous mappings it has empty though the process has pages there
/// (MADV_WIPEONFORK). They are copied while the process is frozen
/// ([`invisible_to_fork`]); [`fill_flags`] sets the exact flags later.
pub fn mark_invisible(proc: &ProcDir, snapshot: &ProcDir, layout: &mut [Vma]) -> Result<()> {
    use stasis_sys::dirty::{category as c, scan_first, ScanMasks};
    use std::os::fd::AsRawFd;
    let theirs: Vec<(u64, u64)> = snapshot
        .process()?
        .maps()
        .map_err(std::io::Error::other)
        .ctx(snapshot.pid, || {
            "reading /proc/PID/maps of the snapshot".into()
        })?
        .into_iter()
        .map(|m| m.address)
        .collect();
    let open = |p: &ProcDir| {
        std::fs::File::open(p.file("pagemap")).ctx(p.pid, || "opening /proc/PID/pagemap".into())
    };
    let (ours_pm, theirs_pm) = (open(proc)?, open(snapshot)?);
    // Present pages that are not the shared zero page.
    let masks = ScanMasks {
        all: c::PRESENT | c::PFNZERO,
        inverted: c::PFNZERO,
        report: c::PRESENT,
        ..ScanMasks::default()
    };
    let has_pages = |pm: &std::fs::File, pid: i32, v: &Vma| {
        scan_first(pm.as_raw_fd(), v.map.start, v.map.end, masks)
            .map(|r| r.is_some())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno))
            .ctx(pid, || {
                format!("PAGEMAP_SCAN of mapping {:x}-{:x}", v.map.start, v.map.end)
            })
    };
    for v in layout.iter_mut().filter(|v| saves_pages(v)) {
        let k = theirs.partition_point(|t| t.0 <= v.map.start);
        let held = k.checked_sub(1).is_some_and(|k| v.map.end <= theirs[k].1);
        if !held {
            v.flags |= VmFlags::DC;
        } else if matches!(v.map.kind, MappingKind::Anonymous)
            && has_pages(&ours_pm, proc.pid, v)?
            && !has_pages(&theirs_pm, snapshot.pid, v)?
        {
            v.flags |= VmFlags::WF;
        }
    }
    Ok(())
}

/// Sets the flags of a layout read without them ([`read_layout_unflagged`]) from
/// `flags`, its snapshot's smaps (exact: the snapshot was forked while the process
/// was frozen, and keeps every flag but userfaultfd's: not for a process whose
/// writes are tracked). A mapping the snapshot lacks
/// (MADV_DONTFORK) takes its other flags from the process's own smaps, read now
/// that it runs again (`proc`), if it still has it.
pub fn fill_flags(proc: &ProcDir, flags: &FlagCache, layout: &mut [Vma]) -> Result<()> {
    let sorted = |c: &FlagCache| {
        let mut v: Vec<((u64, u64), VmFlags)> = c.iter().map(|(k, f)| (*k, *f)).collect();
        v.sort_unstable_by_key(|t| t.0);
        v
    };
    let holder = |all: &[((u64, u64), VmFlags)], v: &Vma| {
        let k = all.partition_point(|t| t.0 .0 <= v.map.start);
        k.checked_sub(1)
            .map(|k| all[k])
            .filter(|t| v.map.end <= t.0 .1)
            .map(|t| t.1)
    };
    let theirs = sorted(flags);
    let mut own = None;
    for v in layout.iter_mut() {
        // A mapping [`mark_invisible`] found the snapshot lacks: whatever the
        // snapshot mapped since in the gap it leaves is not it.
        let absent = v.flags.contains(VmFlags::DC);
        let f = match holder(&theirs, v).filter(|_| !absent) {
            Some(f) => f,
            None => {
                if own.is_none() {
                    own = Some(sorted(&read_flags(proc)?));
                }
                let mine = own.as_deref().and_then(|o| holder(o, v));
                mine.unwrap_or_default() | VmFlags::DC
            }
        };
        v.set_flags(proc.pid, f)?;
    }
    Ok(())
}

/// Reads the memory layout of a process and refuses what cannot be saved yet. With
/// `cache` (see [`read_flags`]), reads the cheap /proc/PID/maps and takes the flags
/// from the cache, unless a mapping is not there (then smaps is read after all).
/// Says whether the flags came from the cache (to be checked later) or from smaps
/// (exact, read now).
pub fn read_layout(proc: &ProcDir, cache: Option<&FlagCache>) -> Result<(Vec<Vma>, bool)> {
    let pid = proc.pid;
    if let Some(cache) = cache {
        let mut all = read_maps(proc)?;
        let complete = all.iter_mut().all(|m| match cache.get(&m.address) {
            Some(f) => {
                m.extension.vm_flags = *f;
                true
            }
            None => false,
        });
        if complete && !all.is_empty() {
            return Ok((layout_of(proc, all)?, true));
        }
    }
    let maps = proc
        .process()?
        .smaps()
        .map_err(std::io::Error::other)
        .ctx(pid, || "reading /proc/PID/smaps".into())?
        .into_iter()
        .collect();
    Ok((layout_of(proc, maps)?, false))
}

/// The mappings of `/proc/PID/maps` (cheap; no flags).
fn read_maps(proc: &ProcDir) -> Result<Vec<procfs::process::MemoryMap>> {
    Ok(proc
        .process()?
        .maps()
        .map_err(std::io::Error::other)
        .ctx(proc.pid, || "reading /proc/PID/maps".into())?
        .into_iter()
        .collect())
}

/// The layout made of mappings read from maps or smaps (with their flags, if any).
fn layout_of(proc: &ProcDir, maps: Vec<procfs::process::MemoryMap>) -> Result<Vec<Vma>> {
    let pid = proc.pid;
    let mut out = Vec::new();
    let mut relinks: HashMap<(u64, u64), Option<(stasis_image::FileId, String)>> = HashMap::new();
    for m in maps {
        let (start, end) = m.address;
        let shared = m.perms.contains(MMPermissions::SHARED);
        let flags = m.extension.vm_flags;
        let range = format!("{start:x}-{end:x}");
        let (kind, name) = match &m.pathname {
            MMapPath::Vdso => (MappingKind::Vdso, "[vdso]".to_string()),
            MMapPath::Vvar => (MappingKind::Vvar, "[vvar]".to_string()),
            MMapPath::Vsyscall => (MappingKind::Vsyscall, "[vsyscall]".to_string()),
            MMapPath::Other(s) if s.trim_matches(['[', ']']) == "vvar_vclock" => {
                (MappingKind::VvarVclock, "[vvar_vclock]".to_string())
            }
            MMapPath::Heap => (MappingKind::Anonymous, "[heap]".to_string()),
            MMapPath::Stack => (MappingKind::Anonymous, "[stack]".to_string()),
            MMapPath::Anonymous if !shared => (MappingKind::Anonymous, String::new()),
            MMapPath::Anonymous => (
                MappingKind::SharedMemory {
                    id: m.inode,
                    offset: m.offset,
                },
                String::new(),
            ),
            MMapPath::Path(p) => {
                let path = p.to_string_lossy().into_owned();
                if path.ends_with(" (deleted)") {
                    if path.starts_with("/SYSV") {
                        // The segment itself is saved with the IPC namespace (sysv).
                        (
                            MappingKind::SysvShm {
                                shmid: m.inode as i32,
                            },
                            path,
                        )
                    } else {
                        // A memfd or MAP_SHARED|MAP_ANONYMOUS region keeps its inode
                        // number as id; a deleted regular file (also in /dev/shm) has
                        // its device folded in (the same id as its fds get).
                        let dev = libc::makedev(m.dev.0 as u32, m.dev.1 as u32);
                        let relinked = if crate::shm::is_internal(&path) {
                            None
                        } else {
                            // Searched once per file, however many mappings it has.
                            match relinks.get(&(dev, m.inode)) {
                                Some(found) => found.clone(),
                                None => {
                                    let found = other_link(proc, &m, dev, &path)?;
                                    relinks.insert((dev, m.inode), found.clone());
                                    found
                                }
                            }
                        };
                        if let Some((file, other)) = relinked {
                            // Unlinked under this name, still linked under another.
                            (
                                MappingKind::File {
                                    file,
                                    offset: m.offset,
                                },
                                other,
                            )
                        } else {
                            let id = if crate::shm::is_internal(&path) {
                                m.inode
                            } else {
                                crate::shm::deleted_id(dev, m.inode)
                            };
                            (
                                MappingKind::SharedMemory {
                                    id,
                                    offset: m.offset,
                                },
                                path,
                            )
                        }
                    }
                } else {
                    let md = std::fs::metadata(&path)
                        .ctx(pid, || format!("stat of mapped file {path}"))?;
                    if !md.is_file() {
                        return Err(unsupported(
                            pid,
                            format!("mapping {range} of device {path}"),
                        ));
                    }
                    let id = file_id(&path, &md);
                    if id.ino != m.inode {
                        return Err(unsupported(pid, format!("mapping {range} of {path}, which was replaced on disk after it was mapped")));
                    }
                    (
                        MappingKind::File {
                            file: id,
                            offset: m.offset,
                        },
                        path,
                    )
                }
            }
            // An attached System V segment: the inode column is the shmid. The
            // segment itself is saved with the IPC namespace (sysv).
            MMapPath::Vsys(key) => (
                MappingKind::SysvShm {
                    shmid: m.inode as i32,
                },
                format!("SYSV{key:08x}"),
            ),
            other => return Err(unsupported(pid, format!("mapping {range} ({other:?})"))),
        };
        let mut v = Vma {
            map: Mapping {
                start,
                end,
                prot: prot_of(m.perms),
                shared,
                kind,
                name,
                growsdown: false,
                advice: Vec::new(),
                pages: Vec::new(),
                content_file: None,
            },
            flags: VmFlags::empty(),
        };
        v.set_flags(pid, flags)?;
        out.push(v);
    }
    Ok(out)
}

/// For a mapping of a file marked " (deleted)" (`path`): its other name when the file
/// still has hard links (unlinked only under this name), found by
/// [`crate::files::find_other_link`]; None when it has no links left. The link count
/// is read through /proc/PID/map_files where stasis may (privileged); where it may
/// not, the other name is searched all the same, and a file not found counts as
/// deleted. Refused when the file has links that are not found.
fn other_link(
    proc: &ProcDir,
    m: &procfs::process::MemoryMap,
    dev: u64,
    path: &str,
) -> Result<Option<(stasis_image::FileId, String)>> {
    use std::os::unix::fs::MetadataExt;
    let (start, end) = m.address;
    let gone = path.strip_suffix(" (deleted)").unwrap_or(path);
    let nlink = std::fs::metadata(proc.file(&format!("map_files/{start:x}-{end:x}")))
        .ok()
        .map(|md| md.nlink());
    if nlink == Some(0) {
        return Ok(None);
    }
    let Some(other) = crate::files::find_other_link(gone, dev, m.inode) else {
        return match nlink {
            Some(n) => Err(unsupported(
                proc.pid,
                format!(
                    "mapping {start:x}-{end:x} of {gone}, unlinked but with {n} other link(s) that stasis did not find (searched {} entries around its directory on the same filesystem)",
                    crate::files::LINK_SEARCH_LIMIT
                ),
            )),
            None => Ok(None),
        };
    };
    let md = std::fs::metadata(&other).ctx(proc.pid, || format!("stat of mapped file {other}"))?;
    Ok(Some((file_id(&other, &md), other)))
}

fn unsupported(pid: i32, what: String) -> Error {
    Error::Unsupported { pid, what }
}

/// Shared file mappings of files up to this size have the file's content saved, to
/// recreate the file if it is missing at restore.
pub const SHARED_CONTENT_LIMIT: u64 = 64 << 20;

/// The content of the files a checkpoint's processes map shared (see
/// [`save_shared_files`]): each file is saved once per checkpoint, however many
/// processes map it (an MPI job's shared-memory segments are mapped by every rank).
#[derive(Debug, Default)]
pub struct SharedFiles {
    /// Saved so far: path, data file.
    saved: HashMap<String, String>,
    /// Files under these directories are not saved: their content is saved and
    /// recreated, before any process, with the job's private /tmp and /dev/shm.
    skip_under: Vec<std::path::PathBuf>,
}

impl SharedFiles {
    /// For one checkpoint; files under `skip_under` are left out.
    pub fn new(skip_under: Vec<std::path::PathBuf>) -> SharedFiles {
        SharedFiles {
            saved: HashMap::new(),
            skip_under,
        }
    }
}

/// Saves the content of the files (up to [`SHARED_CONTENT_LIMIT`]) that process `pid`
/// maps shared, read while the job is frozen, so that a restart can recreate a file
/// that is gone; each mapping records its data file.
pub fn save_shared_files(
    pid: i32,
    vmas: &mut [Vma],
    files: &mut SharedFiles,
    writer: &mut stasis_image::CheckpointWriter,
) -> Result<()> {
    for v in vmas.iter_mut() {
        let MappingKind::File { file, .. } = &v.map.kind else {
            continue;
        };
        if !v.map.shared || file.size > SHARED_CONTENT_LIMIT {
            continue;
        }
        if files
            .skip_under
            .iter()
            .any(|d| std::path::Path::new(&file.path).starts_with(d))
        {
            continue;
        }
        if let Some(name) = files.saved.get(&file.path) {
            v.map.content_file = Some(name.clone());
            continue;
        }
        let name = format!("shared-{pid}-{}.img", files.saved.len());
        let data = std::fs::read(&file.path)
            .ctx(pid, || format!("reading shared mapped file {}", file.path))?;
        let mut w = writer.data_file(&name)?;
        w.write_all(&data)?;
        writer.finish_data(w)?;
        files.saved.insert(file.path.clone(), name.clone());
        v.map.content_file = Some(name);
    }
    Ok(())
}

/// Executable ranges (vdso first), to look for a syscall instruction in.
pub fn exec_ranges(vmas: &[Vma]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = vmas
        .iter()
        .filter(|v| {
            v.map.prot & libc::PROT_EXEC as u32 != 0 && v.map.prot & libc::PROT_READ as u32 != 0
        })
        .filter(|v| v.map.kind != MappingKind::Vsyscall)
        .map(|v| (v.map.start, v.map.end))
        .collect();
    v.sort_by_key(|r| {
        !vmas
            .iter()
            .any(|m| m.map.kind == MappingKind::Vdso && m.map.start == r.0)
    });
    v
}

/// True when the pages of this mapping live in memory only (must be saved).
pub(super) fn saves_pages(v: &Vma) -> bool {
    match v.map.kind {
        MappingKind::Anonymous => true,
        // A private mapping of a file, memfd or deleted file: its copied-on-write pages.
        MappingKind::File { .. } | MappingKind::SharedMemory { .. } => !v.map.shared,
        _ => false,
    }
}

impl Vma {
    /// Sets its VM flags and what follows from them (the advice to re-apply, the
    /// stack's growing down); refuses device memory.
    fn set_flags(&mut self, pid: i32, flags: VmFlags) -> Result<()> {
        let m = &mut self.map;
        if flags.intersects(VmFlags::IO | VmFlags::PF)
            && !matches!(
                m.kind,
                MappingKind::Vvar
                    | MappingKind::VvarVclock
                    | MappingKind::Vdso
                    | MappingKind::Vsyscall
            )
        {
            return Err(unsupported(
                pid,
                format!(
                    "device memory mapping {:x}-{:x} ({})",
                    m.start, m.end, m.name
                ),
            ));
        }
        m.advice.retain(|a| LOCK_ADVICE.contains(&a.as_str()));
        for (f, a) in [
            (VmFlags::DC, "dontfork"),
            (VmFlags::WF, "wipeonfork"),
            (VmFlags::DD, "dontdump"),
            (VmFlags::HG, "hugepage"),
            (VmFlags::NH, "nohugepage"),
            (VmFlags::MG, "mergeable"),
            (VmFlags::SR, "sequential"),
            (VmFlags::RR, "random"),
        ] {
            if flags.contains(f) {
                m.advice.push(a.to_string());
            }
        }
        m.growsdown = flags.contains(VmFlags::GD);
        self.flags = flags;
        Ok(())
    }

    /// True when this mapping's pages are saved in the page file.
    pub fn saves_pages(&self) -> bool {
        saves_pages(self)
    }

    /// Its VM flags (smaps VmFlags).
    pub fn flags(&self) -> VmFlags {
        self.flags
    }
}

/// Reads the memory locks of a frozen process (whose layout is `layout`; `inj`
/// injects syscalls into it): each locked mapping gets the advice "locked" (mlock)
/// or "lockonfault" (mlock2 MLOCK_ONFAULT), from VmFlags `lo` and `lf` of its own
/// /proc/PID/smaps (a fork, the snapshot, does not inherit locks), read only when
/// /proc/PID/status shows locked memory (VmLck). mlockall(MCL_FUTURE), which nothing
/// in /proc shows, is probed in a process that holds locked memory: a page mapped
/// (PROT_NONE) and unmapped again by an
/// injected mmap is locked only under it (VmLck grows, or the mmap fails with EAGAIN
/// at the RLIMIT_MEMLOCK); `lf` on that page tells MCL_ONFAULT. Returns the
/// mlockall flags in force (MCL_FUTURE, with MCL_ONFAULT), else 0. Refused when more
/// is locked than the process's RLIMIT_MEMLOCK allows (a privileged process), as a
/// restore could not lock it again.
pub fn read_locks(
    proc: &ProcDir,
    inj: &crate::inject::Injector,
    layout: &mut [Vma],
) -> Result<i32> {
    let pid = proc.pid;
    let vmlck = || -> Result<u64> {
        let status = std::fs::read_to_string(proc.file("status"))
            .ctx(pid, || "reading /proc/PID/status".into())?;
        Ok(status
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0))
    };
    let before = vmlck()?;
    // The probe maps a page for a moment: a kill of stasis in between would leave it
    // mapped. Only a process holding locked memory is probed (MCL_FUTURE locks what
    // it maps from then on, so one that called it and mapped anything since has some).
    if before == 0 {
        return Ok(0);
    }
    let prot = libc::PROT_NONE as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let probe = inj.raw(libc::SYS_mmap, &[0, 4096, prot, flags, u64::MAX, 0])?;
    if probe == -i64::from(libc::EAGAIN) {
        // Only a locked mapping is refused for want of RLIMIT_MEMLOCK.
        return Err(unsupported(
            pid,
            "mlockall(MCL_FUTURE) with its RLIMIT_MEMLOCK used up: stasis cannot map the page it needs to tell whether it is MCL_ONFAULT".into(),
        ));
    }
    let probe = inj.check("mmap of a probe page (for mlockall)", probe)?;
    let after = vmlck();
    let read = after.and_then(|after| {
        if after == 0 {
            return Ok(None);
        }
        let smaps = std::fs::read_to_string(proc.file("smaps"))
            .ctx(pid, || "reading /proc/PID/smaps".into())?;
        Ok(Some((after > before, smaps)))
    });
    inj.call("munmap of the probe page", libc::SYS_munmap, &[probe, 4096])?;
    let Some((future, smaps)) = read? else {
        return Ok(0);
    };
    // (start, end, locked, on fault) of each mapping.
    let mut locks: Vec<(u64, u64, bool, bool)> = Vec::new();
    for line in smaps.lines() {
        if let Some(f) = line.strip_prefix("VmFlags:") {
            let has = |w: &str| f.split_whitespace().any(|x| x == w);
            if let Some(last) = locks.last_mut() {
                last.2 = has("lo");
                last.3 = has("lf");
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            let parsed = range.split_once('-').and_then(|(a, b)| {
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            });
            if let Some((a, b)) = parsed {
                locks.push((a, b, false, false));
            }
        }
    }
    let holder = |addr: u64| locks.iter().find(|l| l.0 <= addr && addr < l.1);
    let limit = memlock_limit(proc)?;
    let mut total = 0;
    for v in layout.iter_mut() {
        let m = &mut v.map;
        m.advice.retain(|a| !LOCK_ADVICE.contains(&a.as_str()));
        match holder(m.start) {
            Some(&(_, _, true, onfault)) => {
                m.advice.push(LOCK_ADVICE[usize::from(onfault)].to_string());
                total += m.end - m.start;
            }
            _ => continue,
        }
        if total > limit {
            return Err(unsupported(
                pid,
                format!(
                    "locked mapping {:x}-{:x} ({}): {total} bytes locked in all, above its RLIMIT_MEMLOCK of {limit} bytes (a privileged process), which a restore could not lock again",
                    m.start, m.end, m.name
                ),
            ));
        }
    }
    Ok(match holder(probe) {
        Some(&(_, _, true, onfault)) if future => {
            libc::MCL_FUTURE | if onfault { libc::MCL_ONFAULT } else { 0 }
        }
        _ if future => libc::MCL_FUTURE,
        _ => 0,
    })
}

/// The soft RLIMIT_MEMLOCK of a process, in bytes (u64::MAX when unlimited).
fn memlock_limit(proc: &ProcDir) -> Result<u64> {
    let limits = std::fs::read_to_string(proc.file("limits"))
        .ctx(proc.pid, || "reading /proc/PID/limits".into())?;
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max locked memory"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("unlimited");
    Ok(soft.parse().unwrap_or(u64::MAX))
}

/// True when a copy-on-write snapshot (fork) of the process would not see this
/// mapping's content: MADV_DONTFORK (absent) and MADV_WIPEONFORK (zeroed). Such
/// mappings are copied while the process is frozen.
pub fn invisible_to_fork(v: &Vma) -> bool {
    v.flags.intersects(VmFlags::DC | VmFlags::WF)
}
