//! NETLINK_SOCK_DIAG for IPv4 and IPv6 sockets (sock_diag(7), inet_diag): the
//! kernel's view of every TCP or UDP socket of our network namespace: state, local and
//! remote address, queue lengths, inode, shutdown state. Sockets no process holds
//! (TIME_WAIT, orphans after close) show inode 0.

use crate::sock_diag::SOCK_DIAG_BY_FAMILY;
use crate::Result;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const INET_DIAG_SHUTDOWN: u16 = 8;

/// TCP states as inet_diag reports them (include/net/tcp_states.h).
pub mod state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
}

/// What inet_diag reports about one TCP or UDP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InetSock {
    /// AF_INET or AF_INET6.
    pub family: i32,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: i32,
    /// One of [`state`] (UDP: ESTABLISHED when connected, CLOSE otherwise).
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Inode of the socket, 0 if no file refers to it.
    pub ino: u64,
    /// TCP: bytes not yet read (listeners: connections not yet accepted); UDP: bytes
    /// of receive memory in use.
    pub rqueue: u32,
    /// TCP: bytes sent and not yet acknowledged, or not yet sent (listeners: the
    /// backlog); UDP: bytes of send memory in use.
    pub wqueue: u32,
    /// RCV_SHUTDOWN (1) | SEND_SHUTDOWN (2).
    pub shutdown: u8,
}

/// An address in one form for comparing IPv4 sockets with IPv6 ones that carry
/// IPv4-mapped addresses (a dual-stack listener's connections).
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        SocketAddr::V6(v6) => SocketAddr::new(IpAddr::V6(*v6.ip()), v6.port()),
    }
}

/// Lists every socket of `protocol` (IPPROTO_TCP or IPPROTO_UDP) of both families in
/// the caller's network namespace.
pub fn dump(protocol: i32) -> Result<Vec<InetSock>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        out.extend(query(family, protocol)?);
    }
    Ok(out)
}

fn query(family: i32, protocol: i32) -> Result<Vec<InetSock>> {
    // struct nlmsghdr (16) + struct inet_diag_req_v2 (56)
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.push(family as u8); // sdiag_family
    req.push(protocol as u8); // sdiag_protocol
    req.push(0); // idiag_ext
    req.push(0); // pad
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: all
    req.extend_from_slice(&[0u8; 48]); // inet_diag_sockid: any
    let mut out = Vec::new();
    match crate::sock_diag::dump("inet_diag", &req, |m| out.extend(parse(m, protocol))) {
        Ok(()) => Ok(out),
        // A family the kernel lacks (no IPv6): nothing of it to list.
        Err(e) if e.errno == libc::ENOENT || e.errno == libc::EAFNOSUPPORT => Ok(out),
        Err(e) => Err(e),
    }
}

fn addr(family: u8, raw: &[u8], port: u16) -> Option<SocketAddr> {
    let ip = if i32::from(family) == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        let b: [u8; 16] = raw.get(..16)?.try_into().ok()?;
        IpAddr::V6(Ipv6Addr::from(b))
    };
    Some(SocketAddr::new(ip, port))
}

fn parse(m: &[u8], protocol: i32) -> Option<InetSock> {
    // struct inet_diag_msg: family, state, timer, retrans (4), sockid (48: sport, dport
    // big-endian, src[16], dst[16], if, cookie[8]), expires, rqueue, wqueue, uid, inode.
    if m.len() < 72 {
        return None;
    }
    let family = m[0];
    let sport = u16::from_be_bytes([m[4], m[5]]);
    let dport = u16::from_be_bytes([m[6], m[7]]);
    let u32_at = |o: usize| m[o..o + 4].try_into().ok().map(u32::from_ne_bytes);
    let mut s = InetSock {
        family: i32::from(family),
        protocol,
        state: m[1],
        local: addr(family, &m[8..24], sport)?,
        remote: addr(family, &m[24..40], dport)?,
        rqueue: u32_at(56)?,
        wqueue: u32_at(60)?,
        ino: u64::from(u32_at(68)?),
        shutdown: 0,
    };
    let mut off = 72;
    while off + 4 <= m.len() {
        let len = u16::from_ne_bytes(m[off..off + 2].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(m[off + 2..off + 4].try_into().ok()?);
        if len < 4 || off + len > m.len() {
            break;
        }
        if ty == INET_DIAG_SHUTDOWN && len > 4 {
            s.shutdown = m[off + 4];
        }
        off += (len + 3) & !3;
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn lists_a_loopback_connection_with_its_inode_and_queue() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        use std::io::Write;
        (&c).write_all(b"hello").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let ino = |fd: i32| {
            std::fs::metadata(format!("/proc/self/fd/{fd}"))
                .unwrap()
                .ino()
        };
        let all = dump(libc::IPPROTO_TCP).unwrap();
        let server = all.iter().find(|x| x.ino == ino(s.as_raw_fd())).unwrap();
        assert_eq!(server.state, state::ESTABLISHED);
        assert_eq!(server.local, l.local_addr().unwrap());
        assert_eq!(server.remote, c.local_addr().unwrap());
        assert_eq!(server.rqueue, 5);
        let listener = all.iter().find(|x| x.ino == ino(l.as_raw_fd())).unwrap();
        assert_eq!(listener.state, state::LISTEN);
    }
}
