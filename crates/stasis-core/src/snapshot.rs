//! The copy-on-write snapshot a running process is checkpointed from, and the
//! one-copy page writer that runs inside it.
//!
//! The snapshot is a child forked by an injected `clone3(CLONE_FILES)` while the
//! process is frozen, stopped before its first instruction: its memory is the
//! process's memory at that instant, shared copy-on-write, so the process resumes at
//! once and runs on while its pages are saved. Every process of a tree under stasis
//! init gets one, all forked while the tree is frozen, so the tree is paused only for
//! the forks. For a process whose parent is us (the init), CLONE_PARENT makes the
//! snapshot our child; for the others (whose parent is in the job) the snapshot is the
//! process's own child with exit signal 0, which its wait(2) never sees and no SIGCHLD
//! announces, reaped by us as its tracer and, as a zombie, by an injected wait4 in
//! the process at its next checkpoint. CLONE_FILES adds no reference to any open file
//! (a pipe's reader still sees EOF when the writer closes).
//!
//! Reading a snapshot from outside costs two copies per page: /proc/PID/mem copies
//! through a kernel bounce page, and process_vm_readv would pin the pages, which makes
//! the kernel copy a page shared copy-on-write first. So the snapshot writes its own
//! pages: it gets a descriptor table of its own (`close_range(CLOSE_RANGE_UNSHARE)`,
//! which leaves the application's untouched), opens the checkpoint's page files, grows
//! one thread per core (injected `clone3(CLONE_VM | CLONE_THREAD ...)`), and each thread
//! runs injected `pwritev(2)` calls straight from the snapshot's memory into the page
//! cache of the files: one copy, on every core, each thread into its own file (writers
//! of one tmpfs file serialize on its inode lock). No code of ours runs in it: every
//! instruction it executes is a `syscall`.

use crate::error::{Error, Result, SysContext};
use crate::inject::{Injector, Scratch};
use crate::memory::{Plan, PlannedRun};
use stasis_image::PAGE_SIZE;
use stasis_sys::clone::{clone_args_bytes, CLONE_ARGS_SIZE};
use stasis_sys::ptrace;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// What a snapshot and a copy while frozen cost, learnt per process from its
/// checkpoints (see [`worth_taking`]).
#[derive(Debug, Clone, Copy)]
struct Costs {
    /// Nanoseconds the fork takes per MiB of the process's resident memory.
    fork_ns_per_mib: f64,
    /// Nanoseconds a copy while frozen takes per MiB copied.
    copy_ns_per_mib: f64,
}

impl Default for Costs {
    fn default() -> Costs {
        // Measured on the machines stasis is developed on: a fork copies page tables
        // at 10-20 ms per GiB; copying pages into tmpfs while frozen runs at about
        // 0.5 GB/s per core (page allocation bound), up to 8 cores.
        let cores = stasis_image::store::workers().clamp(1, 8) as f64;
        Costs {
            fork_ns_per_mib: 20_000.0,
            copy_ns_per_mib: 2_000_000.0 / cores,
        }
    }
}

static COSTS: std::sync::Mutex<std::collections::BTreeMap<i32, Costs>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Extra pause a copy while frozen may cost over a snapshot fork: the snapshot's
/// writer threads, read-back and flag check cost far more time after the pause.
const FROZEN_COPY_SLACK_NS: f64 = 2e6;

/// Whether forking a snapshot of process `pid` (`rss` bytes resident) pauses it for
/// clearly less time than copying the `dirty` bytes written since the last
/// checkpoint while it stays frozen. A copy while frozen needs no fork, no writer
/// threads and nothing read back, so it is the faster checkpoint overall; it is
/// chosen when it pauses the process at most 2 ms longer than the fork would.
pub fn worth_taking(pid: i32, rss: u64, dirty: u64) -> bool {
    let c = COSTS
        .lock()
        .ok()
        .and_then(|m| m.get(&pid).copied())
        .unwrap_or_default();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let fork = mib(rss) * c.fork_ns_per_mib;
    let copy = mib(dirty) * c.copy_ns_per_mib;
    tracing::debug!(
        "process {pid}: snapshot fork ~{:.1} ms, copy while frozen ~{:.1} ms",
        fork / 1e6,
        copy / 1e6
    );
    copy > fork + FROZEN_COPY_SLACK_NS
}

/// Records how long a snapshot fork of `pid` took (`rss` bytes resident).
pub fn note_fork(pid: i32, rss: u64, ns: u64) {
    if rss >= 64 << 20 {
        update(pid, |c| c.fork_ns_per_mib = ns as f64 / (rss >> 20) as f64);
    }
}

/// Records how long copying `bytes` of `pid` while frozen took.
pub fn note_frozen_copy(pid: i32, bytes: u64, ns: u64) {
    if bytes >= 4 << 20 {
        update(pid, |c| {
            c.copy_ns_per_mib = ns as f64 / (bytes >> 20) as f64
        });
    }
}

/// Forgets what was learnt about `pid`.
pub fn forget_costs(pid: i32) {
    if let Ok(mut m) = COSTS.lock() {
        m.remove(&pid);
    }
}

fn update(pid: i32, f: impl FnOnce(&mut Costs)) {
    if let Ok(mut m) = COSTS.lock() {
        f(m.entry(pid).or_default());
    }
}

/// A copy-on-write snapshot of one process (see the module documentation).
pub struct Snapshot {
    pub pid: i32,
    /// Threads created in it to write pages (besides `pid` itself).
    threads: Vec<i32>,
    /// Its parent when not us (the process it is a snapshot of, in a tree): it has
    /// to reap it (see [`reap_left`]).
    foster: Option<i32>,
}

/// A snapshot fork under way in a frozen process (see [`Snapshot::start`]). Dropped
/// before [`Forking::finish`] (a checkpoint failing meanwhile), it waits for the fork
/// and kills the snapshot.
pub struct Forking {
    /// The injector of the thread forking.
    inj: Injector,
    foster: Option<i32>,
    started: std::time::Instant,
    /// The clone3 has not been collected yet.
    pending: bool,
}

impl Forking {
    /// Waits for the fork to end; the snapshot, traced and stopped before its first
    /// instruction.
    pub fn finish(mut self) -> Result<Snapshot> {
        self.pending = false;
        let leader = self.inj.tid();
        let r = self.inj.finish();
        ptrace::set_options(leader, ptrace::O_TRACESYSGOOD)
            .ctx(leader, || "resetting ptrace options".into())?;
        let pid = self.inj.check("clone3 (copy-on-write snapshot)", r?)? as i32;
        if let Ok(mut ours) = SNAPSHOTS.lock() {
            ours.insert(pid);
        }
        let snap = Snapshot {
            pid,
            threads: Vec::new(),
            foster: self.foster,
        };
        crate::thread::wait_created(pid)?;
        ptrace::set_options(pid, ptrace::O_TRACESYSGOOD | ptrace::O_EXITKILL)
            .ctx(pid, || "tracing the snapshot".into())?;
        Ok(snap)
    }

    /// How long since the fork started.
    pub fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}

impl Drop for Forking {
    fn drop(&mut self) {
        if !self.pending {
            return;
        }
        let leader = self.inj.tid();
        let r = self.inj.finish();
        let _ = ptrace::set_options(leader, ptrace::O_TRACESYSGOOD);
        if let Ok(pid) = r {
            if pid > 0 {
                if let Ok(mut ours) = SNAPSHOTS.lock() {
                    ours.insert(pid as i32);
                }
                // Killed and reaped (it is traced by us from its creation on).
                drop(Snapshot {
                    pid: pid as i32,
                    threads: Vec::new(),
                    foster: self.foster,
                });
            }
        }
    }
}

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
    /// Forks the snapshot of a frozen process through the injector of one of its
    /// threads (the copy is of that thread), with `scratch` for the arguments.
    ///
    /// The snapshot is traced with PTRACE_O_EXITKILL as soon as it exists: should we
    /// die, it dies too instead of running on as a copy of the application. (It is only
    /// ever taken by stasis init, as the application's parent: the init's death ends
    /// the whole job anyway.)
    ///
    /// A process of a tree whose parent is a process of the job gets a snapshot that
    /// is its own child, with exit signal 0: its wait(2) does not see it (only
    /// `__WALL` waits do) and no SIGCHLD tells it; once dead and reaped by us as its
    /// tracer it stays a zombie of that process, reaped by an injected wait4 at its
    /// next checkpoint ([`reap_left`]) or by us if it exits.
    pub fn take(inj: &Injector, scratch: &Scratch) -> Result<Snapshot> {
        Snapshot::start(inj, scratch)?.finish()
    }

    /// Starts forking the snapshot (see [`Snapshot::take`]) and returns while the
    /// kernel copies the page tables: the forks of several processes of a tree run at
    /// once, on every core. Nothing else may be injected into the process until
    /// [`Forking::finish`].
    pub fn start(inj: &Injector, scratch: &Scratch) -> Result<Forking> {
        let leader = inj.tid();
        let parent = procfs::process::Process::new(leader)
            .and_then(|p| p.stat())
            .map(|st| st.ppid)
            .map_err(std::io::Error::other)
            .ctx(leader, || "reading /proc/PID/stat".into())?;
        // SAFETY: getpid has no preconditions.
        let ours = parent == unsafe { libc::getpid() };
        // CLONE_PARENT gives the child its parent's exit signal (SIGCHLD), whatever
        // clone_args says: only where the parent is us. Otherwise the snapshot is the
        // process's own child, with exit signal 0.
        let foster = (!ours).then_some(leader);
        let flags = if ours {
            (libc::CLONE_PARENT | libc::CLONE_FILES) as u64
        } else {
            libc::CLONE_FILES as u64
        };
        scratch.write(&clone_args_bytes(flags, 0, 0))?;
        ptrace::set_options(leader, ptrace::O_TRACESYSGOOD | ptrace::O_TRACECLONE)
            .ctx(leader, || "tracing the snapshot fork".into())?;
        let started = inj.start(libc::SYS_clone3, &[scratch.addr, CLONE_ARGS_SIZE]);
        let forking = Forking {
            inj: inj.clone(),
            foster,
            started: std::time::Instant::now(),
            pending: started.is_ok(),
        };
        started?;
        Ok(forking)
    }

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

impl Snapshot {
    /// Kills it (all its threads) without waiting for it to be gone; dropping it
    /// reaps it.
    pub fn kill(&self) {
        // SAFETY: killing the snapshot child we created.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.kill();
        // Reaping its threads, then itself (we trace them all and are its parent; a
        // traced leader is reported only once its other threads are reaped).
        let deadline = std::time::Instant::now() + crate::freeze::EXIT_TIMEOUT;
        let left = self
            .threads
            .iter()
            .chain([&self.pid])
            .filter(|&&t| !crate::freeze::reap_thread(t, deadline))
            .count();
        if left > 0 {
            // Still ours to reap (stasis init's loop does, and forgets it then): not
            // to be taken for an orphan of the job meanwhile.
            tracing::warn!(
                "snapshot {} did not exit within {} s ({})",
                self.pid,
                crate::freeze::EXIT_TIMEOUT.as_secs(),
                crate::proc::thread_state(self.pid)
            );
            return;
        }
        forget_reaped(self.pid);
        if let Some(parent) = self.foster {
            // A zombie of the job's process `parent` now.
            if let Ok(mut left) = LEFT.lock() {
                left.insert(self.pid, parent);
            }
        }
    }
}

/// Snapshots of tree processes, dead and reaped by us as their tracer, left as
/// zombies of their parent in the job: snapshot -> parent.
static LEFT: std::sync::Mutex<std::collections::BTreeMap<i32, i32>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// In the frozen process `inj` runs in: reaps the zombies our snapshots left as its
/// children (an injected `wait4(pid, WNOHANG | __WALL)` each).
pub fn reap_left(inj: &Injector) -> Result<()> {
    let pid = inj.tid();
    let mine: Vec<i32> = LEFT
        .lock()
        .map(|l| l.iter().filter(|e| *e.1 == pid).map(|e| *e.0).collect())
        .unwrap_or_default();
    for s in mine {
        let r = inj.raw(
            libc::SYS_wait4,
            &[s as u64, 0, (libc::WNOHANG | libc::__WALL) as u64, 0],
        )?;
        // ECHILD: not its child any more (reaped by us after its parent died).
        if r == s as i64 || r == -(libc::ECHILD as i64) {
            if let Ok(mut left) = LEFT.lock() {
                left.remove(&s);
            }
        }
    }
    Ok(())
}

/// Whether snapshot `pid` has died (it is a zombie, ours to reap, or gone).
pub fn is_dead(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .is_none_or(|state| matches!(state, 'Z' | 'X'))
}

/// `pid` was reaped: if it was one of our snapshots, it is no longer.
pub fn forget_reaped(pid: i32) {
    if let Ok(mut ours) = SNAPSHOTS.lock() {
        ours.remove(&pid);
    }
}

/// A left snapshot zombie reaped by us (its parent in the job exited).
pub fn forget_left(pid: i32) {
    if let Ok(mut left) = LEFT.lock() {
        left.remove(&pid);
    }
}

/// The snapshots not reaped yet (a dying one takes a while to tear down, and is our
/// child like the job's orphans).
static SNAPSHOTS: std::sync::Mutex<std::collections::BTreeSet<i32>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Whether `pid` is one of our snapshots (not part of any job).
pub fn is_snapshot(pid: i32) -> bool {
    SNAPSHOTS.lock().is_ok_and(|s| s.contains(&pid))
        || LEFT.lock().is_ok_and(|l| l.contains_key(&pid))
}
