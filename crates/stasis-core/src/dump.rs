//! Checkpoint orchestration: freeze, read every kind of state, write the image, resume
//! (or kill) the process, publish the checkpoint.
//!
//! The process is frozen (ptrace-stopped) while its state and memory are read. With
//! `kill`, it stays frozen until the checkpoint is safely on disk and is then killed, so
//! it never runs past the saved state; otherwise it resumes as soon as everything is
//! read, and the image is synced and published while it runs. Any failure leaves the
//! process running as before and the previous checkpoint as the newest.

use crate::error::{Error, Result};
use crate::files::{self, StdioIds};
use crate::freeze::Frozen;
use crate::inject::{find_syscall_insn, Injector, Scratch};
use crate::memory;
use crate::proc::ProcDir;
use crate::{signals, task, thread};
use stasis_image::{store, Checkpoint, CheckpointWriter, DirLock, Origin, Process, Timings};
use stasis_sys::arch;
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
    check_shape(&proc)?;
    let mut frozen = Frozen::freeze(&proc)?;
    // Re-check now that nothing can change under us.
    check_shape(&proc)?;
    let freeze_us = t0.elapsed().as_micros() as u64;

    let layout = memory::read_layout(&proc)?;
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
    scratch.unmap(&inj)?;

    let mut writer = CheckpointWriter::begin(&lock)?;
    let vmas = memory::read_layout(&proc)?;
    let pages_file = format!("pages-{pid}.img");
    let mut pages = writer.data_file(&pages_file)?;
    let (mappings, pages_bytes) = memory::dump_pages(&proc, &vmas, &mut pages)?;
    writer.finish_data(pages)?;
    let stdio = opts
        .stdio
        .clone()
        .unwrap_or_else(|| files::stdio_ids_of(&proc));
    let fds = files::dump_fds(&proc, &stdio, &mut writer)?;
    let dump_us = t0.elapsed().as_micros() as u64 - freeze_us;
    if !opts.kill {
        frozen.release()?;
    }

    let t1 = Instant::now();
    let mut meta = Checkpoint {
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
            dump_us,
            sync_us: 0,
            pages_bytes,
        },
    };
    meta.timings.sync_us = t1.elapsed().as_micros() as u64;
    let sequence = meta.sequence;
    let path = writer.commit(&meta)?;
    if opts.kill {
        // The tracer that is also the parent (stasis init) reaps in its own loop.
        // SAFETY: getpid has no preconditions.
        let parent_is_us = ProcDir::new(pid)
            .process()
            .ok()
            .and_then(|p| p.stat().ok())
            .is_some_and(|s| s.ppid == unsafe { libc::getpid() });
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
