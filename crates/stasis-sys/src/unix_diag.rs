//! NETLINK_SOCK_DIAG for AF_UNIX sockets (sock_diag(7)): the kernel's view of every
//! UNIX socket of our network namespace: type, state, bound name, peer, queue lengths,
//! pending connections of listeners, shutdown state.

use crate::{Result, SysError};
use std::collections::HashMap;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_PEER: u32 = 0x04;
const UDIAG_SHOW_ICONS: u32 = 0x08;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_ICONS: u16 = 3;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

/// What sock_diag reports about one UNIX socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixSock {
    pub ino: u64,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub sock_type: i32,
    /// TCP_ESTABLISHED (1), TCP_CLOSE (7) or TCP_LISTEN (10).
    pub state: u8,
    /// Bound name: a path, or "@name" for the abstract namespace; empty if unbound.
    pub name: String,
    /// Inode of the peer socket, 0 if none.
    pub peer: u64,
    /// For listeners: inodes of the connections not yet accepted.
    pub icons: Vec<u64>,
    /// Bytes (stream) or messages queued for reading; for listeners, the backlog.
    pub rqlen: u32,
    /// Bytes sent but not yet read by the peer (for listeners: the backlog limit).
    pub wqlen: u32,
    /// SHUT_RD (1) | SHUT_WR (2) bits as applied by shutdown(2).
    pub shutdown: u8,
}

/// Dumps every UNIX socket of the caller's network namespace, by inode.
pub fn dump() -> Result<HashMap<u64, UnixSock>> {
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
    let r = dump_on(fd);
    // SAFETY: closing the socket created above.
    unsafe { libc::close(fd) };
    r
}

fn dump_on(fd: i32) -> Result<HashMap<u64, UnixSock>> {
    // struct nlmsghdr (16) + struct unix_diag_req (24)
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.push(libc::AF_UNIX as u8); // sdiag_family
    req.push(0); // sdiag_protocol
    req.extend_from_slice(&0u16.to_ne_bytes()); // pad
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
    req.extend_from_slice(&0u32.to_ne_bytes()); // udiag_ino
    let show = UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN | 0x40;
    req.extend_from_slice(&show.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // cookie
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    // SAFETY: sending a buffer we own.
    if unsafe { libc::send(fd, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(SysError::last("send(sock_diag)", 0));
    }
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: receiving into a buffer we own.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(SysError::last("recv(sock_diag)", 0));
        }
        let mut off = 0usize;
        let n = n as usize;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap_or_default());
            if len < 16 || off + len > n {
                break;
            }
            if ty == libc::NLMSG_DONE as u16 {
                return Ok(out);
            }
            if ty == libc::NLMSG_ERROR as u16 {
                let errno =
                    i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap_or_default());
                return Err(SysError {
                    call: "sock_diag",
                    pid: 0,
                    errno: -errno,
                });
            }
            if let Some(s) = parse(&buf[off + 16..off + len]) {
                out.insert(s.ino, s);
            }
            off += (len + 3) & !3;
        }
    }
}

fn parse(m: &[u8]) -> Option<UnixSock> {
    if m.len() < 16 {
        return None;
    }
    let mut s = UnixSock {
        sock_type: i32::from(m[1]),
        state: m[2],
        ino: u64::from(u32::from_ne_bytes(m[4..8].try_into().ok()?)),
        ..UnixSock::default()
    };
    let mut off = 16;
    while off + 4 <= m.len() {
        let len = u16::from_ne_bytes(m[off..off + 2].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(m[off + 2..off + 4].try_into().ok()?);
        if len < 4 || off + len > m.len() {
            break;
        }
        let data = &m[off + 4..off + len];
        match ty {
            UNIX_DIAG_NAME => {
                s.name = if data.first() == Some(&0) {
                    format!("@{}", String::from_utf8_lossy(&data[1..]))
                } else {
                    String::from_utf8_lossy(data)
                        .trim_end_matches('\0')
                        .to_string()
                }
            }
            UNIX_DIAG_PEER if data.len() >= 4 => {
                s.peer = u64::from(u32::from_ne_bytes(data[..4].try_into().ok()?))
            }
            UNIX_DIAG_ICONS => {
                s.icons = data
                    .chunks_exact(4)
                    .filter_map(|c| c.try_into().ok().map(|b| u64::from(u32::from_ne_bytes(b))))
                    .collect()
            }
            UNIX_DIAG_RQLEN if data.len() >= 8 => {
                s.rqlen = u32::from_ne_bytes(data[..4].try_into().ok()?);
                s.wqlen = u32::from_ne_bytes(data[4..8].try_into().ok()?);
            }
            UNIX_DIAG_SHUTDOWN if !data.is_empty() => s.shutdown = data[0],
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Some(s)
}
