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
//!
//! Files: this one forks and kills snapshots; `costs` decides whether one is worth
//! taking; `write` plans and runs the snapshot's own page writes; `reap` keeps track
//! of snapshots until they are reaped (also those left as zombies of a process).

mod costs;
mod reap;
mod write;

pub use costs::{forget_costs, note_fork, note_frozen_copy, worth_taking};
pub use reap::{forget_left, forget_reaped, is_dead, is_snapshot, reap_left};
pub use write::{PartFiles, WriteProgress, Writes};

use crate::error::{Result, SysContext};
use crate::inject::{Injector, Scratch};
use stasis_sys::clone::{clone_args_bytes, CLONE_ARGS_SIZE};
use stasis_sys::ptrace;

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
        reap::note_snapshot(pid);
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
                reap::note_snapshot(pid as i32);
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
            reap::note_left(self.pid, parent);
        }
    }
}
