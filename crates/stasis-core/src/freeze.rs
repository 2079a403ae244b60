//! Freezing a process: every thread seized and stopped before anything is read, none
//! running again until the checkpoint is taken, and all resumed exactly where they were.
//!
//! Threads may be created or exit while we freeze: the thread list is read again after
//! every round of stops until it no longer changes (a stopped thread cannot create
//! another one), and threads that exit meanwhile are dropped.

use crate::error::{Error, Result, SysContext};
use crate::proc::ProcDir;
use stasis_sys::arch::Regs;
use stasis_sys::ptrace::{self, Stop};

/// One stopped thread and the state it must be resumed with.
#[derive(Debug, Clone)]
pub struct FrozenThread {
    pub tid: i32,
    /// Registers as stopped.
    pub regs: Regs,
    /// Blocked signals as stopped.
    pub sigmask: u64,
    touched: bool,
}

/// A stopped process. Dropping it resumes every thread as it was.
pub struct Frozen {
    pub pid: i32,
    /// The stopped threads, the thread-group leader first.
    pub threads: Vec<FrozenThread>,
    done: bool,
}

fn attach_error(pid: i32, e: stasis_sys::SysError) -> Error {
    let msg = match e.errno {
        libc::ESRCH => "no such process".to_string(),
        libc::EPERM => "permission denied (it must belong to you and not be traced already, e.g. by a debugger; check kernel.yama.ptrace_scope)".to_string(),
        _ => e.to_string(),
    };
    Error::Attach { pid, msg }
}

/// Waits until a seized and interrupted thread stops. Returns false if it exited.
fn wait_stopped(tid: i32) -> Result<bool> {
    loop {
        match ptrace::wait(tid).ctx(tid, || "waiting for the thread to stop".into())? {
            Stop::Event(ptrace::EVENT_STOP, _) => return Ok(true),
            // A signal arrived first: let it be delivered, the stop follows.
            Stop::Signal(sig) => {
                ptrace::cont(tid, sig).ctx(tid, || "delivering a signal".into())?
            }
            Stop::Event(..) | Stop::Syscall => {
                ptrace::cont(tid, 0).ctx(tid, || "resuming".into())?
            }
            Stop::Exited(_) | Stop::Killed(_) => return Ok(false),
        }
    }
}

impl Frozen {
    /// Seizes and stops every thread of the process.
    pub fn freeze(proc: &ProcDir) -> Result<Frozen> {
        let pid = proc.pid;
        let mut f = Frozen {
            pid,
            threads: Vec::new(),
            done: false,
        };
        let mut known: Vec<i32> = Vec::new();
        loop {
            let fresh: Vec<i32> = proc
                .tids()?
                .into_iter()
                .filter(|t| !known.contains(t))
                .collect();
            if fresh.is_empty() {
                break;
            }
            let mut seized = Vec::new();
            for tid in fresh {
                known.push(tid);
                match ptrace::seize(tid, ptrace::O_TRACESYSGOOD) {
                    Ok(()) => {}
                    Err(e) if e.errno == libc::ESRCH && tid != pid => continue, // exited
                    Err(e) => return Err(attach_error(pid, e)),
                }
                ptrace::interrupt(tid).ctx(tid, || "stopping the thread".into())?;
                seized.push(tid);
            }
            for tid in seized {
                if !wait_stopped(tid)? {
                    if tid == pid {
                        return Err(Error::Gone { pid });
                    }
                    continue;
                }
                let regs = ptrace::get_regs(tid).ctx(tid, || "reading registers".into())?;
                let sigmask =
                    ptrace::get_sigmask(tid).ctx(tid, || "reading the signal mask".into())?;
                f.threads.push(FrozenThread {
                    tid,
                    regs,
                    sigmask,
                    touched: false,
                });
            }
        }
        f.threads.sort_by_key(|t| (t.tid != pid, t.tid));
        if f.threads.first().map(|t| t.tid) != Some(pid) {
            return Err(Error::Unsupported {
                pid,
                what: "a process whose main thread has exited while other threads run".into(),
            });
        }
        Ok(f)
    }

    /// Blocks every signal in every thread (while syscalls are injected); the saved
    /// masks are put back on release.
    pub fn block_signals(&mut self) -> Result<()> {
        for t in &mut self.threads {
            t.touched = true;
            ptrace::set_sigmask(t.tid, !0).ctx(t.tid, || "blocking signals".into())?;
        }
        Ok(())
    }

    /// Resumes every thread exactly where it was stopped (once; later calls do nothing).
    pub fn release(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let mut first_err = None;
        for t in &self.threads {
            let r = (|| {
                if t.touched {
                    ptrace::set_regs(t.tid, &t.regs.for_restore())
                        .ctx(t.tid, || "restoring registers".into())?;
                    ptrace::set_sigmask(t.tid, t.sigmask)
                        .ctx(t.tid, || "restoring the signal mask".into())?;
                }
                ptrace::detach(t.tid, 0).ctx(t.tid, || "detaching".into())
            })();
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills the process (still stopped: it never runs past the saved state).
    /// `reap` waits for it when we are only its tracer, not its parent.
    pub fn kill(&mut self, reap: bool) {
        self.done = true;
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if reap {
            for t in &self.threads {
                let _ = ptrace::wait(t.tid);
            }
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
