//! UNIX domain sockets: socketpairs, named and abstract sockets, listeners with their
//! pending connections, accepted connections, and the data waiting in every queue.
//!
//! Dump: the kernel's view of every UNIX socket (state, name, peer, pending
//! connections) comes from NETLINK_SOCK_DIAG; the process's socket is borrowed with
//! `pidfd_getfd(2)` and its receive queue read without consuming it (MSG_PEEK walking
//! with SO_PEEK_OFF). A socket connected to something outside the checkpointed tree,
//! or carrying file descriptors in flight, refuses the checkpoint with a clear error.
//!
//! Restore (in the restorer, before the processes exist): listeners are bound and
//! listen again, accepted connections are re-made through them (connect + accept) so
//! that names stay right, pending connections are re-made and left pending, other
//! connected pairs become socketpairs, and each queue is refilled by sending its bytes
//! from the peer.

use super::sockopt;
use crate::error::{Error, Result, SysContext};
use stasis_image::{CheckpointReader, CheckpointWriter, UnixSocket};
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
}

impl Collector {
    /// A collector for one checkpoint.
    pub fn new() -> Collector {
        Collector::default()
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
        let (data, messages) = if d.state == TCP_LISTEN {
            (Vec::new(), Vec::new())
        } else {
            peek_queue(pid, fd, s, d.sock_type)?
        };
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
            return Err(Error::Unsupported {
                pid,
                what: format!(
                    "fd {fd}, a UNIX socket connected to a process outside the checkpoint{}",
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

/// Reads a socket's receive queue without consuming it: (bytes, message lengths).
/// A stream is read with one MSG_PEEK, which reads across its whole queue; datagrams,
/// and a stream that comes back short, are walked with SO_PEEK_OFF (the socket's own,
/// shared with the application, put back after).
fn peek_queue(pid: i32, fd: i32, s: i32, sock_type: i32) -> Result<(Vec<u8>, Vec<u64>)> {
    let ctx = || format!("reading the queue of socket fd {fd}");
    let mut buf = vec![0u8; 1 << 18];
    let mut cbuf = [0u64; 64];
    if sock_type == libc::SOCK_STREAM {
        let mut want = 0i32;
        // SAFETY: FIONREAD writes an int.
        if unsafe { libc::ioctl(s, libc::FIONREAD, &mut want) } == 0 {
            let want = want.max(0) as usize;
            if want == 0 {
                return Ok((Vec::new(), Vec::new()));
            }
            if buf.len() < want {
                buf.resize(want, 0);
            }
            let n = peek_one(pid, fd, s, &mut buf[..want], &mut cbuf).ctx(pid, ctx)??;
            if n == want {
                return Ok((buf[..n].to_vec(), vec![n as u64]));
            }
        }
    }
    let mut data = Vec::new();
    let mut messages = Vec::new();
    let walk = || -> Result<()> {
        for _ in 0..MAX_MESSAGES {
            let n = peek_one(pid, fd, s, &mut buf, &mut cbuf).ctx(pid, ctx)??;
            if n == usize::MAX {
                break; // nothing more queued
            }
            if n == 0 && sock_type == libc::SOCK_STREAM {
                break;
            }
            data.extend_from_slice(&buf[..n]);
            if sock_type == libc::SOCK_STREAM {
                if let Some(last) = messages.last_mut() {
                    *last += n as u64;
                } else {
                    messages.push(n as u64);
                }
            } else {
                messages.push(n as u64);
            }
        }
        Ok(())
    };
    crate::sockets::with_peek_offset(s, walk).ctx(pid, ctx)??;
    Ok((data, messages))
}

/// One MSG_PEEK into `buf`: the bytes read (`usize::MAX` when nothing is queued), or
/// an error for a message carrying descriptors (SCM_RIGHTS), which cannot be saved.
fn peek_one(
    pid: i32,
    fd: i32,
    s: i32,
    buf: &mut [u8],
    cbuf: &mut [u64; 64],
) -> std::io::Result<Result<usize>> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(cbuf);
    // SAFETY: msg points to live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(s, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(Ok(usize::MAX));
        }
        return Err(e);
    }
    // SAFETY: walking the control messages the kernel wrote into cbuf.
    let passes_fds = unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        let mut found = false;
        while !c.is_null() {
            found |= (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS;
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        found
    };
    if passes_fds {
        return Ok(Err(Error::Unsupported {
            pid,
            what: format!("fd {fd}, a UNIX socket with file descriptors in flight (SCM_RIGHTS)"),
        }));
    }
    Ok(Ok(n as usize))
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

/// Creates every UNIX socket of the image, connected as it was and with its queues
/// refilled. Returns the restorer's descriptor of each, by id.
pub fn create_all(image: &CheckpointReader) -> std::result::Result<HashMap<u64, OwnedFd>, String> {
    let socks = &image.meta.sockets;
    let by_id: HashMap<u64, &UnixSocket> = socks.iter().map(|s| (s.id, s)).collect();
    let mut out: HashMap<u64, OwnedFd> = HashMap::new();
    // Listeners and bound unconnected sockets first: others connect to them.
    for s in socks {
        if s.state == "listening" || (s.peer == 0 && !s.name.is_empty()) {
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
    for s in socks {
        if out.contains_key(&s.id) {
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
        let peer = by_id.get(&s.peer).copied();
        match peer {
            Some(p) if p.peer == s.id && !out.contains_key(&p.id) => {
                // A connected pair. If one end was accepted from a listener we
                // recreated, make the connection through it so names stay right.
                let listener = |x: &UnixSocket| {
                    socks
                        .iter()
                        .find(|l| l.state == "listening" && !x.name.is_empty() && l.name == x.name)
                        .and_then(|l| out.get(&l.id))
                        .map(|fd| fd.as_raw_fd())
                };
                if let Some((server, client, lfd)) = listener(s)
                    .map(|l| (s, p, l))
                    .or_else(|| listener(p).map(|l| (p, s, l)))
                {
                    let cfd = new_socket(client.sock_type)?;
                    let name = &server.name;
                    in_dir(&server.bound_in, || connect(&cfd, name))?;
                    let sfd =
                        super::accept(lfd).map_err(|e| format!("re-accepting on {name}: {e}"))?;
                    out.insert(client.id, cfd);
                    out.insert(server.id, sfd);
                } else {
                    let mut sv = [0i32; 2];
                    // SAFETY: socketpair fills the array with two new descriptors.
                    if unsafe {
                        libc::socketpair(
                            libc::AF_UNIX,
                            s.sock_type | libc::SOCK_CLOEXEC,
                            0,
                            sv.as_mut_ptr(),
                        )
                    } != 0
                    {
                        return Err(format!("socketpair: {}", std::io::Error::last_os_error()));
                    }
                    // SAFETY: both were just created and are owned here.
                    unsafe {
                        out.insert(s.id, OwnedFd::from_raw_fd(sv[0]));
                        out.insert(p.id, OwnedFd::from_raw_fd(sv[1]));
                    }
                }
            }
            Some(p) if p.peer != s.id => {
                // Connected to a bound socket (datagrams to a named server).
                let fd = new_socket(s.sock_type)?;
                in_dir(&p.bound_in, || connect(&fd, &p.name))?;
                out.insert(s.id, fd);
            }
            Some(_) => {}
            None => {
                out.insert(s.id, new_socket(s.sock_type)?);
            }
        }
    }
    // Refill the queues from the peers, then apply options and shutdowns.
    for s in socks {
        let Some(name) = &s.data_file else { continue };
        let path = image.data_path(name).map_err(|e| e.to_string())?;
        let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let sender = match by_id.get(&s.peer) {
            Some(p) if p.peer == s.id => out.get(&p.id).map(|f| f.as_raw_fd()),
            _ => None,
        };
        let temp;
        let (fd, to) = match sender {
            Some(fd) => (fd, None),
            None if !s.name.is_empty() => {
                temp = new_socket(s.sock_type)?;
                let abs = if s.bound_in.is_empty() {
                    s.name.clone()
                } else {
                    format!("{}/{}", s.bound_in, s.name)
                };
                (temp.as_raw_fd(), Some(sockaddr(&abs)?))
            }
            None => {
                return Err(format!(
                    "socket {}: queued data with no way to resend it",
                    s.id
                ))
            }
        };
        let mut off = 0usize;
        for &len in &s.messages {
            let chunk = &data[off..off + len as usize];
            // SAFETY: sending a buffer we own, to an address we built.
            let n = unsafe {
                match &to {
                    Some((a, alen)) => libc::sendto(
                        fd,
                        chunk.as_ptr().cast(),
                        chunk.len(),
                        libc::MSG_NOSIGNAL,
                        (a as *const libc::sockaddr_un).cast(),
                        *alen,
                    ),
                    None => libc::send(fd, chunk.as_ptr().cast(), chunk.len(), libc::MSG_NOSIGNAL),
                }
            };
            if n != chunk.len() as isize {
                return Err(format!(
                    "refilling socket {}: {}",
                    s.id,
                    std::io::Error::last_os_error()
                ));
            }
            off += len as usize;
        }
    }
    for s in socks {
        let Some(fd) = out.get(&s.id) else { continue };
        if s.passcred {
            let _ = super::setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PASSCRED, 1);
        }
        super::shutdown(fd, s.shutdown);
    }
    Ok(out)
}
