//! The NETLINK_SOCK_DIAG request/reply loop shared by [`crate::unix_diag`] and
//! [`crate::inet_diag`]: send one dump request, hand every reply message's payload to
//! the caller until NLMSG_DONE.

use crate::{Result, SysError};

const NETLINK_SOCK_DIAG: i32 = 4;
/// nlmsg_type of a sock_diag request.
pub(crate) const SOCK_DIAG_BY_FAMILY: u16 = 20;

/// Sends `req` (a whole netlink message) on a new NETLINK_SOCK_DIAG socket and calls
/// `each` with the payload of every reply message. `call` names the request in errors.
pub(crate) fn dump(call: &'static str, req: &[u8], mut each: impl FnMut(&[u8])) -> Result<()> {
    // SAFETY: creating a netlink socket; the descriptor is closed below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(SysError::last("socket(NETLINK_SOCK_DIAG)", 0));
    }
    let r = dump_on(fd, call, req, &mut each);
    // SAFETY: closing the socket created above.
    unsafe { libc::close(fd) };
    r
}

fn dump_on(fd: i32, call: &'static str, req: &[u8], each: &mut dyn FnMut(&[u8])) -> Result<()> {
    // SAFETY: sending a buffer we own.
    if unsafe { libc::send(fd, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(SysError::last(call, 0));
    }
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: receiving into a buffer we own.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(SysError::last(call, 0));
        }
        let n = n as usize;
        if n == 0 {
            return Ok(());
        }
        let mut off = 0usize;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap_or_default());
            if len < 16 || off + len > n {
                break;
            }
            if ty == libc::NLMSG_DONE as u16 {
                return Ok(());
            }
            if ty == libc::NLMSG_ERROR as u16 {
                let errno =
                    i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap_or_default());
                return Err(SysError {
                    call,
                    pid: 0,
                    errno: -errno,
                });
            }
            each(&buf[off + 16..off + len]);
            off += (len + 3) & !3;
        }
    }
}
