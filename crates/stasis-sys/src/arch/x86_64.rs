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
    fn xstate_is_sane() {
        let n = xstate_size();
        assert!(n == 0 || (512..=64 * 1024).contains(&n));
    }
}
