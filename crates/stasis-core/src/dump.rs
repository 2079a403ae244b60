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
use crate::inject::{find_syscall_insn, Injector, Scratch};
use crate::memory;
use crate::proc::ProcDir;
use crate::{signals, task, thread};
use stasis_image::{store, Checkpoint, CheckpointWriter, DirLock, Origin, Process, Timings};
use stasis_sys::arch;
use stasis_sys::ptrace::{self, Stop};
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
}

/// Result of a successful checkpoint.
#[derive(Debug, Clone)]
pub struct DumpReport {
    pub path: PathBuf,
    pub sequence: u64,
    pub timings: Timings,
    /// Whether the process was killed after the checkpoint.
    pub killed: bool,
}

/// Checkpoints process `pid` into the checkpoint directory `dir`.
///
/// `pid` is as seen in this process's PID namespace and /proc.
pub fn checkpoint(dir: &Path, pid: i32, opts: &DumpOptions) -> Result<DumpReport> {
    let lock = DirLock::acquire(dir)?;
    let t0 = Instant::now();
    let proc = ProcDir::new(pid);
    if !proc.path.exists() {
        return Err(Error::Attach {
            pid,
            msg: "no such process".into(),
        });
    }
    // A snapshot child is given the process's parent (CLONE_PARENT): only when that
    // parent is us (stasis init), who reaps it. Otherwise the process stays frozen
    // while its memory is copied.
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let parent_is_us = proc
        .process()
        .ok()
        .and_then(|p| p.stat().ok())
        .is_some_and(|s| s.ppid == me);
    check_shape(&proc)?;
    let mut frozen = Frozen::freeze(&proc)?;
    // Re-check now that nothing can change under us.
    check_shape(&proc)?;
    let freeze_us = t0.elapsed().as_micros() as u64;

    let mut layout = memory::read_layout(&proc)?;
    let insn = find_syscall_insn(pid, &memory::exec_ranges(&layout))?;
    frozen.block_signals()?;
    let inj = Injector::new(pid, insn)?;
    let scratch = Scratch::map(&inj, pid)?;
    let sigs = signals::dump(&inj, pid, &scratch)?;
    let ts = task::dump(&proc, &inj, &scratch)?;
    let mut threads = Vec::with_capacity(frozen.threads.len());
    for ft in &frozen.threads {
        let tinj = Injector::new(ft.tid, insn)?;
        threads.push(thread::dump(&tinj, &proc, ft, &scratch)?);
    }

    let plan = memory::plan(&proc, &layout)?;
    let mut writer = CheckpointWriter::begin(&lock)?;
    memory::save_shared_files(pid, &mut layout, &mut writer)?;
    // With a snapshot, what a fork would not see is copied now into a buffer, the rest
    // later from the snapshot. (The page file is only created once the process runs
    // again: reserving its space takes time.)
    let snapshot_ok = parent_is_us && !opts.kill;
    let hidden = |r: &memory::PlannedRun| memory::invisible_to_fork(&layout[r.vma]);
    let (hidden_plan, hidden_index) = memory::subplan(&plan, |r| snapshot_ok && hidden(r));
    let mut hidden_buf = vec![0u8; hidden_plan.bytes as usize];
    memory::copy_pages(
        pid,
        memory::Source::Process,
        &hidden_plan,
        |_| true,
        &mut hidden_buf,
    )?;
    let snapshot = if snapshot_ok {
        Some(Snapshot::take(&inj, pid, &scratch)?)
    } else {
        None
    };
    scratch.unmap(&inj)?;
    let stdio = opts
        .stdio
        .clone()
        .unwrap_or_else(|| files::stdio_ids_of(&proc));
    let fds = files::dump_fds(&proc, &stdio, &mut writer)?;
    if snapshot.is_some() {
        frozen.release()?;
    }
    let dump_us = t0.elapsed().as_micros() as u64 - freeze_us;

    let t1 = Instant::now();
    let pages_file = format!("pages-{pid}.img");
    let pages = writer.positioned_file(&pages_file, plan.bytes)?;
    let mut prefetched = std::collections::HashMap::new();
    for (sub_i, r) in hidden_plan.runs.iter().enumerate() {
        let len = (r.npages * stasis_image::PAGE_SIZE) as usize;
        prefetched.insert(
            hidden_index[sub_i],
            &hidden_buf[r.offset as usize..r.offset as usize + len],
        );
    }
    let snapshotted = snapshot.is_some();
    let (src, how) = match &snapshot {
        Some(s) => (s.pid, memory::Source::Snapshot),
        None => (pid, memory::Source::Process),
    };
    let (zeros, chunks) = memory::write_pages(src, how, &plan, &prefetched, pages.file())?;
    drop(snapshot);
    if !opts.kill {
        frozen.release()?;
    }
    let copy_us = t1.elapsed().as_micros() as u64;

    let t2 = Instant::now();
    let (mappings, pages_bytes) = memory::finish_pages(&layout, &plan, &zeros);
    writer.finish_positioned(pages, chunks)?;
    let sync_us = t2.elapsed().as_micros() as u64;
    let (pause_us, copy_us) = if snapshotted {
        (dump_us, copy_us)
    } else {
        (dump_us + copy_us, 0)
    };
    let meta = Checkpoint {
        sequence: writer.sequence(),
        arch: arch::ARCH_NAME.to_string(),
        kernel: kernel_release(),
        page_size: stasis_image::PAGE_SIZE,
        origin: opts.origin,
        root_pid: pid,
        processes: vec![Process {
            pid,
            ppid: ts.ppid,
            comm: ts.comm,
            exe: ts.exe,
            cwd: ts.cwd,
            umask: ts.umask,
            personality: ts.personality,
            rlimits: ts.rlimits,
            mm: ts.mm,
            mappings,
            pages_file,
            fds,
            signals: sigs,
            itimers: ts.itimers,
            threads,
        }],
        timings: Timings {
            freeze_us,
            dump_us: pause_us,
            sync_us,
            copy_us,
            snapshot: snapshotted,
            pages_bytes,
        },
    };
    let sequence = meta.sequence;
    let path = writer.commit(&meta)?;
    if opts.kill {
        // The tracer that is also the parent (stasis init) reaps in its own loop.
        frozen.kill(!parent_is_us);
    }
    if let Err(e) = store::prune(&lock, opts.keep) {
        tracing::warn!(
            "checkpoint {} written, but removing old checkpoints failed: {e}",
            path.display()
        );
    }
    Ok(DumpReport {
        path,
        sequence,
        timings: meta.timings,
        killed: opts.kill,
    })
}

/// A copy-on-write copy of the process's memory: a child forked by an injected
/// `clone3(CLONE_PARENT | CLONE_FILES)`, stopped before its first instruction, read
/// while the process runs on, killed afterwards. With CLONE_PARENT it is our child
/// (not the application's, whose wait() never sees it); CLONE_FILES adds no reference
/// to any open file (a pipe's reader still sees EOF when the writer closes).
struct Snapshot {
    pid: i32,
}

impl Snapshot {
    fn take(inj: &Injector, leader: i32, scratch: &Scratch) -> Result<Snapshot> {
        let flags = (libc::CLONE_PARENT | libc::CLONE_FILES) as u64;
        let mut args = Vec::with_capacity(88);
        for v in [flags, 0u64, 0, 0, 0, 0, 0, 0, 0, 0, 0] {
            args.extend_from_slice(&v.to_le_bytes());
        }
        scratch.write(&args)?;
        ptrace::set_options(leader, ptrace::O_TRACESYSGOOD | ptrace::O_TRACECLONE)
            .ctx(leader, || "tracing the snapshot fork".into())?;
        let r = inj.call(
            "clone3 (copy-on-write snapshot)",
            libc::SYS_clone3,
            &[scratch.addr, 88],
        );
        ptrace::set_options(leader, ptrace::O_TRACESYSGOOD)
            .ctx(leader, || "resetting ptrace options".into())?;
        let pid = r? as i32;
        let snap = Snapshot { pid };
        loop {
            match ptrace::wait(pid).ctx(pid, || "waiting for the snapshot".into())? {
                Stop::Event(ptrace::EVENT_STOP, _) => return Ok(snap),
                Stop::Exited(_) | Stop::Killed(_) => return Err(Error::Gone { pid }),
                _ => ptrace::cont(pid, 0).ctx(pid, || "resuming the snapshot".into())?,
            }
        }
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        // SAFETY: killing the snapshot child we created; then reaping it (we are its
        // tracer and its parent).
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let _ = ptrace::wait(self.pid);
    }
}

/// Refuses shapes of process this version cannot save: child processes.
fn check_shape(proc: &ProcDir) -> Result<()> {
    let children = proc.children()?;
    if !children.is_empty() {
        return Err(Error::Unsupported {
            pid: proc.pid,
            what: format!("a process with child processes ({children:?}); process trees"),
        });
    }
    Ok(())
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
