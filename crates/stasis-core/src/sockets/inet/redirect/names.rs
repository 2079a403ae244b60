//! `accept(2)`/`accept4(2)`, `getpeername(2)` and `getsockname(2)`: the new address
//! of a node of the job is reported as the address the node had (the one the job's
//! processes know it by).
//!
//! A name is read by us on the process's socket (pidfd_getfd) and written into the
//! process's memory only when it is a moved node's; otherwise the call goes on
//! untouched. An `accept` that asks for the peer's address is made by us: the new
//! connection is handed to the process with SECCOMP_IOCTL_NOTIF_ADDFD (which answers
//! the call with the descriptor's number, as accept would), its address written first.
//! A blocking listener is waited on in a thread of its own, which gives up when the
//! process stops waiting (a signal), before taking any connection.

use super::super::net::{addr_for, from_sockaddr, name_of, to_sockaddr};
use super::super::remote::plain_ip;
use super::{dup, reply, still_valid, Notif, SECCOMP_USER_NOTIF_FLAG_CONTINUE};
use stasis_sys::inet_diag::canonical;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

// _IOW('!', 3, struct seccomp_notif_addfd)
const SECCOMP_IOCTL_NOTIF_ADDFD: u64 = 0x4018_2103;
/// Add the descriptor and answer the call with its number, atomically (Linux 5.14).
const SECCOMP_ADDFD_FLAG_SEND: u32 = 1 << 1;

/// struct seccomp_notif_addfd.
#[repr(C)]
struct AddFd {
    id: u64,
    flags: u32,
    srcfd: u32,
    newfd: u32,
    newfd_flags: u32,
}

/// The name the job's processes know for `a` (None: the same). `own`: `a` is a local
/// name of this part's (getsockname), else a peer's.
fn old_of(dir: &Path, a: SocketAddr, own: bool) -> Option<SocketAddr> {
    let ip = plain_ip(canonical(a).ip());
    let old = old_ip(dir, a, own).unwrap_or(ip);
    let port = if own {
        super::super::ports::own_old_port(a.port())
    } else {
        super::super::ports::old_port(dir, old, a.port())
    }
    .unwrap_or(a.port());
    let shown = SocketAddr::new(old, port);
    (shown != SocketAddr::new(ip, a.port())).then_some(shown)
}

/// The address of the job's first start that the address `a` of a node of the job
/// stands for (None: not a node's). Several parts restarted on one node share its
/// address: then the connecting side's note in the rendezvous ([`note_source`]) says
/// which part `a` (with its port) is, and `own` prefers this part's own first address
/// (a local name).
fn old_ip(dir: &Path, a: SocketAddr, own: bool) -> Option<IpAddr> {
    let ip = plain_ip(canonical(a).ip());
    let mut olds: Vec<IpAddr> = super::super::remote::first_addresses(dir)
        .into_iter()
        .filter(|(_, now)| plain_ip(*now) == ip)
        .map(|(first, _)| plain_ip(first))
        .collect();
    if olds.len() > 1 {
        if let Some(n) = super::super::ports::noted(dir, ip, a.port()) {
            olds = vec![plain_ip(n)];
        } else {
            let mine = super::super::ports::own_olds();
            olds.sort_by_key(|o| !(own && mine.contains(o)));
        }
    }
    olds.first().copied()
}

/// Before a process of this part connects (redirected) from its socket `sock`: notes
/// in the rendezvous which old address the socket's (new address, port) stands for
/// (see `ports::note_local`). An unbound socket is bound first (to port 0 of any
/// address, as connect would).
pub(super) fn note_source(dir: &Path, sock: &OwnedFd, family: i32) {
    let fd = sock.as_raw_fd();
    if super::super::net::local_of(fd).is_none() {
        let any = match family {
            libc::AF_INET6 => IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
        };
        let _ = super::super::net::bind(sock, SocketAddr::new(any, 0));
    }
    if let Some(local) = super::super::net::local_of(fd) {
        super::super::ports::note_local(dir, local);
    }
}

/// The socket's family when it is an IP socket.
fn inet_family(sock: &OwnedFd) -> Option<i32> {
    match crate::sockets::sockopt(sock.as_raw_fd(), libc::SO_DOMAIN) {
        f @ (libc::AF_INET | libc::AF_INET6) => Some(f),
        _ => None,
    }
}

/// Writes `a` as a `family` address into process `pid`'s buffer `addr` of `*lenp`
/// bytes (truncated as the kernel does), and its full length into `*lenp`.
fn write_name(pid: i32, addr: u64, lenp: u64, family: i32, a: SocketAddr) -> Option<()> {
    let mut len = [0u8; 4];
    stasis_sys::vm::read(pid, lenp, &mut len).ok()?;
    let room = u32::from_ne_bytes(len) as usize;
    let (ss, full) = to_sockaddr(addr_for(family, a));
    // SAFETY: sockaddr_storage is plain data, `full` bytes of it are the address.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&ss as *const libc::sockaddr_storage).cast::<u8>(),
            full as usize,
        )
    };
    stasis_sys::vm::write(pid, addr, &bytes[..room.min(bytes.len())]).ok()?;
    stasis_sys::vm::write(pid, lenp, &full.to_ne_bytes()).ok()
}

/// Answers a getpeername or getsockname (notification `n` of `listener`).
pub(super) fn name(listener: i32, n: &Notif, dir: &Path) {
    let (pid, fd, addr, lenp) = (n.pid as i32, n.args[0] as i32, n.args[1], n.args[2]);
    let peer = i64::from(n.nr) == libc::SYS_getpeername;
    let done = (|| {
        if addr == 0 || lenp == 0 {
            return None;
        }
        let sock = crate::proc::borrow_fd(pid, fd).ok()?;
        let family = inet_family(&sock)?;
        let old = old_of(dir, name_of(sock.as_raw_fd(), peer)?, !peer)?;
        write_name(pid, addr, lenp, family, old)
    })();
    match done {
        Some(()) => reply(listener, n.id, 0, 0),
        None => reply(listener, n.id, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE),
    }
}

/// Answers an accept or accept4 (notification `n` of `listener`).
pub(super) fn accept(listener: i32, n: &Notif, dir: &Path) {
    let (pid, fd, addr, lenp) = (n.pid as i32, n.args[0] as i32, n.args[1], n.args[2]);
    let flags = if i64::from(n.nr) == libc::SYS_accept4 {
        n.args[3] as i32
    } else {
        0
    };
    let taken = (addr != 0 && lenp != 0)
        .then(|| crate::proc::borrow_fd(pid, fd).ok())
        .flatten()
        .and_then(|s| Some((inet_family(&s)?, s)));
    let Some((family, sock)) = taken else {
        return reply(listener, n.id, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
    };
    let call = Accept {
        id: n.id,
        pid,
        addr,
        lenp,
        flags,
        family,
        dir: dir.to_path_buf(),
    };
    // SAFETY: F_GETFL on a descriptor of ours.
    let fl = unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_GETFL) };
    if fl >= 0 && fl & libc::O_NONBLOCK != 0 {
        return call.finish(listener, &sock);
    }
    let Some(listener_dup) = dup(listener) else {
        return reply(listener, n.id, -libc::ENOMEM, 0);
    };
    let spawned = std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || {
            let l = listener_dup.as_raw_fd();
            while still_valid(l, call.id) {
                if super::super::net::poll_one(sock.as_raw_fd(), libc::POLLIN, 250) != 0 {
                    return call.finish(l, &sock);
                }
            }
        });
    if spawned.is_err() {
        reply(listener, n.id, -libc::EAGAIN, 0);
    }
}

/// An accept to make for a process.
struct Accept {
    id: u64,
    pid: i32,
    addr: u64,
    lenp: u64,
    flags: i32,
    family: i32,
    dir: PathBuf,
}

impl Accept {
    /// Accepts on `sock` (the process's listener), writes the peer's address as the
    /// process knows it, and hands the connection over.
    fn finish(&self, listener: i32, sock: &OwnedFd) {
        // SAFETY: sockaddr_storage is plain data; zeroed is a valid empty value.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes of address into `ss`.
        let c = unsafe {
            libc::accept4(
                sock.as_raw_fd(),
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
                (self.flags & libc::SOCK_NONBLOCK) | libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            return reply(listener, self.id, -e, 0);
        }
        // SAFETY: `c` was just created and is ours alone.
        let conn = unsafe { OwnedFd::from_raw_fd(c) };
        let Some(peer) = from_sockaddr(&ss) else {
            return reply(listener, self.id, -libc::EINVAL, 0);
        };
        let shown = old_of(&self.dir, peer, false).unwrap_or(peer);
        if write_name(self.pid, self.addr, self.lenp, self.family, shown).is_none() {
            return reply(listener, self.id, -libc::EFAULT, 0);
        }
        let mut add = AddFd {
            id: self.id,
            flags: SECCOMP_ADDFD_FLAG_SEND,
            srcfd: conn.as_raw_fd() as u32,
            newfd: 0,
            newfd_flags: if self.flags & libc::SOCK_CLOEXEC != 0 {
                libc::O_CLOEXEC as u32
            } else {
                0
            },
        };
        // SAFETY: the ioctl reads one struct seccomp_notif_addfd.
        let r = unsafe {
            libc::ioctl(
                listener,
                SECCOMP_IOCTL_NOTIF_ADDFD as _,
                &mut add as *mut AddFd,
            )
        };
        if r < 0 {
            tracing::warn!(
                "process {}: a connection from {peer} accepted for it could not be handed over ({}); it is closed",
                self.pid,
                std::io::Error::last_os_error()
            );
        } else {
            tracing::debug!(
                "process {}: connection from {peer} accepted as fd {r}, shown from {shown}",
                self.pid
            );
        }
    }
}
