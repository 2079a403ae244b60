//! Running syscalls inside a stopped tracee.
//!
//! Only the process itself can report some of its state (its signal handlers, timers,
//! `brk`) and only it can replace its own address space (`mremap` of the vdso,
//! `PR_SET_MM_MAP`). We make it execute single syscalls: point its instruction pointer
//! at a `syscall` instruction that exists in its address space, load the number and
//! arguments, and run it with PTRACE_SYSCALL to the syscall-exit stop, where we read
//! the result. No code of ours runs in the tracee and nothing but the one instruction
//! is executed, so this also works after the memory around it has been unmapped.
//!
//! # Kill-safe injection (checkpoints of a running application)
//!
//! A tracer that dies releases its tracees at once, with whatever registers they hold.
//! So a checkpoint never leaves an application thread in a state it could not resume
//! from by itself:
//!
//! * The [`Gadget`] (`syscall; rt_sigreturn`, and `syscall; close(result);
//!   rt_sigreturn`) is written once into the zero padding after the last section of the
//!   process's vdso, bytes nothing executes or reads (PTRACE_POKEDATA: the page
//!   becomes a private copy, as under a debugger's breakpoint). It stays there for the
//!   next checkpoints.
//! * Before a thread's registers change, a [`ReturnFrame`] (an `rt_sigframe` holding
//!   its registers, extended state and signal mask as they must resume, an interrupted
//!   syscall restarted) is written below its red zone, where the kernel puts signal
//!   frames, and its scratch area below that: no mapping is added to the process.
//! * The thread is then *parked*: its registers point at the gadget's `rt_sigreturn`
//!   with the stack pointer on the frame, and only then are its signals blocked. Each
//!   injected syscall runs at the gadget's `syscall`, followed by `rt_sigreturn`. Left
//!   alone at any instant, the thread finishes the syscall at hand and returns to
//!   exactly its saved state; a descriptor created for us is closed on that way.
//! * Released normally, the mask and then the registers are put back by ptrace.
//!
//! Restore and the snapshot, whose tracees are not yet (or no longer) the
//! application, use the plain form ([`Injector::new`]).

use crate::error::{Error, Result, SysContext};
use stasis_sys::arch::{self, Regs, ReturnFrame, SYSCALL_INSN};
use stasis_sys::fault;
use stasis_sys::ptrace::{self, Stop};

/// How long an injected syscall may take. The syscalls injected are queries, memory
/// map changes and the fork of a snapshot (about 13 ms per GiB resident): none
/// blocks; the snapshot's page writes are followed by [`Injector::poll`] instead.
pub const SYSCALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Executes syscalls in a stopped, seized thread. A clone injects into the same
/// thread (e.g. to collect a syscall started through another).
#[derive(Clone)]
pub struct Injector {
    pid: i32,
    insn: u64,
    base: Regs,
    /// Parked on a return frame: the gadget's `syscall; close; rt_sigreturn`.
    call_close: Option<u64>,
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
            call_close: None,
            nr: std::cell::Cell::new(-1),
        })
    }

    /// Injects into thread `tid` parked on its return frame (see the module
    /// documentation): `parked` are its registers as parked, on the frame.
    pub fn parked(tid: i32, gadget: &Gadget, parked: Regs) -> Injector {
        Injector {
            pid: tid,
            insn: gadget.call,
            base: parked,
            call_close: Some(gadget.call_close),
            nr: std::cell::Cell::new(-1),
        }
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
        self.start_at(self.insn, nr, args)
    }

    fn start_at(&self, insn: u64, nr: i64, args: &[u64]) -> Result<()> {
        let pid = self.pid;
        fault::step("injected syscall")?;
        self.nr.set(nr);
        let mut regs = self.base;
        regs.set_syscall(insn, nr, args);
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

    /// Runs a syscall that creates a descriptor in the tracee (`what` describes it),
    /// hands the descriptor's number to `take` (which takes it out, e.g. with
    /// pidfd_getfd) and closes it in the tracee again. Parked, the close is part of the
    /// gadget the syscall runs at: the tracee closes it by itself if left alone at any
    /// moment in between.
    pub fn call_closing<T>(
        &self,
        what: &str,
        nr: i64,
        args: &[u64],
        take: impl FnOnce(i32) -> Result<T>,
    ) -> Result<T> {
        let Some(at) = self.call_close else {
            let fd = self.call(what, nr, args)? as i32;
            let taken = take(fd);
            self.call(
                &format!("close of the {what}"),
                libc::SYS_close,
                &[fd as u64],
            )?;
            return taken;
        };
        self.start_at(at, nr, args)?;
        let r = self.finish()?;
        let taken = self.check(what, r).and_then(|fd| take(fd as i32));
        // On to the gadget's close (of an error code: EBADF, harmless). An error
        // injected here is returned once the descriptor is closed.
        let fault = fault::step("closing an injected descriptor").err();
        self.nr.set(libc::SYS_close);
        ptrace::syscall(self.pid, 0).ctx(self.pid, || "resuming into a close".into())?;
        self.wait_syscall_stop(libc::SYS_close, crate::freeze::STOP_TIMEOUT)?;
        ptrace::syscall(self.pid, 0).ctx(self.pid, || "running a close".into())?;
        let closed = self.finish()?;
        if r >= 0 {
            self.check(&format!("close of the {what}"), closed)?;
        }
        if let Some(f) = fault {
            return Err(f.into());
        }
        taken
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

/// Scratch memory of the tracee for syscall arguments and results.
pub struct Scratch {
    pub addr: u64,
    /// Its size in bytes.
    pub len: u64,
    pid: i32,
}

/// Size of the scratch area of the thread that runs a checkpoint's process-wide
/// syscalls (and of the one at restore).
pub const SCRATCH_LEN: u64 = 4096;

impl Scratch {
    /// Maps a fresh private anonymous page in the tracee, for injection without return
    /// frames (see [`Injection`]).
    pub fn map(inj: &Injector, pid: i32) -> Result<Scratch> {
        let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let addr = inj.call(
            "mmap of a scratch page",
            libc::SYS_mmap,
            &[0, SCRATCH_LEN, prot, flags, u64::MAX, 0],
        )?;
        Ok(Scratch {
            addr,
            len: SCRATCH_LEN,
            pid,
        })
    }

    /// Unmaps a page [`Scratch::map`] mapped.
    pub fn unmap(self, inj: &Injector) -> Result<()> {
        inj.call(
            "munmap of the scratch page",
            libc::SYS_munmap,
            &[self.addr, self.len],
        )
        .map(drop)
    }

    /// Uses `len` bytes at `addr`, writable memory of the tracee that nothing else uses.
    pub fn at(pid: i32, addr: u64, len: u64) -> Scratch {
        Scratch { addr, len, pid }
    }

    /// Reads `len` bytes at offset 0.
    pub fn read(&self, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        stasis_sys::vm::read(self.pid, self.addr, &mut buf)
            .ctx(self.pid, || "reading the scratch area".into())?;
        Ok(buf)
    }

    /// Writes `data` at offset 0.
    pub fn write(&self, data: &[u8]) -> Result<()> {
        stasis_sys::vm::write(self.pid, self.addr, data)
            .ctx(self.pid, || "writing the scratch area".into())
    }
}

/// The return gadget of a process (see the module documentation): the addresses of
/// its entry points.
#[derive(Debug, Clone, Copy)]
pub struct Gadget {
    /// `syscall; rt_sigreturn`.
    pub call: u64,
    /// `rt_sigreturn`: where a parked thread's registers point.
    pub ret: u64,
    /// `syscall; close(result); rt_sigreturn`.
    pub call_close: u64,
}

/// Marks the gadget in the vdso padding (followed by its code).
const GADGET_TAG: &[u8; 8] = b"stasisR1";

impl Gadget {
    /// Places the gadget of process `pid` (stopped) into the padding after the last
    /// byte of its vdso's ELF image, or finds it there from an earlier checkpoint.
    /// Err when there is no vdso or no room in it.
    pub fn install(pid: i32, layout: &[crate::memory::Vma]) -> Result<Gadget> {
        let none = |why: &str| Error::Unsupported {
            pid,
            what: format!("kill-safe syscall injection: {why}"),
        };
        let vdso = layout
            .iter()
            .find(|v| v.map.kind == stasis_image::MappingKind::Vdso)
            .ok_or_else(|| none("no vdso"))?;
        let (start, end) = (vdso.map.start, vdso.map.end);
        let mut image = vec![0u8; (end - start).min(1 << 20) as usize];
        stasis_sys::vm::read(pid, start, &mut image).ctx(pid, || "reading the vdso".into())?;
        let used = elf_image_end(&image).ok_or_else(|| none("an unreadable vdso image"))?;
        let at = (used + 15) & !15;
        let mut want = GADGET_TAG.to_vec();
        want.extend_from_slice(&arch::GADGET_CODE);
        // Whole words (PTRACE_POKEDATA writes eight bytes).
        while !want.len().is_multiple_of(8) {
            want.push(0);
        }
        let region = image
            .get(at..at + want.len())
            .ok_or_else(|| none("no room after the vdso image"))?;
        if region != want.as_slice() {
            // Zeros, or our own bytes from a write that was interrupted.
            if region
                .iter()
                .zip(&want)
                .any(|(&have, &w)| have != 0 && have != w)
            {
                return Err(none("the vdso padding is not empty"));
            }
            for (k, word) in want.chunks_exact(8).enumerate() {
                fault::step("writing the return gadget")?;
                let v = u64::from_le_bytes(word.try_into().unwrap_or_default());
                let a = start + (at + 8 * k) as u64;
                ptrace::poke(pid, a, v).ctx(pid, || "writing the return gadget".into())?;
            }
        }
        let code = start + (at + GADGET_TAG.len()) as u64;
        Ok(Gadget {
            call: code + arch::GADGET_CALL,
            ret: code + arch::GADGET_RETURN,
            call_close: code + arch::GADGET_CALL_CLOSE,
        })
    }
}

/// Offset just past the last byte an ELF image (the vdso) uses: headers, program and
/// section header tables, segments and sections. None if it is not a 64-bit ELF.
fn elf_image_end(img: &[u8]) -> Option<usize> {
    if img.get(0..5)? != b"\x7fELF\x02" {
        return None;
    }
    let u16_at = |o: usize| {
        img.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as u64)
    };
    let u32_at = |o: usize| {
        img.get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        img.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (phoff, shoff) = (u64_at(0x20)?, u64_at(0x28)?);
    let (phentsize, phnum) = (u16_at(0x36)?, u16_at(0x38)?);
    let (shentsize, shnum) = (u16_at(0x3a)?, u16_at(0x3c)?);
    let mut end = 64u64.max(phoff + phentsize * phnum);
    if shnum > 0 {
        end = end.max(shoff + shentsize * shnum);
    }
    for i in 0..phnum {
        let ph = (phoff + i * phentsize) as usize;
        end = end.max(u64_at(ph + 8)? + u64_at(ph + 32)?);
    }
    for i in 0..shnum {
        let sh = (shoff + i * shentsize) as usize;
        const SHT_NOBITS: u32 = 8;
        if u32_at(sh + 4)? != SHT_NOBITS {
            end = end.max(u64_at(sh + 24)? + u64_at(sh + 32)?);
        }
    }
    usize::try_from(end).ok().filter(|&e| e <= img.len())
}

/// How syscalls are injected into the threads of a frozen process during a checkpoint.
pub enum Injection {
    /// Every thread parked on its return frame, with its scratch below it (the
    /// leader's first): kill-safe.
    Parked(Vec<(Injector, Scratch)>),
    /// Without return frames (no room for the gadget in the vdso, or for a frame
    /// below a thread's stack pointer): every thread's signals blocked, a scratch page
    /// mapped in the process. A kill of stasis meanwhile can harm the process.
    Legacy {
        injs: Vec<Injector>,
        scratch: Scratch,
    },
}

impl Injection {
    /// Prepares injection into every thread of `frozen` (whose memory map is
    /// `layout`, with a `syscall` instruction at `insn`): parked when possible.
    pub fn prepare(
        frozen: &mut crate::freeze::Frozen,
        layout: &[crate::memory::Vma],
        insn: u64,
    ) -> Result<Injection> {
        let pid = frozen.pid;
        match Gadget::install(pid, layout) {
            Ok(g) => {
                let slot = crate::thread::DUMP_SLOT;
                if let Some(p) = frozen.park_all(&g, layout, SCRATCH_LEN, slot)? {
                    return Ok(Injection::Parked(p));
                }
            }
            Err(e @ Error::Fault(_)) => return Err(e),
            Err(e) => tracing::warn!(
                "{e}: syscalls are injected without return frames (a kill of stasis during this checkpoint could harm the process)"
            ),
        }
        frozen.block_signals()?;
        let injs = frozen
            .threads
            .iter()
            .map(|t| Injector::new(t.tid, insn))
            .collect::<Result<Vec<_>>>()?;
        let scratch = Scratch::map(&injs[0], pid)?;
        Ok(Injection::Legacy { injs, scratch })
    }

    /// The leader's injector and scratch (for the process-wide syscalls).
    pub fn leader(&self) -> (&Injector, &Scratch) {
        match self {
            Injection::Parked(p) => (&p[0].0, &p[0].1),
            Injection::Legacy { injs, scratch } => (&injs[0], scratch),
        }
    }

    /// Each thread's injector and the address of `slot` bytes of its own scratch (in
    /// batches of 64 threads at most, which may share addresses across batches).
    pub fn slots(&self, slot: u64) -> Vec<(&Injector, u64)> {
        match self {
            Injection::Parked(p) => p.iter().map(|(i, s)| (i, s.addr)).collect(),
            Injection::Legacy { injs, scratch } => {
                let base = scratch.addr;
                injs.iter()
                    .enumerate()
                    .map(|(k, i)| (i, base + (k % 64) as u64 * slot))
                    .collect()
            }
        }
    }

    /// Undoes what injection added to the process (the legacy scratch page); parked
    /// threads stay parked until released.
    pub fn finish(self) -> Result<()> {
        match self {
            Injection::Legacy { injs, scratch } => scratch.unmap(&injs[0]),
            Injection::Parked(_) => Ok(()),
        }
    }
}

/// Where a thread parks: its return frame, and the scratch area below it.
pub struct Berth {
    pub frame: ReturnFrame,
    pub scratch_addr: u64,
}

/// Places the return frame of a thread stopped with `regs`, `sigmask` and `xstate`,
/// and `scratch_len` bytes of scratch below it, inside the writable mapping its stack
/// pointer is in. None when that mapping has no room for them.
pub fn berth(
    layout: &[crate::memory::Vma],
    regs: &Regs,
    sigmask: u64,
    xstate: &[u8],
    scratch_len: u64,
) -> std::result::Result<Option<Berth>, String> {
    let frame = arch::return_frame(regs, sigmask, xstate)?;
    let scratch_addr = frame.addr.wrapping_sub(scratch_len) & !63;
    let sp = regs.rsp;
    let fits = layout.iter().any(|v| {
        v.map.prot & libc::PROT_WRITE as u32 != 0
            && v.map.start <= scratch_addr
            && scratch_addr < frame.addr
            && sp <= v.map.end
            && sp > v.map.start
    });
    Ok(fits.then_some(Berth {
        frame,
        scratch_addr,
    }))
}

/// Little-endian u64 at `off` of `buf` (0 if out of range).
pub fn u64_at(buf: &[u8], off: usize) -> u64 {
    buf.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}
