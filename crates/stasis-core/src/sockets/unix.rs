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

use super::sockopt;
use crate::error::{Error, Result, SysContext};
use stasis_image::{CheckpointReader, CheckpointWriter, FdKind, UnixSocket};
use stasis_sys::unix_diag::{self, UnixSock};
use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

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

/// A socket's receive queue, read without consuming it: the bytes, the length of each
/// message, for datagrams the address each came from, and the descriptors in flight
/// (installed in our own table by the peek) with the index of the message carrying
/// them.
struct Queue {
    data: Vec<u8>,
    messages: Vec<u64>,
    senders: Vec<String>,
    fds: Vec<(u64, Vec<OwnedFd>)>,
}

/// Reads a socket's receive queue without consuming it.
/// A stream is read with one MSG_PEEK, which reads across its whole queue up to a
/// message carrying descriptors; datagrams, and a stream that comes back short, are
/// walked with SO_PEEK_OFF (the socket's own, shared with the application, put back
/// after). A stream read stops at the end of a message carrying descriptors, and may
/// have begun in earlier messages without: where that message starts cannot be seen,
/// so the bytes of the read are sent again as one message with the descriptors (a
/// reader then gets them with the first of these bytes it reads, not with the first
/// byte of their own message). An empty datagram that was peeked before (by an
/// earlier checkpoint, or by the application with MSG_PEEK) is skipped by every peek
/// at an offset, so it is not seen. On a socket shut down for reading (`rd_shut`: also one whose
/// connected peer was closed) an empty queue reads as 0 bytes, like an empty
/// message: the walk stops there (an empty message at the end of such a queue is not
/// seen).
fn peek_queue(pid: i32, fd: i32, s: i32, sock_type: i32, rd_shut: bool) -> Result<Queue> {
    let ctx = || format!("reading the queue of socket fd {fd}");
    let mut buf = vec![0u8; 1 << 18];
    let mut q = Queue {
        data: Vec::new(),
        messages: Vec::new(),
        senders: Vec::new(),
        fds: Vec::new(),
    };
    let stream = sock_type == libc::SOCK_STREAM;
    if stream {
        let mut want = 0i32;
        // SAFETY: FIONREAD writes an int.
        if unsafe { libc::ioctl(s, libc::FIONREAD, &mut want) } == 0 {
            let want = want.max(0) as usize;
            if want == 0 {
                return Ok(q);
            }
            if buf.len() < want {
                buf.resize(want, 0);
            }
            let (n, _, fds) = peek_one(s, &mut buf[..want]).ctx(pid, ctx)?;
            if n == want && fds.is_empty() {
                q.data = buf[..n].to_vec();
                q.messages.push(n as u64);
                return Ok(q);
            }
        }
    }
    let mut walk = |q: &mut Queue| -> std::io::Result<()> {
        // A stream's bytes since the last message with descriptors.
        let mut plain = 0u64;
        let mut complete = false;
        for _ in 0..MAX_MESSAGES {
            let (n, from, fds) = peek_one(s, &mut buf)?;
            if n == usize::MAX {
                complete = true; // nothing more queued
                break;
            }
            if n == 0 && (stream || rd_shut) && fds.is_empty() {
                complete = true;
                break;
            }
            q.data.extend_from_slice(&buf[..n]);
            if !stream {
                if !fds.is_empty() {
                    q.fds.push((q.messages.len() as u64, fds));
                }
                q.messages.push(n as u64);
                if sock_type == libc::SOCK_DGRAM {
                    q.senders.push(from);
                }
                continue;
            }
            if fds.is_empty() {
                plain += n as u64;
                continue;
            }
            // The read ends with the message carrying the descriptors; where that
            // message starts in it cannot be seen (a peek from any earlier byte brings
            // them): the read is sent again as one message with them.
            if plain > 0 {
                q.messages.push(plain);
                plain = 0;
            }
            q.fds.push((q.messages.len() as u64, fds));
            q.messages.push(n as u64);
        }
        if plain > 0 {
            q.messages.push(plain);
        }
        if !complete {
            return Err(std::io::Error::other(format!(
                "more than {MAX_MESSAGES} messages queued"
            )));
        }
        Ok(())
    };
    crate::sockets::with_peek_offset(s, || walk(&mut q))
        .ctx(pid, ctx)?
        .ctx(pid, ctx)?;
    Ok(q)
}

/// The name in a sockaddr_un of length `len` as sock_diag shows names: a path,
/// "@name" for the abstract namespace, empty for an unbound socket.
fn addr_name(a: &libc::sockaddr_un, len: usize) -> String {
    let base = std::mem::size_of::<libc::sa_family_t>();
    if len <= base {
        return String::new();
    }
    let bytes: Vec<u8> = a.sun_path[..(len - base).min(a.sun_path.len())]
        .iter()
        .map(|&c| c as u8)
        .collect();
    match bytes.split_first() {
        Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
        _ => {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        }
    }
}

/// One MSG_PEEK into `buf`: the bytes read (`usize::MAX` when nothing is queued), the
/// sender's address, and the descriptors the message carries (SCM_RIGHTS: the peek
/// installs them in our table).
fn peek_one(s: i32, buf: &mut [u8]) -> std::io::Result<(usize, String, Vec<OwnedFd>)> {
    let mut cbuf = [0u64; 512];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: sockaddr_un and msghdr are plain data; zeroed is a valid empty value.
    let mut from: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_un).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points to live buffers of the sizes given.
    let n = unsafe {
        libc::recvmsg(
            s,
            &mut msg,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok((usize::MAX, String::new(), Vec::new()));
        }
        return Err(e);
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into cbuf; the
    // descriptors a peek of SCM_RIGHTS installed in our table are ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<i32>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other(
            "more descriptors in flight with one message than stasis reads",
        ));
    }
    Ok((n as usize, addr_name(&from, msg.msg_namelen as usize), fds))
}

fn new_socket(sock_type: i32) -> std::result::Result<OwnedFd, String> {
    // SAFETY: socket() returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, sock_type | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(name: &str) -> std::result::Result<(libc::sockaddr_un, libc::socklen_t), String> {
    // SAFETY: sockaddr_un is plain data; zeroed is valid.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let (bytes, abstract_) = match name.strip_prefix('@') {
        Some(rest) => (rest.as_bytes(), true),
        None => (name.as_bytes(), false),
    };
    let start = usize::from(abstract_);
    if bytes.len() + start >= a.sun_path.len() {
        return Err(format!("socket name too long: {name}"));
    }
    for (i, b) in bytes.iter().enumerate() {
        a.sun_path[start + i] = *b as libc::c_char;
    }
    let base = std::mem::size_of::<libc::sa_family_t>();
    let len = base + start + bytes.len() + usize::from(!abstract_);
    Ok((a, len as libc::socklen_t))
}

/// Runs `f` with the current directory set to `dir` (if not empty), for a relative
/// socket name. The restorer is single-threaded while it creates sockets.
fn in_dir<T>(
    dir: &str,
    f: impl FnOnce() -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    if dir.is_empty() {
        return f();
    }
    let back = std::env::current_dir().map_err(|e| e.to_string())?;
    std::env::set_current_dir(dir)
        .map_err(|e| format!("entering {dir} to bind a relative socket name: {e}"))?;
    let r = f();
    std::env::set_current_dir(&back).map_err(|e| e.to_string())?;
    r
}

fn bind(fd: &OwnedFd, name: &str) -> std::result::Result<(), String> {
    if !name.starts_with('@') {
        // The socket file of the process we replace is still there: remove it, but
        // only if it is a socket.
        use std::os::unix::fs::FileTypeExt;
        if std::fs::symlink_metadata(name).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(name);
        }
    }
    let (a, len) = sockaddr(name)?;
    // SAFETY: bind with a valid sockaddr_un of length `len`.
    if unsafe { libc::bind(fd.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), len) } != 0 {
        return Err(format!(
            "binding {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn connect(fd: &OwnedFd, name: &str) -> std::result::Result<(), String> {
    let (a, len) = sockaddr(name)?;
    // SAFETY: connect with a valid sockaddr_un of length `len`.
    if unsafe { libc::connect(fd.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), len) } != 0 {
        return Err(format!(
            "connecting to {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// "process P fd F": the first fd holding socket `id`, for error messages.
fn holder(image: &CheckpointReader, id: u64) -> String {
    for p in &image.meta.processes {
        for f in &p.fds {
            if matches!(f.kind, FdKind::UnixSocket { sock, .. } if sock == id) {
                return format!("process {} fd {}", p.pid, f.fd);
            }
        }
    }
    format!("UNIX socket {id}")
}

fn socketpair(sock_type: i32) -> std::result::Result<(OwnedFd, OwnedFd), String> {
    let mut sv = [0i32; 2];
    // SAFETY: socketpair fills the array with two new descriptors.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            sock_type | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    } != 0
    {
        return Err(format!("socketpair: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
}

/// `name`, made absolute with `dir` when it is a relative path.
fn abs_name(name: &str, dir: &str) -> String {
    if dir.is_empty() || name.starts_with('/') || name.starts_with('@') {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Sends one message `chunk` from our socket `fd` (to `to`, else to its peer), with
/// the descriptors `fds` (SCM_RIGHTS) if any. With `wait` false a full queue is an
/// error rather than a wait.
fn send_one(
    fd: i32,
    chunk: &[u8],
    fds: &[i32],
    to: Option<&(libc::sockaddr_un, libc::socklen_t)>,
    wait: bool,
) -> std::io::Result<()> {
    let flags = libc::MSG_NOSIGNAL | if wait { 0 } else { libc::MSG_DONTWAIT };
    let mut iov = libc::iovec {
        iov_base: chunk.as_ptr() as *mut libc::c_void,
        iov_len: chunk.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some((a, alen)) = to {
        msg.msg_name = (a as *const libc::sockaddr_un as *mut libc::sockaddr_un).cast();
        msg.msg_namelen = *alen;
    }
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer has room for one header and the descriptors.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<i32>(),
                fds.len(),
            );
        }
    }
    // SAFETY: msg points to live buffers: the chunk (only read), the address, the
    // control buffer.
    let n = unsafe { libc::sendmsg(fd, &msg, flags) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != chunk.len() {
        return Err(std::io::Error::other(format!(
            "sent {n} of {} bytes",
            chunk.len()
        )));
    }
    Ok(())
}

/// Temporary senders of datagrams whose sender is not a socket of the image (it was
/// closed, or is outside the job), by name; dropped after the refill.
#[derive(Default)]
struct Temps {
    by_name: HashMap<String, OwnedFd>,
    /// Socket files made for them, removed after the refill.
    made: Vec<String>,
}

impl Temps {
    /// A datagram socket bound to `name` (relative names in `dir`), or unbound when
    /// `name` is empty or held by a live socket outside the job (that sender cannot
    /// be named again: recvfrom then shows no address).
    fn get(&mut self, name: &str, dir: &str, sock_type: i32) -> std::result::Result<i32, String> {
        if let Some(fd) = self.by_name.get(name) {
            return Ok(fd.as_raw_fd());
        }
        let fd = new_socket(sock_type)?;
        if !name.is_empty() {
            let full = abs_name(name, dir);
            let live = !full.starts_with('@') && {
                // A socket file that something still listens on is not ours to take.
                let probe = new_socket(sock_type)?;
                std::fs::symlink_metadata(&full).is_ok() && connect(&probe, &full).is_ok()
            };
            let existed = std::fs::symlink_metadata(&full).is_ok();
            if live || bind(&fd, &full).is_err() {
                tracing::warn!(
                    "datagrams from {name} come back from an unnamed socket: the name is in use outside the job"
                );
            } else if !existed && !full.starts_with('@') {
                self.made.push(full);
            }
        }
        let raw = fd.as_raw_fd();
        self.by_name.insert(name.to_string(), fd);
        Ok(raw)
    }

    fn finish(self) {
        drop(self.by_name);
        for f in self.made {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// What is left to do for the UNIX sockets once every open file description exists
/// (queued messages may carry any of them): refill the queues, connect the datagram
/// sockets, close the stand-ins, apply options and shutdowns.
pub struct Pending {
    /// Our own descriptor of every socket (a duplicate of the one handed out).
    socks: HashMap<u64, OwnedFd>,
    stand_ins: HashMap<u64, OwnedFd>,
    connect_later: Vec<(u64, String, String)>,
    gone_later: Vec<u64>,
}

/// Creates every UNIX socket of the image, connected as it was (step 1). Returns the
/// restorer's descriptor of each, by id, and what [`finish`] does once every open
/// file description exists.
pub fn create_all(
    image: &CheckpointReader,
) -> std::result::Result<(HashMap<u64, OwnedFd>, Pending), String> {
    let socks = &image.meta.sockets;
    let by_id: HashMap<u64, &UnixSocket> = socks.iter().map(|s| (s.id, s)).collect();
    let mut out: HashMap<u64, OwnedFd> = HashMap::new();
    // The other end of a connection standing in for a closed peer, by the survivor's
    // id: it sends the survivor's queue and is closed at the end.
    let mut stand_ins: HashMap<u64, OwnedFd> = HashMap::new();
    // Datagram sockets connected after the refill: (id, name, directory), and those
    // whose peer was closed (connected to a stand-in that is closed).
    let mut connect_later: Vec<(u64, String, String)> = Vec::new();
    let mut gone_later: Vec<u64> = Vec::new();
    let dgram = |s: &UnixSocket| s.sock_type == libc::SOCK_DGRAM;
    let reconnect_now = |fd: &OwnedFd, s: &UnixSocket| {
        in_dir(&s.reconnect_in, || connect(fd, &s.reconnect)).map_err(|e| {
            format!(
                "{}: reconnecting the UNIX socket to {} outside the job (saved with --unix-external=reconnect): {e}; is anything listening there?",
                holder(image, s.id),
                s.reconnect
            )
        })
    };

    // 1. Create. Listeners and bound sockets without a peer in the image first:
    // others connect to them.
    for s in socks {
        let bound = s.peer == 0 && s.pending_on == 0 && !s.name.is_empty();
        if s.state == "listening" || (bound && (dgram(s) || !s.peer_gone)) {
            let fd = new_socket(s.sock_type)?;
            in_dir(&s.bound_in, || bind(&fd, &s.name))?;
            if s.state == "listening" {
                // SAFETY: listen on our socket.
                if unsafe { libc::listen(fd.as_raw_fd(), s.backlog as i32) } != 0 {
                    return Err(format!(
                        "listen on {}: {}",
                        s.name,
                        std::io::Error::last_os_error()
                    ));
                }
            }
            out.insert(s.id, fd);
        }
    }
    let listener_of = |x: &UnixSocket, out: &HashMap<u64, OwnedFd>| {
        socks
            .iter()
            .find(|l| l.state == "listening" && !x.name.is_empty() && l.name == x.name)
            .and_then(|l| out.get(&l.id))
            .map(|fd| fd.as_raw_fd())
    };
    for s in socks {
        if let Some(fd) = out.get(&s.id) {
            // Bound above: what it was connected to.
            if !s.reconnect.is_empty() {
                if dgram(s) {
                    connect_later.push((s.id, s.reconnect.clone(), s.reconnect_in.clone()));
                } else {
                    reconnect_now(fd, s)?;
                }
            } else if s.peer_gone && s.state != "listening" {
                gone_later.push(s.id);
            }
            continue;
        }
        if s.pending_on != 0 {
            // A connection the server has not accepted yet: connect and leave it.
            let l = by_id.get(&s.pending_on).ok_or("listener missing")?;
            let fd = new_socket(s.sock_type)?;
            in_dir(&l.bound_in, || connect(&fd, &l.name))?;
            out.insert(s.id, fd);
            continue;
        }
        if !s.reconnect.is_empty() {
            let fd = new_socket(s.sock_type)?;
            if dgram(s) {
                connect_later.push((s.id, s.reconnect.clone(), s.reconnect_in.clone()));
            } else {
                reconnect_now(&fd, s)?;
            }
            out.insert(s.id, fd);
            continue;
        }
        if s.peer_gone {
            // A stand-in for the closed peer: through the listener that accepted
            // the connection (so that its name stays right), else a socketpair.
            if let Some(lfd) = listener_of(s, &out).filter(|_| !dgram(s)) {
                let cfd = new_socket(s.sock_type)?;
                in_dir(&s.bound_in, || connect(&cfd, &s.name))?;
                let sfd =
                    super::accept(lfd).map_err(|e| format!("re-accepting on {}: {e}", s.name))?;
                out.insert(s.id, sfd);
                stand_ins.insert(s.id, cfd);
            } else {
                let (a, b) = socketpair(s.sock_type)?;
                if !s.name.is_empty() {
                    in_dir(&s.bound_in, || bind(&a, &s.name))?;
                }
                out.insert(s.id, a);
                stand_ins.insert(s.id, b);
            }
            continue;
        }
        let peer = by_id.get(&s.peer).copied();
        match peer {
            Some(p) if p.peer == s.id && !out.contains_key(&p.id) => {
                // A connected pair. If one end of a stream was accepted from a
                // listener we recreated, make the connection through it so names
                // stay right.
                let via = if dgram(s) {
                    None
                } else {
                    listener_of(s, &out)
                        .map(|l| (s, p, l))
                        .or_else(|| listener_of(p, &out).map(|l| (p, s, l)))
                };
                if let Some((server, client, lfd)) = via {
                    let cfd = new_socket(client.sock_type)?;
                    let name = &server.name;
                    in_dir(&server.bound_in, || connect(&cfd, name))?;
                    let sfd =
                        super::accept(lfd).map_err(|e| format!("re-accepting on {name}: {e}"))?;
                    out.insert(client.id, cfd);
                    out.insert(server.id, sfd);
                } else {
                    // A socketpair; datagram ends that had bound a name get it again.
                    let (a, b) = socketpair(s.sock_type)?;
                    for (x, fd) in [(s, &a), (p, &b)] {
                        if !x.name.is_empty() {
                            in_dir(&x.bound_in, || bind(fd, &x.name))?;
                        }
                    }
                    out.insert(s.id, a);
                    out.insert(p.id, b);
                }
            }
            Some(p) if p.peer != s.id => {
                // Connected to a bound socket (datagrams to a named server); a
                // datagram socket connects after its queue is refilled.
                let fd = new_socket(s.sock_type)?;
                if dgram(s) {
                    if !s.name.is_empty() {
                        in_dir(&s.bound_in, || bind(&fd, &s.name))?;
                    }
                    connect_later.push((s.id, p.name.clone(), p.bound_in.clone()));
                } else {
                    in_dir(&p.bound_in, || connect(&fd, &p.name))?;
                }
                out.insert(s.id, fd);
            }
            Some(_) => {}
            None => {
                out.insert(s.id, new_socket(s.sock_type)?);
            }
        }
    }

    let mut socks_dup = HashMap::with_capacity(out.len());
    for (id, fd) in &out {
        let dup = fd
            .try_clone()
            .map_err(|e| format!("{}: duplicating: {e}", holder(image, *id)))?;
        socks_dup.insert(*id, dup);
    }
    Ok((
        out,
        Pending {
            socks: socks_dup,
            stand_ins,
            connect_later,
            gone_later,
        },
    ))
}

/// Steps 2 and 3 of the restore of the UNIX sockets, once every open file description
/// exists (`descs`, by id): refills the queues, with their descriptors in flight, then
/// connects the datagram sockets, closes the stand-ins and applies options and
/// shutdowns.
pub fn finish(
    image: &CheckpointReader,
    pending: Pending,
    descs: &HashMap<u64, OwnedFd>,
) -> std::result::Result<(), String> {
    let socks = &image.meta.sockets;
    let by_id: HashMap<u64, &UnixSocket> = socks.iter().map(|s| (s.id, s)).collect();
    let Pending {
        socks: out,
        stand_ins,
        connect_later,
        gone_later,
    } = pending;
    // 2. Refill the queues, each message from its sender.
    let mut temps = Temps::default();
    let refilled = refill(image, &by_id, &out, &stand_ins, descs, &mut temps);
    temps.finish();
    refilled?;

    // 3. Connect the datagram sockets, let the stand-ins go, apply options and
    // shutdowns.
    for (id, name, dir) in &connect_later {
        let fd = out.get(id).ok_or("socket vanished")?;
        in_dir(dir, || connect(fd, name)).map_err(|e| {
            let s = by_id.get(id);
            if s.is_some_and(|s| !s.reconnect.is_empty()) {
                format!(
                    "{}: reconnecting the UNIX socket to {name} outside the job (saved with --unix-external=reconnect): {e}; is anything bound there?",
                    holder(image, *id)
                )
            } else {
                format!("{}: {e}", holder(image, *id))
            }
        })?;
    }
    for id in &gone_later {
        // Connected to a stand-in bound to a name of our own, which is closed.
        let fd = out.get(id).ok_or("socket vanished")?;
        let ty = by_id.get(id).map_or(libc::SOCK_DGRAM, |s| s.sock_type);
        let stand_in = new_socket(ty)?;
        let name = format!("@stasis-closed-peer-{}-{id}", std::process::id());
        bind(&stand_in, &name)?;
        connect(fd, &name).map_err(|e| format!("{}: {e}", holder(image, *id)))?;
    }
    drop(stand_ins);
    for s in socks {
        let Some(fd) = out.get(&s.id) else { continue };
        if s.passcred {
            let _ = super::setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PASSCRED, 1);
        }
        super::shutdown(fd, s.shutdown);
    }
    Ok(())
}

/// Sends every queued message again, in order: from the peer (or its stand-in) of a
/// connected socket, else (datagrams to a named socket) from a socket bound to the
/// name of its sender.
fn refill(
    image: &CheckpointReader,
    by_id: &HashMap<u64, &UnixSocket>,
    out: &HashMap<u64, OwnedFd>,
    stand_ins: &HashMap<u64, OwnedFd>,
    descs: &HashMap<u64, OwnedFd>,
    temps: &mut Temps,
) -> std::result::Result<(), String> {
    for s in &image.meta.sockets {
        let Some(name) = &s.data_file else { continue };
        let path = image.data_path(name).map_err(|e| e.to_string())?;
        let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let from_peer =
            stand_ins
                .get(&s.id)
                .map(|f| f.as_raw_fd())
                .or_else(|| match by_id.get(&s.peer) {
                    Some(p) if p.peer == s.id => out.get(&p.id).map(|f| f.as_raw_fd()),
                    _ => None,
                });
        let to = if s.name.is_empty() {
            None
        } else {
            Some(sockaddr(&abs_name(&s.name, &s.bound_in))?)
        };
        let count = s.messages.len();
        let mut off = 0usize;
        for (i, &len) in s.messages.iter().enumerate() {
            let chunk = data
                .get(off..off + len as usize)
                .ok_or_else(|| format!("{}: the saved queue is short", path.display()))?;
            off += len as usize;
            let mut fds = Vec::new();
            for m in s.in_flight.iter().filter(|m| m.message == i as u64) {
                for f in &m.fds {
                    let d = descs.get(&f.desc).ok_or_else(|| {
                        format!(
                            "{}: descriptor {} in flight: description {} missing",
                            holder(image, s.id),
                            f.fd,
                            f.desc
                        )
                    })?;
                    fds.push(d.as_raw_fd());
                }
            }
            let sent = match (from_peer, &to) {
                (Some(fd), _) => send_one(fd, chunk, &fds, None, s.sock_type == libc::SOCK_STREAM),
                (None, Some(to)) => {
                    let sender = s.senders.get(i).map(String::as_str).unwrap_or("");
                    let own = image
                        .meta
                        .sockets
                        .iter()
                        .find(|x| {
                            !sender.is_empty() && x.sock_type == s.sock_type && x.name == sender
                        })
                        .and_then(|x| out.get(&x.id))
                        .map(|f| f.as_raw_fd());
                    let fd = match own {
                        Some(fd) => fd,
                        None => temps.get(sender, &s.bound_in, s.sock_type)?,
                    };
                    send_one(fd, chunk, &fds, Some(to), false)
                }
                (None, None) => {
                    return Err(format!(
                        "{}: queued data with no way to resend it",
                        holder(image, s.id)
                    ))
                }
            };
            sent.map_err(|e| {
                format!(
                    "{}: refilling the queue (message {} of {count}): {e}",
                    holder(image, s.id),
                    i + 1
                )
            })?;
        }
    }
    Ok(())
}
