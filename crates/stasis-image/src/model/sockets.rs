//! Sockets in the image: UNIX sockets (with queued data and descriptors in flight)
//! and inet sockets (TCP repair state, options).

use super::*;
use serde::{Deserialize, Serialize};

/// A UNIX domain socket (unix(7)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixSocket {
    /// Identifier the fds refer to (the socket's inode number at checkpoint time).
    pub id: u64,
    /// SOCK_STREAM (1), SOCK_DGRAM (2) or SOCK_SEQPACKET (5).
    pub sock_type: i32,
    /// `listening`, `connected` or `unconnected`.
    pub state: String,
    /// Bound address: a path, "@name" (abstract), or empty.
    pub name: String,
    /// For a relative path name: the directory it was bound in (the holder's cwd).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bound_in: String,
    /// The socket it is connected to (id), 0 if none.
    pub peer: u64,
    /// For the client end of a connection not yet accepted: the listener's id.
    #[serde(default)]
    pub pending_on: u64,
    /// For listeners: listen(2) backlog.
    #[serde(default)]
    pub backlog: u32,
    /// shutdown(2) bits: 1 = SHUT_RD, 2 = SHUT_WR.
    #[serde(default)]
    pub shutdown: u8,
    /// SO_PASSCRED.
    #[serde(default)]
    pub passcred: bool,
    /// Data file with the bytes waiting to be read, if any.
    pub data_file: Option<String>,
    /// Length of each queued message (one entry for a byte stream).
    #[serde(default)]
    pub messages: Vec<u64>,
    /// For datagram sockets: the address each queued message was sent from (what
    /// recvfrom(2) names: a path, "@name", or empty for an unbound sender), one per
    /// entry of `messages`. Empty in older images (every message then comes from the
    /// peer, or from an unbound socket).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub senders: Vec<String>,
    /// Still connected to a peer that was closed (released): a stream reader gets the
    /// queued bytes then end-of-file, a datagram socket's send fails with
    /// ECONNREFUSED. `peer` is 0.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub peer_gone: bool,
    /// Connected to a socket outside the checkpoint, saved with
    /// `--unix-external=reconnect`: the name (path or "@name") to connect to again at
    /// restore. `peer` is 0.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reconnect: String,
    /// For `reconnect` with a relative name: the directory it is resolved in.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reconnect_in: String,
    /// File descriptors in flight (sent with SCM_RIGHTS, not received yet), with the
    /// queued message that carries them. A stream's `messages` are then the segments
    /// between such messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_flight: Vec<InFlight>,
}

/// The file descriptors one queued message of a UNIX socket carries (SCM_RIGHTS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// Index of the message in the socket's `messages`.
    pub message: u64,
    /// The descriptors, in the order they were sent (`fd` is that position); their
    /// descriptions are shared with the processes' fds as usual (`desc`).
    pub fds: Vec<Fd>,
}

/// A TCP or UDP socket over IPv4 or IPv6 (ip(7), ipv6(7), tcp(7), udp(7)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InetSocket {
    /// Identifier the fds refer to (the socket's inode number at checkpoint time).
    pub id: u64,
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `listening`, `connected` (TCP: established or half-closed; UDP: connect(2)ed),
    /// `bound`, `unbound`, or `reset` (a TCP connection to a peer outside the
    /// checkpoint, saved with `--tcp-external=reset`: it comes back reset).
    pub state: String,
    /// Local address as `127.0.0.1:5000` or `[::1]:5000`; empty if unbound.
    pub local: String,
    /// Remote address (same form); empty if not connected.
    #[serde(default)]
    pub remote: String,
    /// TCP: the other end of the connection (id) when it is in the checkpoint, else 0.
    #[serde(default)]
    pub peer: u64,
    /// TCP: for the client end of a connection not yet accepted, the listener's id.
    #[serde(default)]
    pub pending_on: u64,
    /// TCP: the peer closed its end (a FIN came) and is not in the checkpoint: the
    /// queued bytes are followed by end of file.
    #[serde(default)]
    pub peer_closed: bool,
    /// For listeners: listen(2) backlog.
    #[serde(default)]
    pub backlog: u32,
    /// shutdown(2) bits applied to this end: 1 = SHUT_RD, 2 = SHUT_WR.
    #[serde(default)]
    pub shutdown: u8,
    /// Socket options that differ from a new socket's (name, value); see
    /// docs/IMAGE-FORMAT.md for the names.
    #[serde(default)]
    pub options: Vec<SocketOption>,
    /// Data file with the bytes waiting to be read (TCP: the receive queue and the
    /// peer's unread send queue, in order; UDP: the datagrams, concatenated), at
    /// `data_offset` in it (the sum of `messages` long). Every socket of a checkpoint
    /// shares one file, `inet.img`.
    #[serde(default)]
    pub data_file: Option<String>,
    #[serde(default)]
    pub data_offset: u64,
    /// Length of each queued datagram (TCP: one entry, the bytes queued).
    #[serde(default)]
    pub messages: Vec<u64>,
    /// UDP: sender address of each queued datagram.
    #[serde(default)]
    pub sources: Vec<String>,
    /// TCP, in a job's own network namespace: the connection's exact state, read with
    /// TCP_REPAIR. `data_file` then holds the receive queue followed by the send queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<TcpRepair>,
}

/// The state of an established TCP connection as TCP_REPAIR reads and sets it (tcp(7),
/// include/uapi/linux/tcp.h).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRepair {
    /// Sequence number after the last byte written (write_seq).
    pub snd_seq: u32,
    /// Sequence number after the last byte received (rcv_nxt).
    pub rcv_seq: u32,
    /// Bytes received and not yet read (the start of `data_file`).
    pub inq_len: u32,
    /// Bytes written and not yet acknowledged (the rest of `data_file`), of which
    /// `unsent_len` were not sent yet.
    pub outq_len: u32,
    pub unsent_len: u32,
    /// TCP options negotiated: maximum segment size, window scales, SACK, timestamps.
    pub mss: u32,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub wscale_ok: bool,
    pub sack_ok: bool,
    pub timestamps_ok: bool,
    /// TCP_TIMESTAMP: the connection's current timestamp value.
    pub timestamp: u32,
    /// TCP_REPAIR_WINDOW: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
}

/// One socket option, by its name in the C headers (`TCP_NODELAY`, `SO_LINGER`...).
/// `SO_LINGER` is the linger time in seconds, -1 when off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketOption {
    pub name: String,
    pub value: i64,
}

/// A listener port of a node's part that moved at a restart onto a node shared with
/// another part: the job's processes know `address`:`port`, which is at port `now` of
/// the node `address` stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMove {
    pub address: String,
    pub port: u16,
    pub now: u16,
}
