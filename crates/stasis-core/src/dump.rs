//! Checkpoint orchestration: freeze, read every kind of state, write the image, resume
//! (or kill) the process, publish the checkpoint.
//!
//! The process is frozen (ptrace-stopped) while its state and memory are read. With
//! `kill`, it stays frozen until the checkpoint is safely on disk and is then killed, so
//! it never runs past the saved state; otherwise it resumes as soon as everything is
//! read, and the image is synced and published while it runs. Any failure leaves the
//! process running as before and the previous checkpoint as the newest.

use crate::error::{Error, Result, SysContext};
use crate::files::{self, StdioIds};
use crate::freeze::Frozen;
use crate::inject::{find_syscall_insn, Injection};
use crate::memory;
use crate::proc::ProcDir;
use crate::snapshot::{PartFiles, Snapshot, WriteProgress};
use crate::{signals, task, thread};
use stasis_image::{
    store, Checkpoint, CheckpointWriter, Compression, DirLock, Origin, PageFiles, Process, Timings,
    Zombie,
};
use stasis_sys::arch;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What to do and how.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// Kill the process once the checkpoint is on disk.
    pub kill: bool,
    /// How the process was started.
    pub origin: Origin,
    /// Identities of the stdio streams that came from outside stasis; None: use the
    /// process's own fds 0-2 (for `--pid`).
    pub stdio: Option<StdioIds>,
    /// Checkpoints to keep in the directory (older ones are removed after success).
    pub keep: usize,
    /// Store only the pages changed since the newest checkpoint in the directory
    /// (found by content hash), referring to it for the rest.
    pub incremental: bool,
    /// How page files are compressed.
    pub compress: Compression,
    /// The job has an IPC namespace of its own (under stasis run): its System V
    /// objects are saved with it.
    pub own_ipc_namespace: bool,
    /// The job has a network namespace of its own (`stasis run --network private`): its
    /// TCP connections are saved exactly (TCP_REPAIR) and restored in a new one.
    pub own_network_namespace: bool,
    /// What to do with a TCP connection to a peer outside the checkpoint.
    pub tcp_external: crate::sockets::TcpExternal,
    /// Standard streams of the job's processes that are regular files reopened from a
    /// `--pid` image (see `files::stdio_ids_of`): kept marked as such.
    pub stdio_files: files::StdioIds,
    /// The job has a private /tmp and /dev/shm (`stasis run --tmp private`): their
    /// content is saved with it (the caller sees them: the job's init).
    pub private_tmp: bool,
    /// The supervising init's side of the application interface: connections to it
    /// are saved as such (None: none is, as under `checkpoint --pid`).
    pub app_api: Option<crate::sockets::ApiPeers>,
    /// Faults injected for a test (see `stasis_sys::fault`); None: this process's
    /// environment says.
    pub fault: Option<stasis_sys::fault::Plan>,
    /// A checkpoint of one node's part of a multi-node job (see [`Barrier`]): the
    /// part stays frozen until every node has written its own, and is written into the
    /// directory the barrier names.
    pub barrier: Option<std::sync::Arc<dyn Barrier>>,
}

/// The two points where a checkpoint of one node's part of a multi-node job waits for
/// the other nodes (through the agent that speaks for the node to the coordinator):
/// nothing of the job anywhere is saved before every part is frozen, and no part runs
/// again (or is killed) before every part is written.
pub trait Barrier: std::fmt::Debug + Send + Sync {
    /// The part is frozen. Returns the directory to write it into (created if
    /// needed); an error abandons the checkpoint and the part runs on.
    fn frozen(&self) -> Result<PathBuf>;
    /// The part is written into `path` and synced. Returns whether to kill it (else
    /// it runs on); an error abandons the checkpoint and the part runs on.
    fn written(&self, path: &Path) -> Result<bool>;
}

/// How long a checkpoint waits for one in progress in the same directory.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Result of a successful checkpoint.
#[derive(Debug, Clone)]
pub struct DumpReport {
    pub path: PathBuf,
    pub sequence: u64,
    pub timings: Timings,
    /// Whether the process was killed after the checkpoint.
    pub killed: bool,
}

/// Checkpoints process `pid` and all its descendants into the checkpoint directory
/// `dir`. `pid` is as seen in this process's PID namespace and /proc.
pub fn checkpoint(dir: &Path, pid: i32, opts: &DumpOptions) -> Result<DumpReport> {
    stasis_sys::fault::begin(opts.fault.clone());
    let r = checkpoint_with_retries(dir, pid, opts);
    stasis_sys::fault::end();
    r
}

fn checkpoint_with_retries(dir: &Path, pid: i32, opts: &DumpOptions) -> Result<DumpReport> {
    // A node's part of a multi-node job is written where its barrier says (the
    // directory it was restarted from, part of a global checkpoint, is not touched).
    if opts.barrier.is_some() {
        crate::freeze::settle();
        return checkpoint_locked(None, dir, pid, opts);
    }
    // Checkpoints of one directory are taken one after the other: one asked for while
    // another is still being written waits for it (a stuck one for at most LOCK_WAIT).
    let lock = DirLock::acquire_waiting(dir, LOCK_WAIT, || {
        tracing::info!(
            "waiting for the checkpoint in progress in {}",
            dir.display()
        )
    })?;
    // Threads an earlier attempt could not resume (they had not stopped in time)
    // are resumed now if they have stopped since.
    crate::freeze::settle();
    // A passing state (events queued in an inotify instance) is waited out: the job runs on a moment
    // between attempts.
    let mut attempt = 0;
    loop {
        let r = checkpoint_locked(Some(&lock), dir, pid, opts);
        if r.is_err() {
            // The flags remembered from the last checkpoint may be what went wrong.
            memory::forget_flags(pid);
        }
        match r {
            Err(Error::Transient { pid, what }) if attempt < 50 => {
                tracing::debug!("process {pid}: {what}; retrying");
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            // A short-lived process of the tree (a compiler under make) exiting at
            // the wrong moment is not the job ending: the checkpoint starts over.
            Err(Error::Gone { pid: gone }) if gone != pid && attempt < 50 => {
                tracing::debug!("process {gone} exited during the checkpoint; retrying");
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// `lock`: that of `dir`, None for a node's part of a multi-node job (see
/// [`Barrier`]), written elsewhere.
fn checkpoint_locked(
    lock: Option<&DirLock>,
    dir: &Path,
    pid: i32,
    opts: &DumpOptions,
) -> Result<DumpReport> {
    let t_start = Instant::now();
    let Job {
        root,
        me,
        parent_is_us,
        roots,
    } = Job::find(pid)?;
    // Read before the freeze: the previous checkpoint's page runs (an incremental
    // checkpoint refers to them), and the mapping flags where they are needed early.
    let prev_seq = match lock {
        Some(_) => store::list_checkpoints(dir)?.last().map(|c| c.0),
        None => None,
    };
    let mut prev = if opts.incremental {
        previous_pages(dir, prev_seq)
    } else {
        HashMap::new()
    };
    // Without dirty tracking the flags are read from the snapshot, exactly, and not
    // at all before the freeze.
    let late_flags = !opts.incremental && !crate::dirty::is_tracked(pid);
    let early_flags = if parent_is_us && roots.len() == 1 && !late_flags {
        flags_before_freeze(&root, opts)?
    } else {
        None
    };
    let t0 = Instant::now();
    let (mut tree, zombies) = freeze_tree(&roots, parent_is_us.then_some(me))?;
    let freeze_us = t0.elapsed().as_micros() as u64;
    // A node's part of a multi-node job waits for every other part to be frozen; it
    // is then written where the coordinator says, into a directory of its own.
    let (target_lock, target);
    let (lock, dir) = match (&opts.barrier, lock) {
        (None, Some(lock)) => (lock, dir),
        (None, None) => {
            return Err(Error::Abandoned {
                why: "internal: a checkpoint without its directory's lock".into(),
            })
        }
        (Some(b), _) => {
            target = b.frozen()?;
            std::fs::create_dir_all(&target).map_err(|e| Error::Io {
                pid,
                context: format!("creating {}", target.display()),
                source: e,
            })?;
            target_lock = DirLock::acquire(&target)?;
            (&target_lock, target.as_path())
        }
    };
    let hold = opts.barrier.is_some();

    let mut writer = CheckpointWriter::begin(lock)?;
    let (stdio, stdio_files) = match &opts.stdio {
        Some(ids) => (ids.clone(), opts.stdio_files.clone()),
        None => files::stdio_ids_of(&root),
    };
    // Bytes stuck in a TCP sender's queue are moved through our memory only where our
    // death ends the job anyway (stasis init), never by `checkpoint --pid`.
    let mut registry = files::Registry::new(
        tree.iter().map(|(p, _)| p.pid).collect(),
        opts.tcp_external,
        opts.own_network_namespace,
        opts.origin != Origin::Attached,
    );
    registry.stdio_files = stdio_files;
    registry.zombies = zombies.iter().map(|z| z.pid).collect();
    registry.sockets.set_app_api(opts.app_api.clone());
    let mut shm = crate::shm::Collector::new();
    // Under stasis init (whose death ends the job, so no snapshot outlives a dying
    // tracer), every process gets a snapshot child (CLONE_PARENT: the process's
    // parent's; see `Snapshot::take` for the ones whose parent is in the job), and the
    // tree runs on as soon as all are forked. With --kill a single process too: it
    // then stays frozen while its snapshot writes (one copy, on every core), until it
    // is killed; a tree to be killed is copied while frozen. `checkpoint --pid` copies
    // while frozen.
    // A part of a multi-node job stays frozen until every part is written: no
    // snapshot would shorten its pause.
    let snapshot_ok = parent_is_us && (tree.len() == 1 || !opts.kill) && !hold;
    let mut parts = Vec::with_capacity(tree.len());
    let tracking = Tracking {
        snapshot_ok,
        early_flags: early_flags.filter(|_| snapshot_ok),
        late_flags: snapshot_ok && late_flags,
        incremental: opts.incremental,
        keeps_tracking: opts.origin != Origin::Attached,
        prev_seq,
        prev_runs: prev.keys().copied().collect(),
        seq: writer.sequence(),
        job_stopped: tree
            .iter()
            .filter(|(_, f)| f.job_stop.is_some())
            .map(|(p, _)| p.pid)
            .collect(),
    };
    // A snapshot left as a zombie of its process is reparented, with SIGCHLD, to the
    // nearest child subreaper when that process exits: one in the job would reap a
    // child it never made. Below a subreaper of the job, processes are copied while
    // frozen (and so is the whole tree: see `all_snapshotted`).
    let mut below_subreaper: std::collections::HashSet<i32> = Default::default();
    // Each process is read up to the start of its snapshot fork, then (once every
    // fork is under way) the rest: the forks run at once (see `Begun`).
    let mut begun = Vec::with_capacity(tree.len());
    for (proc, frozen) in tree.iter_mut() {
        stasis_sys::fault::step("reading a frozen process")?;
        let allow = !below_subreaper.contains(&proc.pid);
        let b = dump_frozen(&tracking, allow, proc, frozen, &mut shm, &mut writer)?;
        if b.ts.settings.child_subreaper || !allow {
            below_subreaper.extend(job_children(proc)?);
        }
        begun.push(b);
    }
    for (b, (proc, _)) in begun.into_iter().zip(tree.iter()) {
        parts.push(b.end(
            &tracking,
            proc,
            &stdio,
            &mut registry,
            &mut shm,
            &mut writer,
        )?);
    }
    files::mark_shared_tables(parts.iter_mut().map(|p| &mut p.process))?;
    let waited: HashMap<i32, bool> = parts
        .iter()
        .flat_map(|p| p.child_waits.iter().copied())
        .collect();
    for part in &mut parts {
        if let Some(js) = part.process.job_stop.as_mut() {
            js.waited = waited.get(&part.process.pid).copied().unwrap_or(true);
        }
    }
    registry.sockets.end_repair();
    // File locks held through no fd of the job, read while everything is frozen.
    for (pid, lock) in registry.locks.check()? {
        if let Some(part) = parts.iter_mut().find(|p| p.process.pid == pid) {
            part.process.locks.push(lock);
        }
    }
    // System V objects, read while everything is frozen.
    let sysv = sysv_of(opts, &parts, &mut writer)?;
    // The job's private /tmp and /dev/shm, read while everything is frozen.
    let private_dirs = if opts.private_tmp {
        crate::tmpdirs::save(&mut writer)?
    } else {
        Vec::new()
    };
    // The job runs on before its pages are copied only when every process has its
    // snapshot; one copied from the process itself keeps the tree frozen.
    let snapshotted = parts.iter().all(|p| p.snapshot.is_some());
    if snapshotted && !opts.kill {
        for (_, f) in tree.iter_mut() {
            f.release()?;
        }
    }
    let dump_us = t0.elapsed().as_micros() as u64 - freeze_us;

    let t1 = Instant::now();
    let mut processes = Vec::with_capacity(parts.len());
    let mut pages_bytes = 0;
    let t_prev = Instant::now();
    for part in parts.iter().filter(|p| !p.tracked) {
        // Pages not tracked are compared by content with the previous checkpoint's.
        if let Some(p) = prev.get_mut(&part.process.pid) {
            load_hashes(dir, part.process.pid, p);
        }
    }
    tracing::debug!(
        "previous checkpoint's page hashes read in {:?}",
        t_prev.elapsed()
    );
    let snapshot_us = parts.iter().map(|p| p.snapshot_us).sum();
    let mut dead_snapshots = Vec::new();
    let mut one_copy = false;
    let mut copied = Vec::with_capacity(parts.len());
    for part in parts {
        let prev_pages = prev.get(&part.process.pid);
        copied.push(part.write_pages(&mut writer, prev_pages, opts.compress)?);
    }
    // Each process's terminal state, while still frozen.
    let terminals: Vec<(i32, procfs::process::Stat)> = tree
        .iter()
        .filter_map(|(proc, _)| read_stat(proc).ok().map(|st| (proc.pid, st)))
        .collect();
    // Every page is copied: the processes may run on (unless they are to die, or
    // wait for the other nodes' parts).
    if !opts.kill && !hold {
        for (_, f) in tree.iter_mut() {
            f.release()?;
        }
    }
    let pause_end = Instant::now();
    let frozen_copy = copied.iter().any(|c| c.frozen_copy);
    let mut depends_on = Vec::new();
    for c in copied {
        let prev_pages = prev.get(&c.process.pid);
        let f = c.finish(&mut writer, prev_pages)?;
        dead_snapshots.extend(f.snapshot);
        pages_bytes += f.bytes;
        one_copy |= f.one_copy;
        depends_on.extend(f.sources);
        processes.push(f.process);
    }
    depends_on.sort_unstable();
    depends_on.dedup();
    let copy_us = t1.elapsed().as_micros() as u64;
    let (pause_us, copy_us) = if snapshotted && !opts.kill {
        (dump_us, copy_us)
    } else {
        let frozen_copy = (pause_end - t1).as_micros() as u64;
        (dump_us + frozen_copy, copy_us - frozen_copy)
    };

    let t2 = Instant::now();
    stasis_sys::fault::step("writing the metadata")?;
    let shared_memory = shm.finish(&mut writer)?;
    let files::Found {
        pipes,
        unix: sockets,
        inet: inet_sockets,
        mut ptys,
    } = registry.finish(&mut writer)?;
    mark_controlling_terminals(&terminals, &mut ptys, &mut processes)?;
    let mut meta = Checkpoint {
        sequence: writer.sequence(),
        arch: arch::ARCH_NAME.to_string(),
        kernel: kernel_release(),
        page_size: stasis_image::PAGE_SIZE,
        origin: opts.origin,
        root_pid: pid,
        processes,
        depends_on,
        zombies,
        pipes,
        sockets,
        inet_sockets,
        private_network: opts.own_network_namespace,
        private_dirs,
        ptys,
        sysv,
        shared_memory,
        timings: Timings {
            freeze_us,
            dump_us: pause_us,
            sync_us: 0,
            copy_us,
            snapshot: snapshotted,
            pages_bytes,
            snapshot_us,
            one_copy,
            frozen_copy,
        },
    };
    meta.timings.sync_us = t2.elapsed().as_micros() as u64;
    let sequence = meta.sequence;
    let t3 = Instant::now();
    let path = writer.commit(&meta)?;
    tracing::debug!(
        "checkpoint {sequence}: {:.1} ms in all (frozen after {:.1} ms), {:.1} ms to publish",
        t_start.elapsed().as_secs_f64() * 1e3,
        (t0 - t_start).as_secs_f64() * 1e3,
        t3.elapsed().as_secs_f64() * 1e3
    );
    if !dead_snapshots.is_empty() {
        // Reaped aside: a large address space takes a while to tear down, and the
        // checkpoint is complete.
        std::thread::spawn(move || drop(dead_snapshots));
    }
    let kill = match &opts.barrier {
        None => opts.kill,
        Some(b) => match b.written(&path) {
            Ok(kill) => kill,
            Err(e) => {
                // Abandoned: the other parts run on, and so does this one (the
                // coordinator removes what was written).
                for (_, f) in tree.iter_mut() {
                    f.release()?;
                }
                return Err(e);
            }
        },
    };
    if hold && !kill {
        for (_, f) in tree.iter_mut() {
            f.release()?;
        }
    }
    if kill {
        // Their TCP connections end with a reset, not a FIN: nothing of the job waits
        // out TIME_WAIT on the ports a restart binds again.
        crate::sockets::inet::abort_on_close(&meta);
        // Children first, all at once; then each is reaped (bounded: the checkpoint is
        // published, a process slow to exit only earns a warning). The tracer that is
        // also the root's parent (stasis init) reaps the root in its own loop.
        for (_, f) in tree.iter_mut().rev() {
            f.kill();
        }
        let deadline = Instant::now() + crate::freeze::EXIT_TIMEOUT;
        for (proc, f) in tree.iter_mut().rev() {
            if let Err(e) = f.reap(proc.pid != pid || !parent_is_us, deadline) {
                tracing::warn!("checkpoint {} written, but {e}", path.display());
            }
            crate::dirty::forget(proc.pid);
            crate::snapshot::forget_costs(proc.pid);
        }
    }
    if hold {
        // One checkpoint per directory: the coordinator keeps the global ones.
    } else if let Err(e) = store::prune(lock, opts.keep) {
        tracing::warn!(
            "checkpoint {} written, but removing old checkpoints failed: {e}",
            path.display()
        );
    }
    Ok(DumpReport {
        path,
        sequence,
        timings: meta.timings,
        killed: kill,
    })
}

/// The processes a checkpoint of `pid` is about.
struct Job {
    root: ProcDir,
    /// This process (the stasis init, when it started the job).
    me: i32,
    /// The root is our child: we are the init of its PID namespace.
    parent_is_us: bool,
    /// The root and, under the init, the orphans it adopted (part of the job).
    roots: Vec<i32>,
}

impl Job {
    fn find(pid: i32) -> Result<Job> {
        let root = ProcDir::new(pid);
        if !root.path.exists() {
            return Err(Error::Attach {
                pid,
                msg: "no such process".into(),
            });
        }
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        let parent_is_us = root
            .process()
            .ok()
            .and_then(|p| p.stat().ok())
            .is_some_and(|s| s.ppid == me);
        let mut roots = vec![pid];
        if parent_is_us {
            roots.extend(orphans_of(me)?.into_iter().filter(|&c| c != pid));
        }
        Ok(Job {
            root,
            me,
            parent_is_us,
            roots,
        })
    }
}

/// The mapping flags of a process that will be snapshotted with dirty tracking
/// (whose registrations a fork does not show): remembered from its last checkpoint
/// while its mappings keep their bounds, else read from smaps now, before the freeze
/// (slow); they are checked on the snapshot. Arms the tracking first for a first
/// `--incremental` checkpoint (not for a process about to be killed).
fn flags_before_freeze(root: &ProcDir, opts: &DumpOptions) -> Result<Option<memory::FlagCache>> {
    if opts.incremental && !opts.kill {
        crate::dirty::prearm(root)?;
    }
    Ok(memory::remembered_flags(root).or_else(|| memory::read_flags(root).ok()))
}

/// System V objects of the job's own IPC namespace; outside one, a process
/// attached to a segment is refused.
fn sysv_of(
    opts: &DumpOptions,
    parts: &[Part],
    writer: &mut CheckpointWriter,
) -> Result<stasis_image::Sysv> {
    if opts.own_ipc_namespace {
        return crate::sysv::dump(writer);
    }
    let sysv_user = parts.iter().find(|p| {
        p.layout
            .iter()
            .any(|v| matches!(v.map.kind, stasis_image::MappingKind::SysvShm { .. }))
    });
    if let Some(p) = sysv_user {
        return Err(Error::Unsupported {
            pid: p.process.pid,
            what: "System V shared memory outside a job started by stasis run (its IPC namespace is not the job's own)".into(),
        });
    }
    Ok(stasis_image::Sysv::default())
}

/// Records which pseudo-terminal of the job is each process's controlling terminal,
/// and each such terminal's session and foreground group, from the processes' stat
/// (`terminals`, read while frozen). A process whose controlling terminal is one of the
/// job's but whose session leader is not in the job is refused: only a session leader
/// can make a terminal its controlling one again, and the others inherit it from it.
fn mark_controlling_terminals(
    terminals: &[(i32, procfs::process::Stat)],
    ptys: &mut [stasis_image::Pty],
    processes: &mut [Process],
) -> Result<()> {
    for (pid, st) in terminals {
        let pid = *pid;
        if st.tty_nr == 0 {
            continue;
        }
        let dev = st.tty_nr as u64;
        let Some(t) = ptys.iter_mut().find(|p| crate::tty::slave_dev(p.id) == dev) else {
            continue;
        };
        if !terminals.iter().any(|(q, _)| *q == st.session) {
            return Err(Error::Unsupported {
                pid,
                what: format!(
                    "its controlling terminal, pseudo-terminal {} of the job, whose session leader ({}) is not in the job",
                    t.id, st.session
                ),
            });
        }
        if st.session == pid {
            t.session = pid;
            t.foreground = st.tpgid;
        }
        if let Some(p) = processes.iter_mut().find(|p| p.pid == pid) {
            p.ctty = Some(t.id);
        }
    }
    Ok(())
}

/// The frozen processes of a tree, parents first.
type FrozenTree = Vec<(ProcDir, Frozen)>;

/// Freezes the `roots` (the first is the application) and all their descendants,
/// parents before children, until no process of the tree is left running (a process
/// forking while we freeze is caught by the next round). Children that already
/// exited but were not reaped, or exit while being stopped, are zombies.
fn freeze_tree(roots: &[i32], adopter: Option<i32>) -> Result<(FrozenTree, Vec<Zombie>)> {
    let root = roots[0];
    let mut tree: FrozenTree = Vec::new();
    let mut zombies = Vec::new();
    let mut known = std::collections::HashSet::new();
    let mut queue: std::collections::VecDeque<i32> = roots.iter().copied().collect();
    loop {
        while let Some(p) = queue.pop_front() {
            if !known.insert(p) {
                continue;
            }
            let proc = ProcDir::new(p);
            let stat = match read_stat(&proc) {
                Ok(s) => s,
                Err(_) if p != root => continue, // exited meanwhile
                Err(e) => return Err(e),
            };
            if stat.state == 'Z' {
                if p == root {
                    return Err(Error::Gone { pid: p });
                }
                zombies.push(zombie(p, &stat));
                continue;
            }
            let frozen = match Frozen::freeze(&proc) {
                Ok(f) => f,
                Err(e @ (Error::Gone { .. } | Error::Attach { .. })) if p != root => {
                    // It exited while being stopped (its parent is already frozen, so
                    // it stays a zombie until restart) or is gone altogether.
                    match exited_state(&proc) {
                        Some(Some(stat)) => zombies.push(zombie(p, &stat)),
                        Some(None) => {}
                        None => return Err(e),
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            queue.extend(job_children(&proc)?);
            tree.push((proc, frozen));
        }
        // Everything known is stopped now; children forked meanwhile are caught here.
        for (proc, _) in &tree {
            queue.extend(
                job_children(proc)?
                    .into_iter()
                    .filter(|c| !known.contains(c)),
            );
        }
        // The children of a process that exited while we froze are reparented to
        // the namespace init (us): they belong to the job as well.
        if let Some(me) = adopter {
            let orphans = orphans_of(me)?;
            queue.extend(orphans.into_iter().filter(|c| !known.contains(c)));
        }
        if queue.is_empty() {
            return Ok((tree, zombies));
        }
    }
}

/// The children of a process of the job, not counting our snapshots (alive, or
/// zombies left to it).
fn job_children(proc: &ProcDir) -> Result<Vec<i32>> {
    let mut kids = proc.children()?;
    kids.retain(|&c| !crate::snapshot::is_snapshot(c));
    Ok(kids)
}

/// The children of the namespace init `me` (the application and the orphans it
/// adopted), not counting snapshots of earlier checkpoints still being torn down.
fn orphans_of(me: i32) -> Result<Vec<i32>> {
    let mut kids = ProcDir::new(me).children()?;
    kids.retain(|&c| !crate::snapshot::is_snapshot(c));
    Ok(kids)
}

fn read_stat(proc: &ProcDir) -> Result<procfs::process::Stat> {
    let p = proc.pid;
    proc.process().and_then(|pr| {
        pr.stat()
            .map_err(std::io::Error::other)
            .ctx(p, || "reading /proc/PID/stat".into())
    })
}

fn zombie(pid: i32, stat: &procfs::process::Stat) -> Zombie {
    Zombie {
        pid,
        ppid: stat.ppid,
        pgid: stat.pgrp,
        sid: stat.session,
        status: stat.exit_code.unwrap_or(0),
    }
}

/// After a process failed to freeze: `Some(Some(stat))` if it is a zombie now,
/// `Some(None)` if it is gone, `None` if it still lives (the failure was real). An
/// exiting process takes a moment to become a zombie; that moment is waited out.
fn exited_state(proc: &ProcDir) -> Option<Option<procfs::process::Stat>> {
    for _ in 0..100 {
        match read_stat(proc) {
            Err(_) => return Some(None),
            Ok(s) if s.state == 'Z' => return Some(Some(s)),
            Ok(s) if s.state == 'X' => return Some(None),
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
    None
}

/// One process's state, read while frozen; its pages are written by `write_pages`.
struct Part {
    process: Process,
    layout: Vec<memory::Vma>,
    plan: memory::Plan,
    /// The plan (but for `hidden_plan`) is made from the snapshot's pagemap.
    plan_later: bool,
    /// Pages written since the previous checkpoint (dirty tracking), if known.
    written: Option<Vec<(u64, u64)>>,
    hidden_plan: memory::Plan,
    hidden_index: Vec<usize>,
    hidden_buf: Vec<u8>,
    snapshot: Option<Snapshot>,
    /// Time taken to fork the snapshot.
    snapshot_us: u64,
    /// The plan knows which pages were written since the previous checkpoint.
    tracked: bool,
    /// The layout's flags were read before the freeze (to be checked on the snapshot,
    /// or on the process once it runs again).
    early_flags: bool,
    /// The layout has no flags yet: they come from the snapshot's smaps.
    late_flags: bool,
    /// The process's flags, read while its pages are copied while frozen.
    frozen_flags: Option<FlagsJob>,
    /// A snapshot could have been taken, but the pages written since the previous
    /// checkpoint were copied while frozen (see `snapshot::worth_taking`).
    frozen_copy: bool,
    /// /proc/PID/mem of a process that is not dumpable, opened while it was made
    /// dumpable for the checkpoint (its pages are copied afterwards).
    mem: Option<std::fs::File>,
    /// Dirty tracking registered mappings the layout's flags do not show as such.
    fresh_registrations: bool,
    /// A `syscall` instruction of the process (and of its snapshot).
    insn: u64,
    /// Its children stopped by job control, and whether it has collected their stops.
    child_waits: Vec<(i32, bool)>,
}

/// How the processes of one checkpoint are dumped: snapshot and dirty tracking.
struct Tracking {
    /// Take a copy-on-write snapshot (single process under stasis init, no --kill).
    snapshot_ok: bool,
    /// The mapping flags of the (single) process, read before it was frozen.
    early_flags: Option<memory::FlagCache>,
    /// The flags are read from the snapshot's smaps once the process runs again
    /// (snapshot without dirty tracking, whose registrations a fork does not show).
    late_flags: bool,
    incremental: bool,
    /// This process lives on after the checkpoint (stasis init, not `checkpoint
    /// --pid`): dirty tracking it arms is there for the next checkpoint.
    keeps_tracking: bool,
    /// The newest checkpoint before this one.
    prev_seq: Option<u64>,
    /// The processes whose page runs in it were read (an unreadable or damaged one
    /// is not relied on: everything is read and compared, or stored).
    prev_runs: std::collections::HashSet<i32>,
    /// This checkpoint.
    seq: u64,
    /// The processes stopped by job control: their parents are asked whether they
    /// have collected the stops.
    job_stopped: Vec<i32>,
}

/// A process's dump up to the start of its snapshot fork ([`dump_frozen`]); the rest
/// is done by [`Begun::end`] once the forks of the whole tree are under way, so that
/// the kernel copies their page tables at once, on every core (the tree's pause is
/// about the longest fork, not their sum).
struct Begun {
    pid: i32,
    steps: Steps,
    late_flags: bool,
    layout: Vec<memory::Vma>,
    insn: u64,
    injection: Injection,
    dumpable: u32,
    ts: task::TaskState,
    sigs: stasis_image::Signals,
    posix_timers: Vec<stasis_image::PosixTimer>,
    child_waits: Vec<(i32, bool)>,
    threads: Vec<stasis_image::Thread>,
    job_stop: Option<i32>,
    written: Option<Vec<(u64, u64)>>,
    tracked: bool,
    rss: u64,
    frozen_copy: bool,
    snapshot_ok: bool,
    frozen_flags: Option<FlagsJob>,
    /// The memory planned and copied while frozen, once done (before the fork, or
    /// after it when the fork has to show what it does not copy).
    memory: Option<FrozenMemory>,
    forking: Option<crate::snapshot::Forking>,
    early_flags: bool,
}

/// What of a process's memory is planned and copied while it is frozen.
struct FrozenMemory {
    plan: Option<memory::Plan>,
    hidden_plan: memory::Plan,
    hidden_buf: Vec<u8>,
    fresh_registrations: bool,
}

/// Plans the process's pages (all of them, or with a snapshot only what a fork does
/// not copy, the rest being planned from the snapshot's own pagemap once the process
/// runs again: see Part::write_pages), arms dirty tracking, saves its shared
/// mappings and copies the pages a fork does not.
#[allow(clippy::too_many_arguments)]
fn frozen_memory(
    tracking: &Tracking,
    proc: &ProcDir,
    layout: &mut [memory::Vma],
    injection: &Injection,
    written: Option<&[(u64, u64)]>,
    tracked: bool,
    snapshot_ok: bool,
    steps: &mut Steps,
    shm: &mut crate::shm::Collector,
    writer: &mut CheckpointWriter,
) -> Result<FrozenMemory> {
    let pid = proc.pid;
    let (inj, scratch) = injection.leader();
    let (plan, hidden_plan) = if snapshot_ok {
        let hidden = memory::plan(proc, layout, written, memory::invisible_to_fork)?;
        (None, hidden)
    } else {
        let all = memory::plan(proc, layout, written, |_| true)?;
        (Some(all), memory::Plan::default())
    };
    steps.done("pagemap");
    // Only a tracer that lives on (stasis init) keeps the tracking it arms.
    let fresh_registrations = tracking.incremental
        && tracking.keeps_tracking
        && crate::dirty::arm(proc, layout, inj, tracking.seq, tracked)?;
    steps.done("dirty arm");
    memory::save_shared_files(pid, layout, writer)?;
    shm.save_mappings(proc, layout, inj, scratch, writer)?;
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

/// Reads a frozen process's state up to the start of its snapshot fork (see
/// [`Begun`]). `allow_snapshot`: false for a process whose snapshot could be reaped
/// by the job (see the caller).
#[allow(clippy::too_many_arguments)]
fn dump_frozen(
    tracking: &Tracking,
    allow_snapshot: bool,
    proc: &ProcDir,
    frozen: &mut Frozen,
    shm: &mut crate::shm::Collector,
    writer: &mut CheckpointWriter,
) -> Result<Begun> {
    let pid = proc.pid;
    let mut steps = Steps::new();
    let tracking_snapshot_ok = tracking.snapshot_ok && allow_snapshot;
    let tracking_late_flags = tracking.late_flags && allow_snapshot;
    task::check_supported(proc)?;
    let mut layout = if tracking_late_flags {
        memory::read_layout_unflagged(proc)?
    } else {
        memory::read_layout(proc, tracking.early_flags.as_ref())?
    };
    let insn = find_syscall_insn(pid, &memory::exec_ranges(&layout))?;
    let injection = Injection::prepare(frozen, &layout, insn)?;
    let (inj, scratch) = injection.leader();
    // Zombies that the snapshots of its children left it (see `Snapshot::take`).
    crate::snapshot::reap_left(inj)?;
    steps.done("layout");
    let dumpable = task::make_readable(inj)?;
    let sigs = signals::dump(inj, pid, scratch)?;
    let ts = task::dump(proc, inj, scratch, dumpable)?;
    let posix_timers = crate::timers::dump(proc, inj, scratch)?;
    let stopped_children: Vec<i32> = proc
        .children()?
        .into_iter()
        .filter(|c| tracking.job_stopped.contains(c))
        .collect();
    let child_waits = crate::jobctl::probe_waited(inj, scratch, &stopped_children)?;
    let threads = thread::dump_all(proc, &frozen.threads, &injection.slots(thread::DUMP_SLOT))?;
    steps.done("threads and task");
    // With tracking armed at the previous checkpoint, pages not written since are
    // not even read; then (re)arm it for the next one.
    // Only where the previous checkpoint's page runs could be read: pages not
    // written since are referred to there, not read again.
    let written = match (tracking.incremental, tracking.prev_seq) {
        (true, Some(prev)) if tracking.prev_runs.contains(&pid) => {
            crate::dirty::written(proc, &layout, prev)
        }
        _ => None,
    };
    let tracked = written.is_some();
    // When few pages were written since the last checkpoint, copying them while the
    // process stays frozen pauses it no longer than forking a snapshot would, and
    // the checkpoint is done sooner (no fork, no writer threads, nothing read back).
    let rss = if tracking_snapshot_ok {
        resident_bytes(proc)
    } else {
        0
    };
    let frozen_copy = tracking_snapshot_ok
        && written.as_deref().is_some_and(|w| {
            let dirty = w.iter().map(|(a, b)| b - a).sum();
            !crate::snapshot::worth_taking(pid, rss, dirty)
        });
    let snapshot_ok = tracking_snapshot_ok && !frozen_copy;
    // A frozen copy reads the exact flags while it copies (the layout's were read
    // before the freeze or remembered, and there is no snapshot to check them on).
    let frozen_flags = (frozen_copy && tracking.early_flags.is_some()).then(|| {
        let proc = proc.clone();
        std::thread::spawn(move || memory::read_flags(&proc).map(Some))
    });
    steps.done("dirty scan");
    // Without flags (see Tracking::late_flags), the snapshot is forked first: what a
    // fork does not copy is seen on it (in `Begun::end`).
    let late = snapshot_ok && tracking_late_flags;
    let memory = if late {
        None
    } else {
        Some(frozen_memory(
            tracking,
            proc,
            &mut layout,
            &injection,
            written.as_deref(),
            tracked,
            snapshot_ok,
            &mut steps,
            shm,
            writer,
        )?)
    };
    let forking = if snapshot_ok {
        stasis_sys::fault::step("taking the snapshot")?;
        let (inj, scratch) = injection.leader();
        Some(Snapshot::start(inj, scratch)?)
    } else {
        None
    };
    Ok(Begun {
        pid,
        steps,
        late_flags: tracking_late_flags,
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
        written,
        tracked,
        rss,
        frozen_copy,
        snapshot_ok,
        frozen_flags,
        memory,
        forking,
        early_flags: tracking.early_flags.is_some(),
    })
}

impl Begun {
    /// Waits for the snapshot fork, then reads the rest of the process's state (its
    /// descriptors) while it is still frozen.
    fn end(
        mut self,
        tracking: &Tracking,
        proc: &ProcDir,
        stdio: &files::StdioIds,
        registry: &mut files::Registry,
        shm: &mut crate::shm::Collector,
        writer: &mut CheckpointWriter,
    ) -> Result<Part> {
        let pid = self.pid;
        let mut snapshot = None;
        let mut snapshot_us = 0;
        if let Some(forking) = self.forking.take() {
            let t_wait = Instant::now();
            let took = forking.elapsed();
            snapshot = Some(forking.finish()?);
            snapshot_us = (took + t_wait.elapsed()).as_micros() as u64;
            self.steps.done("snapshot");
        }
        let memory = match self.memory.take() {
            Some(m) => m,
            None => {
                if let Some(snap) = &snapshot {
                    memory::mark_invisible(proc, &ProcDir::new(snap.pid), &mut self.layout)?;
                }
                frozen_memory(
                    tracking,
                    proc,
                    &mut self.layout,
                    &self.injection,
                    self.written.as_deref(),
                    self.tracked,
                    self.snapshot_ok,
                    &mut self.steps,
                    shm,
                    writer,
                )?
            }
        };
        if snapshot.is_some() {
            crate::snapshot::note_fork(pid, self.rss, snapshot_us * 1000);
        }
        let fds = registry.dump_fds(proc, stdio, shm, writer)?;
        self.steps.done("fds");
        // Its /proc files are not read any more (pages of a process without a snapshot
        // are copied with process_vm_readv).
        let mem = if self.dumpable == 0 && snapshot.is_none() {
            Some(
                std::fs::File::open(proc.file("mem"))
                    .ctx(pid, || "opening /proc/PID/mem".into())?,
            )
        } else {
            None
        };
        let (inj, _) = self.injection.leader();
        task::restore_readable(inj, self.dumpable)?;
        self.injection.finish()?;
        tracing::debug!("process {pid} frozen: {}", self.steps.report());
        let ts = self.ts;
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
                signals: self.sigs,
                itimers: ts.itimers,
                posix_timers: self.posix_timers,
                settings: ts.settings,
                job_stop: self.job_stop.map(|signal| stasis_image::JobStop {
                    signal,
                    waited: true,
                }),
                threads: self.threads,
                locks: registry.locks.take(pid),
                creds: Some(crate::creds::dump(pid)?),
            },
            layout: self.layout,
            plan: memory.plan.unwrap_or_default(),
            plan_later: self.snapshot_ok,
            written: self.written,
            hidden_plan: memory.hidden_plan,
            hidden_index: Vec::new(),
            hidden_buf: memory.hidden_buf,
            snapshot,
            snapshot_us,
            tracked: self.tracked,
            early_flags: self.early_flags,
            late_flags: self.late_flags && self.snapshot_ok,
            frozen_copy: self.frozen_copy,
            mem,
            frozen_flags: self.frozen_flags,
            fresh_registrations: memory.fresh_registrations,
            insn: self.insn,
            child_waits: self.child_waits,
        })
    }
}

impl Part {
    /// Writes the pages (from the snapshot if there is one, else from the frozen
    /// process). What is left to do once the process may run again is in the result.
    fn write_pages(
        mut self,
        writer: &mut CheckpointWriter,
        prev: Option<&memory::PrevPages>,
        compress: Compression,
    ) -> Result<Copied> {
        let pid = self.process.pid;
        let mut steps = Steps::new();
        let t0 = Instant::now();
        self.plan_from_snapshot()?;
        steps.done("pagemap");
        let part_size = memory::part_size(self.plan.bytes);
        let mut files = PageFiles::new(&format!("pages-{pid}"), self.plan.bytes, part_size);
        files.compression = compress;
        let mut plain = Vec::new();
        let mut packed = Vec::new();
        for (k, name) in files.parts.iter().enumerate() {
            let (lo, hi) = files.range(k, self.plan.bytes);
            if compress == Compression::None {
                plain.push(writer.positioned_file(name, hi - lo)?);
            } else {
                packed.push(writer.data_file(name)?);
            }
        }
        let hidden_plan = std::mem::take(&mut self.hidden_plan);
        let hidden_index = std::mem::take(&mut self.hidden_index);
        let hidden_buf = std::mem::take(&mut self.hidden_buf);
        let prefetched = prefetched_runs(&hidden_plan, &hidden_index, &hidden_buf);
        let (src, how) = match &self.snapshot {
            Some(s) => (s.pid, memory::Source::Snapshot),
            None => (pid, memory::Source::Process),
        };
        // The flags: read while a frozen copy runs, or on the snapshot (see
        // Part::flags_job).
        let mut flags_job = self.frozen_flags.take();
        // From a snapshot, the snapshot itself writes what it can (one copy); the
        // rest (unreadable areas, what a fork does not see) is copied from outside.
        // Not when compressing (we must see the data), nor when unchanged pages are
        // found by comparing hashes (we must read them all, and store few).
        let snapshot_writes = compress == Compression::None && (prev.is_none() || self.tracked);
        let mut done = None;
        if snapshot_writes && self.snapshot.is_some() {
            let copied_outside: std::collections::HashSet<usize> =
                hidden_index.iter().copied().collect();
            done = self.write_by_snapshot(
                &plain,
                part_size,
                (&prefetched, &copied_outside),
                prev,
                &mut flags_job,
            )?;
            steps.done("written by the snapshot");
        }
        if flags_job.is_none() {
            flags_job = self.flags_job();
        }
        let one_copy = done.is_some();
        let (zeros, per_part) = match done {
            Some(d) => d,
            None => {
                let outs: Vec<memory::PartOut> = if compress == Compression::None {
                    plain.iter().map(memory::PartOut::Plain).collect()
                } else {
                    packed
                        .iter_mut()
                        .map(|w| memory::PartOut::Compressed(w, compress))
                        .collect()
                };
                memory::write_pages(
                    src,
                    how,
                    &self.plan,
                    &prefetched,
                    outs,
                    part_size,
                    prev,
                    &|_| false,
                    None,
                    self.mem.as_ref(),
                )
                .map_err(|e| blame(e, pid, self.snapshot.as_ref().map(|s| s.pid)))?
            }
        };
        steps.done("checked and completed");
        if let Some(job) = flags_job {
            if let Some(flags) = join_flag_check(job, pid)? {
                memory::fill_flags(&ProcDir::new(pid), &flags, &mut self.layout)?;
            }
            if self.fresh_registrations {
                memory::forget_flags(pid);
            } else {
                memory::remember_flags(pid, &self.layout);
            }
        }
        steps.done("flags checked");
        drop(prefetched);
        drop(hidden_buf);
        // Its pages are saved: it dies now, and is reaped once the checkpoint is
        // published (tearing down a large address space takes a while).
        let snapshot = self.snapshot.take();
        if let Some(s) = &snapshot {
            s.kill();
        }
        steps.done("killed");
        if self.frozen_copy {
            let ns = t0.elapsed().as_nanos() as u64;
            crate::snapshot::note_frozen_copy(pid, self.plan.bytes, ns);
        }
        tracing::debug!("process {pid} pages: {}", steps.report());
        Ok(Copied {
            frozen_copy: self.frozen_copy,
            process: self.process,
            layout: self.layout,
            plan: self.plan,
            files,
            states: zeros,
            per_part,
            plain,
            packed,
            one_copy,
            snapshot,
        })
    }

    /// With a snapshot, plans its pages from its own pagemap, after the runs of what
    /// a fork does not see (planned while frozen).
    fn plan_from_snapshot(&mut self) -> Result<()> {
        if !self.plan_later {
            return Ok(());
        }
        let pid = self.process.pid;
        let snap = self.snapshot.as_ref().ok_or(Error::Gone { pid })?;
        let mut plan = memory::plan(
            &ProcDir::new(snap.pid),
            &self.layout,
            self.written.as_deref(),
            |v| !memory::invisible_to_fork(v),
        )
        .map_err(|e| blame(e, pid, Some(snap.pid)))?;
        self.hidden_index = memory::append(&mut plan, &self.hidden_plan);
        self.plan = plan;
        Ok(())
    }

    /// The snapshot's flags, read on a thread (smaps is slow): to fill in a layout
    /// read without them (late_flags), or to check those read before the freeze
    /// against. None without a snapshot, or when nothing is to be read.
    fn flags_job(&self) -> Option<FlagsJob> {
        let snap = self.snapshot.as_ref()?;
        let (late, layout) = self.flags_spec()?;
        Some(snapshot_flags_job(snap.pid, late, layout))
    }

    /// What the snapshot's flag job does (see [`snapshot_flags_job`]), if any.
    fn flags_spec(&self) -> Option<(bool, Vec<memory::Vma>)> {
        (self.early_flags || self.late_flags).then(|| (self.late_flags, self.layout.clone()))
    }

    /// The snapshot writes the runs it can while one thread per part follows it,
    /// reading back, hashing and completing what it has written. None when the
    /// snapshot could not write them (the parts are emptied again: the caller copies
    /// the pages itself). Starts the snapshot's flag job once its writers are set up
    /// (reading smaps holds the snapshot's memory map lock, which their setup needs).
    fn write_by_snapshot(
        &mut self,
        plain: &[stasis_image::PositionedFile],
        part_size: u64,
        (prefetched, copied_outside): (&HashMap<usize, &[u8]>, &std::collections::HashSet<usize>),
        prev: Option<&memory::PrevPages>,
        flags_job: &mut Option<FlagsJob>,
    ) -> Result<Option<(memory::ZeroMap, Vec<memory::PartDone>)>> {
        let pid = self.process.pid;
        let job_spec = self.flags_spec();
        let Some(snap) = self.snapshot.as_mut() else {
            return Ok(None);
        };
        let part_files = PartFiles {
            files: plain
                .iter()
                .map(|p| (p.path().to_path_buf(), p.file()))
                .collect(),
            size: part_size,
        };
        let mut in_file = vec![false; self.plan.runs.len()];
        let writes = Snapshot::plan_writes(
            &self.plan,
            part_size,
            |i, r| !r.clean && !r.forced && !copied_outside.contains(&i),
            &mut in_file,
        );
        let progress = WriteProgress::new(plain.len());
        let (plan, chosen, src) = (&self.plan, &in_file, snap.pid);
        let (written, checked) = std::thread::scope(|sc| {
            let checker = sc.spawn(|| {
                memory::write_pages(
                    src,
                    memory::Source::Snapshot,
                    plan,
                    prefetched,
                    plain.iter().map(memory::PartOut::Plain).collect(),
                    part_size,
                    prev,
                    &|i| chosen.get(i).copied().unwrap_or(false),
                    Some(&progress),
                    None,
                )
            });
            let ready = || {
                if let Some((late, layout)) = job_spec {
                    *flags_job = Some(snapshot_flags_job(src, late, layout));
                }
            };
            // Should the writing panic, the checker must not wait for it forever (the
            // scope joins it before the panic goes on).
            let _end = EndOnPanic(&progress);
            let written = snap.write(self.insn, writes, &part_files, &progress, ready);
            progress.end(matches!(written, Ok(true)));
            let checked = checker.join().unwrap_or_else(|_| {
                Err(Error::Restore {
                    pid,
                    msg: "a page checking thread panicked".into(),
                })
            });
            (written, checked)
        });
        if written.map_err(|e| blame(e, pid, Some(src)))? {
            Ok(Some(checked.map_err(|e| blame(e, pid, Some(src)))?))
        } else {
            part_files.empty(pid)?;
            Ok(None)
        }
    }
}

/// Ends a snapshot's write progress as failed when dropped by a panic: the threads
/// following it give up instead of waiting forever.
struct EndOnPanic<'a>(&'a WriteProgress);

impl Drop for EndOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.end(false);
        }
    }
}

/// The runs copied while frozen (what a fork does not see: `hidden` planned into
/// `buf`, its runs at `index` in the whole plan), by run index.
fn prefetched_runs<'a>(
    hidden: &memory::Plan,
    index: &[usize],
    buf: &'a [u8],
) -> HashMap<usize, &'a [u8]> {
    let mut out = HashMap::new();
    for (sub_i, r) in hidden.runs.iter().enumerate() {
        let (at, len) = (r.offset as usize, r.file_len() as usize);
        if let (Some(&i), Some(data)) = (index.get(sub_i), buf.get(at..at + len)) {
            if !r.clean {
                out.insert(i, data);
            }
        }
    }
    out
}

/// A thread reading a process's mapping flags: Some (the flags) to fill a layout
/// in with, None when it only checked them.
type FlagsJob = std::thread::JoinHandle<Result<Option<memory::FlagCache>>>;

/// Reads the flags of snapshot `snap`: returns them (`late`: the layout has none), or
/// checks `layout`'s against them.
fn snapshot_flags_job(snap: i32, late: bool, layout: Vec<memory::Vma>) -> FlagsJob {
    std::thread::spawn(move || {
        let snap = ProcDir::new(snap);
        if late {
            memory::read_flags(&snap).map(Some)
        } else {
            memory::check_flags(&snap, &layout).map(|()| None)
        }
    })
}

/// A process whose pages are copied: the page files still to complete, and its
/// record (its page runs, the page-hash file), work that needs no frozen process.
struct Copied {
    process: Process,
    layout: Vec<memory::Vma>,
    plan: memory::Plan,
    files: PageFiles,
    states: memory::ZeroMap,
    per_part: Vec<memory::PartDone>,
    plain: Vec<stasis_image::PositionedFile>,
    packed: Vec<stasis_image::DataWriter>,
    /// Pages were written by the snapshot itself.
    one_copy: bool,
    /// The killed snapshot, to reap once the checkpoint is published.
    snapshot: Option<Snapshot>,
    /// Copied while frozen instead of from a snapshot (few pages written).
    frozen_copy: bool,
}

impl Copied {
    /// Completes the page files and the process's record. Returns it and the bytes
    /// of pages stored.
    fn finish(
        mut self,
        writer: &mut CheckpointWriter,
        prev: Option<&memory::PrevPages>,
    ) -> Result<Finished> {
        let pid = self.process.pid;
        let mut steps = Steps::new();
        for (part, done) in self.plain.into_iter().zip(&self.per_part) {
            writer.finish_positioned(part, done.sums.clone(), true)?;
        }
        for w in self.packed {
            writer.finish_data(w)?;
        }
        if self.files.compression != Compression::None {
            self.files.frames = self.per_part.iter().map(|d| d.frames.clone()).collect();
        }
        steps.done("parts finished");
        let (mappings, bytes) = memory::finish_pages(&self.layout, &self.plan, &self.states, prev);
        steps.done("runs");
        // The hash of every page of the page file, in its order: each part's.
        let name = format!("page-hashes-{pid}.bin");
        let mut w = writer.data_file(&name)?;
        let mut failed = Ok(());
        for d in &self.per_part {
            stasis_image::PageHashes::encode_into(&d.hashes, &mut |b| {
                if failed.is_ok() {
                    failed = w.write_all(b);
                }
            });
        }
        failed?;
        writer.finish_data(w)?;
        steps.done("hashes");
        // The page runs (many when scattered pages changed) go to a binary file, not
        // into the JSON.
        let mut mappings = mappings;
        let mut sources: Vec<u64> = mappings
            .iter()
            .flat_map(|m| m.pages.iter().map(|r| r.from))
            .filter(|&f| f != 0)
            .collect();
        sources.sort_unstable();
        sources.dedup();
        let runs_name = format!("runs-{pid}.bin");
        let mut w = writer.data_file(&runs_name)?;
        w.write_all(&stasis_image::PageRun::encode_all(
            mappings.iter().flat_map(|m| m.pages.iter()),
        ))?;
        writer.finish_data(w)?;
        for m in &mut mappings {
            m.pages = Vec::new();
        }
        steps.done("runs file");
        self.process.pages = self.files;
        self.process.page_hashes = Some(name);
        self.process.runs_file = Some(runs_name);
        self.process.mappings = mappings;
        tracing::debug!("process {pid} finished: {}", steps.report());
        Ok(Finished {
            process: self.process,
            sources,
            bytes,
            one_copy: self.one_copy,
            snapshot: self.snapshot,
        })
    }
}

/// A process's record, complete.
struct Finished {
    process: Process,
    /// The earlier checkpoints its page runs refer to.
    sources: Vec<u64>,
    /// Bytes of pages stored.
    bytes: u64,
    /// Written by its snapshot.
    one_copy: bool,
    /// The killed snapshot, to reap once the checkpoint is published.
    snapshot: Option<Snapshot>,
}

/// Time taken by each step of a dump, for the debug log.
struct Steps {
    last: Instant,
    steps: Vec<(&'static str, std::time::Duration)>,
}

impl Steps {
    fn new() -> Steps {
        Steps {
            last: Instant::now(),
            steps: Vec::new(),
        }
    }

    fn done(&mut self, what: &'static str) {
        let now = Instant::now();
        self.steps.push((what, now - self.last));
        self.last = now;
    }

    fn report(&self) -> String {
        self.steps
            .iter()
            .map(|(w, d)| format!("{w} {:.1} ms", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Waits for a mapping flag check (see `memory::check_flags`) of process `pid`, or
/// for the flags read from its snapshot.
fn join_flag_check<T>(check: std::thread::JoinHandle<Result<T>>, pid: i32) -> Result<T> {
    let r = check.join().unwrap_or_else(|_| {
        Err(Error::Restore {
            pid,
            msg: "the mapping flag check panicked".into(),
        })
    });
    r.map_err(|e| name_process(e, pid))
}

/// Resident anonymous memory of a process, bytes (`/proc/PID/statm`: resident less
/// shared); 0 when unreadable.
fn resident_bytes(proc: &ProcDir) -> u64 {
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

/// An error of the page writer of process `pid`: when its snapshot `snap` has died
/// (killed by someone), that process is gone and the checkpoint starts over; else the
/// process is named (not its snapshot).
fn blame(e: Error, pid: i32, snap: Option<i32>) -> Error {
    match snap {
        Some(s) if !matches!(e, Error::Fault(_)) && crate::snapshot::is_dead(s) => {
            tracing::debug!("snapshot {s} of process {pid} died ({e})");
            Error::Gone { pid: s }
        }
        _ => name_process(e, pid),
    }
}

/// Names the process (not its snapshot) in an error of the page writer.
fn name_process(e: Error, pid: i32) -> Error {
    match e {
        Error::Io {
            source, context, ..
        } => Error::Io {
            pid,
            context,
            source,
        },
        Error::Sys {
            source, context, ..
        } => Error::Sys {
            pid,
            context,
            source,
        },
        Error::Transient { what, .. } => Error::Transient { pid, what },
        e => e,
    }
}

/// The page runs of checkpoint `prev_seq` in `dir` (the newest before this one), by
/// process: what an incremental checkpoint refers to for pages it does not store
/// again. Unreadable or absent: nothing (everything is stored).
fn previous_pages(dir: &Path, prev_seq: Option<u64>) -> HashMap<i32, memory::PrevPages> {
    let mut out = HashMap::new();
    let Some(seq) = prev_seq else {
        return out;
    };
    let path = store::checkpoint_path(dir, seq);
    let Ok(bytes) = std::fs::read(path.join("checkpoint.json")) else {
        return out;
    };
    // Only the page runs are needed: the rest is skipped over, not built.
    #[derive(serde::Deserialize)]
    struct Lite {
        processes: Vec<LiteProcess>,
    }
    #[derive(serde::Deserialize)]
    struct LiteProcess {
        pid: i32,
        mappings: Vec<LiteMapping>,
        #[serde(default)]
        runs_file: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct LiteMapping {
        #[serde(default)]
        pages: Vec<stasis_image::PageRun>,
    }
    let Ok(meta) = serde_json::from_slice::<Lite>(&bytes) else {
        return out;
    };
    for p in meta.processes {
        let mut runs: Vec<stasis_image::PageRun> =
            p.mappings.into_iter().flat_map(|m| m.pages).collect();
        if let Some(name) = &p.runs_file {
            // Verified: wrong runs would make the new checkpoint refer to wrong pages.
            match stasis_image::store::CheckpointReader::read_verified(&path, name)
                .ok()
                .and_then(|raw| stasis_image::PageRun::decode_all(&raw))
            {
                Some(r) => runs.extend(r),
                None => continue,
            }
        }
        out.insert(p.pid, memory::PrevPages::new(seq, runs));
    }
    out
}

/// Adds to `prev` the page hashes of every checkpoint its runs refer to, so that
/// pages can be compared by content (when writes were not tracked). A hash file that
/// is missing or unreadable only means its pages are stored again.
fn load_hashes(dir: &Path, pid: i32, prev: &mut memory::PrevPages) {
    for seq in prev.sources() {
        // Verified against its manifest: a wrong hash could make a changed page look
        // unchanged.
        let name = format!("page-hashes-{pid}.bin");
        let path = store::checkpoint_path(dir, seq);
        if let Ok(raw) = stasis_image::store::CheckpointReader::read_verified(&path, &name) {
            prev.add_hashes(seq, stasis_image::PageHashes::decode(&raw));
        }
    }
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
