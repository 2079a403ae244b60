//! Job control: processes stopped by SIGSTOP, SIGTSTP, SIGTTIN or SIGTTOU.
//!
//! Dump: a stopped process reports its group stop, with the signal that stopped it,
//! when it is seized (see `freeze`); it goes back to that stop, without a new report to
//! its parent, when released. Whether its parent has collected the stop already
//! (waitpid with WUNTRACED) is asked in the frozen parent by an injected
//! `waitid(WSTOPPED | WNOHANG | WNOWAIT)`, which reports without consuming.
//!
//! Restore: once every process is prepared and seized, and before any is rebuilt, a
//! stopped one gets its signal delivered through ptrace (`stop_again`): it enters the
//! group stop, which the kernel reports to its parent as any stop (SIGCHLD, a stop for
//! waitpid to collect). In the parent's rebuild (`settle_parent`), the SIGCHLD is
//! dropped and, if the stop had been collected, it is collected again, by injected
//! syscalls, before the parent's saved pending signals are queued. The stopped process
//! is rebuilt all the same (a tracer's resume runs a tracee despite a group stop, and
//! its threads created meanwhile join the stop) and stops again, silently, when
//! detached.

use crate::error::{Error, Result, SysContext};
use crate::inject::{Injector, Scratch};
use stasis_image::Process;
use stasis_sys::ptrace::{self, Stop};

const WNOWAIT: u64 = 0x0100_0000;
/// Offset of si_pid in a siginfo of SIGCHLD.
const SI_PID: usize = 16;

/// For each of `children` (stopped by job control) of the process `inj` runs in: whether
/// it has collected the child's stop (a waitid that does not consume finds nothing to
/// report).
pub fn probe_waited(
    inj: &Injector,
    scratch: &Scratch,
    children: &[i32],
) -> Result<Vec<(i32, bool)>> {
    let mut out = Vec::with_capacity(children.len());
    for &child in children {
        scratch.write(&[0u8; 128])?;
        inj.call(
            &format!("waitid for the stop of child {child}"),
            libc::SYS_waitid,
            &[
                libc::P_PID as u64,
                child as u64,
                scratch.addr,
                (libc::WSTOPPED | libc::WNOHANG) as u64 | WNOWAIT,
                0,
            ],
        )?;
        let info = scratch.read(SI_PID + 4)?;
        let reported = i32::from_le_bytes([
            info[SI_PID],
            info[SI_PID + 1],
            info[SI_PID + 2],
            info[SI_PID + 3],
        ]);
        out.push((child, reported != child));
    }
    Ok(out)
}

/// The signal that stops `p` again: its own, unless the kernel would not stop it with
/// that one now (a handler or SIG_IGN for it, or, for the terminal stop signals, an
/// orphaned process group, for which the kernel discards them): then SIGSTOP.
fn stop_signal(p: &Process, procs: &[Process], sig: i32) -> i32 {
    if sig == libc::SIGSTOP {
        return sig;
    }
    let default = !p
        .signals
        .actions
        .iter()
        .any(|a| a.signo == sig && a.handler != 0);
    // A group is orphaned unless a member's parent is in another group of the same
    // session (a process whose parent is not in the image gets the init as its parent,
    // in a session of its own).
    let orphaned = !procs.iter().filter(|q| q.pgid == p.pgid).any(|q| {
        procs
            .iter()
            .any(|par| par.pid == q.ppid && par.pgid != p.pgid && par.sid == q.sid)
    });
    if default && !orphaned {
        sig
    } else {
        libc::SIGSTOP
    }
}

/// Puts prepared, seized process `p` (at its interrupt stop) in the group stop it was
/// saved in: a SIGSTOP is queued (the only signal its mask, all blocked while it
/// prepares, lets through) and, at its delivery stop, replaced by the saved signal,
/// unblocked for that moment (a blocked one would be queued again instead). Returns at
/// the group stop.
pub fn stop_again(p: &Process, procs: &[Process]) -> Result<()> {
    let Some(js) = p.job_stop else {
        return Ok(());
    };
    let pid = p.pid;
    let sig = stop_signal(p, procs, js.signal);
    // SAFETY: kill has no memory-safety preconditions; `pid` is our tracee.
    if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
        return Err(stasis_sys::SysError::last("kill", pid))
            .ctx(pid, || "stopping the new process again".into());
    }
    ptrace::cont(pid, 0).ctx(pid, || "resuming the new process".into())?;
    let deadline = std::time::Instant::now() + crate::freeze::STOP_TIMEOUT;
    let mut blocked = None;
    loop {
        let stop = ptrace::wait_until(pid, deadline)
            .ctx(pid, || "waiting for the new process to stop".into())?;
        match stop {
            None => {
                return Err(Error::Timeout {
                    pid,
                    what: format!(
                        "the new process did not stop again (with signal {sig}) within {} s ({})",
                        crate::freeze::STOP_TIMEOUT.as_secs(),
                        crate::proc::thread_state(pid)
                    ),
                })
            }
            // Its group stop.
            Some(Stop::Event(ptrace::EVENT_STOP, s)) if s != libc::SIGTRAP => {
                if let Some(mask) = blocked {
                    ptrace::set_sigmask(pid, mask).ctx(pid, || "blocking signals again".into())?;
                }
                return Ok(());
            }
            Some(Stop::Signal(libc::SIGSTOP)) => {
                if sig != libc::SIGSTOP && blocked.is_none() {
                    let mask =
                        ptrace::get_sigmask(pid).ctx(pid, || "reading the signal mask".into())?;
                    ptrace::set_sigmask(pid, mask & !(1u64 << (sig - 1)))
                        .ctx(pid, || "unblocking the stop signal".into())?;
                    blocked = Some(mask);
                }
                ptrace::cont(pid, sig).ctx(pid, || "delivering the stop signal".into())?
            }
            Some(Stop::Exited(_) | Stop::Killed(_)) => {
                return Err(Error::Restore {
                    pid,
                    msg: "the new process died while being stopped again".into(),
                })
            }
            Some(_) => ptrace::cont(pid, 0).ctx(pid, || "resuming the new process".into())?,
        }
    }
}

/// In the rebuild of `p` (the process `inj` runs in): for its children of `procs` that
/// were stopped again, drops the SIGCHLD their stops sent and collects again the stops
/// that had been collected. Before `p`'s saved pending signals are queued.
pub fn settle_parent(
    inj: &Injector,
    p: &Process,
    procs: &[Process],
    scratch: &Scratch,
) -> Result<()> {
    let stopped: Vec<(i32, bool)> = procs
        .iter()
        .filter(|c| c.ppid == p.pid)
        .filter_map(|c| Some((c.pid, c.job_stop?.waited)))
        .collect();
    if stopped.is_empty() {
        return Ok(());
    }
    for &(child, waited) in &stopped {
        if !waited {
            continue;
        }
        scratch.write(&[0u8; 128])?;
        inj.call(
            &format!("waitid collecting the stop of child {child}"),
            libc::SYS_waitid,
            &[
                libc::P_PID as u64,
                child as u64,
                scratch.addr,
                (libc::WSTOPPED | libc::WNOHANG) as u64,
                0,
            ],
        )?;
    }
    // Every SIGCHLD pending now came from the restore (those of the zombies were dropped
    // while preparing); the saved ones are queued again afterwards.
    let mut set = [0u8; 24];
    set[..8].copy_from_slice(&(1u64 << (libc::SIGCHLD - 1)).to_le_bytes());
    scratch.write(&set)?;
    for _ in 0..64 {
        let r = inj.raw(
            libc::SYS_rt_sigtimedwait,
            &[scratch.addr, 0, scratch.addr + 8, 8],
        )?;
        if r < 0 {
            break; // EAGAIN: none left
        }
    }
    Ok(())
}
