//! TCP and UDP sockets over IPv4 and IPv6, without privilege.
//!
//! Dump (every end frozen): the socket is borrowed with `pidfd_getfd(2)`; its addresses
//! come from getsockname/getpeername, its TCP state from `TCP_INFO`, and the kernel's
//! view of every socket of the network namespace from inet_diag
//! ([`stasis_sys::inet_diag`]). The other end of a TCP connection is the socket whose
//! local and remote addresses are ours swapped:
//! * held by a process of the checkpoint: the connection is saved whole. The bytes on
//!   their way to each end are its receive queue followed by the peer's send queue.
//!   When the peer's send queue is empty the receive queue is read with MSG_PEEK
//!   (nothing consumed). Otherwise the receive queue is drained (consumed) until the
//!   peer's send queue has flowed in, and everything is sent back through the peer's
//!   socket before any process runs again: same bytes, same order, same buffers.
//! * a socket no process holds (the peer closed it): the connection comes back with its
//!   unread bytes followed by end of file;
//! * the embryo of a connection a listener of the checkpoint has not accepted yet: the
//!   client end comes back pending on that listener;
//! * anything else is outside the checkpoint: refused (error naming fd and remote
//!   address), or with `--tcp-external=reset` saved to come back reset (ECONNRESET on
//!   its next use, as after a network failure). The connection itself is not touched.
//!
//! UDP: local and remote address, and the queued datagrams with their sender addresses
//! (MSG_PEEK walking with SO_PEEK_OFF). Raw, ICMP and other IP sockets are refused.
//! Options that differ from a new socket's are saved by name ([`OPTIONS`]).
//!
//! Restore (in the restorer, before the processes exist): listeners are bound and
//! listen again (a port taken meanwhile is an error naming it); each connection inside
//! the checkpoint is made again between the saved addresses (through its listener when
//! that is in the checkpoint too, else through a listener of our own on the server
//! end's address), local ports kept where they are free; pending connections are made
//! last and left pending; a connection whose peer had closed gets its bytes and end of
//! file from a temporary peer, which then closes; a reset one is reset by a temporary
//! peer closing with SO_LINGER 0. Queues are refilled by sending from the peer (a
//! connection that must hold more than a new one does is first grown by pushing bytes
//! through it, as TCP autotuning does), datagrams are sent again from their senders'
//! addresses, then shutdowns and options are applied.

mod diag;
mod dump;
mod net;
mod options;
mod repair;
mod restore;

pub use dump::Collector;
pub use options::owner_of;
pub(crate) use options::F_SETSIG;
pub use restore::create_all;

/// What to do with a TCP connection whose peer is outside the checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TcpExternal {
    /// Refuse the checkpoint with an error naming the socket and the remote address.
    #[default]
    Refuse,
    /// Save it as reset: after a restart its next use fails with ECONNRESET.
    Reset,
    /// The peer is another node's part of the same multi-node job, checkpointed
    /// together with this one: the connection is saved whole (its receive queue, once
    /// [`settle_external`] has seen everything sent acknowledged) and made again at
    /// restart between the nodes' new addresses ([`remote`]).
    Peer,
}

mod ports;
pub mod redirect;
mod remote;
pub use ports::current_port_map;
pub use remote::{
    current_address_map, node_addresses, publish_addresses, settle_external, SETTLE_TIMEOUT,
};

/// Makes every TCP socket of the checkpointed processes close with a reset
/// (SO_LINGER 0), before they are killed: a connection then leaves no TIME_WAIT
/// behind on its ports (a restart on this host binds them again), and a peer outside
/// the job sees its connection reset, as it will find it after a restart. Errors are
/// ignored: the processes are about to die either way.
pub fn abort_on_close(meta: &stasis_image::Checkpoint) {
    let tcp: std::collections::HashSet<u64> = meta
        .inet_sockets
        .iter()
        .filter(|s| s.protocol == "tcp")
        .map(|s| s.id)
        .collect();
    let mut done = std::collections::HashSet::new();
    for p in &meta.processes {
        for f in &p.fds {
            let stasis_image::FdKind::InetSocket { sock, .. } = f.kind else {
                continue;
            };
            if !tcp.contains(&sock) || !done.insert(sock) {
                continue;
            }
            if let Ok(fd) = crate::proc::borrow_fd(p.pid, f.fd) {
                let l = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: setsockopt reads a struct linger from `l`.
                unsafe {
                    libc::setsockopt(
                        std::os::unix::io::AsRawFd::as_raw_fd(&fd),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&l as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    )
                };
            }
        }
    }
}
