//! ptrace(2): seizing, stopping, resuming and reading/writing the state of a thread.
//!
//! Requests that the `nix` crate lacks (full register sets, signal masks, rseq
//! configuration, PEEKSIGINFO) are called through libc here, once, with their kernel
//! structure layouts spelled out.

use crate::arch::{Regs, NT_XSTATE};
use crate::{Result, SysError};

const PTRACE_SEIZE: libc::c_uint = 0x4206;
const PTRACE_INTERRUPT: libc::c_uint = 0x4207;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;

/// Report syscall stops as `SIGTRAP | 0x80`.
pub const O_TRACESYSGOOD: u64 = 1;
/// Trace threads and processes the tracee creates with clone (they start stopped).
pub const O_TRACECLONE: u64 = 8;
/// Kill the tracee if the tracer exits.
pub const O_EXITKILL: u64 = 0x10_0000;
/// `PTRACE_EVENT_STOP`: the stop PTRACE_INTERRUPT and group-stops produce.
pub const EVENT_STOP: i32 = 128;

fn req(
    call: &'static str,
    request: libc::c_uint,
    pid: i32,
    addr: usize,
    data: usize,
) -> Result<i64> {
    // SAFETY: every caller passes `addr`/`data` that are either plain integers or point
    // to live buffers of the size the request expects (documented at each call site).
    let r = unsafe {
        libc::ptrace(
            request,
            pid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    if r == -1 {
        let e = SysError::last(call, pid);
        if e.errno != 0 {
            return Err(e);
        }
    }
    Ok(r)
}

/// PTRACE_SEIZE: attach without stopping the thread.
pub fn seize(pid: i32, options: u64) -> Result<()> {
    req("PTRACE_SEIZE", PTRACE_SEIZE, pid, 0, options as usize).map(drop)
}

/// PTRACE_SETOPTIONS.
pub fn set_options(pid: i32, options: u64) -> Result<()> {
    req(
        "PTRACE_SETOPTIONS",
        libc::PTRACE_SETOPTIONS,
        pid,
        0,
        options as usize,
    )
    .map(drop)
}

/// PTRACE_INTERRUPT: ask a seized thread to stop (reported as [`Stop::Event`] with
/// [`EVENT_STOP`]).
pub fn interrupt(pid: i32) -> Result<()> {
    req("PTRACE_INTERRUPT", PTRACE_INTERRUPT, pid, 0, 0).map(drop)
}

/// PTRACE_CONT, delivering `sig` (0 for none).
pub fn cont(pid: i32, sig: i32) -> Result<()> {
    req("PTRACE_CONT", libc::PTRACE_CONT, pid, 0, sig as usize).map(drop)
}

/// PTRACE_SYSCALL: resume until the next syscall entry or exit.
pub fn syscall(pid: i32, sig: i32) -> Result<()> {
    req("PTRACE_SYSCALL", libc::PTRACE_SYSCALL, pid, 0, sig as usize).map(drop)
}

/// PTRACE_DETACH, delivering `sig` (0 for none).
pub fn detach(pid: i32, sig: i32) -> Result<()> {
    req("PTRACE_DETACH", libc::PTRACE_DETACH, pid, 0, sig as usize).map(drop)
}

/// PTRACE_POKEDATA: writes the word `data` at `addr` of a stopped tracee, also into a
/// mapping it cannot write itself (a private copy of the page is made, as a debugger's
/// breakpoint does).
pub fn poke(pid: i32, addr: u64, data: u64) -> Result<()> {
    req(
        "PTRACE_POKEDATA",
        libc::PTRACE_POKEDATA,
        pid,
        addr as usize,
        data as usize,
    )
    .map(drop)
}

/// PTRACE_GETREGS.
pub fn get_regs(pid: i32) -> Result<Regs> {
    let mut regs = Regs::default();
    // `regs` is a repr(C) user_regs_struct, the buffer GETREGS fills.
    req(
        "PTRACE_GETREGS",
        libc::PTRACE_GETREGS,
        pid,
        0,
        &mut regs as *mut Regs as usize,
    )?;
    Ok(regs)
}

/// PTRACE_SETREGS.
pub fn set_regs(pid: i32, regs: &Regs) -> Result<()> {
    // `regs` is a repr(C) user_regs_struct, the buffer SETREGS reads.
    req(
        "PTRACE_SETREGS",
        libc::PTRACE_SETREGS,
        pid,
        0,
        regs as *const Regs as usize,
    )
    .map(drop)
}

/// PTRACE_GETREGSET NT_X86_XSTATE: the XSAVE area, `size` bytes at most.
pub fn get_xstate(pid: i32, size: usize) -> Result<Vec<u8>> {
    if size == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; size];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // The iovec describes `buf`, which outlives the call.
    req(
        "PTRACE_GETREGSET(NT_X86_XSTATE)",
        libc::PTRACE_GETREGSET,
        pid,
        NT_XSTATE as usize,
        &mut iov as *mut _ as usize,
    )?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// PTRACE_SETREGSET NT_X86_XSTATE.
pub fn set_xstate(pid: i32, xstate: &[u8]) -> Result<()> {
    if xstate.is_empty() {
        return Ok(());
    }
    let mut iov = libc::iovec {
        iov_base: xstate.as_ptr() as *mut libc::c_void,
        iov_len: xstate.len(),
    };
    // The iovec describes `xstate`; the kernel only reads it.
    req(
        "PTRACE_SETREGSET(NT_X86_XSTATE)",
        libc::PTRACE_SETREGSET,
        pid,
        NT_XSTATE as usize,
        &mut iov as *mut _ as usize,
    )
    .map(drop)
}

/// PTRACE_GETSIGMASK: the thread's blocked-signal mask (bit N-1 = signal N).
pub fn get_sigmask(pid: i32) -> Result<u64> {
    let mut mask = 0u64;
    req(
        "PTRACE_GETSIGMASK",
        PTRACE_GETSIGMASK,
        pid,
        8,
        &mut mask as *mut u64 as usize,
    )?;
    Ok(mask)
}

/// PTRACE_SETSIGMASK.
pub fn set_sigmask(pid: i32, mask: u64) -> Result<()> {
    req(
        "PTRACE_SETSIGMASK",
        PTRACE_SETSIGMASK,
        pid,
        8,
        &mask as *const u64 as usize,
    )
    .map(drop)
}

/// `struct ptrace_rseq_configuration` (include/uapi/linux/ptrace.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RseqConfig {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

/// PTRACE_GET_RSEQ_CONFIGURATION: where the thread registered its rseq area.
pub fn get_rseq(pid: i32) -> Result<RseqConfig> {
    let mut conf = RseqConfig::default();
    req(
        "PTRACE_GET_RSEQ_CONFIGURATION",
        PTRACE_GET_RSEQ_CONFIGURATION,
        pid,
        std::mem::size_of::<RseqConfig>(),
        &mut conf as *mut RseqConfig as usize,
    )?;
    Ok(conf)
}

/// A raw `siginfo_t` (128 bytes), as queued by the kernel.
pub type RawSiginfo = [u8; 128];

#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// PTRACE_PEEKSIGINFO: the pending signals of the thread (`shared == false`) or of the
/// whole process (`shared == true`), without dequeuing them.
pub fn peek_siginfo(pid: i32, shared: bool) -> Result<Vec<RawSiginfo>> {
    let mut out = Vec::new();
    loop {
        let mut batch = [[0u8; 128]; 32];
        let args = PeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: batch.len() as i32,
        };
        // `args` and `batch` are live for the call; batch holds `nr` siginfos.
        let n = req(
            "PTRACE_PEEKSIGINFO",
            PTRACE_PEEKSIGINFO,
            pid,
            &args as *const _ as usize,
            batch.as_mut_ptr() as usize,
        )?;
        if n <= 0 {
            return Ok(out);
        }
        out.extend_from_slice(&batch[..n as usize]);
    }
}

/// Why `waitpid` returned for a traced thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The thread exited with this status.
    Exited(i32),
    /// The thread was killed by this signal.
    Killed(i32),
    /// A syscall-entry or syscall-exit stop (needs [`O_TRACESYSGOOD`]).
    Syscall,
    /// A ptrace event stop (`PTRACE_EVENT_*`), with the stop signal.
    Event(i32, i32),
    /// A signal-delivery stop for this signal.
    Signal(i32),
}

/// waitpid(pid, __WALL) for a traced thread, retrying on EINTR.
pub fn wait(pid: i32) -> Result<Stop> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r == -1 {
            let e = SysError::last("waitpid", pid);
            if e.errno == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        break;
    }
    Ok(decode_status(status))
}

/// waitpid(pid, __WALL | WNOHANG): the stop if `pid` has one to report, else None.
pub fn try_wait(pid: i32) -> Result<Option<Stop>> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL | libc::WNOHANG) };
        match r {
            -1 => {
                let e = SysError::last("waitpid", pid);
                if e.errno == libc::EINTR {
                    continue;
                }
                return Err(e);
            }
            0 => return Ok(None),
            _ => return Ok(Some(decode_status(status))),
        }
    }
}

/// waitpid(pid, __WALL) for a traced thread, giving up at `deadline`: None when it
/// had nothing to report by then. waitpid has no timeout, so this polls: a few
/// yields first (a stop asked for is usually reported within microseconds), then
/// sleeps growing to a millisecond.
pub fn wait_until(pid: i32, deadline: std::time::Instant) -> Result<Option<Stop>> {
    let mut pause = std::time::Duration::from_micros(20);
    let mut spins = 0;
    loop {
        if let Some(stop) = try_wait(pid)? {
            return Ok(Some(stop));
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        if spins < 64 {
            spins += 1;
            std::thread::yield_now();
        } else {
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(std::time::Duration::from_millis(1));
        }
    }
}

/// Decodes a wait status of a traced child.
pub fn decode_status(status: i32) -> Stop {
    if libc::WIFEXITED(status) {
        Stop::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Stop::Killed(libc::WTERMSIG(status))
    } else {
        let sig = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        if sig == (libc::SIGTRAP | 0x80) {
            Stop::Syscall
        } else if event != 0 {
            Stop::Event(event, sig)
        } else {
            Stop::Signal(sig)
        }
    }
}
