//! One frozen process's state, in four steps so that the processes of a tree are
//! read at once where they can be: what needs the tracer's own thread (ptrace,
//! injected syscalls) up to the threads ([`read_frozen`], one process after the
//! other); its memory's page tables (dirty pages, pagemap), in a thread of its own
//! per process ([`scan_frozen`]); what the tree shares, then the start of its snapshot
//! fork ([`begin_frozen`], one after the other); and, once every fork of the tree is
//! under way, the rest ([`Begun::end`]): the memory a fork cannot see and the fds.

use crate::error::{Result, SysContext};
use crate::files::{self};
use crate::freeze::Frozen;
use crate::inject::{find_syscall_insn, Injection};
use crate::memory;
use crate::proc::ProcDir;
use crate::snapshot::Snapshot;
use crate::{signals, task, thread};
use memory::part::{FlagsJob, Part, Steps};
use stasis_image::{CheckpointWriter, Process};
use std::time::Instant;

/// How the processes of one checkpoint are dumped: snapshot and dirty tracking.
pub(super) struct Tracking {
    /// Take a copy-on-write snapshot (single process under stasis init, no --kill).
    pub(super) snapshot_ok: bool,
    /// The mapping flags of the job's processes, by pid, read before they were frozen
    /// or remembered from their last checkpoint.
    pub(super) early_flags: std::collections::HashMap<i32, memory::FlagCache>,
    /// The flags are read from the snapshot's smaps once the process runs again
    /// (snapshot without dirty tracking, whose registrations a fork does not show).
    pub(super) late_flags: bool,
    pub(super) incremental: bool,
    /// This process lives on after the checkpoint (stasis init, not `checkpoint
    /// --pid`): dirty tracking it arms is there for the next checkpoint.
    pub(super) keeps_tracking: bool,
    /// The newest checkpoint before this one.
    pub(super) prev_seq: Option<u64>,
    /// The processes whose page runs in it were read (an unreadable or damaged one
    /// is not relied on: everything is read and compared, or stored).
    pub(super) prev_runs: std::collections::HashSet<i32>,
    /// This checkpoint.
    pub(super) seq: u64,
    /// The processes stopped by job control: their parents are asked whether they
    /// have collected the stops.
    pub(super) job_stopped: Vec<i32>,
}

/// What the processes of a checkpoint share, saved once: objects with no name left
/// (shared anonymous memory, memfds, deleted files) and the files they map shared.
pub(super) struct Shared {
    pub(super) objects: crate::shm::Collector,
    pub(super) files: memory::SharedFiles,
}

/// A process's dump up to the start of its snapshot fork ([`begin_frozen`]); the rest
/// is done by [`Begun::end`] once the forks of the whole tree are under way, so that
/// the kernel copies their page tables at once, on every core (the tree's pause is
/// about the longest fork, not their sum).
pub(super) struct Begun {
    /// What was read through ptrace (its layout completed since).
    r: Reading,
    written: Option<Vec<(u64, u64)>>,
    tracked: bool,
    rss: u64,
    frozen_copy: bool,
    /// A snapshot is being forked.
    snapshot_ok: bool,
    frozen_flags: Option<FlagsJob>,
    /// The memory planned and copied while frozen, once done (before the fork, or
    /// after it when the fork has to show what it does not copy).
    memory: Option<FrozenMemory>,
    forking: Option<crate::snapshot::Forking>,
}

/// What of a process's memory is planned and copied while it is frozen.
pub(super) struct FrozenMemory {
    pub(super) plan: Option<memory::Plan>,
    pub(super) hidden_plan: memory::Plan,
    pub(super) hidden_buf: Vec<u8>,
    pub(super) fresh_registrations: bool,
}

/// The pages of a process to copy while it is frozen ([`plan_frozen`]).
pub(super) struct Plans {
    /// Every page (no snapshot).
    pub(super) plan: Option<memory::Plan>,
    /// With a snapshot: the pages it will not show.
    pub(super) hidden_plan: memory::Plan,
}

/// Plans the process's pages: all of them, or with a snapshot only what a fork does
/// not copy, the rest being planned from the snapshot's own pagemap once the process
/// runs again (see Part::write_pages). Reads /proc alone: any thread may run it.
pub(super) fn plan_frozen(
    proc: &ProcDir,
    layout: &[memory::Vma],
    written: Option<&[(u64, u64)]>,
    snapshot_ok: bool,
) -> Result<Plans> {
    Ok(if snapshot_ok {
        Plans {
            plan: None,
            hidden_plan: memory::plan(proc, layout, written, memory::invisible_to_fork)?,
        }
    } else {
        Plans {
            plan: Some(memory::plan(proc, layout, written, |_| true)?),
            hidden_plan: memory::Plan::default(),
        }
    })
}

/// Plans the process's pages ([`plan_frozen`]), then the rest of [`save_frozen`].
#[allow(clippy::too_many_arguments)]
pub(super) fn frozen_memory(
    tracking: &Tracking,
    proc: &ProcDir,
    layout: &mut [memory::Vma],
    injection: &Injection,
    written: Option<&[(u64, u64)]>,
    tracked: bool,
    snapshot_ok: bool,
    steps: &mut Steps,
    shared: &mut Shared,
    writer: &mut CheckpointWriter,
) -> Result<FrozenMemory> {
    let plans = plan_frozen(proc, layout, written, snapshot_ok)?;
    steps.done("pagemap");
    save_frozen(
        tracking, proc, layout, injection, tracked, plans, steps, shared, writer,
    )
}

/// With the pages planned: arms dirty tracking, saves the process's shared mappings
/// and copies the pages a fork does not.
#[allow(clippy::too_many_arguments)]
pub(super) fn save_frozen(
    tracking: &Tracking,
    proc: &ProcDir,
    layout: &mut [memory::Vma],
    injection: &Injection,
    tracked: bool,
    plans: Plans,
    steps: &mut Steps,
    shared: &mut Shared,
    writer: &mut CheckpointWriter,
) -> Result<FrozenMemory> {
    let pid = proc.pid;
    let (inj, scratch) = injection.leader();
    let Plans { plan, hidden_plan } = plans;
    // Only a tracer that lives on (stasis init) keeps the tracking it arms.
    let fresh_registrations = tracking.incremental
        && tracking.keeps_tracking
        && crate::dirty::arm(proc, layout, inj, tracking.seq, tracked)?;
    steps.done("dirty arm");
    memory::save_shared_files(pid, layout, &mut shared.files, writer)?;
    shared
        .objects
        .save_mappings(proc, layout, inj, scratch, writer)?;
    let mut hidden_buf = vec![0u8; hidden_plan.bytes as usize];
    memory::copy_pages(
        pid,
        memory::Source::Process,
        &hidden_plan,
        |_| true,
        &mut hidden_buf,
    )?;
    steps.done("shared and hidden memory");
    Ok(FrozenMemory {
        plan,
        hidden_plan,
        hidden_buf,
        fresh_registrations,
    })
}

/// What [`read_frozen`] read of a frozen process through ptrace and injected
/// syscalls, which only the tracer's own thread may do.
pub(super) struct Reading {
    pid: i32,
    steps: Steps,
    /// A snapshot may be taken (the tracking's, for this process).
    snapshot_ok: bool,
    late_flags: bool,
    /// The layout's flags were known before the freeze (see [`read_frozen`]).
    early_flags: bool,
    layout: Vec<memory::Vma>,
    insn: u64,
    injection: Injection,
    dumpable: u32,
    pub(super) ts: task::TaskState,
    sigs: stasis_image::Signals,
    posix_timers: Vec<stasis_image::PosixTimer>,
    child_waits: Vec<(i32, bool)>,
    threads: Vec<stasis_image::Thread>,
    job_stop: Option<i32>,
}

/// Reads a frozen process's layout, task, signals, timers and threads.
/// `allow_snapshot`: false for a process whose snapshot could be reaped by the job
/// (see the caller).
pub(super) fn read_frozen(
    tracking: &Tracking,
    allow_snapshot: bool,
    proc: &ProcDir,
    frozen: &mut Frozen,
) -> Result<Reading> {
    let pid = proc.pid;
    let mut steps = Steps::new();
    let snapshot_ok = tracking.snapshot_ok && allow_snapshot;
    let late_flags = tracking.late_flags && allow_snapshot;
    task::check_supported(proc)?;
    // Flags known before the freeze (read then, or remembered from the last
    // checkpoint) spare reading smaps while frozen (10-15 ms per GiB); they are
    // checked against the snapshot's, or read again while a frozen copy runs, so only
    // where one of the two will be.
    let (mut layout, early_flags) = if late_flags {
        (memory::read_layout_unflagged(proc)?, false)
    } else if snapshot_ok {
        let known = match tracking.early_flags.get(&pid) {
            Some(flags) => Some(std::borrow::Cow::Borrowed(flags)),
            None => memory::remembered(pid).map(std::borrow::Cow::Owned),
        };
        memory::read_layout(proc, known.as_deref())?
    } else {
        memory::read_layout(proc, None)?
    };
    let insn = find_syscall_insn(pid, &memory::exec_ranges(&layout))?;
    let injection = Injection::prepare(frozen, &layout, insn)?;
    let (inj, scratch) = injection.leader();
    // Zombies that the snapshots of its children left it (see `Snapshot::take`).
    crate::snapshot::reap_left(inj)?;
    steps.done("layout");
    let dumpable = task::make_readable(inj)?;
    let sigs = signals::dump(inj, pid, scratch)?;
    let mut ts = task::dump(proc, inj, scratch, dumpable)?;
    ts.settings.mlockall = memory::read_locks(proc, inj, &mut layout)?;
    let posix_timers = crate::timers::dump(proc, inj, scratch)?;
    let stopped_children: Vec<i32> = proc
        .children()?
        .into_iter()
        .filter(|c| tracking.job_stopped.contains(c))
        .collect();
    let child_waits = crate::jobctl::probe_waited(inj, scratch, &stopped_children)?;
    let threads = thread::dump_all(proc, &frozen.threads, &injection.slots(thread::DUMP_SLOT))?;
    steps.done("threads and task");
    Ok(Reading {
        pid,
        steps,
        snapshot_ok,
        late_flags,
        early_flags,
        layout,
        insn,
        injection,
        dumpable,
        ts,
        sigs,
        posix_timers,
        child_waits,
        threads,
        job_stop: frozen.job_stop,
    })
}

impl Reading {
    /// What [`scan_frozen`] needs, to run in a thread of its own.
    pub(super) fn scan_input(&self) -> ScanInput {
        ScanInput {
            layout: self.layout.clone(),
            snapshot_ok: self.snapshot_ok,
            late_flags: self.late_flags,
        }
    }
}

pub(super) struct ScanInput {
    layout: Vec<memory::Vma>,
    snapshot_ok: bool,
    late_flags: bool,
}

/// What [`scan_frozen`] found in a frozen process's page tables.
pub(super) struct Scan {
    written: Option<Vec<(u64, u64)>>,
    rss: u64,
    frozen_copy: bool,
    snapshot_ok: bool,
    /// None where the snapshot is forked first (see Tracking::late_flags).
    plans: Option<Plans>,
    took: [(&'static str, std::time::Duration); 2],
}

/// The pages written since the last checkpoint (dirty tracking), whether to copy
/// them while frozen or fork a snapshot, and the plan of the pages to copy while
/// frozen. /proc reads alone (no ptrace): the processes of a tree are scanned at
/// once, each in a thread.
pub(super) fn scan_frozen(tracking: &Tracking, proc: &ProcDir, input: ScanInput) -> Result<Scan> {
    let pid = proc.pid;
    let t0 = Instant::now();
    // With tracking armed at the previous checkpoint, pages not written since are
    // not even read; then (re)arm it for the next one.
    // Only where the previous checkpoint's page runs could be read: pages not
    // written since are referred to there, not read again.
    let written = match (tracking.incremental, tracking.prev_seq) {
        (true, Some(prev)) if tracking.prev_runs.contains(&pid) => {
            crate::dirty::written(proc, &input.layout, prev)
        }
        _ => None,
    };
    // When few pages were written since the last checkpoint, copying them while the
    // process stays frozen pauses it no longer than forking a snapshot would, and
    // the checkpoint is done sooner (no fork, no writer threads, nothing read back).
    let rss = if input.snapshot_ok {
        resident_bytes(proc)
    } else {
        0
    };
    let frozen_copy = input.snapshot_ok
        && written.as_deref().is_some_and(|w| {
            let dirty = w.iter().map(|(a, b)| b - a).sum();
            !crate::snapshot::worth_taking(pid, rss, dirty)
        });
    let snapshot_ok = input.snapshot_ok && !frozen_copy;
    let t1 = Instant::now();
    // Without flags (see Tracking::late_flags), the snapshot is forked first: what a
    // fork does not copy is seen on it (in `Begun::end`).
    let plans = if snapshot_ok && input.late_flags {
        None
    } else {
        Some(plan_frozen(
            proc,
            &input.layout,
            written.as_deref(),
            snapshot_ok,
        )?)
    };
    Ok(Scan {
        written,
        rss,
        frozen_copy,
        snapshot_ok,
        plans,
        took: [("dirty scan", t1 - t0), ("pagemap", t1.elapsed())],
    })
}

/// Saves what the process shares with others and copies what its snapshot will not
/// show, then starts the snapshot fork (see [`Begun`]).
pub(super) fn begin_frozen(
    mut r: Reading,
    scan: Scan,
    tracking: &Tracking,
    proc: &ProcDir,
    shared: &mut Shared,
    writer: &mut CheckpointWriter,
) -> Result<Begun> {
    let Scan {
        written,
        rss,
        frozen_copy,
        snapshot_ok,
        plans,
        took,
    } = scan;
    r.steps.steps.extend(took);
    // Its own steps from here (the time since its reading went to the others').
    r.steps.last = Instant::now();
    let tracked = written.is_some();
    // A frozen copy reads the exact flags while it copies (the layout's were read
    // before the freeze or remembered, and there is no snapshot to check them on).
    let frozen_flags = (frozen_copy && r.early_flags).then(|| {
        let proc = proc.clone();
        std::thread::spawn(move || memory::read_flags(&proc).map(Some))
    });
    let memory = match plans {
        None => None,
        Some(plans) => Some(save_frozen(
            tracking,
            proc,
            &mut r.layout,
            &r.injection,
            tracked,
            plans,
            &mut r.steps,
            shared,
            writer,
        )?),
    };
    let forking = if snapshot_ok {
        stasis_sys::fault::step("taking the snapshot")?;
        let (inj, scratch) = r.injection.leader();
        Some(Snapshot::start(inj, scratch)?)
    } else {
        None
    };
    Ok(Begun {
        r,
        written,
        tracked,
        rss,
        frozen_copy,
        snapshot_ok,
        frozen_flags,
        memory,
        forking,
    })
}

impl Begun {
    /// Waits for the snapshot fork, then reads the rest of the process's state (its
    /// descriptors) while it is still frozen.
    pub(super) fn end(
        mut self,
        tracking: &Tracking,
        proc: &ProcDir,
        stdio: &files::StdioIds,
        registry: &mut files::Registry,
        shared: &mut Shared,
        writer: &mut CheckpointWriter,
    ) -> Result<Part> {
        let pid = self.r.pid;
        let mut snapshot = None;
        let mut snapshot_us = 0;
        if let Some(forking) = self.forking.take() {
            let t_wait = Instant::now();
            let took = forking.elapsed();
            snapshot = Some(forking.finish()?);
            snapshot_us = (took + t_wait.elapsed()).as_micros() as u64;
            self.r.steps.done("snapshot");
        }
        let memory = match self.memory.take() {
            Some(m) => m,
            None => {
                if let Some(snap) = &snapshot {
                    memory::mark_invisible(proc, &ProcDir::new(snap.pid), &mut self.r.layout)?;
                }
                frozen_memory(
                    tracking,
                    proc,
                    &mut self.r.layout,
                    &self.r.injection,
                    self.written.as_deref(),
                    self.tracked,
                    self.snapshot_ok,
                    &mut self.r.steps,
                    shared,
                    writer,
                )?
            }
        };
        if snapshot.is_some() {
            crate::snapshot::note_fork(pid, self.rss, snapshot_us * 1000);
        }
        let fds = registry.dump_fds(proc, stdio, &mut shared.objects, writer)?;
        self.r.steps.done("fds");
        // Its /proc files are not read any more (pages of a process without a snapshot
        // are copied with process_vm_readv).
        let mem = if self.r.dumpable == 0 && snapshot.is_none() {
            Some(
                std::fs::File::open(proc.file("mem"))
                    .ctx(pid, || "opening /proc/PID/mem".into())?,
            )
        } else {
            None
        };
        let (inj, _) = self.r.injection.leader();
        task::restore_readable(inj, self.r.dumpable)?;
        self.r.injection.finish()?;
        tracing::debug!("process {pid} frozen: {}", self.r.steps.report());
        let ts = self.r.ts;
        Ok(Part {
            process: Process {
                pid,
                ppid: ts.ppid,
                pgid: ts.pgid,
                sid: ts.sid,
                ctty: None,
                comm: ts.comm,
                exe: ts.exe,
                cwd: ts.cwd,
                cwd_removed: ts.cwd_removed,
                umask: ts.umask,
                personality: ts.personality,
                rlimits: ts.rlimits,
                mm: ts.mm,
                mappings: Vec::new(),
                pages: Default::default(),
                page_hashes: None,
                runs_file: None,
                fds,
                fd_table_of: None,
                signals: self.r.sigs,
                itimers: ts.itimers,
                posix_timers: self.r.posix_timers,
                settings: ts.settings,
                job_stop: self.r.job_stop.map(|signal| stasis_image::JobStop {
                    signal,
                    waited: true,
                }),
                threads: self.r.threads,
                locks: registry.locks.take(pid),
                creds: Some(crate::creds::dump(pid)?),
            },
            layout: self.r.layout,
            plan: memory.plan.unwrap_or_default(),
            plan_later: self.snapshot_ok,
            written: self.written,
            hidden_plan: memory.hidden_plan,
            hidden_index: Vec::new(),
            hidden_buf: memory.hidden_buf,
            snapshot,
            snapshot_us,
            tracked: self.tracked,
            early_flags: self.r.early_flags,
            late_flags: self.r.late_flags && self.snapshot_ok,
            exact_flags: !self.r.early_flags && !self.r.late_flags,
            frozen_copy: self.frozen_copy,
            mem,
            frozen_flags: self.frozen_flags,
            fresh_registrations: memory.fresh_registrations,
            insn: self.r.insn,
            child_waits: self.r.child_waits,
        })
    }
}

/// Resident anonymous memory of a process, bytes (`/proc/PID/statm`: resident less
/// shared); 0 when unreadable.
pub(super) fn resident_bytes(proc: &ProcDir) -> u64 {
    let Ok(statm) = std::fs::read_to_string(proc.file("statm")) else {
        return 0;
    };
    let f: Vec<u64> = statm
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    match (f.get(1), f.get(2)) {
        (Some(res), Some(shared)) => res.saturating_sub(*shared) * stasis_image::PAGE_SIZE,
        _ => 0,
    }
}
