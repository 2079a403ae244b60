//! x86-64: `struct user_regs_struct`, `NT_X86_XSTATE`, the `syscall` instruction.
//!
//! See arch/x86/include/asm/user_64.h and ptrace(2) (PTRACE_GETREGSET).

use serde::{Deserialize, Serialize};

/// Name of this architecture as recorded in images.
pub const ARCH_NAME: &str = "x86_64";

/// Machine code of one `syscall` instruction. Injected syscalls jump here.
pub const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];

/// ELF note type of the extended state register set (`NT_X86_XSTATE`).
pub const NT_XSTATE: libc::c_int = 0x202;

/// General-purpose registers as the kernel lays them out for PTRACE_GETREGS
/// (`struct user_regs_struct`). Field order is ABI.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

// Syscall restart codes the kernel leaves in rax when a syscall was interrupted
// (include/linux/errno.h). User space never sees them.
const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// Syscalls that fail with EINTR after a stop (signal(7)), rather than restarting.
const STOP_EINTR_SYSCALLS: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_io_getevents,
    333, // io_pgetevents
];

impl Regs {
    /// The syscall the thread was inside of when it stopped, if any.
    pub fn syscall_nr(&self) -> Option<i64> {
        let nr = self.orig_rax as i64;
        (nr >= 0).then_some(nr)
    }

    /// Return value register, signed.
    pub fn ret(&self) -> i64 {
        self.rax as i64
    }

    /// True when the thread stopped in the middle of a syscall that the kernel would
    /// restart (rax holds one of the internal -ERESTART* codes).
    pub fn interrupted_restartable(&self) -> bool {
        let Some(nr) = self.syscall_nr() else {
            return false;
        };
        match -self.ret() {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK => true,
            // These return EINTR when the thread is merely stopped (signal(7): "even
            // in the absence of signal handlers ... after the process is stopped"),
            // which our ptrace stop is: caught before user space sees it, they are
            // executed again instead.
            e if e == i64::from(libc::EINTR) => STOP_EINTR_SYSCALLS.contains(&nr),
            _ => false,
        }
    }

    /// Registers to resume a thread with: a restored one, or a live one after syscalls
    /// were injected into it.
    ///
    /// Every interrupted restartable syscall is executed again with its original
    /// arguments (still in the argument registers): back up over the `syscall`
    /// instruction and reload the number. A restored thread has no kernel restart
    /// block, and a live one must not be left inside `restart_syscall(2)` either: the
    /// next checkpoint would find it there with its original syscall unknown. Injection
    /// leaves a live thread outside the kernel's own restart path, so this is done by
    /// hand for it too. A relative sleep may last a little longer than asked, never
    /// shorter, and never fails with a spurious EINTR.
    pub fn for_restore(&self) -> Regs {
        let mut r = *self;
        if r.interrupted_restartable() {
            r.rax = r.orig_rax;
            r.rip -= SYSCALL_INSN.len() as u64;
        }
        r.orig_rax = u64::MAX;
        r
    }

    /// Registers of a thread parked on a [`ReturnFrame`]: left alone, it executes
    /// `rt_sigreturn` at `ret` (a [`GADGET_RETURN`]) with the stack pointer at `sp`.
    pub fn parked(&self, ret: u64, sp: u64) -> Regs {
        let mut r = *self;
        r.rip = ret;
        r.rsp = sp;
        r.rax = 15;
        // No restart of the syscall the thread was stopped in: the frame does it.
        r.orig_rax = u64::MAX;
        r
    }

    /// Prepares these registers to execute syscall `nr` with `args` at `insn`
    /// (the address of a `syscall` instruction in the tracee).
    pub fn set_syscall(&mut self, insn: u64, nr: i64, args: &[u64]) {
        self.rip = insn;
        self.rax = nr as u64;
        // orig_rax = -1 keeps the kernel from applying its own restart logic to the
        // syscall the thread was stopped in.
        self.orig_rax = u64::MAX;
        let slots = [
            &mut self.rdi,
            &mut self.rsi,
            &mut self.rdx,
            &mut self.r10,
            &mut self.r8,
            &mut self.r9,
        ];
        for (slot, v) in slots
            .into_iter()
            .zip(args.iter().copied().chain(std::iter::repeat(0)))
        {
            *slot = v;
        }
    }
}

/// The return gadget: the machine code a checkpoint runs injected syscalls through
/// (stasis-core's `inject` places it in the padding after the vdso's last section).
/// A thread pointed at [`GADGET_CALL`] executes one syscall and then `rt_sigreturn`;
/// with its stack pointer at a [`ReturnFrame`], that puts back every register, the
/// extended state and the signal mask as they were before anything was injected. So a
/// thread left alone at any instant (its tracer killed) completes what it was doing
/// and returns to its own saved state by itself. [`GADGET_CALL_CLOSE`] does the same
/// for a syscall that creates a descriptor, closing it on the way back.
pub const GADGET_CODE: [u8; 28] = [
    0x0f, 0x05, // +0  syscall                 (GADGET_CALL)
    0xb8, 0x0f, 0x00, 0x00, 0x00, // +2  mov $15, %eax  (GADGET_RETURN: rt_sigreturn)
    0x0f, 0x05, // +7  syscall
    0x0f, 0x05, // +9  syscall                 (GADGET_CALL_CLOSE)
    0x48, 0x89, 0xc7, // +11 mov %rax, %rdi
    0xb8, 0x03, 0x00, 0x00, 0x00, // +14 mov $3, %eax   (close)
    0x0f, 0x05, // +19 syscall
    0xb8, 0x0f, 0x00, 0x00, 0x00, // +21 mov $15, %eax  (rt_sigreturn)
    0x0f, 0x05, // +26 syscall
];
/// Offset in [`GADGET_CODE`] of a syscall followed by `rt_sigreturn`.
pub const GADGET_CALL: u64 = 0;
/// Offset in [`GADGET_CODE`] of `rt_sigreturn` alone (a parked thread's next step).
pub const GADGET_RETURN: u64 = 2;
/// Offset in [`GADGET_CODE`] of a syscall, `close` of its result, then `rt_sigreturn`.
pub const GADGET_CALL_CLOSE: u64 = 9;
/// Offset in [`GADGET_CODE`] of the `close` of [`GADGET_CALL_CLOSE`].
pub const GADGET_CLOSE: u64 = 11;

/// Bytes below the stack pointer that a function may use without moving it (the
/// System V ABI's red zone): a frame goes below them, as the kernel puts a signal
/// frame.
pub const RED_ZONE: u64 = 128;
/// `struct rt_sigframe` of x86-64: the return address slot, `struct ucontext` (304
/// bytes) and `struct siginfo` (128); the extended state follows, 64-byte aligned.
const RT_SIGFRAME_LEN: u64 = 440;
const UC_FP_XSTATE: u64 = 1;
const UC_SIGCONTEXT_SS: u64 = 2;
const UC_STRICT_RESTORE_SS: u64 = 4;
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// Offset of `struct _fpx_sw_bytes` in the legacy FXSAVE area.
const FX_SW_BYTES: usize = 464;
/// Legacy area and XSAVE header.
const XSAVE_MIN: usize = 576;

/// A signal frame written by hand below a stopped thread's stack pointer (where the
/// kernel would put one for a signal handler), holding the thread's state as it must
/// resume: `rt_sigreturn` with the stack pointer at [`ReturnFrame::sp`] restores it.
#[derive(Debug, Clone)]
pub struct ReturnFrame {
    /// Address of its first byte (the lowest).
    pub addr: u64,
    pub bytes: Vec<u8>,
    /// The stack pointer `rt_sigreturn` is to run with.
    pub sp: u64,
}

/// Most bytes a [`ReturnFrame`] for this extended state takes below the red zone.
pub fn return_frame_len(xstate: &[u8]) -> u64 {
    xstate.len() as u64 + 4 + 64 + RT_SIGFRAME_LEN + 16 + 8
}

/// The part of an XSAVE area (standard format, as PTRACE_GETREGSET NT_X86_XSTATE gives
/// it) that holds state in use: its length (up to the end of the last component its
/// XSTATE_BV marks, at least the legacy area and header) and the features to restore.
/// None when the area is too short, compacted, or marks a component past its end.
fn xstate_in_use(xstate: &[u8]) -> Option<(usize, u64)> {
    let word = |off: usize| {
        xstate
            .get(off..off + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let bv = word(512)?;
    let comp = word(520)?;
    if comp & (1 << 63) != 0 {
        return None;
    }
    let mut end = XSAVE_MIN;
    for i in 2..63u32 {
        if bv & (1 << i) != 0 {
            // CPUID leaf 0xD, sub-leaf i: size (EAX) and offset (EBX) of component i in
            // the standard format; always available where XSAVE is.
            let leaf = core::arch::x86_64::__cpuid_count(0xd, i);
            end = end.max((leaf.ebx + leaf.eax) as usize);
        }
    }
    (end <= xstate.len()).then_some((end, bv | 3))
}

/// The frame that resumes a thread stopped with `regs` (as stopped: an interrupted
/// syscall is restarted as by [`Regs::for_restore`]), blocked signals `sigmask` and
/// extended state `xstate`, placed below `regs.rsp`'s red zone. Its `uc_stack` is left
/// invalid on purpose: `rt_sigreturn` then leaves the thread's alternate signal stack
/// as it is (the kernel ignores an invalid one there). Err when the extended state
/// cannot go into a signal frame.
pub fn return_frame(regs: &Regs, sigmask: u64, xstate: &[u8]) -> Result<ReturnFrame, String> {
    let (used, features) = xstate_in_use(xstate).ok_or_else(|| {
        format!(
            "an extended register area of {} bytes this stasis cannot put into a signal frame",
            xstate.len()
        )
    })?;
    let r = regs.for_restore();
    let top = r.rsp.wrapping_sub(RED_ZONE);
    let fp = top.wrapping_sub(used as u64 + 4) & !63;
    let addr = (fp.wrapping_sub(RT_SIGFRAME_LEN) & !15).wrapping_sub(8);
    let len = (fp + used as u64 + 4 - addr) as usize;
    let mut b = vec![0u8; len];
    let mut put = |off: u64, v: &[u8]| {
        let o = off as usize;
        b[o..o + v.len()].copy_from_slice(v);
    };
    // struct ucontext at +8.
    put(
        8,
        &(UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS).to_le_bytes(),
    );
    // uc_stack.ss_flags: neither 0, SS_ONSTACK nor SS_DISABLE (see above).
    put(24 + 8, &3i32.to_le_bytes());
    let mc = 48u64;
    let gprs = [
        r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx, r.rdx,
        r.rax, r.rcx, r.rsp, r.rip, r.eflags,
    ];
    for (k, v) in gprs.iter().enumerate() {
        put(mc + 8 * k as u64, &v.to_le_bytes());
    }
    put(mc + 144, &(r.cs as u16).to_le_bytes());
    put(mc + 146, &(r.gs as u16).to_le_bytes());
    put(mc + 148, &(r.fs as u16).to_le_bytes());
    put(mc + 150, &(r.ss as u16).to_le_bytes());
    put(mc + 184, &fp.to_le_bytes());
    put(304, &sigmask.to_le_bytes());
    // The extended state, with the software bytes that tell rt_sigreturn its size.
    let at = fp - addr;
    put(at, &xstate[..used]);
    let sw = at + FX_SW_BYTES as u64;
    put(sw, &FP_XSTATE_MAGIC1.to_le_bytes());
    put(sw + 4, &(used as u32 + 4).to_le_bytes());
    put(sw + 8, &features.to_le_bytes());
    put(sw + 16, &(used as u32).to_le_bytes());
    put(sw + 20, &[0u8; 28]);
    put(at + used as u64, &FP_XSTATE_MAGIC2.to_le_bytes());
    Ok(ReturnFrame {
        addr,
        bytes: b,
        sp: addr + 8,
    })
}

/// Size in bytes of the XSAVE area of this CPU with every enabled feature
/// (CPUID leaf 0xD, sub-leaf 0, EBX), or 0 if the CPU has no XSAVE.
pub fn xstate_size() -> usize {
    // CPUID is available on every x86-64 CPU and has no side effects.
    let max_leaf = core::arch::x86_64::__cpuid(0).eax;
    if max_leaf < 0xd {
        return 0;
    }
    let leaf = core::arch::x86_64::__cpuid_count(0xd, 0);
    leaf.ebx as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_rules() {
        let mut r = Regs {
            orig_rax: libc::SYS_nanosleep as u64,
            rax: (-ERESTART_RESTARTBLOCK) as u64,
            rip: 0x1002,
            ..Default::default()
        };
        let rest = r.for_restore();
        assert_eq!(rest.rax, libc::SYS_nanosleep as u64);
        assert_eq!(rest.rip, 0x1000);
        assert_eq!(rest.orig_rax, u64::MAX);
        r.rax = 5;
        assert_eq!(r.for_restore().rip, 0x1002);
        r.orig_rax = u64::MAX;
        r.rax = (-ERESTARTSYS) as u64;
        assert_eq!(r.for_restore().rip, 0x1002, "not in a syscall: untouched");
    }

    #[test]
    fn return_frame_layout() {
        // An XSAVE area with only the legacy state in use.
        let mut xs = vec![0u8; 1024];
        xs[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
        xs[512..520].copy_from_slice(&3u64.to_le_bytes());
        let regs = Regs {
            rsp: 0x7fff_0000_1238,
            rip: 0x1002,
            orig_rax: libc::SYS_nanosleep as u64,
            rax: (-ERESTART_RESTARTBLOCK) as u64,
            rbx: 7,
            ..Default::default()
        };
        let f = return_frame(&regs, 0x4000, &xs).unwrap();
        assert_eq!(f.sp, f.addr + 8);
        assert_eq!(f.sp % 16, 0, "sp as after a call");
        let end = f.addr + f.bytes.len() as u64;
        assert!(end <= regs.rsp - RED_ZONE, "the red zone is left alone");
        let word = |off: u64| {
            u64::from_le_bytes(f.bytes[off as usize..off as usize + 8].try_into().unwrap())
        };
        // sigcontext at +48: rbx, rip (restart applied), rax, rsp, the mask.
        assert_eq!(word(48 + 88), 7);
        assert_eq!(word(48 + 128), 0x1000);
        assert_eq!(word(48 + 104), libc::SYS_nanosleep as u64);
        assert_eq!(word(48 + 120), regs.rsp);
        assert_eq!(word(304), 0x4000);
        let fp = word(48 + 184);
        assert_eq!(fp % 64, 0);
        let at = fp - f.addr;
        assert_eq!(word(at + 464) as u32, FP_XSTATE_MAGIC1);
        assert_eq!((word(at + 480) & 0xffff_ffff) as usize, XSAVE_MIN);
        let m2 = (at as usize) + XSAVE_MIN;
        assert_eq!(f.bytes.len(), m2 + 4);
        assert_eq!(
            u32::from_le_bytes(f.bytes[m2..].try_into().unwrap()),
            FP_XSTATE_MAGIC2
        );
        // A compacted area cannot go into a frame.
        xs[520..528].copy_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(return_frame(&regs, 0, &xs).is_err());
    }

    #[test]
    fn xstate_is_sane() {
        let n = xstate_size();
        assert!(n == 0 || (512..=64 * 1024).contains(&n));
    }
}
