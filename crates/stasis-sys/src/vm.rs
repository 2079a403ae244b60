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
