//! Signals: dispositions and process-wide pending signals.
//! (Per-thread mask and pending signals are in [`crate::thread`].)
//!
//! Dump: a disposition's handler, flags and mask are only known to the process, so
//! `rt_sigaction(sig, NULL, &old)` is injected for every signal that /proc/PID/status
//! shows caught or ignored, and for SIGCHLD (whose SA_NOCLDSTOP and SA_NOCLDWAIT act
//! even with the default action). The other signals have the default action; flags
//! or a mask given with it have no effect and are not kept. (Querying all 62 cost
//! 4-60 ms of pause per process, most of a small MPI rank's.) Pending signals are read without dequeuing them with
//! PTRACE_PEEKSIGINFO. Restore: dispositions are set by the new process itself before
//! its address space is replaced (the handler addresses are just numbers until then,
//! and every signal is blocked); pending signals are queued again with an injected
//! `rt_sigqueueinfo` / `rt_tgsigqueueinfo` once memory is back.

use crate::error::{Result, SysContext};
use crate::inject::{u64_at, Injector, Scratch};
use stasis_image::{from_hex, to_hex, SigAction, Signals};
use stasis_sys::ptrace;

/// Highest signal number on Linux.
pub const NSIG: i32 = 64;

/// `struct kernel_sigaction` of x86-64 rt_sigaction(2).
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: u64,
    flags: u64,
    restorer: u64,
    mask: u64,
}

/// Reads the dispositions and the shared pending queue of a stopped process.
pub fn dump(inj: &Injector, pid: i32, scratch: &Scratch) -> Result<Signals> {
    let mut actions = Vec::new();
    let not_default = not_default(pid);
    for signo in 1..=NSIG {
        if signo == libc::SIGKILL || signo == libc::SIGSTOP {
            continue;
        }
        if signo != libc::SIGCHLD && not_default & (1u64 << (signo - 1)) == 0 {
            continue;
        }
        inj.call(
            &format!("rt_sigaction({signo}) query"),
            libc::SYS_rt_sigaction,
            &[signo as u64, 0, scratch.addr, 8],
        )?;
        let raw = scratch.read(32)?;
        let a = SigAction {
            signo,
            handler: u64_at(&raw, 0),
            flags: u64_at(&raw, 8),
            restorer: u64_at(&raw, 16),
            mask: u64_at(&raw, 24),
        };
        if a.handler != 0 || a.flags != 0 || a.mask != 0 {
            actions.push(a);
        }
    }
    let shared_pending = ptrace::peek_siginfo(pid, true)
        .ctx(pid, || "reading pending signals".into())?
        .iter()
        .map(|s| to_hex(s))
        .collect();
    Ok(Signals {
        actions,
        shared_pending,
    })
}

/// The signals process `pid` catches or ignores (bit `signo - 1`), from
/// /proc/PID/status; all of them where it cannot be read.
fn not_default(pid: i32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return u64::MAX;
    };
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    match (mask("SigIgn:"), mask("SigCgt:")) {
        (Some(ign), Some(cgt)) => ign | cgt,
        _ => u64::MAX,
    }
}

/// Installs the saved dispositions in the calling (new) process. Every signal must be
/// blocked until the address space holding the handlers is in place.
pub fn restore_actions(sig: &Signals) -> std::result::Result<(), String> {
    // The new process starts with the restorer's dispositions (the Rust runtime ignores
    // SIGPIPE and handles SIGSEGV/SIGBUS): reset every one, then apply the saved ones.
    let dfl = KernelSigaction::default();
    for signo in 1..=NSIG {
        if signo == libc::SIGKILL || signo == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads a kernel_sigaction of the size passed.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signo,
                &dfl as *const KernelSigaction,
                0usize,
                8usize,
            )
        };
    }
    for a in &sig.actions {
        let act = KernelSigaction {
            handler: a.handler,
            flags: a.flags,
            restorer: a.restorer,
            mask: a.mask,
        };
        // SAFETY: rt_sigaction reads a kernel_sigaction of the size passed (8-byte mask);
        // the handler is not called while every signal is blocked.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                a.signo,
                &act as *const KernelSigaction,
                0usize,
                8usize,
            )
        };
        if r != 0 && a.signo != 32 && a.signo != 33 {
            return Err(format!(
                "rt_sigaction({}): {}",
                a.signo,
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Queues saved siginfos again (process-wide when `tid` is None).
pub fn requeue(
    inj: &Injector,
    pid: i32,
    tid: Option<i32>,
    infos: &[String],
    scratch: &Scratch,
) -> Result<()> {
    for hex in infos {
        let Some(raw) = from_hex(hex).filter(|r| r.len() == 128) else {
            return Err(crate::Error::Restore {
                pid,
                msg: "malformed pending siginfo in the image".into(),
            });
        };
        let signo = i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        scratch.write(&raw)?;
        match tid {
            Some(t) => inj.call(
                "rt_tgsigqueueinfo",
                libc::SYS_rt_tgsigqueueinfo,
                &[pid as u64, t as u64, signo as u64, scratch.addr],
            )?,
            None => inj.call(
                "rt_sigqueueinfo",
                libc::SYS_rt_sigqueueinfo,
                &[pid as u64, signo as u64, scratch.addr],
            )?,
        };
    }
    Ok(())
}
