//! The snapshot's own page writes: the runs planned into `pwritev(2)` jobs, the
//! snapshot given a descriptor table of its own with the part files and one writer
//! thread per core, the jobs run by injection, and their progress published to the
//! readers that check the pages.

use super::Snapshot;
use crate::error::{Error, Result, SysContext};
use crate::inject::Injector;
use crate::memory::{Plan, PlannedRun};
use stasis_image::PAGE_SIZE;
use stasis_sys::clone::{clone_args_bytes, CLONE_ARGS_SIZE};
use stasis_sys::ptrace;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Most iovecs of one injected pwritev (IOV_MAX).
const MAX_IOVECS: usize = 1024;
/// Most bytes of one injected pwritev: small enough to spread the work evenly and
/// for the readers checking the pages to follow closely.
const MAX_JOB: u64 = 16 << 20;
/// Bytes of snapshot memory per writer thread for its iovec array.
const IOV_AREA: u64 = (MAX_IOVECS * 16) as u64;
/// How long the snapshot's writers may go without finishing a write (of at most
/// `MAX_JOB` bytes) before the checkpoint gives up.
const WRITE_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// One pwritev: a contiguous range of one part file, from these memory ranges.
struct Job {
    part: usize,
    /// Offset in the part file.
    at: u64,
    iov: Vec<(u64, u64)>,
    /// Bytes left to write (the sum of the iovec lengths).
    len: u64,
}

impl Job {
    /// Drops the first `n` bytes (written by a short write).
    fn advance(&mut self, mut n: u64) {
        self.at += n;
        self.len -= n.min(self.len);
        while n > 0 && !self.iov.is_empty() {
            let first = &mut self.iov[0];
            if n >= first.1 {
                n -= first.1;
                self.iov.remove(0);
            } else {
                first.0 += n;
                first.1 -= n;
                n = 0;
            }
        }
    }
}

/// The part files the snapshot writes into: (path, open file) in logical order.
pub struct PartFiles<'a> {
    pub files: Vec<(PathBuf, &'a std::fs::File)>,
    /// Logical bytes per part.
    pub size: u64,
}

impl Snapshot {
    /// Plans the writes of the runs selected by `want` (see [`Snapshot::write`]);
    /// marks in `chosen` (by index in the plan) the runs it will write.
    pub fn plan_writes(
        plan: &Plan,
        part_size: u64,
        want: impl Fn(usize, &PlannedRun) -> bool,
        chosen: &mut [bool],
    ) -> Writes {
        Writes(plan_jobs(plan, part_size, &want, chosen))
    }

    /// Writes the planned runs into the part files from inside the snapshot (see the
    /// module documentation), with `insn` the address of a `syscall` instruction,
    /// publishing in `progress` how far each part is written; `ready` is called once
    /// the writers are set up (the snapshot's memory map no longer changes: slow
    /// readers of it, such as smaps, may start without delaying them). Returns false
    /// when the
    /// snapshot cannot write them (e.g. it cannot open the files): the caller then
    /// empties the parts ([`PartFiles::empty`]) and copies the pages itself. Writing
    /// errors (a full disk) are errors. Either way, nothing of the snapshot's writes
    /// any more once it returns.
    pub fn write(
        &mut self,
        insn: u64,
        writes: Writes,
        parts: &PartFiles,
        progress: &WriteProgress,
        ready: impl FnOnce(),
    ) -> Result<bool> {
        let jobs = writes.0;
        progress.start(&jobs);
        if jobs.is_empty() {
            return Ok(true);
        }
        let threads = stasis_image::store::workers()
            .min(jobs.len())
            .min(parts.files.len());
        let t0 = std::time::Instant::now();
        let pid = self.pid;
        let attempt = move || -> Result<bool> {
            let Some((fds, area)) = self.prepare(insn, parts, threads)? else {
                return Ok(false);
            };
            ready();
            let mut writers = vec![Injector::new(self.pid, insn)?];
            for tid in &self.threads {
                writers.push(Injector::new(*tid, insn)?);
            }
            let (t1, njobs) = (std::time::Instant::now(), jobs.len());
            self.run_jobs(jobs, &writers, &fds, area, parts, progress)?;
            tracing::debug!(
                "snapshot {}: {} writer threads ready in {:?}, {njobs} pwritev in {:?}",
                self.pid,
                writers.len(),
                t1 - t0,
                t1.elapsed()
            );
            Ok(true)
        };
        match attempt() {
            Ok(true) => Ok(true),
            Ok(false) => Ok(false),
            // The disk (full, failing) or the snapshot itself gone: copying from
            // outside cannot do better.
            // Nor can it when a write hangs (and the writer may still be in it).
            Err(e)
                if is_disk_error(&e)
                    || matches!(
                        e,
                        Error::Gone { .. } | Error::Timeout { .. } | Error::Fault(_)
                    ) =>
            {
                Err(e)
            }
            // Anything else (a kernel without close_range, a seccomp filter the
            // snapshot inherited...): the pages are copied from outside instead.
            Err(e) => {
                tracing::debug!(
                    "snapshot {pid}: cannot write its own pages ({e}); copying from outside"
                );
                Ok(false)
            }
        }
    }

    /// Gives the snapshot a descriptor table of its own holding the part files, and
    /// `threads - 1` more threads. Returns the descriptors and the iovec area, or None
    /// (after logging why) when the snapshot cannot open the files as we see them.
    fn prepare(
        &mut self,
        insn: u64,
        parts: &PartFiles,
        threads: usize,
    ) -> Result<Option<(Vec<u64>, u64)>> {
        let pid = self.pid;
        let inj = Injector::new(pid, insn)?;
        inj.call(
            "close_range(CLOSE_RANGE_UNSHARE)",
            libc::SYS_close_range,
            &[0, u64::from(u32::MAX), libc::CLOSE_RANGE_UNSHARE as u64],
        )?;
        let len = (threads as u64 * IOV_AREA).max(PAGE_SIZE);
        let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let area = inj.call(
            "mmap of the iovec area",
            libc::SYS_mmap,
            &[0, len, prot, flags, u64::MAX, 0],
        )?;
        let mut fds = Vec::with_capacity(parts.files.len());
        for (path, file) in &parts.files {
            let mut name = path.as_os_str().as_encoded_bytes().to_vec();
            name.push(0);
            if name.len() as u64 > len {
                tracing::debug!("snapshot {pid}: page file path too long; copying from outside");
                return Ok(None);
            }
            stasis_sys::vm::write(pid, area, &name).ctx(pid, || "writing a path".into())?;
            let r = inj.raw(
                libc::SYS_openat,
                &[
                    libc::AT_FDCWD as u64,
                    area,
                    (libc::O_WRONLY | libc::O_CLOEXEC) as u64,
                ],
            )?;
            if r < 0 {
                tracing::debug!(
                    "snapshot {pid}: cannot open {} (errno {}); copying from outside",
                    path.display(),
                    -r
                );
                return Ok(None);
            }
            // The path might name another file in the process's mount namespace.
            let theirs = std::fs::metadata(format!("/proc/{pid}/fd/{r}"));
            let ours = file.metadata();
            match (theirs, ours) {
                (Ok(t), Ok(o)) if t.dev() == o.dev() && t.ino() == o.ino() => {}
                _ => {
                    tracing::debug!(
                        "snapshot {pid}: {} is another file in its namespace; copying from outside",
                        path.display()
                    );
                    return Ok(None);
                }
            }
            fds.push(r as u64);
        }
        let flags = crate::thread::THREAD_FLAGS;
        stasis_sys::vm::write(pid, area, &clone_args_bytes(flags, 0, 0))
            .ctx(pid, || "writing clone3 arguments".into())?;
        ptrace::set_options(pid, ptrace::O_TRACESYSGOOD | ptrace::O_TRACECLONE)
            .ctx(pid, || "tracing the snapshot's threads".into())?;
        // Every thread there is clones one more at once: the count doubles each round.
        let mut all = vec![pid];
        'grow: while all.len() < threads {
            let n = (threads - all.len()).min(all.len());
            let parents: Vec<Injector> = all[..n]
                .iter()
                .map(|&t| Injector::new(t, insn))
                .collect::<Result<_>>()?;
            for p in &parents {
                p.start(libc::SYS_clone3, &[area, CLONE_ARGS_SIZE])?;
            }
            let mut born = Vec::with_capacity(n);
            let mut refused = false;
            for p in &parents {
                let r = p.finish()?;
                if r < 0 {
                    // Fewer writer threads only make it slower.
                    tracing::debug!("snapshot {pid}: clone3 of a writer thread: errno {}", -r);
                    refused = true;
                } else {
                    born.push(r as i32);
                }
            }
            for tid in born {
                self.threads.push(tid);
                all.push(tid);
                crate::thread::wait_created(tid)?;
            }
            if refused {
                break 'grow;
            }
        }
        Ok(Some((fds, area)))
    }

    /// Runs the jobs on the writer threads, each taking the next job as it finishes.
    /// A part has one writer at a time: writers of one file serialize on its lock.
    fn run_jobs(
        &self,
        jobs: Vec<Job>,
        writers: &[Injector],
        fds: &[u64],
        area: u64,
        parts: &PartFiles,
        progress: &WriteProgress,
    ) -> Result<()> {
        let pid = self.pid;
        let mut queues: Vec<std::collections::VecDeque<Job>> =
            (0..parts.files.len()).map(|_| Default::default()).collect();
        for j in jobs {
            if let Some(q) = queues.get_mut(j.part) {
                q.push_back(j);
            }
        }
        let mut writing = vec![false; queues.len()];
        let mut busy: Vec<Option<Job>> = (0..writers.len()).map(|_| None).collect();
        // Where the search for a part to write starts, so that parts are spread.
        let mut next_part = 0usize;
        let mut last_progress = std::time::Instant::now();
        loop {
            let mut progressed = false;
            let mut failure = None;
            for (w, slot) in busy.iter_mut().enumerate() {
                if let Some(job) = slot {
                    let Some(r) = writers[w].poll()? else {
                        continue;
                    };
                    progressed = true;
                    if r <= 0 {
                        let source = if r < 0 {
                            std::io::Error::from_raw_os_error(-r as i32)
                        } else {
                            std::io::ErrorKind::WriteZero.into()
                        };
                        let path = parts.files.get(job.part).map(|f| f.0.display());
                        failure = Some((
                            w,
                            Error::Io {
                                pid,
                                context: format!(
                                    "writing pages into {}",
                                    path.map(|p| p.to_string()).unwrap_or_default()
                                ),
                                source,
                            },
                        ));
                        break;
                    }
                    job.advance(r as u64);
                    if let Some(j) = slot.take() {
                        let part = j.part;
                        writing[part] = false;
                        // After a short write, the rest goes again.
                        if !j.iov.is_empty() {
                            queues[part].push_front(j);
                        }
                        // Everything before the part's next job is written.
                        let next = queues[part].front().map_or(u64::MAX, |n| n.at);
                        progress.advance(part, next);
                    }
                }
                if slot.is_none() {
                    let n = queues.len();
                    let pick = (0..n)
                        .map(|k| (next_part + k) % n)
                        .find(|&k| !writing[k] && !queues[k].is_empty());
                    if let Some(job) = pick.and_then(|k| queues[k].pop_front()) {
                        next_part = (job.part + 1) % n;
                        let iov_at = area + w as u64 * IOV_AREA;
                        let mut buf = Vec::with_capacity(job.iov.len() * 16);
                        for (a, l) in &job.iov {
                            buf.extend_from_slice(&a.to_le_bytes());
                            buf.extend_from_slice(&l.to_le_bytes());
                        }
                        stasis_sys::vm::write(pid, iov_at, &buf)
                            .ctx(pid, || "writing an iovec array".into())?;
                        writers[w].start(
                            libc::SYS_pwritev,
                            &[fds[job.part], iov_at, job.iov.len() as u64, job.at, 0],
                        )?;
                        writing[job.part] = true;
                        *slot = Some(job);
                        progressed = true;
                    }
                }
            }
            if let Some((failed, e)) = failure {
                // The other writers finish what they are doing first: nothing of ours
                // may still write into the parts once we return.
                let others: Vec<usize> = (0..busy.len())
                    .filter(|&o| o != failed && busy[o].is_some())
                    .collect();
                drain(writers, &others);
                return Err(e);
            }
            if busy.iter().all(Option::is_none) && queues.iter().all(|q| q.is_empty()) {
                return Ok(());
            }
            if progressed {
                last_progress = std::time::Instant::now();
            } else if last_progress.elapsed() > WRITE_STALL_TIMEOUT {
                let stuck: Vec<usize> = (0..busy.len()).filter(|&w| busy[w].is_some()).collect();
                let state = stuck
                    .first()
                    .map(|&w| crate::proc::thread_state(writers[w].tid()))
                    .unwrap_or_default();
                drain(writers, &stuck);
                return Err(Error::Timeout {
                    pid,
                    what: format!(
                        "the snapshot's page writes made no progress for {} s ({state}); is the file system of the checkpoint directory hung?",
                        WRITE_STALL_TIMEOUT.as_secs()
                    ),
                });
            } else {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }
    }
}

/// The page writes a snapshot is to make (see [`Snapshot::plan_writes`]).
pub struct Writes(Vec<Job>);

/// How far a snapshot has written each part: readers that check what it wrote
/// follow it closely instead of waiting for the end.
pub struct WriteProgress {
    /// Per part: the offset below which every write of the snapshot is done.
    marks: Vec<std::sync::atomic::AtomicU64>,
    failed: std::sync::atomic::AtomicBool,
}

impl WriteProgress {
    /// For `parts` parts, nothing written yet.
    pub fn new(parts: usize) -> WriteProgress {
        WriteProgress {
            marks: (0..parts)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Before the first write: each part is done up to its first job.
    fn start(&self, jobs: &[Job]) {
        for (k, m) in self.marks.iter().enumerate() {
            let first = jobs.iter().find(|j| j.part == k).map_or(u64::MAX, |j| j.at);
            m.store(first, std::sync::atomic::Ordering::Release);
        }
    }

    fn advance(&self, part: usize, to: u64) {
        if let Some(m) = self.marks.get(part) {
            m.store(to, std::sync::atomic::Ordering::Release);
        }
    }

    /// The snapshot will write nothing more: failed (readers give up) or done.
    pub fn end(&self, ok: bool) {
        if !ok {
            self.failed
                .store(true, std::sync::atomic::Ordering::Release);
        }
        for m in &self.marks {
            m.store(u64::MAX, std::sync::atomic::Ordering::Release);
        }
    }

    /// Waits until part `part` is written up to offset `upto`; false when the
    /// snapshot failed (what it wrote does not count).
    pub fn wait(&self, part: usize, upto: u64) -> bool {
        use std::sync::atomic::Ordering;
        let Some(m) = self.marks.get(part) else {
            return false;
        };
        loop {
            if self.failed.load(Ordering::Acquire) {
                return false;
            }
            if m.load(Ordering::Acquire) >= upto {
                return !self.failed.load(Ordering::Acquire);
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }
}

impl PartFiles<'_> {
    /// Empties the parts (keeping their size) after a snapshot failed to write them:
    /// pages copied from outside leave holes where nothing is stored, and the
    /// checksums count on them.
    pub fn empty(&self, pid: i32) -> Result<()> {
        for (path, f) in &self.files {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            f.set_len(0)
                .and_then(|()| f.set_len(len))
                .map_err(|e| Error::Io {
                    pid,
                    context: format!("emptying {}", path.display()),
                    source: e,
                })?;
        }
        Ok(())
    }
}

/// Waits for the syscalls running on the `busy` writers to finish (results ignored;
/// at most about ten seconds each).
fn drain(writers: &[Injector], busy: &[usize]) {
    for &w in busy {
        for _ in 0..100_000 {
            match writers[w].poll() {
                Ok(None) => std::thread::sleep(std::time::Duration::from_micros(100)),
                _ => break,
            }
        }
    }
}

/// An error of the file system under the image (not of the snapshot's way of writing).
fn is_disk_error(e: &Error) -> bool {
    let errno = match e {
        Error::Io { source, .. } => source.raw_os_error(),
        Error::Image(stasis_image::ImageError::Io { source, .. }) => source.raw_os_error(),
        _ => None,
    };
    matches!(
        errno,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EIO | libc::EFBIG | libc::EROFS)
    )
}

/// Splits the runs selected by `want` into pwritev jobs (marking them in `chosen`):
/// each a contiguous range of one part file.
fn plan_jobs(
    plan: &Plan,
    part_size: u64,
    want: &impl Fn(usize, &PlannedRun) -> bool,
    chosen: &mut [bool],
) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    for (i, r) in plan.runs.iter().enumerate() {
        if !want(i, r) {
            continue;
        }
        chosen[i] = true;
        let (mut off, end) = (r.offset, r.offset + r.npages * PAGE_SIZE);
        while off < end {
            let part = (off / part_size) as usize;
            let local = off - part as u64 * part_size;
            let n = (end - off).min(part_size - local);
            let addr = r.addr + (off - r.offset);
            match jobs.last_mut() {
                Some(j)
                    if j.part == part
                        && j.at + j.len == local
                        && j.iov.len() < MAX_IOVECS
                        && j.len + n <= MAX_JOB =>
                {
                    j.iov.push((addr, n));
                    j.len += n;
                }
                _ => jobs.push(Job {
                    part,
                    at: local,
                    iov: vec![(addr, n)],
                    len: n,
                }),
            }
            off += n;
        }
    }
    jobs
}
