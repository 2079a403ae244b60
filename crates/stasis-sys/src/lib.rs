//! Thin, safe wrappers over the Linux kernel interfaces that stasis uses to read and
//! rebuild a process from the outside.
//!
//! One module per kernel object, in the manner of rustix: [`ptrace`] (tracing and register
//! access), [`vm`] (`process_vm_readv(2)` and friends), [`clone`] (`clone3(2)` with
//! `set_tid`). Everything that depends on the instruction set (register layout, the
//! syscall instruction, extended state size, syscall restart rules) lives in [`arch`], so
//! that another architecture is one new file there.

pub mod arch;
pub mod caps;
pub mod clone;
pub mod dirty;
pub mod fault;
pub mod inet_diag;
pub mod ptrace;
mod sock_diag;
pub mod unix_diag;
pub mod vm;

use std::fmt;

/// A failed system call: which call, on which process, and the errno it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysError {
    /// Name of the call, e.g. `"PTRACE_SEIZE"`.
    pub call: &'static str,
    /// Process or thread the call was about (0 when none).
    pub pid: i32,
    /// The errno value.
    pub errno: i32,
}

impl SysError {
    /// Builds an error from the calling thread's current `errno`.
    pub fn last(call: &'static str, pid: i32) -> Self {
        SysError {
            call,
            pid,
            errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        }
    }

    /// True when the process no longer exists (it exited or was killed).
    pub fn is_gone(&self) -> bool {
        self.errno == libc::ESRCH
    }
}

impl fmt::Display for SysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = std::io::Error::from_raw_os_error(self.errno);
        if self.pid != 0 {
            write!(f, "{} on pid {} failed: {}", self.call, self.pid, msg)
        } else {
            write!(f, "{} failed: {}", self.call, msg)
        }
    }
}

impl std::error::Error for SysError {}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, SysError>;

/// Size of a page on this machine (4096 on x86-64).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let sz = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if sz <= 0 {
        4096
    } else {
        sz as usize
    }
}
