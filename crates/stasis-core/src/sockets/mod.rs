//! Sockets, one module per address family, dump and restore side by side:
//! [`unix`] (UNIX domain sockets) and [`inet`] (TCP and UDP over IPv4 and IPv6), and
//! [`appapi`], an application's connection to the stasis application interface.
//!
//! Dump: each socket fd is borrowed with `pidfd_getfd(2)` (the same open file
//! description: queues can be read without consuming them and options read), its
//! address family read (`SO_DOMAIN`), and it is saved once by the collector of its
//! family. Families stasis cannot save (netlink, packet, raw IP...) refuse the
//! checkpoint with an error naming the fd.
//!
//! Restore: [`create_all`] creates every socket of the image in the restorer, before
//! the processes exist, connected as they were and (IP) with their queues refilled;
//! the fds are then handed out like any other open file description, and
//! [`unix::finish`] refills the UNIX sockets' queues once every description exists
//! (their messages may carry descriptors in flight).

pub mod appapi;
pub mod inet;
pub mod unix;

pub use appapi::ApiPeers;
pub use inet::TcpExternal;

use crate::error::{Error, Result};
use stasis_image::{CheckpointReader, CheckpointWriter, FdKind, InetSocket, UnixSocket};
use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, OwnedFd};

/// Reads an int socket option; None if the kernel refuses it.
pub(crate) fn getsockopt_int(fd: i32, level: i32, opt: i32) -> Option<i32> {
    let mut v: i32 = 0;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let r = unsafe { libc::getsockopt(fd, level, opt, (&mut v as *mut i32).cast(), &mut len) };
    (r == 0).then_some(v)
}

/// Sets an int socket option.
/// Runs `peek` (reads of a socket's queue with MSG_PEEK) with SO_PEEK_OFF enabled
/// from 0, then puts the socket's own peek offset back (SO_PEEK_OFF belongs to the
/// socket, shared with the application). Err when the socket has no peek offset.
pub(crate) fn with_peek_offset<T>(s: i32, peek: impl FnOnce() -> T) -> std::io::Result<T> {
    let own = getsockopt_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF).unwrap_or(-1);
    setsockopt_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)?;
    let r = peek();
    let _ = setsockopt_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, own);
    Ok(r)
}

/// Sets an int socket option.
pub(crate) fn setsockopt_int(fd: i32, level: i32, opt: i32, v: i32) -> std::io::Result<()> {
    // SAFETY: setsockopt reads an int from `v`.
    let r = unsafe { libc::setsockopt(fd, level, opt, (&v as *const i32).cast(), 4) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An int option of level SOL_SOCKET (0 if refused).
pub(crate) fn sockopt(fd: i32, opt: i32) -> i32 {
    getsockopt_int(fd, libc::SOL_SOCKET, opt).unwrap_or(0)
}

/// Applies saved shutdown(2) bits (1 = SHUT_RD, 2 = SHUT_WR) to our socket `fd`.
pub(crate) fn shutdown(fd: &OwnedFd, bits: u8) {
    let how = match bits & 3 {
        1 => libc::SHUT_RD,
        2 => libc::SHUT_WR,
        3 => libc::SHUT_RDWR,
        _ => return,
    };
    // SAFETY: shutdown on a socket we own.
    unsafe { libc::shutdown(fd.as_raw_fd(), how) };
}

/// sendmsg(2) of `data` on our socket `fd` (to the UNIX address `to`, else to its
/// peer) with the descriptors `fds` in flight (SCM_RIGHTS) if any; the bytes sent.
pub(crate) fn send_with_fds(
    fd: i32,
    data: &[u8],
    fds: &[i32],
    to: Option<&(libc::sockaddr_un, libc::socklen_t)>,
    flags: i32,
) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
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
    let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer is CMSG_SPACE(len) bytes, aligned, and has room
        // for one header followed by the descriptors.
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
    // SAFETY: msg points to live buffers for the duration of the call: the data (only
    // read), the address, the control buffer.
    let n = unsafe { libc::sendmsg(fd, &msg, flags) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// accept4(2) on our listener `lfd`, close-on-exec.
pub(crate) fn accept(lfd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: accept on a listener we own; returns a new descriptor or -1.
    let fd = unsafe {
        libc::accept4(
            lfd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned here.
    Ok(unsafe { std::os::unix::io::FromRawFd::from_raw_fd(fd) })
}

/// Collects the sockets of a checkpoint.
#[derive(Default)]
pub struct Collector {
    unix: unix::Collector,
    inet: inet::Collector,
    /// The supervising init's side of the application interface, if any.
    api: Option<ApiPeers>,
}

impl Collector {
    /// A collector for one checkpoint of the processes `job` (every process whose
    /// fds are saved: a connection between two of them is inside the checkpoint).
    /// With `repair`, established TCP connections are saved with TCP_REPAIR (the job
    /// has a network namespace of its own, where we hold CAP_NET_ADMIN). With
    /// `drain`, bytes stuck in a sender's queue may be moved through our memory (see
    /// `inet::Collector::new`).
    pub fn new(job: Vec<i32>, external: TcpExternal, repair: bool, drain: bool) -> Collector {
        Collector {
            unix: unix::Collector::new(),
            inet: inet::Collector::new(job, external, repair, drain),
            api: None,
        }
    }

    /// With `reconnect`, a UNIX socket connected to a socket outside the checkpoint is
    /// saved to connect again to the same name at restore (else it refuses the
    /// checkpoint).
    pub fn set_unix_reconnect(&mut self, reconnect: bool) {
        self.unix.set_reconnect(reconnect);
    }

    /// The addresses of the other nodes of a multi-node job (with
    /// [`TcpExternal::Peer`]: connections to them are saved, others refused).
    pub fn set_peer_nodes(&mut self, nodes: Vec<std::net::IpAddr>) {
        self.inet.set_peer_nodes(nodes);
    }

    /// The descriptors in flight found in UNIX sockets' queues since the last call
    /// (see [`unix::Collector::take_in_flight`]).
    pub fn take_in_flight(&mut self) -> Vec<(u64, u64, Vec<OwnedFd>)> {
        self.unix.take_in_flight()
    }

    /// Records the saved descriptors in flight of message `message` of UNIX socket
    /// `id`.
    pub fn set_unix_in_flight(&mut self, id: u64, message: u64, fds: Vec<stasis_image::Fd>) {
        self.unix.set_in_flight(id, message, fds);
    }

    /// The first holder (pid, fd) of UNIX socket `id`.
    pub fn unix_holder(&self, id: u64) -> (i32, i32) {
        self.unix.holder(id)
    }

    /// Connections to these sockets of the supervising init are the application
    /// interface's, saved as such (see [`appapi`]).
    pub fn set_app_api(&mut self, api: Option<ApiPeers>) {
        self.api = api;
    }

    /// Saves the socket behind fd `fd` of process `pid` (inode `ino`), once per
    /// socket, and returns how the fd refers to it.
    pub fn dump_fd(
        &mut self,
        pid: i32,
        fd: i32,
        ino: u64,
        flags: i32,
        writer: &mut CheckpointWriter,
    ) -> Result<FdKind> {
        if self.unix.has(ino) {
            return Ok(FdKind::UnixSocket { sock: ino, flags });
        }
        let sock = crate::proc::borrow_fd(pid, fd)?;
        let domain = sockopt(sock.as_raw_fd(), libc::SO_DOMAIN);
        match domain {
            libc::AF_UNIX => {
                if let Some(api) = &self.api {
                    let diag = self.unix.diag(pid)?;
                    if let Some(kind) = appapi::classify(api, diag, ino, flags) {
                        return Ok(kind);
                    }
                }
                Ok(FdKind::UnixSocket {
                    sock: self.unix.dump_fd(pid, fd, ino, &sock, writer)?,
                    flags,
                })
            }
            libc::AF_INET | libc::AF_INET6 => {
                let (owner, signal) = inet::owner_of(&sock);
                Ok(FdKind::InetSocket {
                    sock: self.inet.dump_fd(pid, fd, ino, &sock)?,
                    flags,
                    owner,
                    signal,
                })
            }
            d => {
                let what = match d {
                    libc::AF_NETLINK => "a netlink socket".to_string(),
                    libc::AF_PACKET => "a packet socket (AF_PACKET)".to_string(),
                    d => format!("a socket of address family {d}"),
                };
                Err(Error::Unsupported {
                    pid,
                    what: format!("fd {fd}, {what}"),
                })
            }
        }
    }

    /// Every socket is saved: those put in repair mode send again (called before the
    /// processes run again; dropping the collector does it too).
    pub fn end_repair(&mut self) {
        self.inet.end_repair();
    }

    /// Checks that every connection stays inside the checkpoint (or may be reset) and
    /// returns the sockets.
    pub fn finish(
        self,
        writer: &mut CheckpointWriter,
    ) -> Result<(Vec<UnixSocket>, Vec<InetSocket>)> {
        Ok((self.unix.finish()?, self.inet.finish(writer)?))
    }
}

/// Creates every socket of the image, connected as it was; IP sockets with their
/// queues refilled, UNIX sockets once every open file description exists
/// ([`unix::finish`] with the returned [`unix::Pending`]: their messages may carry
/// descriptors). Returns the restorer's descriptor of each, by id.
pub fn create_all(
    image: &CheckpointReader,
) -> std::result::Result<(HashMap<u64, OwnedFd>, unix::Pending), String> {
    let wanted = image.meta.sockets.len() + image.meta.inet_sockets.len();
    if wanted > 256 {
        // The restorer holds every socket at once: room for them (up to the hard limit;
        // each restored process sets its own saved limits).
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with a valid struct of ours.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
                r.rlim_cur = r.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            }
        }
    }
    let (mut out, pending) = unix::create_all(image)?;
    out.extend(inet::create_all(&image.meta.inet_sockets, image)?);
    Ok((out, pending))
}
