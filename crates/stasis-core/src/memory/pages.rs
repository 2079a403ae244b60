//! Page writing at dump time: copying the planned pages out of the process and into
//! the page file.
//!
//! [`copy_pages`] copies runs with `process_vm_readv` (from the frozen process or its
//! copy-on-write snapshot) while the process is frozen; [`write_pages`] writes every
//! planned page into the page file's parts, one worker thread per part, plain or
//! compressed, leaving all-zero pages as holes and checksumming chunks as it goes;
//! [`finish_pages`] turns the plan and what became of each page into the mappings'
//! saved page runs (pages unchanged since the previous checkpoint refer to it).

use super::layout::*;
use super::plan::*;
use crate::error::{Error, Result, SysContext};
use stasis_image::{Compression, Mapping, PageRun, PAGE_SIZE};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;

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
pub(super) fn share_out<T>(items: Vec<T>, weight: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
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
pub(super) fn join_all<T>(
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

pub(super) fn is_zero(page: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: reinterpreting initialized bytes as u64 words is valid for any bit
        // pattern; align_to handles the unaligned head and tail.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}
