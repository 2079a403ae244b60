//! process_vm_readv(2) / process_vm_writev(2): copying memory between processes
//! without an intermediate kernel buffer, and `/proc/PID/mem` for pages that the
//! process itself cannot read (PROT_NONE).

use crate::{Result, SysError};
use std::os::unix::fs::FileExt;

/// Copies `buf.len()` bytes from address `addr` of process `pid` into `buf`.
/// Returns an error unless the whole range could be read.
pub fn read(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let local = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr as usize + done) as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: `local` describes the unfilled tail of `buf`; the remote iovec is only
        // interpreted in the address space of `pid`.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            let mut e = SysError::last("process_vm_readv", pid);
            if n == 0 {
                e.errno = libc::EFAULT;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Copies the ranges `remote` (address, length) of process `pid`, one after the
/// other, into `buf` (as long as their sum), with as few process_vm_readv(2) calls
/// as IOV_MAX allows.
pub fn read_scattered(pid: i32, remote: &[(u64, usize)], buf: &mut [u8]) -> Result<()> {
    let total: usize = remote.iter().map(|r| r.1).sum();
    if total != buf.len() {
        return Err(SysError {
            call: "process_vm_readv",
            pid,
            errno: libc::EINVAL,
        });
    }
    const IOV_MAX: usize = 1024;
    let mut at = 0usize;
    for group in remote.chunks(IOV_MAX) {
        let len: usize = group.iter().map(|r| r.1).sum();
        let iov: Vec<libc::iovec> = group
            .iter()
            .map(|&(a, l)| libc::iovec {
                iov_base: a as usize as *mut libc::c_void,
                iov_len: l,
            })
            .collect();
        let local = libc::iovec {
            iov_base: buf[at..].as_mut_ptr().cast(),
            iov_len: len,
        };
        // SAFETY: `local` describes `len` bytes of `buf` from `at` (within it, as the
        // lengths sum to its size); the remote iovecs are only interpreted in the
        // address space of `pid`.
        let n = unsafe {
            libc::process_vm_readv(pid, &local, 1, iov.as_ptr(), iov.len() as libc::c_ulong, 0)
        };
        if n < 0 {
            return Err(SysError::last("process_vm_readv", pid));
        }
        if (n as usize) < len {
            // A partial read stops at the first range that could not be read whole:
            // the rest, range by range, to name the failure.
            let mut off = at;
            for &(a, l) in group {
                read(pid, a, &mut buf[off..off + l])?;
                off += l;
            }
        }
        at += len;
    }
    Ok(())
}

/// Copies `buf` to address `addr` of process `pid`. The pages must be writable.
pub fn write(pid: i32, addr: u64, buf: &[u8]) -> Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let local = libc::iovec {
            iov_base: buf[done..].as_ptr() as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr as usize + done) as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: `local` describes the unwritten tail of `buf` (only read by the
        // kernel); the remote iovec is interpreted in the address space of `pid`.
        let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            let mut e = SysError::last("process_vm_writev", pid);
            if n == 0 {
                e.errno = libc::EFAULT;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Reads through an open `/proc/PID/mem`, which ignores page protections
/// (the kernel uses FOLL_FORCE), for mappings the process cannot read itself.
pub fn read_forced(mem: &std::fs::File, pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    mem.read_exact_at(buf, addr).map_err(|e| SysError {
        call: "pread(/proc/PID/mem)",
        pid,
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    })
}
