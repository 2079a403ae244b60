//! clone3(2) with `set_tid`: create a child process with a chosen PID.
//!
//! The caller needs CAP_SYS_ADMIN (or CAP_CHECKPOINT_RESTORE) in the user namespace that
//! owns its PID namespace; stasis runs restore as PID 1 of a PID namespace it created in
//! its own user namespace, where it has both.

use crate::{Result, SysError};

/// `struct clone_args` (include/uapi/linux/sched.h), version 2 (with set_tid).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Size of `struct clone_args` version 2, the `size` argument of clone3.
pub const CLONE_ARGS_SIZE: u64 = std::mem::size_of::<CloneArgs>() as u64;

/// The bytes of a `struct clone_args` (exit signal 0, no stack: the new task never
/// runs code of its own before it is stopped), for a clone3 injected into another
/// process. `set_tid` is the address of `set_tid_size` TIDs in that process.
pub fn clone_args_bytes(flags: u64, set_tid: u64, set_tid_size: u64) -> Vec<u8> {
    let a = CloneArgs {
        flags,
        set_tid,
        set_tid_size,
        ..Default::default()
    };
    [
        a.flags,
        a.pidfd,
        a.child_tid,
        a.parent_tid,
        a.exit_signal,
        a.stack,
        a.stack_size,
        a.tls,
        a.set_tid,
        a.set_tid_size,
        a.cgroup,
    ]
    .iter()
    .flat_map(|v| v.to_le_bytes())
    .collect()
}

/// Outcome of [`fork_with_pid`] in each process.
pub enum Forked {
    /// In the parent: the child's PID.
    Parent(i32),
    /// In the child.
    Child,
}

/// Forks (like fork(2), SIGCHLD on exit) so that the child gets PID `pid` in the
/// caller's PID namespace. `pid == 0` lets the kernel choose.
///
/// # Safety
/// Same rules as fork(2): the caller must be single-threaded, and the child should only
/// use code that is safe after fork.
pub unsafe fn fork_with_pid(pid: i32) -> Result<Forked> {
    // SAFETY: the caller keeps fork_with_pid's rules, which are this one's.
    unsafe { fork_with_pid_flags(pid, 0) }
}

/// [`fork_with_pid`] with clone flags `flags` (CLONE_FILES: the child shares the
/// caller's file descriptor table).
///
/// # Safety
/// As for [`fork_with_pid`]; `flags` must not include CLONE_VM or thread flags.
pub unsafe fn fork_with_pid_flags(pid: i32, flags: u64) -> Result<Forked> {
    let tid = [pid as libc::pid_t];
    let args = CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if pid > 0 { tid.as_ptr() as u64 } else { 0 },
        set_tid_size: u64::from(pid > 0),
        ..Default::default()
    };
    // SAFETY: `args` is a valid clone_args of the size passed; with no CLONE_VM and no
    // stack the child continues on a copy of this stack, exactly like fork(2). The
    // caller guarantees single-threadedness.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match r {
        -1 => Err(SysError::last("clone3(set_tid)", pid)),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Parent(child as i32)),
    }
}

/// Forks into new namespaces (`flags` are CLONE_NEW* bits), like fork(2).
///
/// # Safety
/// As for [`fork_with_pid`].
pub unsafe fn fork_into_namespaces(flags: u64) -> Result<Forked> {
    let args = CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: as in fork_with_pid.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match r {
        -1 => Err(SysError::last("clone3(namespaces)", 0)),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Parent(child as i32)),
    }
}
