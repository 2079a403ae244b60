//! Page planning: which pages of each mapping are saved, and where in the page file.
//!
//! While the process is frozen, `/proc/PID/pagemap` (or the PAGEMAP_SCAN ioctl where
//! the kernel has it) says which pages exist: populated anonymous pages and the
//! copied-on-write pages of private file mappings are planned as runs of consecutive
//! pages; pages never touched are neither read nor stored. With write tracking,
//! pages not written since the previous checkpoint are planned as clean; without
//! it, [`PrevPages`] holds the previous checkpoint's pages (and their hashes) so
//! that unchanged pages are found by content.

use super::layout::*;
use super::pages::*;
use crate::error::{Result, SysContext};
use crate::proc::ProcDir;
use stasis_image::{MappingKind, PageRun, PAGE_SIZE};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;

/// Pagemap entry bits.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
/// Pages copied per process_vm_readv call (and per planned run).
pub(super) const BATCH_PAGES: u64 = 1024;

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
        let file_backed = matches!(
            map.kind,
            MappingKind::File { .. } | MappingKind::SharedMemory { .. }
        );
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
        let file_backed = matches!(
            map.kind,
            MappingKind::File { .. } | MappingKind::SharedMemory { .. }
        );
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

/// True when the machine has swap space (SwapTotal in /proc/meminfo is not 0).
pub(super) fn has_swap() -> bool {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("SwapTotal:"))
                .map(|v| v.trim().trim_end_matches("kB").trim() != "0")
        })
        .unwrap_or(true)
}
