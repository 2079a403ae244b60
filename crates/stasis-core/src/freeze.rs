//! Freezing a process: every thread seized and stopped before anything is read, none
//! running again until the checkpoint is taken, and all resumed exactly where they were.
//!
//! Threads may be created or exit while we freeze: the thread list is read again after
//! every round of stops until it no longer changes (a stopped thread cannot create
//! another one), and threads that exit meanwhile are dropped.

use crate::error::{Error, Result, SysContext};
use crate::inject::{Gadget, Injector, Scratch};
use crate::proc::{thread_state, ProcDir};
use stasis_sys::arch::Regs;
use stasis_sys::fault;
use stasis_sys::ptrace::{self, Stop};
use std::time::{Duration, Instant};

/// How long a thread told to stop (or just created) may take to report its stop. Only
/// a thread in an uninterruptible wait in the kernel takes long: a hung file system, a
/// vfork parent whose child neither runs a program nor exits.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a killed process may take to exit (its last thread tears down the whole
/// address space, which takes a while for a large one).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// On release, how long a thread that is not in a stop (still on its way to the one
/// asked for, or inside an injected syscall) is waited for before it is left as a
/// straggler.
const RELEASE_GRACE: Duration = Duration::from_millis(500);

/// One stopped thread and the state it must be resumed with.
#[derive(Debug, Clone)]
pub struct FrozenThread {
    pub tid: i32,
    /// Registers as stopped.
    pub regs: Regs,
    /// Blocked signals as stopped.
    pub sigmask: u64,
    /// Extended registers as stopped (read when the thread is parked).
    pub xstate: Option<Vec<u8>>,
    /// Its registers or mask were changed: they are put back on release.
    touched: bool,
}

/// A stopped process. Dropping it resumes every thread as it was.
pub struct Frozen {
    pub pid: i32,
    /// The stopped threads, the thread-group leader first.
    pub threads: Vec<FrozenThread>,
    /// Threads seized and told to stop whose stop was not seen (yet).
    pending: Vec<i32>,
    /// Stopped by job control (SIGSTOP, SIGTSTP...): the stopping signal. It stays
    /// stopped when released.
    pub job_stop: Option<i32>,
    done: bool,
}

fn attach_error(pid: i32, tid: i32, e: stasis_sys::SysError) -> Error {
    if e.errno == libc::EPERM && is_straggler(tid) {
        return Error::Timeout {
            pid,
            what: format!(
                "thread {tid} has still not stopped since an earlier checkpoint attempt asked it to ({})",
                thread_state(tid)
            ),
        };
    }
    let msg = match e.errno {
        libc::ESRCH => "no such process".to_string(),
        libc::EPERM if crate::proc::looks_not_dumpable(tid) => "it is not dumpable (it called prctl(PR_SET_DUMPABLE, 0), or changed its user or group IDs): only a tracer privileged over it (root, or stasis run's own init) may checkpoint it".to_string(),
        libc::EPERM => "permission denied (it must belong to you and not be traced already, e.g. by a debugger; check kernel.yama.ptrace_scope)".to_string(),
        _ => e.to_string(),
    };
    Error::Attach { pid, msg }
}

/// Waits until a seized and interrupted thread of process `pid` stops. Returns the
/// signal of its stop (SIGTRAP, or in a group stop the signal that stopped it), None
/// if it exited; an error if it has not stopped by `deadline`.
fn wait_stopped(pid: i32, tid: i32, deadline: Instant) -> Result<Option<i32>> {
    loop {
        let stop = ptrace::wait_until(tid, deadline)
            .ctx(tid, || "waiting for the thread to stop".into())?;
        match stop {
            None => {
                return Err(Error::Timeout {
                    pid,
                    what: format!(
                        "thread {tid} did not stop within {} s ({}); is it blocked in the kernel (a hung file system, a vfork child that neither runs a program nor exits)?",
                        STOP_TIMEOUT.as_secs(),
                        thread_state(tid)
                    ),
                })
            }
            Some(Stop::Event(ptrace::EVENT_STOP, sig)) => return Ok(Some(sig)),
            // A signal arrived first: let it be delivered, the stop follows.
            Some(Stop::Signal(sig)) => {
                ptrace::cont(tid, sig).ctx(tid, || "delivering a signal".into())?
            }
            Some(Stop::Event(..) | Stop::Syscall) => {
                ptrace::cont(tid, 0).ctx(tid, || "resuming".into())?
            }
            Some(Stop::Exited(_) | Stop::Killed(_)) => return Ok(None),
        }
    }
}

/// Waits until traced thread `tid`, killed, has exited, and reaps it. False if it
/// is still there at `deadline`.
pub(crate) fn reap_thread(tid: i32, deadline: Instant) -> bool {
    loop {
        match ptrace::wait_until(tid, deadline) {
            // Err: ECHILD, already reaped (or no longer ours).
            Ok(Some(Stop::Exited(_) | Stop::Killed(_))) | Err(_) => return true,
            // A stop reported before the SIGKILL took effect: the exit follows.
            Ok(Some(_)) => {}
            Ok(None) => return false,
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
            pending: Vec::new(),
            job_stop: None,
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
            for tid in fresh {
                known.push(tid);
                fault::step("seizing a thread")?;
                match ptrace::seize(tid, ptrace::O_TRACESYSGOOD) {
                    Ok(()) => {}
                    Err(e) if e.errno == libc::ESRCH && tid != pid => continue, // exited
                    Err(e) => return Err(attach_error(pid, tid, e)),
                }
                f.pending.push(tid);
                ptrace::interrupt(tid).ctx(tid, || "stopping the thread".into())?;
            }
            // On an error the threads still pending are released with the others.
            let deadline = Instant::now() + STOP_TIMEOUT;
            while let Some(&tid) = f.pending.first() {
                let stopped = wait_stopped(pid, tid, deadline)?;
                f.pending.remove(0);
                if let Some(sig) = stopped.filter(|&s| s != libc::SIGTRAP) {
                    f.job_stop.get_or_insert(sig);
                }
                if stopped.is_none() {
                    if tid == pid {
                        return Err(Error::Gone { pid });
                    }
                    continue;
                }
                let state = ptrace::get_regs(tid)
                    .ctx(tid, || "reading registers".into())
                    .and_then(|regs| {
                        let sigmask = ptrace::get_sigmask(tid)
                            .ctx(tid, || "reading the signal mask".into())?;
                        Ok((regs, sigmask))
                    });
                let (regs, sigmask) = match state {
                    Ok(s) => s,
                    Err(e) => {
                        // Stopped: detached on release like the others still pending.
                        f.pending.push(tid);
                        return Err(e);
                    }
                };
                f.threads.push(FrozenThread {
                    tid,
                    regs,
                    sigmask,
                    xstate: None,
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

    /// Blocks every signal in every thread (while syscalls are injected without return
    /// frames); the saved masks are put back on release.
    pub fn block_signals(&mut self) -> Result<()> {
        for t in &mut self.threads {
            t.touched = true;
            ptrace::set_sigmask(t.tid, !0).ctx(t.tid, || "blocking signals".into())?;
        }
        Ok(())
    }

    /// Parks every thread on a return frame (see [`crate::inject`]) with `gadget`, the
    /// leader with `scratch_len` bytes of scratch, the others with `thread_scratch`,
    /// and returns an injector and the scratch of each, in the order of `threads`.
    /// A thread whose stack is the main one (it grows down) and has no room below its
    /// stack pointer has it grown first, by a syscall another thread, parked already,
    /// makes write there. None when a thread still has no room (or its extended state
    /// cannot go into a frame): nothing was changed then but threads parked and a
    /// stack grown, and the caller injects without frames.
    pub fn park_all(
        &mut self,
        gadget: &Gadget,
        layout: &[crate::memory::Vma],
        scratch_len: u64,
        thread_scratch: u64,
    ) -> Result<Option<Vec<(Injector, Scratch)>>> {
        let pid = self.pid;
        let xsize = stasis_sys::arch::xstate_size();
        let len_of = |tid: i32| {
            if tid == pid {
                scratch_len
            } else {
                thread_scratch
            }
        };
        let no_room = |t: &FrozenThread, why: &str| {
            tracing::warn!(
                "process {pid}: thread {} ({why}): syscalls are injected without return frames (a kill of stasis during this checkpoint could harm the process)",
                t.tid
            );
        };
        let mut berths = Vec::with_capacity(self.threads.len());
        let mut short = Vec::new();
        for (k, t) in self.threads.iter_mut().enumerate() {
            let xstate = match t.xstate.take() {
                Some(x) => x,
                None => ptrace::get_xstate(t.tid, xsize)
                    .ctx(t.tid, || "reading extended registers".into())?,
            };
            let b = crate::inject::berth(layout, &t.regs, t.sigmask, &xstate, len_of(t.tid));
            t.xstate = Some(xstate);
            match b {
                Ok(Some(b)) => berths.push(Some(b)),
                Ok(None) if on_main_stack(layout, t.regs.rsp) => {
                    berths.push(None);
                    short.push(k);
                }
                Ok(None) => {
                    no_room(t, "no room below its stack pointer for a return frame");
                    return Ok(None);
                }
                Err(why) => {
                    no_room(t, &why);
                    return Ok(None);
                }
            }
        }
        if berths.iter().all(Option::is_none) {
            if let Some(t) = self.threads.first() {
                no_room(
                    t,
                    "its stack is at its deepest point so far, and no other thread can grow it",
                );
            }
            return Ok(None);
        }
        let mut out: Vec<Option<(Injector, Scratch)>> = Vec::with_capacity(self.threads.len());
        for (k, b) in berths.into_iter().enumerate() {
            out.push(match b {
                Some(b) => Some(self.park(k, gadget, b, len_of(self.threads[k].tid))?),
                None => None,
            });
        }
        for k in short {
            let t = &self.threads[k];
            let len = len_of(t.tid);
            let xstate = t.xstate.as_deref().unwrap_or_default();
            // The lowest byte its frame and scratch need, written by a parked thread:
            // the kernel grows the stack to it (memory below a red zone is free).
            let need = match stasis_sys::arch::return_frame(&t.regs, t.sigmask, xstate) {
                Ok(f) => f.addr.wrapping_sub(len) & !63,
                Err(why) => {
                    no_room(t, &why);
                    return Ok(None);
                }
            };
            let Some((helper, _)) = out.iter().flatten().next() else {
                return Ok(None);
            };
            let r = helper.raw(
                libc::SYS_clock_gettime,
                &[libc::CLOCK_MONOTONIC as u64, need],
            )?;
            let layout = crate::memory::read_layout_unflagged(&ProcDir::new(pid))?;
            let b = crate::inject::berth(&layout, &t.regs, t.sigmask, xstate, len);
            match b {
                Ok(Some(b)) => {
                    tracing::debug!("process {pid}: stack of thread {} grown to {need:x}", t.tid);
                    out[k] = Some(self.park(k, gadget, b, len)?);
                }
                _ => {
                    no_room(t, &format!("its stack could not grow to {need:x}: {r}"));
                    return Ok(None);
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Parks thread `k` on berth `b` (see [`Frozen::park_all`]).
    fn park(
        &mut self,
        k: usize,
        gadget: &Gadget,
        b: crate::inject::Berth,
        len: u64,
    ) -> Result<(Injector, Scratch)> {
        let t = &mut self.threads[k];
        let tid = t.tid;
        fault::step("writing a return frame")?;
        stasis_sys::vm::write(tid, b.frame.addr, &b.frame.bytes).ctx(tid, || {
            "writing a return frame below the stack pointer".into()
        })?;
        // From here on, left alone, the thread returns to its saved state by itself.
        let parked = t.regs.parked(gadget.ret, b.frame.sp);
        fault::step("parking a thread")?;
        t.touched = true;
        ptrace::set_regs(tid, &parked).ctx(tid, || "parking the thread".into())?;
        fault::step("blocking signals")?;
        ptrace::set_sigmask(tid, !0).ctx(tid, || "blocking signals".into())?;
        Ok((
            Injector::parked(tid, gadget, parked),
            Scratch::at(tid, b.scratch_addr, len),
        ))
    }

    /// Resumes every thread exactly where it was stopped (once; later calls do nothing).
    /// A thread not in a stop (after a failure: one that did not stop in time, or one
    /// inside an injected syscall that did not return in time) is waited for a
    /// moment, then left as a straggler, resumed by [`settle`] once it stops.
    pub fn release(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        // A fault injected here is reported once every thread is resumed (in kill mode
        // the process dies at that step, its threads as they are).
        let mut first_err: Option<Error> = fault::step("resuming a process").err().map(Into::into);
        let grace = Instant::now() + RELEASE_GRACE;
        for t in &self.threads {
            if let Err(e) = fault::step("resuming a thread") {
                first_err.get_or_insert(e.into());
            }
            let restore = t.touched.then_some((t.regs, t.sigmask));
            let r = match resume_stopped(t.tid, restore.as_ref(), 0) {
                // ESRCH: not in a stop (or gone).
                Err(Error::Gone { .. }) => resume_when_stopped(self.pid, t.tid, restore, grace),
                r => r,
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        for &tid in &self.pending {
            // Stopped already (its stop perhaps not collected): detached at once.
            let r = match ptrace::detach(tid, 0) {
                Ok(()) => Ok(()),
                Err(_) => resume_when_stopped(self.pid, tid, None, grace),
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills the process (still stopped: it never runs past the saved state). Its
    /// threads are reaped by [`Frozen::reap`].
    pub fn kill(&mut self) {
        self.done = true;
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    /// After [`Frozen::kill`]: waits until every thread we trace has exited and reaps
    /// it, the other threads before the leader. A traced thread stays a zombie until
    /// its tracer reaps it, and a traced leader is reported only once its other
    /// threads are reaped: waiting for the leader first waited forever. With `leader`
    /// false the leader is left to the caller, its parent (stasis init reaps the
    /// application in its own loop, to see how it ended). An error naming the threads
    /// still there at `deadline` (whoever waits for our children later reaps them, or
    /// they are released when we exit).
    pub fn reap(&mut self, leader: bool, deadline: Instant) -> Result<()> {
        let pid = self.pid;
        let mut order: Vec<i32> = self
            .threads
            .iter()
            .map(|t| t.tid)
            .chain(self.pending.iter().copied())
            .filter(|&t| t != pid)
            .collect();
        if leader {
            order.push(pid);
        }
        let left: Vec<i32> = order
            .into_iter()
            .filter(|&tid| !reap_thread(tid, deadline))
            .collect();
        match left.first() {
            None => Ok(()),
            Some(&tid) => Err(Error::Timeout {
                pid,
                what: format!(
                    "killed, but its threads {left:?} did not exit within {} s (thread {tid}: {})",
                    EXIT_TIMEOUT.as_secs(),
                    thread_state(tid)
                ),
            }),
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

/// Whether `sp` is in the process's main stack, which the kernel grows down.
fn on_main_stack(layout: &[crate::memory::Vma], sp: u64) -> bool {
    layout.iter().any(|v| {
        (v.map.growsdown || v.map.name == "[stack]") && v.map.start < sp && sp <= v.map.end
    })
}

/// Puts the mask and registers of a thread in a stop back (`restore`) and detaches
/// it, delivering `sig`. The mask first: a parked thread (see [`crate::inject`]) whose
/// tracer dies in between still returns to its saved state through its frame, mask
/// included.
fn resume_stopped(tid: i32, restore: Option<&(Regs, u64)>, sig: i32) -> Result<()> {
    if let Some((regs, sigmask)) = restore {
        ptrace::set_sigmask(tid, *sigmask).ctx(tid, || "restoring the signal mask".into())?;
        ptrace::set_regs(tid, &regs.for_restore()).ctx(tid, || "restoring registers".into())?;
    }
    ptrace::detach(tid, sig).ctx(tid, || "detaching".into())
}

/// Resumes `tid` (of process `pid`) at its next stop: its exit needs nothing; a stop
/// not reported by `deadline` leaves it as a straggler (an error saying so).
fn resume_when_stopped(
    pid: i32,
    tid: i32,
    restore: Option<(Regs, u64)>,
    deadline: Instant,
) -> Result<()> {
    match ptrace::wait_until(tid, deadline) {
        // Err: ECHILD, gone (or not ours any more).
        Ok(Some(Stop::Exited(_) | Stop::Killed(_))) | Err(_) => Ok(()),
        Ok(Some(stop)) => resume_stopped(tid, restore.as_ref(), stop_signal(stop)),
        Ok(None) => {
            let state = thread_state(tid);
            if let Ok(mut s) = STRAGGLERS.lock() {
                s.push(Straggler { tid, restore });
            }
            Err(Error::Timeout {
                pid,
                what: format!(
                    "thread {tid} is not stopped ({state}): it will be resumed once it stops"
                ),
            })
        }
    }
}

/// The signal to deliver on resuming a thread from `stop` (that of a
/// signal-delivery stop, else none).
fn stop_signal(stop: Stop) -> i32 {
    match stop {
        Stop::Signal(sig) => sig,
        _ => 0,
    }
}

/// A thread we could not resume because it was not in a stop: seized and told to
/// stop but blocked in the kernel, or inside an injected syscall, when a deadline
/// passed. `restore`: the registers and mask to put back first.
struct Straggler {
    tid: i32,
    restore: Option<(Regs, u64)>,
}

/// The stragglers of failed checkpoints, resumed by [`settle`]. (Only the thread that
/// seized them may resume them: stasis checkpoints from one thread.)
static STRAGGLERS: std::sync::Mutex<Vec<Straggler>> = std::sync::Mutex::new(Vec::new());

fn is_straggler(tid: i32) -> bool {
    STRAGGLERS
        .lock()
        .is_ok_and(|s| s.iter().any(|x| x.tid == tid))
}

/// Resumes the stragglers that stopped since (registers and mask put back first) and
/// forgets those that exited; never blocks. Called before every checkpoint and by
/// stasis init whenever its tracees change state.
pub fn settle() {
    let Ok(mut list) = STRAGGLERS.lock() else {
        return;
    };
    list.retain(|s| match ptrace::try_wait(s.tid) {
        Ok(None) => true,
        Ok(Some(Stop::Exited(_) | Stop::Killed(_))) | Err(_) => false,
        Ok(Some(stop)) => {
            if let Err(e) = resume_stopped(s.tid, s.restore.as_ref(), stop_signal(stop)) {
                tracing::warn!("could not resume thread {}: {e}", s.tid);
            }
            false
        }
    });
}

/// A stop of tracee `tid` that a `waitpid(-1)` outside any checkpoint collected (the
/// init's reaping loop): no process is held stopped between checkpoints, so it is a
/// straggler's (or a leftover's) and the thread is resumed.
pub fn resume_reported(tid: i32, status: i32) {
    let stop = ptrace::decode_status(status);
    let restore = STRAGGLERS.lock().ok().and_then(|mut list| {
        let i = list.iter().position(|s| s.tid == tid)?;
        list.swap_remove(i).restore
    });
    if let Err(e) = resume_stopped(tid, restore.as_ref(), stop_signal(stop)) {
        tracing::warn!("could not resume thread {tid}: {e}");
    }
}
