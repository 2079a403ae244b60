//! UNIX domain sockets: socketpairs, named and abstract sockets, listeners with their
//! pending connections, accepted connections, datagram sockets (connected or not, with
//! the sender of every queued datagram), sockets whose peer was closed, and the data
//! waiting in every queue.
//!
//! Dump: the kernel's view of every UNIX socket (state, name, peer, pending
//! connections) comes from NETLINK_SOCK_DIAG; the process's socket is borrowed with
//! `pidfd_getfd(2)` and its receive queue read without consuming it (MSG_PEEK walking
//! with SO_PEEK_OFF; for datagrams also the address each came from). A socket whose
//! peer was closed shows a peer of inode 0 (`peer_gone`). A socket connected to
//! something outside the checkpointed tree refuses the checkpoint with a clear error,
//! or with `--unix-external=reconnect` is saved to connect again to the same name at
//! restore. File descriptors in flight (SCM_RIGHTS) come with the peek, installed in
//! our own table: the collector hands them to the fd registry
//! ([`Collector::take_in_flight`]), which saves them like any fd (a socket among them
//! is read in turn, so several levels deep) and gives them back
//! ([`Collector::set_in_flight`]); a kind that cannot be saved refuses the checkpoint.
//!
//! Restore (in the restorer, before the processes exist), in three steps, the first in
//! [`create_all`], the others in [`finish`] once every open file description exists
//! (a message may carry any of them):
//! 1. create: listeners are bound and listen again, accepted connections are re-made
//!    through them (connect + accept) so that names stay right, pending connections
//!    are re-made and left pending, other connected stream pairs and mutually
//!    connected datagram pairs become socketpairs (bound again where they had a name);
//!    a socket whose peer was closed gets a stand-in peer (a socketpair, or a
//!    connection through its listener); other datagram sockets are created and bound.
//! 2. refill: each queue is refilled by sending its messages again in order, with
//!    their descriptors in flight, from the peer (or stand-in), and for a datagram
//!    socket from a socket bound to the name of each datagram's sender: the job's own
//!    socket of that name, or a temporary one.
//! 3. connect: datagram sockets connect to their peers (after the refill: a connected
//!    socket takes datagrams from its peer only), sockets saved with `reconnect`
//!    connect to their outside name, stand-ins are closed (the survivor sees its peer
//!    gone: end-of-file after the data, or ECONNREFUSED), options and shutdowns are
//!    applied.
//!
//! The code is in one file per concern:
//!
//! - this file: the dump side, the [`Collector`] of every UNIX socket of a checkpoint;
//! - [`queue`]: reading a socket's queue without consuming it, with each datagram's
//!   sender and the descriptors in flight (SCM_RIGHTS);
//! - [`restore`](mod@restore): steps 1 and 3 of the restore ([`create_all`], [`finish`])
//!   and the helpers making, binding and connecting sockets;
//! - [`refill`]: step 2, the queues refilled with their messages and descriptors.

mod queue;
mod refill;
mod restore;

pub use restore::{create_all, finish, Pending};

use queue::{peek_queue, Queue};

use super::sockopt;
use crate::error::{Error, Result, SysContext};
use stasis_image::{CheckpointWriter, UnixSocket};
use stasis_sys::unix_diag::{self, UnixSock};
use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, OwnedFd};

const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;
const MAX_MESSAGES: usize = 1 << 16;

/// Collects the UNIX sockets of a checkpoint.
#[derive(Default)]
pub struct Collector {
    diag: Option<HashMap<u64, UnixSock>>,
    socks: Vec<UnixSocket>,
    /// First holder (pid, fd) of each socket, for error messages.
    holders: HashMap<u64, (i32, i32)>,
    /// `--unix-external=reconnect`: a socket connected outside the checkpoint is saved
    /// to connect again to the same name at restore (else it refuses the checkpoint).
    reconnect: bool,
    /// Descriptors in flight found in queues and not saved yet: (socket, message,
    /// the descriptors, installed in our table by the peek).
    pending: Vec<(u64, u64, Vec<OwnedFd>)>,
}

impl Collector {
    /// A collector for one checkpoint.
    pub fn new() -> Collector {
        Collector::default()
    }

    /// With `reconnect`, a socket connected to a socket outside the checkpoint is
    /// saved to connect again to the same name at restore (`--unix-external=reconnect`).
    pub fn set_reconnect(&mut self, reconnect: bool) {
        self.reconnect = reconnect;
    }

    /// The descriptors in flight found since the last call: (socket, index of the
    /// message carrying them, our descriptors of them), to be saved like any fd and
    /// given back with [`Collector::set_in_flight`].
    pub fn take_in_flight(&mut self) -> Vec<(u64, u64, Vec<OwnedFd>)> {
        std::mem::take(&mut self.pending)
    }

    /// Records the saved descriptors `fds` carried by message `message` of socket `id`.
    pub fn set_in_flight(&mut self, id: u64, message: u64, fds: Vec<stasis_image::Fd>) {
        if let Some(s) = self.socks.iter_mut().find(|s| s.id == id) {
            s.in_flight.push(stasis_image::InFlight { message, fds });
        }
    }

    /// The first holder (pid, fd) of socket `id`, for error messages.
    pub fn holder(&self, id: u64) -> (i32, i32) {
        self.holders.get(&id).copied().unwrap_or((0, -1))
    }

    /// Whether the socket `ino` was saved already.
    pub fn has(&self, ino: u64) -> bool {
        self.holders.contains_key(&ino)
    }

    /// Every UNIX socket of the network namespace, by inode (listed once per
    /// checkpoint, for process `pid`'s first socket).
    pub fn diag(&mut self, pid: i32) -> Result<&HashMap<u64, UnixSock>> {
        let diag = match self.diag.take() {
            Some(d) => d,
            None => unix_diag::dump().ctx(pid, || "listing UNIX sockets (sock_diag)".into())?,
        };
        Ok(self.diag.insert(diag))
    }

    /// Saves the UNIX socket `sock` (fd `fd` of process `pid`, borrowed), once per
    /// socket.
    pub fn dump_fd(
        &mut self,
        pid: i32,
        fd: i32,
        ino: u64,
        sock: &OwnedFd,
        writer: &mut CheckpointWriter,
    ) -> Result<u64> {
        if self.holders.contains_key(&ino) {
            return Ok(ino);
        }
        let s = sock.as_raw_fd();
        let d = self
            .diag(pid)?
            .get(&ino)
            .cloned()
            .ok_or_else(|| Error::Unsupported {
                pid,
                what: format!("fd {fd}, a UNIX socket the kernel's socket list does not show (another network namespace?)"),
            })?;
        let state = match d.state {
            TCP_LISTEN => "listening",
            TCP_ESTABLISHED => "connected",
            _ if d.peer != 0 => "connected",
            _ => "unconnected",
        };
        let Queue {
            data,
            messages,
            senders,
            fds,
        } = if d.state == TCP_LISTEN {
            Queue {
                data: Vec::new(),
                messages: Vec::new(),
                senders: Vec::new(),
                fds: Vec::new(),
            }
        } else {
            peek_queue(pid, fd, s, d.sock_type, d.shutdown & 1 != 0)?
        };
        for (message, fds) in fds {
            self.pending.push((ino, message, fds));
        }
        let data_file = if data.is_empty() {
            None
        } else {
            let name = format!("sock-{ino}.img");
            let mut w = writer.data_file(&name)?;
            w.write_all(&data)?;
            writer.finish_data(w)?;
            Some(name)
        };
        self.socks.push(UnixSocket {
            id: ino,
            sock_type: d.sock_type,
            state: state.to_string(),
            name: d.name.clone(),
            bound_in: if !d.name.is_empty() && !d.name.starts_with('/') && !d.name.starts_with('@')
            {
                std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            },
            peer: d.peer,
            pending_on: 0,
            // sock_diag does not report a listener's backlog; SOMAXCONN is what most
            // programs ask for and what the kernel caps to.
            backlog: if d.state == TCP_LISTEN {
                libc::SOMAXCONN as u32
            } else {
                0
            },
            shutdown: d.shutdown,
            passcred: sockopt(s, libc::SO_PASSCRED) != 0,
            data_file,
            messages,
            senders,
            // The kernel still names a peer, of inode 0: it was closed (released).
            // (The client end of a pending connection looks the same: `finish`
            // tells them apart.)
            peer_gone: d.has_peer && d.peer == 0 && d.state != TCP_LISTEN,
            reconnect: String::new(),
            reconnect_in: String::new(),
            in_flight: Vec::new(),
        });
        self.holders.insert(ino, (pid, fd));
        Ok(ino)
    }

    /// Checks that every connection stays inside the checkpoint and returns the
    /// sockets. Pending (not yet accepted) connections are tied to their listener.
    pub fn finish(mut self) -> Result<Vec<UnixSocket>> {
        let ids: std::collections::HashSet<u64> = self.socks.iter().map(|s| s.id).collect();
        let diag = self.diag.take().unwrap_or_default();
        let listeners: Vec<(u64, Vec<u64>)> = self
            .socks
            .iter()
            .filter(|s| s.state == "listening")
            .map(|s| {
                (
                    s.id,
                    diag.get(&s.id).map(|d| d.icons.clone()).unwrap_or_default(),
                )
            })
            .collect();
        let listener_names: std::collections::HashSet<String> = self
            .socks
            .iter()
            .filter(|s| s.state == "listening")
            .map(|s| s.name.clone())
            .collect();
        for s in &mut self.socks {
            // The client end of a pending connection: the listener's queue lists it
            // (sock_diag shows such a socket's peer, the embryo, as 0).
            if let Some((l, _)) = listeners.iter().find(|(_, icons)| icons.contains(&s.id)) {
                if diag.get(&s.id).is_some_and(|d| d.wqlen > 0) {
                    // The bytes wait in the not-yet-accepted server end, which no fd
                    // reaches: they could not be saved.
                    let (pid, fd) = self.holders.get(&s.id).copied().unwrap_or((0, -1));
                    // Usually accepted a moment later: the checkpoint is retried.
                    return Err(Error::Transient {
                        pid,
                        what: format!(
                            "fd {fd}, a UNIX socket connection not yet accepted, already carries data the server has not accepted (it cannot be saved)"
                        ),
                    });
                }
                s.pending_on = *l;
                s.peer = 0;
                s.peer_gone = false;
                continue;
            }
            if s.peer == 0 || ids.contains(&s.peer) {
                continue;
            }
            let (pid, fd) = self.holders.get(&s.id).copied().unwrap_or((0, -1));
            let peer_name = diag
                .get(&s.peer)
                .map(|p| p.name.clone())
                .unwrap_or_default();
            // An accepted connection from an outside client: nothing to connect to.
            let accepted = !s.name.is_empty() && listener_names.contains(&s.name);
            if self.reconnect && !accepted {
                if peer_name.is_empty() {
                    return Err(Error::Unsupported {
                        pid,
                        what: format!(
                            "fd {fd}, a UNIX socket connected to an unnamed socket outside the checkpoint (nothing to reconnect to)"
                        ),
                    });
                }
                if s.data_file.is_some() {
                    // Bytes the outside peer sent and the job has not read yet could
                    // not come back over a new connection; usually read a moment later.
                    return Err(Error::Transient {
                        pid,
                        what: format!(
                            "fd {fd}, a UNIX socket connected to {peer_name} outside the checkpoint, has unread data from it"
                        ),
                    });
                }
                s.reconnect_in = if peer_name.starts_with('/') || peer_name.starts_with('@') {
                    String::new()
                } else {
                    std::fs::read_link(format!("/proc/{pid}/cwd"))
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default()
                };
                s.reconnect = peer_name;
                s.peer = 0;
                continue;
            }
            return Err(Error::Unsupported {
                pid,
                what: format!(
                    "fd {fd}, a UNIX socket connected to a process outside the checkpoint{} (`--unix-external=reconnect` saves it to connect again to the same name at restore)",
                    if peer_name.is_empty() {
                        String::new()
                    } else {
                        format!(" ({peer_name})")
                    }
                ),
            });
        }
        for (l, icons) in &listeners {
            if icons.iter().any(|c| !ids.contains(c)) {
                let (pid, fd) = self.holders.get(l).copied().unwrap_or((0, -1));
                return Err(Error::Unsupported {
                    pid,
                    what: format!("fd {fd}, a listening UNIX socket with a pending connection from outside the checkpoint"),
                });
            }
        }
        Ok(self.socks)
    }
}
