//! Checkpoint orchestration: freeze, read every kind of state, write the image, resume
//! (or kill) the process, publish the checkpoint.
//!
//! The process is frozen (ptrace-stopped) while its state and memory are read. With
//! `kill`, it stays frozen until the checkpoint is safely on disk and is then killed, so
//! it never runs past the saved state; otherwise it resumes as soon as everything is
//! read, and the image is synced and published while it runs. Any failure leaves the
//! process running as before and the previous checkpoint as the newest.
//!
//! Files: this one runs a checkpoint (options, the barrier of a multi-node part, the
//! steps in order); `tree` finds and freezes the job's processes; `frozen` reads each
//! frozen process's state (up to and after its snapshot fork); the page writing of
//! each process is `memory::part`.

mod frozen;
mod tree;

use frozen::{begin_frozen, read_frozen, scan_frozen, Scan, Shared, Tracking};
use memory::part::Part;
use tree::{freeze_tree, job_children, read_stat, Job};

/// A process's page-table scan (see `frozen::scan_frozen`): in a thread of its own,
/// or done.
enum Scanning<'s> {
    Thread(std::thread::ScopedJoinHandle<'s, Result<Scan>>),
    Done(Result<Scan>),
}

use crate::error::{Error, Result};
use crate::files::{self, StdioIds};
use crate::memory;
use crate::proc::ProcDir;
use stasis_image::{store, Checkpoint, CheckpointWriter, Compression, DirLock, Origin, Timings};
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
    /// Save a UNIX socket connected to a socket outside the checkpoint to connect
    /// again to the same name at restore (`--unix-external=reconnect`), else refuse it.
    pub unix_external_reconnect: bool,
    /// The addresses of the nodes of a multi-node job (see [`Barrier`]): TCP
    /// connections to them are saved (`TcpExternal::Peer`).
    pub peer_nodes: Vec<std::net::IpAddr>,
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
    let early_flags = if parent_is_us && !late_flags {
        flags_before_freeze(&roots, opts)?
    } else {
        HashMap::new()
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
            // Nothing this part sent to another node's is left on its way (that
            // node saves it, in its receive queue) before this part says it is frozen.
            let pids: Vec<i32> = tree.iter().map(|(p, _)| p.pid).collect();
            crate::sockets::inet::settle_external(
                &pids,
                &opts.peer_nodes,
                crate::sockets::inet::SETTLE_TIMEOUT,
            )?;
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
    registry
        .sockets
        .set_unix_reconnect(opts.unix_external_reconnect);
    registry.sockets.set_peer_nodes(opts.peer_nodes.clone());
    let mut shared = Shared {
        objects: crate::shm::Collector::new(),
        // Files in the job's private /tmp and /dev/shm are saved (and recreated) with
        // them.
        files: memory::SharedFiles::new(if opts.private_tmp {
            crate::tmpdirs::DIRS
                .iter()
                .map(std::path::PathBuf::from)
                .collect()
        } else {
            Vec::new()
        }),
    };
    // Under stasis init (whose death ends the job, so no snapshot outlives a dying
    // tracer), every process gets a snapshot child (CLONE_PARENT: the process's
    // parent's; see `Snapshot::take` for the ones whose parent is in the job), and the
    // tree runs on as soon as all are forked. With --kill a single process too: it
    // then stays frozen while its snapshot writes (one copy, on every core), until it
    // is killed; a tree to be killed is copied while frozen. `checkpoint --pid` copies
    // while frozen.
    // A part of a multi-node job stays frozen until every part is written: no
    // snapshot would shorten its pause.
    let snapshot_ok = parent_is_us && snapshots_wanted(opts, tree.len());
    let mut parts = Vec::with_capacity(tree.len());
    let tracking = Tracking {
        snapshot_ok,
        early_flags: if snapshot_ok {
            early_flags
        } else {
            Default::default()
        },
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
    // fork is under way) the rest: the forks run at once (see `Begun`). Its page
    // tables are scanned in a thread while the next ones are read (see `frozen`).
    let mut begun = Vec::with_capacity(tree.len());
    // (Threads for the first two processes per core; the rest, and a process alone,
    // are scanned in place.)
    let max_threads = std::thread::available_parallelism().map_or(4, |n| 2 * n.get());
    let scan_threads = tree.len() > 1;
    std::thread::scope(|sc| -> Result<()> {
        let mut read = Vec::with_capacity(tree.len());
        for (i, (proc, frozen)) in tree.iter_mut().enumerate() {
            stasis_sys::fault::step("reading a frozen process")?;
            let proc: &ProcDir = proc;
            let allow = !below_subreaper.contains(&proc.pid);
            let r = read_frozen(&tracking, allow, proc, frozen)?;
            if r.ts.settings.child_subreaper || !allow {
                below_subreaper.extend(job_children(proc)?);
            }
            let (input, tracking) = (r.scan_input(), &tracking);
            let scan = if scan_threads && i < max_threads {
                Scanning::Thread(sc.spawn(move || scan_frozen(tracking, proc, input)))
            } else {
                Scanning::Done(scan_frozen(tracking, proc, input))
            };
            read.push((r, proc, scan));
        }
        for (r, proc, scan) in read {
            let scan = match scan {
                Scanning::Done(s) => s,
                Scanning::Thread(h) => h.join().map_err(|_| Error::Abandoned {
                    why: format!(
                        "internal: the page-table scan of process {} panicked",
                        proc.pid
                    ),
                })?,
            }?;
            begun.push(begin_frozen(
                r,
                scan,
                &tracking,
                proc,
                &mut shared,
                &mut writer,
            )?);
        }
        Ok(())
    })?;
    for (b, (proc, _)) in begun.into_iter().zip(tree.iter()) {
        parts.push(b.end(
            &tracking,
            proc,
            &stdio,
            &mut registry,
            &mut shared,
            &mut writer,
        )?);
    }
    let t_ended = Instant::now();
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
    let t_dirs = Instant::now();
    // The job's private /tmp and /dev/shm, read while everything is frozen.
    let private_dirs = if opts.private_tmp {
        crate::tmpdirs::save(&mut writer)?
    } else {
        Vec::new()
    };
    tracing::debug!(
        "every process read after {:.1} ms; tables, locks and System V {:.1} ms, private dirs {:.1} ms",
        (t_ended - t0).as_secs_f64() * 1e3,
        (t_dirs - t_ended).as_secs_f64() * 1e3,
        t_dirs.elapsed().as_secs_f64() * 1e3
    );
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
    let shared_memory = shared.objects.finish(&mut writer)?;
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
        node_addresses: if hold {
            crate::sockets::inet::node_addresses()
                .iter()
                .map(|a| a.to_string())
                .collect()
        } else {
            Vec::new()
        },
        address_map: if hold {
            crate::sockets::inet::current_address_map()
        } else {
            Vec::new()
        },
        port_map: if hold {
            crate::sockets::inet::current_port_map()
        } else {
            Vec::new()
        },
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

/// Whether a job of `processes` processes under stasis init is snapshotted (see
/// `snapshot_ok` in `checkpoint_locked`): not a tree to be killed, nor a part of a
/// multi-node job (it stays frozen until every part is written anyway).
fn snapshots_wanted(opts: &DumpOptions, processes: usize) -> bool {
    (processes == 1 || !opts.kill) && opts.barrier.is_none()
}

/// The mapping flags of the job's processes when they will be snapshotted with
/// dirty tracking (whose registrations a fork does not show), by pid: remembered
/// from a process's last checkpoint while its mappings keep their bounds, else read
/// from smaps now, before the freeze (10-15 ms per GiB, so in a thread per process);
/// they are checked on the snapshot. Arms the tracking first, while the job runs,
/// for every process of a first `--incremental` checkpoint (not for a job about to
/// be killed): write-protecting a process's whole memory while it is frozen would
/// cost 15-20 ms per GiB of pause.
fn flags_before_freeze(
    roots: &[i32],
    opts: &DumpOptions,
) -> Result<HashMap<i32, memory::FlagCache>> {
    let pids = tree::running_tree(roots);
    if opts.incremental && !opts.kill {
        for &pid in &pids {
            crate::dirty::prearm(&ProcDir::new(pid))?;
        }
    }
    // No snapshot, no early flags.
    if !snapshots_wanted(opts, pids.len()) {
        return Ok(HashMap::new());
    }
    // Best effort: a process that exits or cannot be read is read while frozen.
    let read = |pid: i32| {
        let proc = ProcDir::new(pid);
        memory::remembered_flags(&proc).or_else(|| memory::read_flags(&proc).ok())
    };
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
    let mut flags = HashMap::new();
    for some in pids.chunks(cores) {
        std::thread::scope(|sc| {
            let threads: Vec<_> = some
                .iter()
                .map(|&pid| (pid, sc.spawn(move || read(pid))))
                .collect();
            for (pid, t) in threads {
                if let Ok(Some(f)) = t.join() {
                    flags.insert(pid, f);
                }
            }
        });
    }
    Ok(flags)
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
    processes: &mut [stasis_image::Process],
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
