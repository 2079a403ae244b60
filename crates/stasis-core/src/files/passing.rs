//! Handing each restored process its fds: sent by the restorer over a UNIX socket
//! with SCM_RIGHTS, in batches, and put at their numbers by the process.

use super::is_late;
use stasis_image::{Fd, FdKind};
use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, OwnedFd};

/// One entry of the fd-passing protocol: target fd number and FD_CLOEXEC.
const ENTRY: usize = 8;
/// Fds per message (SCM_MAX_FD is 253).
const BATCH: usize = 200;

/// The descriptions of the files that `fds`' epoll sets watch and hold under no fd
/// number of their own (see [`stasis_image::EpollItem::desc`]), in a fixed order: sent
/// to the process beside its fds, for the registration only.
pub fn epoll_temps(fds: &[Fd]) -> Vec<u64> {
    let mut out = Vec::new();
    for f in fds {
        if let FdKind::Epoll { items, .. } = &f.kind {
            for d in items.iter().filter_map(|i| i.desc) {
                if !out.contains(&d) {
                    out.push(d);
                }
            }
        }
    }
    out
}

/// Sends process `fds` over the SOCK_SEQPACKET socket `sock`: batches of (number,
/// cloexec) entries with the descriptions as SCM_RIGHTS, then an empty message. The
/// files of [`epoll_temps`] go with them, numbered -1, -2...
pub fn send_fds(
    sock: i32,
    fds: &[Fd],
    descs: &HashMap<u64, OwnedFd>,
) -> std::result::Result<(), String> {
    let mut items: Vec<(i32, bool, i32)> = Vec::new();
    for f in fds.iter().filter(|f| !is_late(&f.kind)) {
        let d = descs
            .get(&f.desc)
            .ok_or_else(|| format!("fd {}: no description", f.fd))?;
        items.push((f.fd, f.cloexec, d.as_raw_fd()));
    }
    for (k, desc) in epoll_temps(fds).into_iter().enumerate() {
        let d = descs
            .get(&desc)
            .ok_or_else(|| format!("a file watched by epoll (description {desc}) is missing"))?;
        items.push((-(k as i32) - 1, true, d.as_raw_fd()));
    }
    for batch in items.chunks(BATCH) {
        let mut payload = Vec::with_capacity(batch.len() * ENTRY);
        for (num, cloexec, _) in batch {
            payload.extend_from_slice(&num.to_le_bytes());
            payload.extend_from_slice(&[u8::from(*cloexec), 0, 0, 0]);
        }
        let raw: Vec<i32> = batch.iter().map(|b| b.2).collect();
        send_with_fds(sock, &payload, &raw)?;
    }
    send_with_fds(sock, &[], &[])
}

fn send_with_fds(sock: i32, payload: &[u8], fds: &[i32]) -> std::result::Result<(), String> {
    let byte = [0u8; 1];
    let data: &[u8] = if payload.is_empty() {
        &byte[..]
    } else {
        payload
    };
    crate::sockets::send_with_fds(sock, data, fds, None, libc::MSG_NOSIGNAL)
        .map_err(|e| format!("passing fds: {e}"))?;
    Ok(())
}

/// In the new process: receives its fds from `sock` and puts them at their numbers.
/// Received descriptors are first moved to numbers >= `hi`, so that placing one never
/// overwrites another not yet placed. Returns the files of [`epoll_temps`], by their
/// index there, left at numbers >= `hi` (for the caller to close).
pub fn receive_fds(sock: i32, hi: i32) -> std::result::Result<HashMap<usize, i32>, String> {
    let mut temps = HashMap::new();
    let mut pending: Vec<(i32, bool, i32)> = Vec::new();
    loop {
        let mut data = vec![0u8; BATCH * ENTRY];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE((BATCH * 4) as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: msghdr is plain data; zeroed is a valid empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg points to live buffers of the sizes given.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(format!(
                "receiving fds: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut fds: Vec<i32> = Vec::new();
        // SAFETY: walking the control messages the kernel wrote into cbuf.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                    let p = libc::CMSG_DATA(c).cast::<i32>();
                    for i in 0..count {
                        fds.push(*p.add(i));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let entries = if fds.is_empty() {
            0
        } else {
            n as usize / ENTRY
        };
        if entries == 0 {
            break;
        }
        if entries != fds.len() {
            return Err("fd-passing message and descriptors do not match".into());
        }
        for (k, fd) in fds.into_iter().enumerate() {
            let e = &data[k * ENTRY..(k + 1) * ENTRY];
            let num = i32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            // SAFETY: moving a received descriptor (ours) above `hi`.
            let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, hi) };
            // SAFETY: closing the original received descriptor.
            unsafe { libc::close(fd) };
            if high < 0 {
                return Err(format!("fd {num}: {}", std::io::Error::last_os_error()));
            }
            if num < 0 {
                temps.insert((-num - 1) as usize, high);
            } else {
                pending.push((num, e[4] != 0, high));
            }
        }
    }
    for (num, cloexec, high) in pending.iter().copied() {
        let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
        // SAFETY: dup3 onto the saved number, which is free or ours to replace.
        if unsafe { libc::dup3(high, num, flags) } < 0 {
            return Err(format!(
                "fd {num}: dup3: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    for (_, _, high) in pending {
        // SAFETY: closing our temporary high copies.
        unsafe { libc::close(high) };
    }
    Ok(temps)
}
