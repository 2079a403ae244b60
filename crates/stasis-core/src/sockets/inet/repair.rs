//! Established TCP connections saved and restored exactly with TCP_REPAIR (tcp(7)):
//! sequence numbers, both queues (unacknowledged bytes included), negotiated options,
//! timestamps and windows. It needs CAP_NET_ADMIN over the socket's network namespace,
//! which stasis holds for a job run with `--network private` (the namespace belongs to
//! the job's user namespace); elsewhere the unprivileged path of `dump` is used.
//!
//! Dump: the socket is put in repair mode, read, and taken out again without a window
//! probe (the job does not notice). Restore: each end is created in repair mode, bound
//! and "connected" without a handshake at its saved sequence numbers with its receive
//! queue filled; once every end exists, repair mode is left and its send queue is sent
//! as new data. Bytes its peer had received but not yet acknowledged are dropped from
//! the send queue first ([`settled`]): nothing is in flight after a restore, so no
//! retransmission timer has to fire (one that fires while the job is still being
//! rebuilt backs off to many seconds: a connection silent for longer than a test
//! waits).

use super::net::*;
use crate::error::{Result, SysContext};
use crate::sockets::{getsockopt_int, setsockopt_int};
use stasis_image::{InetSocket, TcpRepair};
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_NO_QUEUE: i32 = 0;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const TCP_REPAIR_OFF_NO_WP: i32 = -1;
const TCPOPT_MSS: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
const SO_RCVBUFFORCE: i32 = 33;
const SO_SNDBUFFORCE: i32 = 32;

fn tcp_set(fd: i32, opt: i32, v: i32) -> std::io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, opt, v)
}

fn tcp_get(fd: i32, opt: i32) -> std::io::Result<i32> {
    getsockopt_int(fd, libc::IPPROTO_TCP, opt).ok_or_else(std::io::Error::last_os_error)
}

fn tcp_get_bytes(fd: i32, opt: i32, buf: &mut [u8]) -> std::io::Result<()> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `buf`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            opt,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn tcp_set_bytes(fd: i32, opt: i32, buf: &[u8]) -> std::io::Result<()> {
    // SAFETY: setsockopt reads `buf.len()` bytes from `buf`.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            opt,
            buf.as_ptr().cast(),
            buf.len() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Peeks `len` bytes of the queue selected with TCP_REPAIR_QUEUE.
fn peek(fd: i32, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    // SAFETY: receiving into a buffer of `len` bytes we own.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            len,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != len {
        return Err(std::io::Error::other(format!(
            "{n} of {len} queued bytes read"
        )));
    }
    Ok(buf)
}

/// Puts socket `s` in repair mode: it sends nothing from now on (its peer's state stays
/// consistent with its own until both are read).
pub(super) fn enter(s: i32) -> std::io::Result<()> {
    tcp_set(s, TCP_REPAIR, 1)
}

/// Takes a socket out of repair mode without a window probe: the peer sees nothing.
pub(super) fn leave(s: i32) {
    if tcp_set(s, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP).is_err() {
        let _ = tcp_set(s, TCP_REPAIR, 0);
    }
}

/// Reads the exact state of the established connection `s` (fd `fd` of `pid`,
/// borrowed, its process frozen, in repair mode together with its peer): the state and
/// the receive queue followed by the send queue.
pub(super) fn dump(pid: i32, fd: i32, s: i32) -> Result<(TcpRepair, Vec<u8>)> {
    read(s).ctx(pid, || {
        format!("fd {fd}: reading a TCP connection in repair mode")
    })
}

/// Reads a socket in repair mode until two readings agree: a segment its peer sent
/// before it entered repair mode may still be on its way through the loopback, and
/// one arriving between the reads of the receive queue and of the window would leave
/// them inconsistent (bytes lost, or a window the restore refuses).
fn read(s: i32) -> std::io::Result<(TcpRepair, Vec<u8>)> {
    let mut last = read_once(s)?;
    for _ in 0..50 {
        let now = read_once(s)?;
        if now.0.rcv_seq == last.0.rcv_seq
            && now.0.inq_len == last.0.inq_len
            && now.0.window == last.0.window
        {
            return Ok(now);
        }
        last = now;
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Err(std::io::Error::other(
        "its receive queue kept changing while in repair mode",
    ))
}

fn read_once(s: i32) -> std::io::Result<(TcpRepair, Vec<u8>)> {
    let mut r = TcpRepair {
        inq_len: ioctl_int(s, SIOCINQ).max(0) as u32,
        outq_len: ioctl_int(s, SIOCOUTQ).max(0) as u32,
        unsent_len: ioctl_int(s, SIOCOUTQNSD).max(0) as u32,
        ..TcpRepair::default()
    };
    tcp_set(s, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
    r.rcv_seq = tcp_get(s, TCP_QUEUE_SEQ)? as u32;
    let mut data = peek(s, r.inq_len as usize)?;
    tcp_set(s, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    r.snd_seq = tcp_get(s, TCP_QUEUE_SEQ)? as u32;
    data.extend(peek(s, r.outq_len as usize)?);
    tcp_set(s, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)?;
    r.mss = tcp_get(s, libc::TCP_MAXSEG)? as u32;
    let mut info = [0u8; 8];
    tcp_get_bytes(s, libc::TCP_INFO, &mut info)?;
    r.timestamps_ok = info[5] & TCPI_OPT_TIMESTAMPS != 0;
    r.sack_ok = info[5] & TCPI_OPT_SACK != 0;
    r.wscale_ok = info[5] & TCPI_OPT_WSCALE != 0;
    r.snd_wscale = info[6] & 0xf;
    r.rcv_wscale = info[6] >> 4;
    r.timestamp = tcp_get(s, TCP_TIMESTAMP)? as u32;
    let mut w = [0u8; 20];
    tcp_get_bytes(s, TCP_REPAIR_WINDOW, &mut w)?;
    for (i, v) in r.window.iter_mut().enumerate() {
        *v = u32::from_ne_bytes([w[i * 4], w[i * 4 + 1], w[i * 4 + 2], w[i * 4 + 3]]);
    }
    Ok((r, data))
}

/// Sends `data` into the queue selected with TCP_REPAIR_QUEUE (64 KiB a call).
fn fill(fd: i32, data: &[u8]) -> std::io::Result<()> {
    for chunk in data.chunks(64 << 10) {
        if let (_, Some(e)) = send_some(fd, chunk) {
            return Err(e);
        }
    }
    Ok(())
}

/// Creates the end `s` of an established connection in repair mode, at its saved
/// sequence numbers, with its receive queue filled. Once every end exists,
/// [`out_of_repair`] and then [`send_queue`] finish it.
pub(super) fn restore(
    s: &InetSocket,
    r: &TcpRepair,
    data: &[u8],
    early_options: impl FnOnce(&OwnedFd),
) -> std::result::Result<OwnedFd, String> {
    let what = format!("restoring the TCP connection {} -> {}", s.local, s.remote);
    let err = |step: &str, e: std::io::Error| format!("{what}: {step}: {e}");
    let (Some(local), Some(remote)) = (parse_addr(&s.local), parse_addr(&s.remote)) else {
        return Err(format!("{what}: addresses missing"));
    };
    let family = family_of(s);
    let fd = new_socket(family, true)?;
    let f = fd.as_raw_fd();
    // Options first: SO_REUSEADDR would undo the forced reuse of the port that repair
    // mode gives (the end shares its port with its listener).
    early_options(&fd);
    tcp_set(f, TCP_REPAIR, 1).map_err(|e| {
        err(
            "TCP_REPAIR (needs CAP_NET_ADMIN over the job's network namespace)",
            e,
        )
    })?;
    let inq = r.inq_len as usize;
    if data.len() != inq + r.outq_len as usize {
        return Err(format!(
            "{what}: {} bytes saved, {} expected",
            data.len(),
            inq + r.outq_len as usize
        ));
    }
    // Room for what was queued, however it was accounted (we may: CAP_NET_ADMIN).
    // This pins the buffer; options the application set are applied afterwards.
    let room = |opt: i32, force: i32, bytes: usize| {
        let now = super::super::sockopt(f, opt).max(0) as usize;
        let want = bytes * 2 + (256 << 10);
        if bytes > 0 && want > now / 2 {
            let v = want.min(i32::MAX as usize / 2) as i32;
            let _ = setsockopt_int(f, libc::SOL_SOCKET, force, v);
        }
    };
    room(libc::SO_RCVBUF, SO_RCVBUFFORCE, inq);
    room(libc::SO_SNDBUF, SO_SNDBUFFORCE, r.outq_len as usize);
    bind(&fd, addr_for(family, local)).map_err(|e| err("bind", e))?;
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).map_err(|e| err("send queue", e))?;
    tcp_set(f, TCP_QUEUE_SEQ, r.snd_seq.wrapping_sub(r.outq_len) as i32)
        .map_err(|e| err("send sequence", e))?;
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).map_err(|e| err("receive queue", e))?;
    tcp_set(f, TCP_QUEUE_SEQ, r.rcv_seq.wrapping_sub(r.inq_len) as i32)
        .map_err(|e| err("receive sequence", e))?;
    connect(&fd, addr_for(family, remote)).map_err(|e| err("connect", e))?;
    let mut opts: Vec<u8> = Vec::new();
    let mut opt = |code: u32, val: u32| {
        opts.extend_from_slice(&code.to_ne_bytes());
        opts.extend_from_slice(&val.to_ne_bytes());
    };
    opt(TCPOPT_MSS, r.mss);
    if r.wscale_ok {
        opt(
            TCPOPT_WINDOW,
            u32::from(r.snd_wscale) | (u32::from(r.rcv_wscale) << 16),
        );
    }
    if r.sack_ok {
        opt(TCPOPT_SACK_PERM, 0);
    }
    if r.timestamps_ok {
        opt(TCPOPT_TIMESTAMP, 0);
    }
    tcp_set_bytes(f, TCP_REPAIR_OPTIONS, &opts).map_err(|e| err("options", e))?;
    if r.timestamps_ok {
        tcp_set(f, TCP_TIMESTAMP, r.timestamp as i32).map_err(|e| err("timestamp", e))?;
    }
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).map_err(|e| err("receive queue", e))?;
    fill(f, &data[..inq]).map_err(|e| err("filling the receive queue", e))?;
    // The send queue stays empty here: see `send_queue`.
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_NO_QUEUE).map_err(|e| err("queues", e))?;
    let w: Vec<u8> = r.window.iter().flat_map(|v| v.to_ne_bytes()).collect();
    tcp_set_bytes(f, TCP_REPAIR_WINDOW, &w).map_err(|e| err("window", e))?;
    Ok(fd)
}

/// The state and queued bytes (`data`: receive queue then send queue) of an end to
/// restore, given its peer's saved state: the bytes of the send queue the peer had
/// already received (up to its `rcv_seq`) are dropped, and the send window shrunk by as
/// many so that its right edge stays where the peer put it. The rest of the send queue
/// is then exactly what the peer has not seen. The peer may have received more than
/// this end's state says was sent (an end in repair mode still transmits: read one
/// after the other, the pair need not agree): the peer's `rcv_seq` is what arrived,
/// and those bytes are dropped too. Left as saved, the send queue would start below
/// what the peer acknowledges, the peer's acknowledgements would name bytes this end
/// has not sent yet and be ignored, and the connection would stall on backed-off
/// retransmissions. An inconsistent pair (the peer received bytes this end no longer
/// holds) is left as saved.
pub(super) fn settled(
    r: &TcpRepair,
    data: &[u8],
    peer: Option<&TcpRepair>,
) -> (TcpRepair, Vec<u8>) {
    let mut r = r.clone();
    let Some(p) = peer else {
        return (r, data.to_vec());
    };
    let una = r.snd_seq.wrapping_sub(r.outq_len);
    let received = p.rcv_seq.wrapping_sub(una);
    if received == 0 || received > r.outq_len || data.len() != (r.inq_len + r.outq_len) as usize {
        return (r, data.to_vec());
    }
    let inq = r.inq_len as usize;
    let mut out = data[..inq].to_vec();
    out.extend_from_slice(&data[inq + received as usize..]);
    let sent = r.outq_len.saturating_sub(r.unsent_len);
    r.outq_len -= received;
    // Of what is left, the part the peer has not been sent (all of it, when the peer
    // got more than this end knew it had sent).
    r.unsent_len = r.unsent_len.min(r.outq_len);
    if received > sent {
        tracing::debug!(
            "TCP repair: the peer received {} bytes more than its sender had sent when it was read",
            received - sent
        );
    }
    r.window[1] = r.window[1].saturating_sub(received);
    (r, out)
}

/// Takes a restored end out of repair mode (every end of its connection exists now):
/// the window probe this sends gets the peer's window back.
pub(super) fn out_of_repair(s: &InetSocket, fd: &OwnedFd) -> std::result::Result<(), String> {
    tcp_set(fd.as_raw_fd(), TCP_REPAIR, 0).map_err(|e| {
        format!(
            "TCP connection {} -> {}: leaving repair mode: {e}",
            s.local, s.remote
        )
    })
}

/// Sends the send queue of a restored end, out of repair mode (as does its peer), as
/// new data from its first unacknowledged byte (see [`settled`]).
pub(super) fn send_queue(
    s: &InetSocket,
    r: &TcpRepair,
    data: &[u8],
    fd: &OwnedFd,
) -> std::result::Result<(), String> {
    let unsent = &data[(r.inq_len as usize).min(data.len())..];
    let f = fd.as_raw_fd();
    // The peer's window may be closed: the bytes wait in our send buffer, which the
    // kernel accounts a little differently than when they were written. Without room
    // (SO_SNDBUFFORCE needs CAP_NET_ADMIN of the host), the buffer grows to the
    // largest an application may ask for; the options the application set are
    // applied afterwards.
    let mut sent = send_some(f, unsent).0;
    if sent < unsent.len() {
        let max = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            .unwrap_or(212992);
        let now = super::super::sockopt(f, libc::SO_SNDBUF);
        if setsockopt_int(f, libc::SOL_SOCKET, SO_SNDBUFFORCE, now.max(1) * 2).is_err() {
            let _ = setsockopt_int(f, libc::SOL_SOCKET, libc::SO_SNDBUF, max);
        }
        sent += send_some(f, &unsent[sent..]).0;
    }
    send_all(f, &unsent[sent..], Instant::now() + Duration::from_secs(2)).map_err(|e| {
        format!(
            "TCP connection {} -> {}: sending its unsent bytes: {e}",
            s.local, s.remote
        )
    })
}

#[cfg(test)]
mod tests {
    use super::settled;
    use stasis_image::TcpRepair;

    /// An end with 3 bytes queued to read, then 10 in its send queue (the last 4
    /// unsent), its window 100 from `snd_una` 1000.
    fn end() -> (TcpRepair, Vec<u8>) {
        let r = TcpRepair {
            snd_seq: 1010,
            inq_len: 3,
            outq_len: 10,
            unsent_len: 4,
            window: [0, 100, 100, 0, 0],
            ..TcpRepair::default()
        };
        (r, b"abc0123456789".to_vec())
    }

    #[test]
    fn bytes_the_peer_received_leave_the_send_queue() {
        let (r, data) = end();
        let peer = TcpRepair {
            rcv_seq: 1004,
            ..TcpRepair::default()
        };
        let (s, d) = settled(&r, &data, Some(&peer));
        assert_eq!(d, b"abc456789");
        assert_eq!((s.outq_len, s.unsent_len, s.snd_seq), (6, 4, 1010));
        assert_eq!(s.window[1], 96, "the window's right edge stays");
    }

    /// The peer got 8 bytes though this end was read with only 6 sent: all 8 leave.
    #[test]
    fn bytes_the_peer_received_beyond_what_was_sent_leave_too() {
        let (r, data) = end();
        let peer = TcpRepair {
            rcv_seq: 1008,
            ..TcpRepair::default()
        };
        let (s, d) = settled(&r, &data, Some(&peer));
        assert_eq!(d, b"abc89");
        assert_eq!((s.outq_len, s.unsent_len, s.snd_seq), (2, 2, 1010));
        assert_eq!(s.window[1], 92);
    }

    #[test]
    fn an_inconsistent_pair_is_left_as_saved() {
        let (r, data) = end();
        for rcv_seq in [1000, 1011, 999, 2000] {
            let peer = TcpRepair {
                rcv_seq,
                ..TcpRepair::default()
            };
            let (s, d) = settled(&r, &data, Some(&peer));
            assert_eq!((s, d), (r.clone(), data.clone()), "rcv_seq {rcv_seq}");
        }
        assert_eq!(settled(&r, &data, None), (r, data));
    }
}
