//! NETLINK_SOCK_DIAG for AF_UNIX sockets (sock_diag(7)): the kernel's view of every
//! UNIX socket of our network namespace: type, state, bound name, peer, queue lengths,
//! pending connections of listeners, shutdown state.

use crate::sock_diag::SOCK_DIAG_BY_FAMILY;
use crate::Result;
use std::collections::HashMap;

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
    /// The kernel reported a peer (UNIX_DIAG_PEER) even if its inode is 0: a peer
    /// that was closed (released) while this socket stayed connected to it.
    pub has_peer: bool,
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
    let mut out = HashMap::new();
    crate::sock_diag::dump("sock_diag(AF_UNIX)", &req, |m| {
        if let Some(s) = parse(m) {
            out.insert(s.ino, s);
        }
    })?;
    Ok(out)
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
                s.peer = u64::from(u32::from_ne_bytes(data[..4].try_into().ok()?));
                s.has_peer = true;
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
