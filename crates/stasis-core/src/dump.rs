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
use crate::inject::{find_syscall_insn, Injector, Scratch};
use crate::memory;
use crate::proc::ProcDir;
use crate::{signals, task, thread};
use stasis_image::{store, Checkpoint, CheckpointWriter, DirLock, Origin, Process, Timings};
use stasis_sys::arch::{self, Regs};
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

/// A seized and stopped process. Dropping it resumes the process as it was.
struct Frozen {
    pid: i32,
    regs: Regs,
    sigmask: u64,
    touched: bool,
    done: bool,
}

impl Frozen {
    fn seize(pid: i32) -> Result<Frozen> {
        ptrace::seize(pid, ptrace::O_TRACESYSGOOD).map_err(|e| match e.errno {
            libc::ESRCH => Error::Attach {
                pid,
                msg: "no such process".into(),
            },
            libc::EPERM => Error::Attach {
                pid,
                msg: "permission denied (it must belong to you and not be traced already, e.g. by a debugger; check kernel.yama.ptrace_scope)".into(),
            },
            _ => Error::Attach { pid, msg: e.to_string() },
        })?;
        let mut f = Frozen {
            pid,
            regs: Regs::default(),
            sigmask: 0,
            touched: false,
            done: false,
        };
        ptrace::interrupt(pid).ctx(pid, || "stopping the process".into())?;
        loop {
            match ptrace::wait(pid).ctx(pid, || "waiting for the process to stop".into())? {
                Stop::Event(ptrace::EVENT_STOP, _) => break,
                // A signal arrived first: let it be delivered, the stop follows.
                Stop::Signal(sig) => {
                    ptrace::cont(pid, sig).ctx(pid, || "resuming a signal".into())?
                }
                Stop::Event(..) | Stop::Syscall => {
                    ptrace::cont(pid, 0).ctx(pid, || "resuming".into())?
                }
                Stop::Exited(_) | Stop::Killed(_) => {
                    f.done = true;
                    return Err(Error::Gone { pid });
                }
            }
        }
        f.regs = ptrace::get_regs(pid).ctx(pid, || "reading registers".into())?;
        f.sigmask = ptrace::get_sigmask(pid).ctx(pid, || "reading the signal mask".into())?;
        Ok(f)
    }

    /// Resumes the process exactly where it was stopped.
    fn release(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let pid = self.pid;
        if self.touched {
            ptrace::set_regs(pid, &self.regs.for_live_resume())
                .ctx(pid, || "restoring registers".into())?;
            ptrace::set_sigmask(pid, self.sigmask)
                .ctx(pid, || "restoring the signal mask".into())?;
        }
        ptrace::detach(pid, 0).ctx(pid, || "detaching".into())
    }

    fn kill(&mut self, reap: bool) {
        self.done = true;
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if reap {
            let _ = ptrace::wait(self.pid);
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!("could not resume process {}: {e}", self.pid);
        }
    }
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
    let mut frozen = Frozen::seize(pid)?;
    // Re-check now that it cannot change under us.
    check_shape(&proc)?;
    let freeze_us = t0.elapsed().as_micros() as u64;

    let layout = memory::read_layout(&proc)?;
    let insn = find_syscall_insn(pid, &memory::exec_ranges(&layout))?;
    frozen.touched = true;
    ptrace::set_sigmask(pid, !0).ctx(pid, || "blocking signals".into())?;
    let inj = Injector::new(pid, insn)?;
    let scratch = Scratch::map(&inj, pid)?;
    let sigs = signals::dump(&inj, pid, &scratch)?;
    let ts = task::dump(&proc, &inj, &scratch)?;
    let th = thread::dump(
        &inj,
        pid,
        &frozen.regs,
        frozen.sigmask,
        &scratch,
        ts.comm.clone(),
    )?;
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
            threads: vec![th],
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

/// Refuses shapes of process this version cannot save: several threads, children.
fn check_shape(proc: &ProcDir) -> Result<()> {
    let pid = proc.pid;
    let tids = proc.tids()?;
    if tids.len() > 1 {
        return Err(Error::Unsupported {
            pid,
            what: format!("a multi-threaded process ({} threads)", tids.len()),
        });
    }
    let children = proc.children()?;
    if !children.is_empty() {
        return Err(Error::Unsupported {
            pid,
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
