//! Signal-driven I/O on any fd: the owner that gets SIGIO (F_SETOWN_EX: a thread, a
//! process or a process group) and the signal sent instead (F_SETSIG), kept by the
//! open file description. IP sockets keep theirs in their own kind (`sockets::inet`).
//!
//! Dump: for an fd whose description has O_ASYNC, read on a copy of it (pidfd_getfd).
//! Restore: set by injected fcntl calls in the rebuild, once every process and thread
//! exists (the owner must exist; IP sockets' too), after O_ASYNC is set again on the
//! fd at its own number (the signal's si_fd is the number it was set at).

use crate::error::Result;
use crate::inject::{Injector, Scratch};
use stasis_image::{Fd, FdKind, FdOwner};
use std::os::unix::io::AsRawFd;

const F_SETSIG: i32 = 10;
const F_GETSIG: i32 = 11;
const F_SETOWN_EX: i32 = 15;
const F_GETOWN_EX: i32 = 16;

#[repr(C)]
struct FOwnerEx {
    kind: i32,
    pid: i32,
}

/// The owner and signal of fd `fd` of process `pid` (with status `flags`), when it
/// does signal-driven I/O.
pub fn dump(pid: i32, fd: i32, flags: i32) -> Result<Option<FdOwner>> {
    if flags & libc::O_ASYNC == 0 {
        return Ok(None);
    }
    let ours = crate::proc::borrow_fd(pid, fd)?;
    let mut o = FOwnerEx { kind: 0, pid: 0 };
    // SAFETY: F_GETOWN_EX writes a struct f_owner_ex into `o`.
    let r = unsafe { libc::fcntl(ours.as_raw_fd(), F_GETOWN_EX, &mut o as *mut FOwnerEx) };
    // SAFETY: F_GETSIG takes no argument.
    let signal = unsafe { libc::fcntl(ours.as_raw_fd(), F_GETSIG) }.max(0);
    Ok(Some(FdOwner {
        kind: if r == 0 { o.kind } else { 0 },
        pid: if r == 0 { o.pid } else { 0 },
        signal,
    }))
}

/// Gives the fds of new process `inj` runs in (in place, every process and thread of
/// the job existing) their saved owner and signal, IP sockets' included, by injected
/// fcntl calls. An owner that cannot be set (a group not made) is logged.
pub fn restore(inj: &Injector, fds: &[Fd], scratch: &Scratch) -> Result<()> {
    for f in fds {
        let inet_async =
            matches!(&f.kind, FdKind::InetSocket { flags, .. } if flags & libc::O_ASYNC != 0);
        if f.owner.is_some() || inet_async {
            // O_ASYNC registers the fd number the signal names (si_fd): set again now
            // that the fd has its own number (it was made at another).
            let cur = inj.call(
                "fcntl(F_GETFL)",
                libc::SYS_fcntl,
                &[f.fd as u64, libc::F_GETFL as u64],
            )?;
            let without = cur & !(libc::O_ASYNC as u64);
            inj.call(
                "fcntl(F_SETFL)",
                libc::SYS_fcntl,
                &[f.fd as u64, libc::F_SETFL as u64, without],
            )?;
            inj.call(
                "fcntl(F_SETFL, O_ASYNC)",
                libc::SYS_fcntl,
                &[
                    f.fd as u64,
                    libc::F_SETFL as u64,
                    without | libc::O_ASYNC as u64,
                ],
            )?;
        }
        let (owner, signal) = match (&f.kind, &f.owner) {
            (
                FdKind::InetSocket {
                    owner: Some((kind, pid)),
                    signal,
                    ..
                },
                _,
            ) => (Some((*kind, *pid)), *signal),
            (FdKind::InetSocket { .. }, _) | (_, None) => continue,
            (_, Some(o)) => ((o.pid != 0).then_some((o.kind, o.pid)), o.signal),
        };
        if let Some((kind, pid)) = owner {
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&kind.to_le_bytes());
            b[4..].copy_from_slice(&pid.to_le_bytes());
            scratch.write(&b)?;
            let r = inj.raw(
                libc::SYS_fcntl,
                &[f.fd as u64, F_SETOWN_EX as u64, scratch.addr],
            )?;
            if r < 0 {
                tracing::warn!(
                    "process {}: fd {}: owner {pid} not restored: {}",
                    inj.tid(),
                    f.fd,
                    std::io::Error::from_raw_os_error(-r as i32)
                );
            }
        }
        if signal != 0 {
            inj.raw(
                libc::SYS_fcntl,
                &[f.fd as u64, F_SETSIG as u64, signal as u64],
            )?;
        }
    }
    Ok(())
}
