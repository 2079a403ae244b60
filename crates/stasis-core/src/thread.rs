//! Threads: registers, extended state, signal mask and per-thread pending signals,
//! rseq, clear_child_tid, robust futex list, alternate signal stack.
//!
//! Only single-threaded processes are accepted for now; everything here is per thread
//! so that multi-threaded support adds a loop, not a redesign.

use crate::error::{Error, Result, SysContext};
use crate::inject::{u64_at, Injector, Scratch};
use stasis_image::{from_hex, to_hex, AltStack, Rseq, Thread};
use stasis_sys::{arch, ptrace};

const PR_GET_TID_ADDRESS: u64 = 40;
const RSEQ_FLAG_UNREGISTER: u64 = 1;

/// Saves a stopped thread. `regs` are its registers as stopped (before injection).
pub fn dump(
    inj: &Injector,
    tid: i32,
    regs: &arch::Regs,
    sigmask: u64,
    scratch: &Scratch,
    comm: String,
) -> Result<Thread> {
    let xstate = ptrace::get_xstate(tid, arch::xstate_size())
        .ctx(tid, || "reading extended registers".into())?;
    let pending = ptrace::peek_siginfo(tid, false)
        .ctx(tid, || "reading pending signals".into())?
        .iter()
        .map(|s| to_hex(s))
        .collect();
    let rseq = match ptrace::get_rseq(tid) {
        Ok(c) if c.rseq_abi_pointer != 0 => Some(Rseq {
            addr: c.rseq_abi_pointer,
            len: c.rseq_abi_size,
            signature: c.signature,
        }),
        Ok(_) => None,
        Err(e) if e.errno == libc::EIO || e.errno == libc::EINVAL => None,
        Err(e) => return Err(e).ctx(tid, || "reading the rseq registration".into()),
    };
    inj.call(
        "prctl(PR_GET_TID_ADDRESS)",
        libc::SYS_prctl,
        &[PR_GET_TID_ADDRESS, scratch.addr],
    )?;
    let clear_child_tid = u64_at(&scratch.read(8)?, 0);
    inj.call(
        "sigaltstack query",
        libc::SYS_sigaltstack,
        &[0, scratch.addr],
    )?;
    let ss = scratch.read(24)?;
    let altstack = AltStack {
        sp: u64_at(&ss, 0),
        flags: u64_at(&ss, 8) as i32,
        size: u64_at(&ss, 16),
    };
    let (robust_list, robust_list_len) = robust_list_of(tid)?;
    Ok(Thread {
        tid,
        comm,
        regs: *regs,
        xstate: to_hex(&xstate),
        sigmask,
        pending,
        rseq,
        clear_child_tid,
        robust_list,
        robust_list_len,
        altstack,
    })
}

fn robust_list_of(tid: i32) -> Result<(u64, u64)> {
    let mut head = 0u64;
    let mut len = 0usize;
    // SAFETY: get_robust_list writes one pointer and one size_t to the given addresses.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    if r != 0 {
        return Err(stasis_sys::SysError::last("get_robust_list", tid))
            .ctx(tid, || "reading the robust futex list".into());
    }
    Ok((head, len as u64))
}

/// Unregisters the rseq area the restorer's own libc registered in the new process,
/// before its memory goes away.
pub fn drop_own_rseq(inj: &Injector, pid: i32) -> Result<()> {
    if let Ok(c) = ptrace::get_rseq(pid) {
        if c.rseq_abi_pointer != 0 {
            inj.call(
                "rseq unregister",
                libc::SYS_rseq,
                &[
                    c.rseq_abi_pointer,
                    u64::from(c.rseq_abi_size),
                    RSEQ_FLAG_UNREGISTER,
                    u64::from(c.signature),
                ],
            )?;
        }
    }
    Ok(())
}

/// Restores the per-thread kernel registrations, once memory is in place.
pub fn restore_registrations(inj: &Injector, t: &Thread, scratch: &Scratch) -> Result<()> {
    inj.call(
        "set_tid_address",
        libc::SYS_set_tid_address,
        &[t.clear_child_tid],
    )?;
    if t.robust_list != 0 {
        inj.call(
            "set_robust_list",
            libc::SYS_set_robust_list,
            &[t.robust_list, t.robust_list_len],
        )?;
    }
    if let Some(r) = t.rseq {
        inj.call(
            "rseq register",
            libc::SYS_rseq,
            &[r.addr, u64::from(r.len), 0, u64::from(r.signature)],
        )?;
    }
    let mut ss = Vec::with_capacity(24);
    let flags = if t.altstack.flags & libc::SS_DISABLE != 0 {
        libc::SS_DISABLE
    } else {
        0
    };
    ss.extend_from_slice(&t.altstack.sp.to_le_bytes());
    ss.extend_from_slice(&(flags as u64).to_le_bytes());
    ss.extend_from_slice(&t.altstack.size.to_le_bytes());
    scratch.write(&ss)?;
    inj.call("sigaltstack", libc::SYS_sigaltstack, &[scratch.addr, 0])?;
    Ok(())
}

/// Loads the saved registers, extended state and signal mask; the thread resumes where
/// it was (interrupted syscalls are re-executed, see `Regs::for_restore`).
pub fn restore_cpu(tid: i32, t: &Thread) -> Result<()> {
    let xstate = from_hex(&t.xstate).ok_or_else(|| Error::Restore {
        pid: tid,
        msg: "malformed xstate in the image".into(),
    })?;
    ptrace::set_regs(tid, &t.regs.for_restore()).ctx(tid, || "setting registers".into())?;
    ptrace::set_xstate(tid, &xstate).ctx(tid, || {
        "setting extended registers (is this CPU's feature set the image's?)".into()
    })?;
    ptrace::set_sigmask(tid, t.sigmask).ctx(tid, || "setting the signal mask".into())?;
    Ok(())
}
