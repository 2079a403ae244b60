//! Running syscalls inside a stopped tracee.
//!
//! Only the process itself can report some of its state (its signal handlers, timers,
//! `brk`) and only it can replace its own address space (`mremap` of the vdso,
//! `PR_SET_MM_MAP`). We make it execute single syscalls: point its instruction pointer
//! at a `syscall` instruction that exists in its address space, load the number and
//! arguments, and run it with PTRACE_SYSCALL to the syscall-exit stop, where we read
//! the result. No code of ours runs in the tracee and nothing but the one instruction
//! is executed, so this also works after the memory around it has been unmapped.

use crate::error::{Error, Result, SysContext};
use stasis_sys::arch::{Regs, SYSCALL_INSN};
use stasis_sys::ptrace::{self, Stop};

/// How long an injected syscall may take. The syscalls injected are queries, memory
/// map changes and the fork of a snapshot (about 13 ms per GiB resident): none
/// blocks; the snapshot's page writes are followed by [`Injector::poll`] instead.
pub const SYSCALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Executes syscalls in a stopped, seized thread.
pub struct Injector {
    pid: i32,
    insn: u64,
    base: Regs,
    /// The syscall started last (for messages).
    nr: std::cell::Cell<i64>,
}

impl Injector {
    /// `insn` is the address of a `syscall` instruction in the tracee. The thread's
    /// current registers are the template for each call; the caller restores the
    /// registers it wants afterwards.
    pub fn new(pid: i32, insn: u64) -> Result<Injector> {
        let base = ptrace::get_regs(pid).ctx(pid, || "reading registers".into())?;
        Ok(Injector {
            pid,
            insn,
            base,
            nr: std::cell::Cell::new(-1),
        })
    }

    /// The thread it runs syscalls in.
    pub fn tid(&self) -> i32 {
        self.pid
    }

    /// Runs syscall `nr` with `args`; returns the raw result (negative errno on error).
    pub fn raw(&self, nr: i64, args: &[u64]) -> Result<i64> {
        self.start(nr, args)?;
        self.finish()
    }

    /// Starts syscall `nr` with `args` and returns once the thread is executing it (past
    /// the syscall-entry stop); [`Injector::poll`] or [`Injector::finish`] collects the
    /// result. Lets several threads run long syscalls at once.
    pub fn start(&self, nr: i64, args: &[u64]) -> Result<()> {
        let pid = self.pid;
        self.nr.set(nr);
        let mut regs = self.base;
        regs.set_syscall(self.insn, nr, args);
        ptrace::set_regs(pid, &regs)
            .ctx(pid, || "setting registers for an injected syscall".into())?;
        ptrace::syscall(pid, 0).ctx(pid, || "resuming into an injected syscall".into())?;
        // The entry stop comes at once: one instruction runs before it.
        self.wait_syscall_stop(nr, crate::freeze::STOP_TIMEOUT)?;
        ptrace::syscall(pid, 0).ctx(pid, || "running an injected syscall".into())
    }

    /// Waits for the syscall stop of injected syscall `nr`, at most `timeout`.
    fn wait_syscall_stop(&self, nr: i64, timeout: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match ptrace::wait_until(self.pid, deadline) {
                Ok(None) => {
                    return Err(Error::Timeout {
                        pid: self.pid,
                        what: format!(
                            "an injected syscall (number {nr}) did not return within {} s ({})",
                            timeout.as_secs(),
                            crate::proc::thread_state(self.pid)
                        ),
                    })
                }
                Ok(Some(stop)) => {
                    if self.at_syscall_stop(Ok(stop))? {
                        return Ok(());
                    }
                }
                Err(e) => self.at_syscall_stop(Err(e)).map(drop)?,
            }
        }
    }

    /// The result of the syscall [`Injector::start`]ed, if it has finished (without
    /// blocking).
    pub fn poll(&self) -> Result<Option<i64>> {
        loop {
            match ptrace::try_wait(self.pid) {
                Ok(None) => return Ok(None),
                Ok(Some(stop)) => {
                    if self.at_syscall_stop(Ok(stop))? {
                        return self.result().map(Some);
                    }
                }
                Err(e) => return Err(e).ctx(self.pid, || "waiting for an injected syscall".into()),
            }
        }
    }

    /// Waits for the syscall [`Injector::start`]ed to finish (at most
    /// [`SYSCALL_TIMEOUT`]); its raw result.
    pub fn finish(&self) -> Result<i64> {
        self.wait_syscall_stop(self.nr.get(), SYSCALL_TIMEOUT)?;
        self.result()
    }

    /// Handles one stop while a syscall is injected: true at a syscall stop; otherwise
    /// the thread is resumed towards it. Signals are blocked while we inject; only
    /// SIGSTOP and friends can arrive: they are suppressed.
    fn at_syscall_stop(
        &self,
        stop: std::result::Result<Stop, stasis_sys::SysError>,
    ) -> Result<bool> {
        let pid = self.pid;
        match stop.ctx(pid, || "waiting for an injected syscall".into())? {
            Stop::Syscall => Ok(true),
            Stop::Exited(_) | Stop::Killed(_) => Err(Error::Gone { pid }),
            Stop::Signal(_) | Stop::Event(..) => {
                ptrace::syscall(pid, 0).ctx(pid, || "resuming into an injected syscall".into())?;
                Ok(false)
            }
        }
    }

    /// The result register of the syscall the thread stopped at the exit of.
    fn result(&self) -> Result<i64> {
        let regs = ptrace::get_regs(self.pid)
            .ctx(self.pid, || "reading an injected syscall's result".into())?;
        Ok(regs.ret())
    }

    /// Runs a syscall that must succeed; `what` describes it for the error message.
    pub fn call(&self, what: &str, nr: i64, args: &[u64]) -> Result<u64> {
        let r = self.raw(nr, args)?;
        self.check(what, r)
    }

    /// Turns a raw result into the value or an error naming `what`.
    pub fn check(&self, what: &str, r: i64) -> Result<u64> {
        if (-4095..0).contains(&r) {
            return Err(Error::Sys {
                pid: self.pid,
                context: format!("injected {what}"),
                source: stasis_sys::SysError {
                    call: "injected syscall",
                    pid: self.pid,
                    errno: (-r) as i32,
                },
            });
        }
        Ok(r as u64)
    }
}

/// Finds a `syscall` instruction in the executable memory of `pid`, looking in the
/// vdso first. Any two bytes `0f 05` in an executable page will do: execution starts
/// there and stops at the syscall exit, before any following byte runs.
pub fn find_syscall_insn(pid: i32, exec_ranges: &[(u64, u64)]) -> Result<u64> {
    for &(start, end) in exec_ranges {
        let len = (end - start).min(1 << 20) as usize;
        let mut buf = vec![0u8; len];
        if stasis_sys::vm::read(pid, start, &mut buf).is_err() {
            continue;
        }
        if let Some(i) = buf.windows(2).position(|w| w == SYSCALL_INSN) {
            return Ok(start + i as u64);
        }
    }
    Err(Error::Unsupported {
        pid,
        what: "a process without any readable syscall instruction (no vdso)".into(),
    })
}

/// A page of scratch memory mapped into the tracee for syscall arguments and results.
pub struct Scratch {
    pub addr: u64,
    pid: i32,
}

/// Size of a [`Scratch`] area.
pub const SCRATCH_LEN: u64 = 4096;

impl Scratch {
    /// Maps a fresh private anonymous page in the tracee.
    pub fn map(inj: &Injector, pid: i32) -> Result<Scratch> {
        let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let addr = inj.call(
            "mmap of a scratch page",
            libc::SYS_mmap,
            &[0, SCRATCH_LEN, prot, flags, u64::MAX, 0],
        )?;
        Ok(Scratch { addr, pid })
    }

    /// Uses an existing writable area of the tracee.
    pub fn at(pid: i32, addr: u64) -> Scratch {
        Scratch { addr, pid }
    }

    /// Reads `len` bytes at offset 0.
    pub fn read(&self, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        stasis_sys::vm::read(self.pid, self.addr, &mut buf)
            .ctx(self.pid, || "reading the scratch page".into())?;
        Ok(buf)
    }

    /// Writes `data` at offset 0.
    pub fn write(&self, data: &[u8]) -> Result<()> {
        stasis_sys::vm::write(self.pid, self.addr, data)
            .ctx(self.pid, || "writing the scratch page".into())
    }

    /// Unmaps the page.
    pub fn unmap(self, inj: &Injector) -> Result<()> {
        inj.call(
            "munmap of the scratch page",
            libc::SYS_munmap,
            &[self.addr, SCRATCH_LEN],
        )
        .map(drop)
    }
}

/// Little-endian u64 at `off` of `buf` (0 if out of range).
pub fn u64_at(buf: &[u8], off: usize) -> u64 {
    buf.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}
