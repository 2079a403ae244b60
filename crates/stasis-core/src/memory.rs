//! Memory: mappings and their pages.
//!
//! Dump: the layout comes from `/proc/PID/smaps` (addresses, protections, backing, VM
//! flags); `/proc/PID/pagemap` says which pages exist, so pages never touched are
//! neither read nor stored; anonymous pages (including the copied-on-write pages of
//! private file mappings) are copied with `process_vm_readv` and all-zero pages are
//! skipped. The rest of a file mapping is mapped again from the file at restore.
//!
//! Restore (through [`Injector`]): each mapping is recreated at its address with
//! `mmap(MAP_FIXED_NOREPLACE)`, its pages are `pread` by the process itself straight
//! from the page file into place, then the final protection and madvise flags are
//! applied. The vdso/vvar block the kernel gave the new process is moved to where the
//! old one was.

use crate::error::{Error, Result, SysContext};
use crate::inject::Injector;
use crate::proc::{file_id, ProcDir};
use procfs::process::{MMPermissions, MMapPath, VmFlags};
use stasis_image::{Compression, Mapping, MappingKind, PageRun, PAGE_SIZE};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
/// Pages copied per process_vm_readv call.
const BATCH_PAGES: u64 = 1024;

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
    .union(VmFlags::GD);

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
    layout_of(proc.pid, read_maps(proc)?)
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
        let f = match holder(&theirs, v) {
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
pub fn read_layout(proc: &ProcDir, cache: Option<&FlagCache>) -> Result<Vec<Vma>> {
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
            return layout_of(pid, all);
        }
    }
    let maps = proc
        .process()?
        .smaps()
        .map_err(std::io::Error::other)
        .ctx(pid, || "reading /proc/PID/smaps".into())?
        .into_iter()
        .collect();
    layout_of(pid, maps)
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
fn layout_of(pid: i32, maps: Vec<procfs::process::MemoryMap>) -> Result<Vec<Vma>> {
    let mut out = Vec::new();
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
                        let shmem = path.starts_with("/memfd:")
                            || path.starts_with("/dev/zero")
                            || path.starts_with("/dev/shm/");
                        if !shared || !shmem {
                            return Err(unsupported(
                                pid,
                                format!("mapping {range} of a deleted file ({path})"),
                            ));
                        }
                        (
                            MappingKind::SharedMemory {
                                id: m.inode,
                                offset: m.offset,
                            },
                            path,
                        )
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

fn unsupported(pid: i32, what: String) -> Error {
    Error::Unsupported { pid, what }
}

/// Shared file mappings of files up to this size have the file's content saved, to
/// recreate the file if it is missing at restore.
pub const SHARED_CONTENT_LIMIT: u64 = 64 << 20;

/// Saves the content of the files behind small shared file mappings into the image
/// (once per file) and records it in the mappings.
pub fn save_shared_files(
    pid: i32,
    vmas: &mut [Vma],
    writer: &mut stasis_image::CheckpointWriter,
) -> Result<()> {
    let mut saved: HashMap<String, String> = HashMap::new();
    for v in vmas.iter_mut() {
        let MappingKind::File { file, .. } = &v.map.kind else {
            continue;
        };
        if !v.map.shared || file.size > SHARED_CONTENT_LIMIT {
            continue;
        }
        if let Some(name) = saved.get(&file.path) {
            v.map.content_file = Some(name.clone());
            continue;
        }
        let name = format!("shared-{pid}-{}.img", saved.len());
        let data = std::fs::read(&file.path)
            .ctx(pid, || format!("reading shared mapped file {}", file.path))?;
        let mut w = writer.data_file(&name)?;
        w.write_all(&data)?;
        writer.finish_data(w)?;
        saved.insert(file.path.clone(), name.clone());
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
fn saves_pages(v: &Vma) -> bool {
    match v.map.kind {
        MappingKind::Anonymous => true,
        MappingKind::File { .. } => !v.map.shared,
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
        m.advice.clear();
        for (f, a) in [
            (VmFlags::DC, "dontfork"),
            (VmFlags::WF, "wipeonfork"),
            (VmFlags::DD, "dontdump"),
            (VmFlags::HG, "hugepage"),
            (VmFlags::NH, "nohugepage"),
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

/// True when a copy-on-write snapshot (fork) of the process would not see this
/// mapping's content: MADV_DONTFORK (absent) and MADV_WIPEONFORK (zeroed). Such
/// mappings are copied while the process is frozen.
pub fn invisible_to_fork(v: &Vma) -> bool {
    v.flags.intersects(VmFlags::DC | VmFlags::WF)
}

/// True when the machine has swap space (SwapTotal in /proc/meminfo is not 0).
fn has_swap() -> bool {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("SwapTotal:"))
                .map(|v| v.trim().trim_end_matches("kB").trim() != "0")
        })
        .unwrap_or(true)
}

/// Pages to copy, planned from `/proc/PID/pagemap` while the process is frozen.
#[derive(Debug, Clone, Copy)]
pub struct PlannedRun {
    /// Index of the mapping in the layout.
    pub vma: usize,
    pub addr: u64,
    pub npages: u64,
    /// Offset in the page file (clean runs take no room there).
    pub offset: u64,
    /// The mapping is not readable by the process: read through /proc/PID/mem.
    pub forced: bool,
    /// Not written since the previous checkpoint (dirty tracking): not read at all,
    /// the previous checkpoint's pages are referred to.
    pub clean: bool,
}

impl PlannedRun {
    /// Bytes it takes in the page file.
    pub fn file_len(&self) -> u64 {
        if self.clean {
            0
        } else {
            self.npages * PAGE_SIZE
        }
    }
}

/// Every page to save, with its place in the page file.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub runs: Vec<PlannedRun>,
    /// Size of the page file.
    pub bytes: u64,
}

/// Plans which pages to save: populated anonymous pages and the copied-on-write pages
/// of private file mappings. Never-touched pages are not even read.
/// Only the mappings `include` accepts are planned (run indices still refer to
/// `vmas`).
pub fn plan(
    proc: &ProcDir,
    vmas: &[Vma],
    written: Option<&[(u64, u64)]>,
    include: impl Fn(&Vma) -> bool,
) -> Result<Plan> {
    // The mappings cut into pieces of at most 64 MiB, shared out between threads in
    // address order (a pagemap read costs about as much per page as a page copy
    // costs per byte); their plans are then laid end to end.
    const PIECE: u64 = 16 * 1024;
    let mut pieces: Vec<(usize, u64, u64)> = Vec::new();
    for (vi, v) in vmas.iter().enumerate() {
        if !saves_pages(v) || !include(v) {
            continue;
        }
        let npages = v.map.len() / PAGE_SIZE;
        let mut idx = 0;
        while idx < npages {
            let n = (npages - idx).min(PIECE);
            pieces.push((vi, idx, idx + n));
            idx += n;
        }
    }
    let mut groups = share_out(pieces, |p| p.2 - p.1);
    if groups.is_empty() {
        groups.push(Vec::new());
    }
    let pid = proc.pid;
    let results: Vec<Result<Plan>> = std::thread::scope(|sc| {
        let handles: Vec<_> = groups
            .iter()
            .map(|g| {
                sc.spawn(move || {
                    plan_scanned(proc, vmas, written, g).or_else(|e| {
                        tracing::debug!(
                            "process {pid}: PAGEMAP_SCAN planning failed ({e}); reading pagemap"
                        );
                        plan_pieces(proc, vmas, written, g)
                    })
                })
            })
            .collect();
        join_all(handles, pid)
    });
    let mut plan = Plan::default();
    for r in results {
        append(&mut plan, &r?);
    }
    Ok(plan)
}

/// [`plan`] by PAGEMAP_SCAN (Linux 6.7+): the kernel reports the present pages as
/// ranges, so a mapping full of pages costs a page-table walk, not 8 bytes of pagemap
/// per page.
fn plan_scanned(
    proc: &ProcDir,
    vmas: &[Vma],
    written: Option<&[(u64, u64)]>,
    pieces: &[(usize, u64, u64)],
) -> std::io::Result<Plan> {
    use stasis_sys::dirty::{category as c, scan, ScanMasks};
    use std::os::fd::AsRawFd;
    let pagemap = std::fs::File::open(proc.file("pagemap"))?;
    // As in plan_pieces: "swapped" entries are markers when there is no swap.
    let swapped = if has_swap() { c::SWAPPED } else { 0 };
    let mut plan = Plan::default();
    for &(vi, from, to) in pieces {
        let map = &vmas[vi].map;
        // Asking whether pages are file pages costs a lookup per page: only for file
        // mappings, whose copied-on-write pages are the anonymous ones.
        let file_backed = matches!(map.kind, MappingKind::File { .. });
        let forced = map.prot & libc::PROT_READ as u32 == 0;
        let masks = ScanMasks {
            any: c::PRESENT | swapped,
            report: c::PRESENT | swapped | c::PFNZERO | if file_backed { c::FILE } else { 0 },
            ..ScanMasks::default()
        };
        let (start, end) = (map.start + from * PAGE_SIZE, map.start + to * PAGE_SIZE);
        let ranges = scan(pagemap.as_raw_fd(), start, end, masks, false)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno))?;
        for (s, e, cat) in ranges {
            // The shared zero page is all zeros: not stored anyway.
            let wanted = cat & c::PRESENT == 0 || cat & (c::FILE | c::PFNZERO) == 0;
            if wanted {
                push_split(&mut plan, vi, s, e, written, forced);
            }
        }
    }
    Ok(plan)
}

/// Adds the pages of `[start, end)` of mapping `vi` to the plan, clean where they are
/// outside the `written` ranges (when tracking).
fn push_split(
    plan: &mut Plan,
    vi: usize,
    start: u64,
    end: u64,
    written: Option<&[(u64, u64)]>,
    forced: bool,
) {
    let Some(w) = written else {
        push_run(plan, vi, start, end, false, forced);
        return;
    };
    let mut at = start;
    // The first written range that ends after `at` (ranges are sorted, disjoint).
    let mut k = w.partition_point(|&(_, e)| e <= at);
    while at < end {
        match w.get(k) {
            Some(&(ws, we)) if ws < end => {
                if at < ws {
                    push_run(plan, vi, at, ws, true, forced);
                    at = ws;
                }
                let to = we.min(end);
                push_run(plan, vi, at, to, false, forced);
                at = to;
                k += 1;
            }
            _ => {
                push_run(plan, vi, at, end, true, forced);
                at = end;
            }
        }
    }
}

/// Appends pages `[start, end)` to the plan as runs of at most BATCH_PAGES, joining
/// the last run where they continue it.
fn push_run(plan: &mut Plan, vi: usize, start: u64, end: u64, clean: bool, forced: bool) {
    let mut page = start;
    while page < end {
        let n = match plan.runs.last_mut() {
            Some(r)
                if r.vma == vi
                    && r.clean == clean
                    && r.addr + r.npages * PAGE_SIZE == page
                    && r.npages < BATCH_PAGES =>
            {
                let n = ((end - page) / PAGE_SIZE).min(BATCH_PAGES - r.npages);
                r.npages += n;
                n
            }
            _ => {
                let n = ((end - page) / PAGE_SIZE).min(BATCH_PAGES);
                plan.runs.push(PlannedRun {
                    vma: vi,
                    addr: page,
                    npages: n,
                    offset: plan.bytes,
                    forced,
                    clean,
                });
                n
            }
        };
        if !clean {
            plan.bytes += n * PAGE_SIZE;
        }
        page += n * PAGE_SIZE;
    }
}

/// Plans the pages of `pieces` (mapping index, first and end page index).
fn plan_pieces(
    proc: &ProcDir,
    vmas: &[Vma],
    written: Option<&[(u64, u64)]>,
    pieces: &[(usize, u64, u64)],
) -> Result<Plan> {
    let pid = proc.pid;
    let pagemap = std::fs::File::open(proc.file("pagemap"))
        .ctx(pid, || "opening /proc/PID/pagemap".into())?;
    let mut entries = vec![0u8; (BATCH_PAGES * 8) as usize];
    let mut plan = Plan::default();
    // Without swap, a "swapped" pagemap entry is a marker (userfaultfd
    // write-protection of a never-populated page, a migration entry): nothing to save.
    let swap = if has_swap() { PM_SWAP } else { 0 };
    for &(vi, from, to) in pieces {
        let map = &vmas[vi].map;
        let file_backed = matches!(map.kind, MappingKind::File { .. });
        let forced = map.prot & libc::PROT_READ as u32 == 0;
        let mut idx = from;
        while idx < to {
            let n = (to - idx).min(BATCH_PAGES);
            let addr = map.start + idx * PAGE_SIZE;
            let ents = &mut entries[..(n * 8) as usize];
            pagemap
                .read_exact_at(ents, addr / PAGE_SIZE * 8)
                .ctx(pid, || {
                    format!("reading pagemap of mapping {:x}-{:x}", map.start, map.end)
                })?;
            for (i, e) in ents.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
                let want = if file_backed {
                    // Copied-on-write pages of a private file mapping are anonymous:
                    // present but not file pages, or swapped.
                    (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & swap != 0
                } else {
                    e & (PM_PRESENT | swap) != 0
                };
                if !want {
                    continue;
                }
                let page = addr + i as u64 * PAGE_SIZE;
                let clean = written.is_some_and(|w| {
                    // `w` is sorted: the last range starting at or before `page`.
                    let k = w.partition_point(|&(a, _)| a <= page);
                    !(k > 0 && page < w[k - 1].1)
                });
                match plan.runs.last_mut() {
                    Some(r)
                        if r.vma == vi
                            && r.clean == clean
                            && r.addr + r.npages * PAGE_SIZE == page
                            && r.npages < BATCH_PAGES =>
                    {
                        r.npages += 1
                    }
                    _ => plan.runs.push(PlannedRun {
                        vma: vi,
                        addr: page,
                        npages: 1,
                        offset: plan.bytes,
                        forced,
                        clean,
                    }),
                }
                // Clean pages are referred to, not stored: they take no room.
                if !clean {
                    plan.bytes += PAGE_SIZE;
                }
            }
            idx += n;
        }
    }
    Ok(plan)
}

/// Appends the runs of `other` to `plan`, after its pages in the page file; returns
/// their indices in `plan`.
pub fn append(plan: &mut Plan, other: &Plan) -> Vec<usize> {
    let mut index = Vec::with_capacity(other.runs.len());
    for r in &other.runs {
        index.push(plan.runs.len());
        plan.runs.push(PlannedRun {
            offset: plan.bytes + r.offset,
            ..*r
        });
    }
    plan.bytes += other.bytes;
    index
}

/// What became of one saved page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// All zero: not stored (a hole).
    Zero,
    /// Stored in this checkpoint's page file; its content hash.
    Own(u128),
    /// Unchanged since an earlier checkpoint, which holds it: (from, offset).
    Ref(u64, u64),
}

/// Per planned run (by index) and first page (within the run): what became of pages.
pub type ZeroMap = Vec<(usize, u64, Vec<PageState>)>;

/// The newest checkpoint's pages of one process, for an incremental checkpoint:
/// where each page lives (its page runs, by address), and, when pages must be
/// compared by content (writes were not tracked), the hashes of the pages of every
/// checkpoint those runs refer to.
#[derive(Debug, Default)]
pub struct PrevPages {
    /// Page runs in address order, `from` absolute.
    runs: Vec<PageRun>,
    /// Page hashes by checkpoint sequence, indexed by page of its page file.
    hashes: HashMap<u64, Vec<u128>>,
}

impl PrevPages {
    /// From the page runs of the checkpoint `seq` (where `from` 0 means `seq`).
    pub fn new(seq: u64, runs: impl IntoIterator<Item = PageRun>) -> PrevPages {
        let mut runs: Vec<PageRun> = runs
            .into_iter()
            .map(|r| PageRun {
                from: if r.from == 0 { seq } else { r.from },
                ..r
            })
            .collect();
        if !runs.is_sorted_by_key(|r| r.addr) {
            runs.sort_unstable_by_key(|r| r.addr);
        }
        PrevPages {
            runs,
            hashes: HashMap::new(),
        }
    }

    /// The checkpoints the runs refer to.
    pub fn sources(&self) -> Vec<u64> {
        let mut s: Vec<u64> = self.runs.iter().map(|r| r.from).collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// Adds the page hashes of checkpoint `seq` (see [`stasis_image::PageHashes`]).
    pub fn add_hashes(&mut self, seq: u64, hashes: Vec<u128>) {
        self.hashes.insert(seq, hashes);
    }

    /// True when pages can be compared by content.
    pub fn has_hashes(&self) -> bool {
        !self.hashes.is_empty()
    }

    /// The runs that overlap `[start, end)`, in address order.
    pub fn runs_in(&self, start: u64, end: u64) -> &[PageRun] {
        let a = self
            .runs
            .partition_point(|r| r.addr + r.npages * PAGE_SIZE <= start);
        let b = self.runs.partition_point(|r| r.addr < end);
        &self.runs[a..b.max(a)]
    }

    /// The page at `addr`: its hash, and where it lives (from, offset).
    pub fn get(&self, addr: u64) -> Option<(u128, u64, u64)> {
        if self.hashes.is_empty() {
            return None;
        }
        let k = self
            .runs
            .partition_point(|r| r.addr <= addr)
            .checked_sub(1)?;
        let r = &self.runs[k];
        let idx = (addr - r.addr) / PAGE_SIZE;
        if idx >= r.npages {
            return None;
        }
        let offset = r.offset + idx * PAGE_SIZE;
        let hash = *self
            .hashes
            .get(&r.from)?
            .get((offset / PAGE_SIZE) as usize)?;
        Some((hash, r.from, offset))
    }
}

type Piece<'a> = (usize, &'a PlannedRun, &'a mut [u8]);

/// Where [`copy_pages`] reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The (frozen) process itself: process_vm_readv, one copy.
    Process,
    /// Its copy-on-write snapshot: through /proc/PID/mem. process_vm_readv would pin
    /// the pages, and pinning a page shared copy-on-write with the running process
    /// makes the kernel copy it first (doubling memory and time).
    Snapshot,
}

/// Copies the planned runs selected by `want` from process `src` straight into `out`
/// (indexed by the plan's offsets), with as many threads as there are cores.
pub fn copy_pages(
    src: i32,
    how: Source,
    plan: &Plan,
    want: impl Fn(&PlannedRun) -> bool,
    out: &mut [u8],
) -> Result<()> {
    let mem = std::fs::File::open(format!("/proc/{src}/mem"))
        .ctx(src, || "opening /proc/PID/mem".into())?;
    // Carve the output into one disjoint slice per run (runs are in file order).
    let mut pieces: Vec<Piece> = Vec::new();
    let mut rest: &mut [u8] = out;
    let mut base = 0u64;
    for (i, r) in plan.runs.iter().enumerate() {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((r.offset - base) as usize);
        let (mine, tail) = tail.split_at_mut(r.file_len() as usize);
        rest = tail;
        base = r.offset + r.file_len();
        if want(r) && !r.clean {
            pieces.push((i, r, mine));
        }
    }
    let groups = share_out(pieces, |p| p.1.npages);
    let results: Vec<Result<()>> = std::thread::scope(|sc| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| {
                let mem = &mem;
                sc.spawn(move || -> Result<()> {
                    for (_, r, buf) in g {
                        let res = if r.forced || how == Source::Snapshot {
                            stasis_sys::vm::read_forced(mem, src, r.addr, buf)
                        } else {
                            stasis_sys::vm::read(src, r.addr, buf)
                        };
                        res.ctx(src, || {
                            format!("reading {} pages at {:x}", r.npages, r.addr)
                        })?;
                    }
                    Ok(())
                })
            })
            .collect();
        join_all(handles, src)
    });
    results.into_iter().collect()
}

/// Logical bytes of each part of a page file of `bytes` bytes: one part per worker
/// thread, whole chunks each (so that chunk checksums stay per part).
pub fn part_size(bytes: u64) -> u64 {
    let chunk = stasis_image::CHUNK_SIZE;
    let nchunks = bytes.div_ceil(chunk).max(1);
    let workers = (stasis_image::store::workers() as u64).min(nchunks);
    nchunks.div_ceil(workers) * chunk
}

/// Where one worker of [`write_pages`] puts the pages of its part.
pub enum PartOut<'a> {
    /// Written at their offsets; zero pages are holes.
    Plain(&'a stasis_image::PositionedFile),
    /// Compressed frame by frame, appended in order.
    Compressed(&'a mut stasis_image::DataWriter, Compression),
}

/// A part once written.
#[derive(Debug, Default)]
pub struct PartDone {
    /// Chunk checksums (plain parts).
    pub sums: Vec<String>,
    /// End offsets of its frames (compressed parts).
    pub frames: Vec<u64>,
    /// Hash of each page of the part, in order (zero pages and pages referred to
    /// elsewhere: the zero page's).
    pub hashes: Vec<u128>,
}

/// What one part received: its page states, and the part.
pub type PartResult = (ZeroMap, PartDone);

/// Writes every planned page into the parts (at the plan's offsets) with one thread
/// per part: each reads its pages (from `prefetched`, the runs copied while the
/// process was frozen, or from process `src`), writes the non-zero ones (zero pages
/// stay holes) and checksums its chunks as it goes. Runs for which `in_file` is true
/// were already written into the (plain) part by the process's snapshot (see
/// `snapshot`): they are read back from the file (as soon as `progress` says they
/// are written, when the snapshot is still writing), and their zero or unchanged
/// pages punched out. Returns the page states and, per part, its chunk checksums and frames.
#[allow(clippy::too_many_arguments)]
pub fn write_pages(
    src: i32,
    how: Source,
    plan: &Plan,
    prefetched: &HashMap<usize, &[u8]>,
    parts: Vec<PartOut>,
    part_size: u64,
    prev: Option<&PrevPages>,
    in_file: &(dyn Fn(usize) -> bool + Sync),
    progress: Option<&crate::snapshot::WriteProgress>,
    opened: Option<&std::fs::File>,
) -> Result<(ZeroMap, Vec<PartDone>)> {
    // `opened`: /proc/PID/mem opened earlier (a process not dumpable is made dumpable
    // only while its state is read).
    let mem = match opened {
        Some(f) => f.try_clone(),
        None => std::fs::File::open(format!("/proc/{src}/mem")),
    }
    .ctx(src, || "opening /proc/PID/mem".into())?;
    // Pages not written since the previous checkpoint (clean runs) are not read at
    // all: finish_pages refers to the previous checkpoint for them.
    let mut zeros: ZeroMap = Vec::new();
    let results: Vec<Result<PartResult>> = std::thread::scope(|sc| {
        let handles: Vec<_> = parts
            .into_iter()
            .enumerate()
            .map(|(w, out)| {
                let lo = (w as u64 * part_size).min(plan.bytes);
                let hi = (lo + part_size).min(plan.bytes);
                let job = RangeJob {
                    src,
                    how,
                    plan,
                    prefetched,
                    prev,
                    mem: &mem,
                    in_file,
                    progress,
                    part: w,
                    out,
                    lo,
                    hi,
                };
                sc.spawn(move || job.run())
            })
            .collect();
        join_all(handles, src)
    });
    let mut per_part = Vec::new();
    for r in results {
        let (z, done) = r?;
        zeros.extend(z);
        per_part.push(done);
    }
    Ok((zeros, per_part))
}

/// One worker of [`write_pages`]: the logical range `[lo, hi)`, stored in `file`.
struct RangeJob<'a> {
    src: i32,
    how: Source,
    plan: &'a Plan,
    prefetched: &'a HashMap<usize, &'a [u8]>,
    prev: Option<&'a PrevPages>,
    mem: &'a std::fs::File,
    in_file: &'a (dyn Fn(usize) -> bool + Sync),
    /// How far the snapshot has written the parts (pages it writes are read back
    /// only once written); None: it has finished.
    progress: Option<&'a crate::snapshot::WriteProgress>,
    /// Index of this part.
    part: usize,
    out: PartOut<'a>,
    lo: u64,
    hi: u64,
}

/// Pages of runs, consecutive in the page file from `off` (`len` bytes), whose data
/// one step of a [`RangeJob`] has in its buffer.
struct ReadPiece {
    /// Per run: (run index, first page in the run, address, pages).
    segs: Vec<(usize, u64, u64, u64)>,
    off: u64,
    len: u64,
    /// Written by the snapshot (read back from the part).
    in_file: bool,
}

/// An I/O error of process `pid`'s page part `out`.
fn part_error(pid: i32, what: &str, out: &PartOut, e: std::io::Error) -> Error {
    let path = match out {
        PartOut::Plain(f) => f.path().display(),
        PartOut::Compressed(w, _) => w.path().display(),
    };
    Error::Io {
        pid,
        context: format!("{what} {path}"),
        source: e,
    }
}

/// What a [`RangeJob`] has produced so far.
#[derive(Default)]
struct Sink {
    zeros: ZeroMap,
    page_hashes: Vec<u128>,
    /// The compressed part's frame being filled, and the ends of those written.
    frame: Vec<u8>,
    frames: Vec<u64>,
}

impl RangeJob<'_> {
    fn run(mut self) -> Result<PartResult> {
        let (plan, lo, hi) = (self.plan, self.lo, self.hi);
        let mut buf = vec![0u8; (BATCH_PAGES * PAGE_SIZE) as usize];
        let mut sink = Sink::default();
        let mut k = plan.runs.partition_point(|r| r.offset + r.file_len() <= lo);
        let mut within = 0u64; // where the next piece of run k starts in the file
        while let Some(r) = plan.runs.get(k) {
            if r.clean {
                k += 1; // no room in the file (see write_pages)
                continue;
            }
            if r.offset >= hi {
                break;
            }
            stasis_sys::fault::step("copying pages")?;
            let piece = self.read_piece(&mut k, &mut within, &mut buf)?;
            self.absorb(&mut sink, &piece, &buf[..piece.len as usize])?;
        }
        self.finish(sink)
    }

    fn io_err(&self, what: &str, e: std::io::Error) -> Error {
        part_error(self.src, what, &self.out, e)
    }

    /// Whether run `j` is copied from the frozen process itself, whole: many such
    /// runs go in one process_vm_readv (the few pages written since an incremental
    /// checkpoint are scattered).
    fn batchable(&self, j: usize, q: &PlannedRun, cap: u64) -> bool {
        self.how == Source::Process
            && !q.forced
            && self.prefetched.get(&j).is_none()
            && !((self.in_file)(j) && matches!(self.out, PartOut::Plain(_)))
            && q.offset >= self.lo
            && q.offset + q.file_len() <= self.hi
            && q.file_len() <= cap
    }

    /// Reads the next piece, starting at run `k` (and `within` it), into `buf`;
    /// advances `k` and `within` past it.
    fn read_piece(&self, k: &mut usize, within: &mut u64, buf: &mut [u8]) -> Result<ReadPiece> {
        let (src, lo, runs) = (self.src, self.lo, &self.plan.runs);
        let cap = buf.len() as u64;
        let r = &runs[*k];
        let off = r.offset.max(lo).max(*within);
        if off == r.offset && self.batchable(*k, r, cap) {
            let (mut segs, mut remote, mut total) = (Vec::new(), Vec::new(), 0u64);
            while let Some(q) = runs.get(*k) {
                if !q.clean {
                    if !self.batchable(*k, q, cap) || total + q.file_len() > cap {
                        break;
                    }
                    segs.push((*k, 0, q.addr, q.npages));
                    remote.push((q.addr, q.file_len() as usize));
                    total += q.file_len();
                }
                *k += 1;
            }
            stasis_sys::vm::read_scattered(src, &remote, &mut buf[..total as usize])
                .ctx(src, || {
                    format!("reading {} runs of pages from {:x}", segs.len(), r.addr)
                })?;
            *within = 0;
            return Ok(ReadPiece {
                segs,
                off,
                len: total,
                in_file: false,
            });
        }
        let run_end = (r.offset + r.npages * PAGE_SIZE).min(self.hi);
        let len = (run_end - off).min(cap);
        let addr = r.addr + (off - r.offset);
        let in_file = (self.in_file)(*k)
            && self.prefetched.get(k).is_none()
            && matches!(self.out, PartOut::Plain(_));
        let data = &mut buf[..len as usize];
        if in_file {
            // Written by the snapshot: read back from the page cache (once written).
            // (pread, not a mapping: faults of every worker in our one address space
            // contend, and a hole read through a tmpfs mapping is allocated.)
            let PartOut::Plain(f) = &self.out else {
                unreachable!("in_file implies a plain part")
            };
            if let Some(p) = self.progress {
                if !p.wait(self.part, off - lo + len) {
                    return Err(Error::Transient {
                        pid: src,
                        what: "the snapshot stopped writing its pages".into(),
                    });
                }
            }
            f.file()
                .read_exact_at(data, off - lo)
                .map_err(|e| self.io_err("reading back", e))?;
        } else {
            match self.prefetched.get(k) {
                Some(pre) => data.copy_from_slice(
                    &pre[(off - r.offset) as usize..(off - r.offset + len) as usize],
                ),
                None if r.forced || self.how == Source::Snapshot => {
                    stasis_sys::vm::read_forced(self.mem, src, addr, data)
                        .ctx(src, || format!("reading {len} bytes at {addr:x}"))?
                }
                None => stasis_sys::vm::read(src, addr, data)
                    .ctx(src, || format!("reading {len} bytes at {addr:x}"))?,
            }
        }
        let segs = vec![(*k, (off - r.offset) / PAGE_SIZE, addr, len / PAGE_SIZE)];
        if off + len >= run_end {
            *k += 1;
            *within = 0;
        } else {
            *within = off + len;
        }
        Ok(ReadPiece {
            segs,
            off,
            len,
            in_file,
        })
    }

    /// Hashes the pages of a piece, stores them (zero and unchanged pages become
    /// holes) and records what became of each.
    fn absorb(&mut self, sink: &mut Sink, piece: &ReadPiece, data: &[u8]) -> Result<()> {
        let addrs = piece
            .segs
            .iter()
            .flat_map(|&(_, _, a, n)| (0..n).map(move |p| a + p * PAGE_SIZE));
        let z: Vec<PageState> = data
            .chunks_exact(PAGE_SIZE as usize)
            .zip(addrs)
            .map(|(page, addr)| {
                if is_zero(page) {
                    return PageState::Zero;
                }
                let h = xxhash_rust::xxh3::xxh3_128(page);
                match self.prev.and_then(|p| p.get(addr)) {
                    Some((old, from, offset)) if old == h => PageState::Ref(from, offset),
                    _ => PageState::Own(h),
                }
            })
            .collect();
        // The part's checksums and the page-hash file are made of these hashes (see
        // stasis_image::store::paged_chunk_hashes): no second pass.
        sink.page_hashes.extend(z.iter().map(|st| match st {
            PageState::Own(h) => *h,
            _ => *ZERO_PAGE_HASH,
        }));
        match &mut self.out {
            PartOut::Compressed(..) => {
                // What the part holds: the stored pages, zeros elsewhere.
                let held =
                    data.chunks_exact(PAGE_SIZE as usize)
                        .zip(&z)
                        .map(|(page, st)| match st {
                            PageState::Own(_) => page,
                            _ => &ZERO_PAGE[..],
                        });
                for page in held {
                    sink.frame.extend_from_slice(page);
                    if sink.frame.len() as u64 == stasis_image::CHUNK_SIZE {
                        self.flush_frame(sink)?;
                    }
                }
            }
            PartOut::Plain(f) => {
                // Pages stored here are written (unless the snapshot did); zero and
                // unchanged pages stay (or become) holes.
                let f = f.file();
                for (s, e, own) in spans(&z) {
                    let at = piece.off - self.lo + s as u64 * PAGE_SIZE;
                    let bytes = &data[s * PAGE_SIZE as usize..e * PAGE_SIZE as usize];
                    if own && !piece.in_file {
                        f.write_all_at(bytes, at)
                            .map_err(|e| self.io_err("writing", e))?;
                    } else if !own && piece.in_file {
                        punch_hole(f, at, bytes.len() as u64)
                            .map_err(|e| self.io_err("punching holes in", e))?;
                    }
                }
            }
        }
        // The states, per piece of run.
        let mut rest = &z[..];
        for &(i, first_page, _, n) in &piece.segs {
            let (mine, tail) = rest.split_at(n as usize);
            sink.zeros.push((i, first_page, mine.to_vec()));
            rest = tail;
        }
        Ok(())
    }

    /// Compresses and writes the frame being filled (compressed parts).
    fn flush_frame(&mut self, sink: &mut Sink) -> Result<()> {
        let PartOut::Compressed(w, codec) = &mut self.out else {
            return Ok(());
        };
        let z = match codec.compress(&sink.frame) {
            Ok(z) => z,
            Err(e) => return Err(part_error(self.src, "compressing", &self.out, e)),
        };
        w.write_all(&z)?;
        sink.frames.push(w.written());
        sink.frame.clear();
        Ok(())
    }

    fn finish(mut self, mut sink: Sink) -> Result<PartResult> {
        let mut sums = Vec::new();
        match &self.out {
            PartOut::Compressed(..) if !sink.frame.is_empty() => self.flush_frame(&mut sink)?,
            PartOut::Compressed(..) => {}
            PartOut::Plain(_) => sums = stasis_image::store::paged_chunk_hashes(&sink.page_hashes),
        }
        Ok((
            sink.zeros,
            PartDone {
                sums,
                frames: sink.frames,
                hashes: sink.page_hashes,
            },
        ))
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
static ZERO_PAGE_HASH: std::sync::LazyLock<u128> =
    std::sync::LazyLock::new(|| stasis_image::store::page_hash(&ZERO_PAGE));

/// Maximal spans `[start, end)` of pages that are all stored here, or all not.
fn spans(z: &[PageState]) -> Vec<(usize, usize, bool)> {
    let own = |k: usize| matches!(z[k], PageState::Own(_));
    let mut out = Vec::new();
    let mut p = 0;
    while p < z.len() {
        let s = p;
        while p < z.len() && own(p) == own(s) {
            p += 1;
        }
        out.push((s, p, own(s)));
    }
    out
}

/// Deallocates `[off, off + len)` of `file`, which then reads as zeros
/// (fallocate(2), FALLOC_FL_PUNCH_HOLE).
fn punch_hole(file: &std::fs::File, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Turns the plan and the page states into the mappings' saved page runs. Zero pages
/// are left out (restore leaves them to the kernel's zero fill; they are holes in the
/// page file); clean runs (not written since the previous checkpoint) refer to where
/// `prev` has their pages, run by run. Returns the mappings and the bytes of pages
/// stored.
pub fn finish_pages(
    vmas: &[Vma],
    plan: &Plan,
    states: &ZeroMap,
    prev: Option<&PrevPages>,
) -> (Vec<Mapping>, u64) {
    let mut mappings: Vec<Mapping> = vmas.iter().map(|v| v.map.clone()).collect();
    // Pieces of runs in plan order (pages without a state are zero).
    let mut order: Vec<&(usize, u64, Vec<PageState>)> = states.iter().collect();
    order.sort_unstable_by_key(|(i, first, _)| (*i, *first));
    let mut pieces = order.into_iter().peekable();
    let mut stored = 0;
    for (i, r) in plan.runs.iter().enumerate() {
        let pages = &mut mappings[r.vma].pages;
        if r.clean {
            let end = r.addr + r.npages * PAGE_SIZE;
            for old in prev.map_or(&[][..], |p| p.runs_in(r.addr, end)) {
                // The part of the old run inside this one.
                let a = old.addr.max(r.addr);
                let b = (old.addr + old.npages * PAGE_SIZE).min(end);
                let offset = old.offset + (a - old.addr);
                push_page_run(pages, a, (b - a) / PAGE_SIZE, offset, old.from);
            }
            continue;
        }
        while let Some((j, first, z)) = pieces.next_if(|p| p.0 <= i) {
            if *j != i {
                continue; // (no piece is made of a clean run)
            }
            for (k, st) in z.iter().enumerate() {
                let k = *first + k as u64;
                let addr = r.addr + k * PAGE_SIZE;
                let (from, offset) = match *st {
                    PageState::Zero => continue,
                    PageState::Own(_) => {
                        stored += PAGE_SIZE;
                        (0, r.offset + k * PAGE_SIZE)
                    }
                    PageState::Ref(from, offset) => (from, offset),
                };
                push_page_run(pages, addr, 1, offset, from);
            }
        }
    }
    (mappings, stored)
}

/// Appends pages to a mapping's runs, extending the last run where they continue it.
fn push_page_run(pages: &mut Vec<PageRun>, addr: u64, npages: u64, offset: u64, from: u64) {
    match pages.last_mut() {
        Some(last)
            if last.from == from
                && last.addr + last.npages * PAGE_SIZE == addr
                && last.offset + last.npages * PAGE_SIZE == offset =>
        {
            last.npages += npages
        }
        _ => pages.push(PageRun {
            addr,
            npages,
            offset,
            from,
        }),
    }
}

/// Cuts `items` (in order) into at most one group per worker thread, of about equal
/// total `weight`.
fn share_out<T>(items: Vec<T>, weight: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
    let total: u64 = items.iter().map(&weight).sum();
    let share = total.div_ceil(stasis_image::store::workers() as u64).max(1);
    let mut groups: Vec<Vec<T>> = Vec::new();
    let mut acc = u64::MAX;
    for item in items {
        if acc >= share {
            groups.push(Vec::new());
            acc = 0;
        }
        acc += weight(&item);
        if let Some(g) = groups.last_mut() {
            g.push(item);
        }
    }
    groups
}

/// Joins scoped worker threads; a panicked worker becomes an error of process `pid`.
fn join_all<T>(
    handles: Vec<std::thread::ScopedJoinHandle<'_, Result<T>>>,
    pid: i32,
) -> Vec<Result<T>> {
    handles
        .into_iter()
        .map(|h| {
            h.join().unwrap_or_else(|_| {
                Err(Error::Restore {
                    pid,
                    msg: "a memory copy thread panicked".into(),
                })
            })
        })
        .collect()
}

fn is_zero(page: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: reinterpreting initialized bytes as u64 words is valid for any bit
        // pattern; align_to handles the unaligned head and tail.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Key of a shared memory object in [`MapFds::files`].
pub fn shm_key(id: u64) -> String {
    format!("shm:{id}")
}

/// Descriptors the restored process holds for the files its mappings come from, by path
/// (shared memory objects by [`shm_key`]).
pub struct MapFds {
    pub files: HashMap<String, i32>,
}

/// Recreates `mappings` (all but the kernel's special ones) in the stopped process and
/// fills their saved pages from `pages` (the mapped page file): every mapping is
/// created first (writable where pages go), the pages are copied in parallel with
/// process_vm_writev straight from the page cache, then the final protections and
/// madvise flags are applied.
pub fn restore_mappings(
    inj: &Injector,
    pid: i32,
    mappings: &[Mapping],
    fds: &MapFds,
    pages: &HashMap<u64, PageSource>,
) -> Result<()> {
    let restored: Vec<&Mapping> = mappings
        .iter()
        .filter(|m| {
            matches!(
                m.kind,
                MappingKind::Anonymous
                    | MappingKind::File { .. }
                    | MappingKind::SharedMemory { .. }
                    | MappingKind::SysvShm { .. }
            )
        })
        .collect();
    for m in &restored {
        if let MappingKind::SysvShm { shmid } = m.kind {
            let mut flags = if m.prot & libc::PROT_WRITE as u32 == 0 {
                libc::SHM_RDONLY
            } else {
                0
            };
            if m.prot & libc::PROT_EXEC as u32 != 0 {
                flags |= libc::SHM_EXEC;
            }
            let what = format!("shmat of System V segment {shmid} at {:x}", m.start);
            let got = inj.call(
                &what,
                libc::SYS_shmat,
                &[shmid as u64, m.start, flags as u64],
            )?;
            if got != m.start {
                return Err(Error::Restore {
                    pid,
                    msg: format!("{what} landed at {got:x}"),
                });
            }
            continue;
        }
        let (fd, offset) = match &m.kind {
            MappingKind::File { file, offset } => {
                let fd = *fds.files.get(&file.path).ok_or_else(|| Error::Restore {
                    pid,
                    msg: format!("no descriptor for mapped file {}", file.path),
                })?;
                (i64::from(fd), *offset)
            }
            MappingKind::SharedMemory { id, offset } => {
                let fd = *fds.files.get(&shm_key(*id)).ok_or_else(|| Error::Restore {
                    pid,
                    msg: format!("no descriptor for shared memory {id}"),
                })?;
                (i64::from(fd), *offset)
            }
            _ => (-1i64, 0u64),
        };
        let mut flags = if m.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        } | libc::MAP_FIXED_NOREPLACE;
        if fd < 0 {
            flags |= libc::MAP_ANONYMOUS;
        }
        if m.growsdown {
            flags |= libc::MAP_GROWSDOWN;
        }
        let what = format!("mmap of {:x}-{:x} {}", m.start, m.end, m.name);
        let got = inj.call(
            &what,
            libc::SYS_mmap,
            &[
                m.start,
                m.len(),
                u64::from(initial_prot(m)),
                flags as u64,
                fd as u64,
                offset,
            ],
        )?;
        if got != m.start {
            return Err(Error::Restore {
                pid,
                msg: format!("{what} landed at {got:x}"),
            });
        }
    }
    fill_pages(pid, &restored, pages)?;
    for m in &restored {
        let prot0 = initial_prot(m);
        if prot0 != m.prot {
            inj.call(
                &format!("mprotect of {:x}-{:x}", m.start, m.end),
                libc::SYS_mprotect,
                &[m.start, m.len(), u64::from(m.prot)],
            )?;
        }
        for a in &m.advice {
            let adv = match a.as_str() {
                "dontfork" => libc::MADV_DONTFORK,
                "wipeonfork" => libc::MADV_WIPEONFORK,
                "dontdump" => libc::MADV_DONTDUMP,
                "hugepage" => libc::MADV_HUGEPAGE,
                "nohugepage" => libc::MADV_NOHUGEPAGE,
                _ => continue,
            };
            // Advice is best effort (e.g. hugepage without THP support).
            let _ = inj.raw(libc::SYS_madvise, &[m.start, m.len(), adv as u64]);
        }
    }
    Ok(())
}

fn initial_prot(m: &Mapping) -> u32 {
    if m.pages.is_empty() {
        m.prot
    } else {
        m.prot | libc::PROT_WRITE as u32
    }
}

/// A checkpoint's page file as mapped for restore: its parts, in logical order.
pub struct PageSource<'a> {
    pub files: &'a stasis_image::PageFiles,
    pub parts: Vec<&'a [u8]>,
}

/// Pages to copy into the process: `len` bytes at `addr` from logical `offset` of the
/// page file of checkpoint `from`.
#[derive(Clone, Copy)]
struct RestorePiece {
    addr: u64,
    from: u64,
    offset: u64,
    len: u64,
}

/// A unit of restore work: pieces that lie in one frame of a compressed part (which
/// is decompressed once for all), or one piece of a plain part.
type Unit = Vec<RestorePiece>;

impl PageSource<'_> {
    /// Whether the parts are compressed.
    fn compressed(&self) -> bool {
        self.files.compression != Compression::None
    }

    /// Where logical `offset` lies: (part, offset in the part).
    fn locate(&self, offset: u64) -> (usize, u64) {
        let size = self.files.part_size.max(1);
        ((offset / size) as usize, offset % size)
    }

    /// The bytes a piece of a plain part refers to.
    fn plain(&self, p: &RestorePiece) -> Option<&[u8]> {
        let (k, local) = self.locate(p.offset);
        self.parts
            .get(k)?
            .get(local as usize..(local + p.len) as usize)
    }

    /// Decompresses the frame that holds logical `offset` into `out`; returns the
    /// logical offset where the frame starts.
    fn frame(&self, offset: u64, out: &mut Vec<u8>) -> std::result::Result<u64, String> {
        let (k, local) = self.locate(offset);
        let chunk = stasis_image::CHUNK_SIZE;
        let idx = (local / chunk) as usize;
        let ends = self
            .files
            .frames
            .get(k)
            .ok_or("no frame list for the part")?;
        let end = *ends.get(idx).ok_or("frame beyond the frame list")?;
        let start = if idx == 0 { 0 } else { ends[idx - 1] };
        let data = self.parts.get(k).ok_or("missing part")?;
        let frame = data
            .get(start as usize..end as usize)
            .ok_or("frame beyond the end of the part file")?;
        let part_len = self.files.range(k, self.files.bytes);
        let len = (part_len.1 - part_len.0)
            .saturating_sub(idx as u64 * chunk)
            .min(chunk);
        self.files
            .compression
            .decompress(frame, len as usize, out)
            .map_err(|e| format!("part {k}, frame {idx}: {e}"))?;
        Ok(offset - (local - idx as u64 * chunk))
    }
}

/// Copies every saved page into the stopped process, with as many threads as cores.
fn fill_pages(pid: i32, mappings: &[&Mapping], pages: &HashMap<u64, PageSource>) -> Result<()> {
    let beyond = |r: &PageRun| Error::Restore {
        pid,
        msg: format!(
            "pages of {:x} lie beyond the end of the page file (of checkpoint {})",
            r.addr, r.from
        ),
    };
    // Pieces of at most 4 MiB that never straddle a part (or a compressed frame),
    // so that the threads share the work evenly.
    let mut plain: Vec<Unit> = Vec::new();
    let mut framed: std::collections::BTreeMap<(u64, usize, u64), Unit> = Default::default();
    for m in mappings {
        for r in &m.pages {
            let src = pages.get(&r.from).ok_or_else(|| beyond(r))?;
            let limit = if src.compressed() {
                stasis_image::CHUNK_SIZE
            } else {
                BATCH_PAGES * PAGE_SIZE
            };
            let (mut done, total) = (0, r.npages * PAGE_SIZE);
            while done < total {
                let offset = r.offset + done;
                let (k, local) = src.locate(offset);
                let room = (src.files.part_size - local).min(limit - local % limit);
                let p = RestorePiece {
                    addr: r.addr + done,
                    from: r.from,
                    offset,
                    len: (total - done).min(room),
                };
                if src.compressed() {
                    framed
                        .entry((r.from, k, local / limit))
                        .or_default()
                        .push(p);
                } else {
                    src.plain(&p).ok_or_else(|| beyond(r))?;
                    plain.push(vec![p]);
                }
                done += p.len;
            }
        }
    }
    let mut work = plain;
    work.extend(framed.into_values());
    let workers = stasis_image::store::workers().min(work.len().max(1));
    let results: Vec<Result<()>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let work = &work;
                sc.spawn(move || -> Result<()> {
                    let mut buf = Vec::new();
                    for unit in work.iter().skip(w).step_by(workers) {
                        let Some(first) = unit.first() else { continue };
                        let Some(src) = pages.get(&first.from) else {
                            continue;
                        };
                        let frame_start = if src.compressed() {
                            src.frame(first.offset, &mut buf)
                                .map_err(|msg| Error::Restore {
                                    pid,
                                    msg: format!(
                                        "page file of checkpoint {} is damaged: {msg}",
                                        first.from
                                    ),
                                })?
                        } else {
                            0
                        };
                        for p in unit {
                            let data = if src.compressed() {
                                let at = (p.offset - frame_start) as usize;
                                buf.get(at..at + p.len as usize)
                            } else {
                                src.plain(p)
                            };
                            let data = data.ok_or_else(|| Error::Restore {
                                pid,
                                msg: format!("pages of {:x} lie beyond their frame", p.addr),
                            })?;
                            stasis_sys::vm::write(pid, p.addr, data).ctx(pid, || {
                                format!("writing {} bytes of memory at {:x}", data.len(), p.addr)
                            })?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        join_all(handles, pid)
    });
    results.into_iter().collect()
}

/// The kernel's special mappings of a layout: (kind, start, end).
pub fn special_areas(mappings: &[Mapping]) -> Vec<(MappingKind, u64, u64)> {
    mappings
        .iter()
        .filter(|m| {
            matches!(
                m.kind,
                MappingKind::Vdso | MappingKind::Vvar | MappingKind::VvarVclock
            )
        })
        .map(|m| (m.kind.clone(), m.start, m.end))
        .collect()
}

/// Puts the kernel's special mappings (`[vvar]`, `[vvar_vclock]`, `[vdso]`) of the
/// restored process, at `current`, where `target` (the image) says: each moved to its
/// saved address (a process may have moved them, together or apart), and those the
/// process had unmapped unmapped. `free_at` is an address with room for the current
/// block that neither layout uses (the moves go through it, so that none overlaps a
/// range still occupied).
pub fn move_vdso(
    inj: &Injector,
    pid: i32,
    current: &[(MappingKind, u64, u64)],
    target: &[(MappingKind, u64, u64)],
    free_at: u64,
) -> Result<()> {
    let mismatch = || {
        Error::Restore {
        pid,
        msg: format!(
            "the vdso of this kernel ({}) differs from the image's ({}); restoring on a different kernel is not supported yet",
            describe(current),
            describe(target)
        ),
    }
    };
    let mut moves = Vec::new();
    for t in target {
        let c = current.iter().find(|c| c.0 == t.0).ok_or_else(mismatch)?;
        if c.2 - c.1 != t.2 - t.1 {
            return Err(mismatch());
        }
        if c.1 != t.1 {
            moves.push((c.1, t.1, t.2 - t.1));
        }
    }
    for c in current
        .iter()
        .filter(|c| !target.iter().any(|t| t.0 == c.0))
    {
        inj.call(
            &format!("munmap of the {:?} the process had unmapped", c.0),
            libc::SYS_munmap,
            &[c.1, c.2 - c.1],
        )?;
    }
    let Some(cbase) = moves.iter().map(|m| m.0).min() else {
        return Ok(());
    };
    let mremap = |from: u64, to: u64, len: u64| -> Result<()> {
        let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
        let got = inj.call(
            &format!("mremap of the vdso block {from:x} -> {to:x}"),
            libc::SYS_mremap,
            &[from, len, len, flags, to],
        )?;
        if got != to {
            return Err(Error::Restore {
                pid,
                msg: format!("vdso moved to {got:x} instead of {to:x}"),
            });
        }
        Ok(())
    };
    for &(c, _, len) in &moves {
        mremap(c, free_at + (c - cbase), len)?;
    }
    for &(c, t, len) in &moves {
        mremap(free_at + (c - cbase), t, len)?;
    }
    Ok(())
}

fn describe(areas: &[(MappingKind, u64, u64)]) -> String {
    areas
        .iter()
        .map(|(k, s, e)| format!("{k:?} {} bytes", e - s))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Finds `len` bytes of address space that overlap none of `used` (sorted or not),
/// above `min`, page aligned, with a guard page on each side.
pub fn find_free(used: &[(u64, u64)], len: u64, min: u64) -> Option<u64> {
    let mut v: Vec<(u64, u64)> = used.to_vec();
    v.sort();
    let limit = 0x7fff_ffff_f000u64;
    let mut candidate = min;
    for (s, e) in v {
        if candidate + len + PAGE_SIZE <= s {
            return Some(candidate);
        }
        candidate = candidate.max(e + PAGE_SIZE);
    }
    (candidate + len <= limit).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space() {
        let used = [(0x10000, 0x20000), (0x22000, 0x30000)];
        assert_eq!(find_free(&used, 0x1000, 0x10000), Some(0x31000));
        assert_eq!(find_free(&used, 0x1000, 0x1000), Some(0x1000));
        assert!(is_zero(&[0u8; 4096]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero(&p));
    }
}
