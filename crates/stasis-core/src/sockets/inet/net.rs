//! Small helpers over socket addresses and socket syscalls shared by dump and restore.

use stasis_image::InetSocket;
use stasis_sys::inet_diag::{canonical, state};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

pub(super) const SIOCINQ: libc::c_ulong = 0x541B;
pub(super) const SIOCOUTQ: libc::c_ulong = 0x5411;
/// The bits of a socket's saved `shutdown` (as inet_diag reports them).
pub(super) const RCV_SHUTDOWN: u8 = 1;
pub(super) const SEND_SHUTDOWN: u8 = 2;

/// Whether a socket bound to `bound` (a listener, or a socket a datagram may come
/// from) is the one at `at`: the same port, and the same address unless it is bound
/// to all of them.
pub(super) fn binds(bound: SocketAddr, at: SocketAddr) -> bool {
    bound.port() == at.port()
        && (bound.ip().is_unspecified() || canonical(bound).ip() == canonical(at).ip())
}

/// The restored listener (descriptor) a connection to `at` arrives on, among
/// `listeners` (address, descriptor).
pub(super) fn listener_for(listeners: &[(SocketAddr, i32)], at: SocketAddr) -> Option<i32> {
    listeners
        .iter()
        .find_map(|(a, fd)| binds(*a, at).then_some(*fd))
}

pub(super) fn family_name(family: i32) -> &'static str {
    if family == libc::AF_INET6 {
        "ipv6"
    } else {
        "ipv4"
    }
}

pub(super) fn family_of(s: &InetSocket) -> i32 {
    if s.family == "ipv6" {
        libc::AF_INET6
    } else {
        libc::AF_INET
    }
}

pub(super) fn is_tcp(s: &InetSocket) -> bool {
    s.protocol == "tcp"
}

pub(super) fn to_sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; zeroed is a valid empty value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_flowinfo = v6.flowinfo();
            sin6.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

pub(super) fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes())),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

pub(super) fn name_of(fd: i32, peer: bool) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; zeroed is a valid empty value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast();
    // SAFETY: the kernel writes at most `len` bytes of address into `ss`.
    let r = unsafe {
        if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        }
    };
    if r != 0 {
        return None;
    }
    from_sockaddr(&ss)
}

/// The bound address, None when unbound (port 0).
pub(super) fn local_of(fd: i32) -> Option<SocketAddr> {
    name_of(fd, false).filter(|a| a.port() != 0)
}

pub(super) fn parse_addr(s: &str) -> Option<SocketAddr> {
    s.parse().ok()
}

pub(super) fn ioctl_int(fd: i32, req: libc::c_ulong) -> i32 {
    let mut v: i32 = 0;
    // SAFETY: these ioctls write one int.
    let r = unsafe { libc::ioctl(fd, req, &mut v as *mut i32) };
    if r == 0 {
        v
    } else {
        0
    }
}

/// The TCP state of a socket (TCP_INFO's first byte).
pub(super) fn tcp_state(fd: i32) -> u8 {
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes of struct tcp_info.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r == 0 {
        info[0]
    } else {
        state::CLOSE
    }
}

pub(super) fn poll_one(fd: i32, events: i16, ms: i32) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: poll on one pollfd we own.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r > 0 {
        p.revents
    } else {
        0
    }
}

/// Sends what fits now of `data` on `fd` (never blocks); returns how much, or the
/// error that stopped it (EAGAIN: the buffers are full).
pub(super) fn send_some(fd: i32, data: &[u8]) -> (usize, Option<std::io::Error>) {
    let mut off = 0;
    while off < data.len() {
        // SAFETY: sending from a buffer we own.
        let n = unsafe {
            libc::send(
                fd,
                data[off..].as_ptr().cast(),
                data.len() - off,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n <= 0 {
            return (off, Some(std::io::Error::last_os_error()));
        }
        off += n as usize;
    }
    (off, None)
}

/// Sends all of `data` on `fd` without blocking forever: gives up at `deadline`.
pub(super) fn send_all(fd: i32, data: &[u8], deadline: Instant) -> std::io::Result<()> {
    let mut off = 0;
    loop {
        let (n, err) = send_some(fd, &data[off..]);
        off += n;
        match err {
            None => return Ok(()),
            Some(e) if e.raw_os_error() != Some(libc::EAGAIN) => return Err(e),
            Some(_) if Instant::now() > deadline => {
                return Err(std::io::Error::other(format!(
                    "{} of {} bytes could not be queued (the connection's buffers are full)",
                    data.len() - off,
                    data.len()
                )))
            }
            Some(_) => {
                poll_one(fd, libc::POLLOUT, 5);
            }
        }
    }
}

pub(super) fn new_socket(family: i32, tcp: bool) -> std::result::Result<OwnedFd, String> {
    let (ty, proto) = if tcp {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP)
    } else {
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP)
    };
    // SAFETY: socket() returns a new descriptor or -1.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `a` in the form a socket of `family` uses (IPv4-mapped for IPv6 sockets).
pub(super) fn addr_for(family: i32, a: SocketAddr) -> SocketAddr {
    match (family, a) {
        (libc::AF_INET6, SocketAddr::V4(v4)) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        (libc::AF_INET, SocketAddr::V6(v6)) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        _ => a,
    }
}

/// bind(2) or connect(2) `fd` to `a`.
fn with_addr(
    call: unsafe extern "C" fn(i32, *const libc::sockaddr, libc::socklen_t) -> i32,
    fd: &OwnedFd,
    a: SocketAddr,
) -> std::io::Result<()> {
    let (ss, len) = to_sockaddr(a);
    // SAFETY: `call` is bind or connect, given a valid socket address of length `len`.
    let r = unsafe {
        call(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) fn bind(fd: &OwnedFd, a: SocketAddr) -> std::io::Result<()> {
    with_addr(libc::bind, fd, a)
}

pub(super) fn connect(fd: &OwnedFd, a: SocketAddr) -> std::io::Result<()> {
    with_addr(libc::connect, fd, a)
}

pub(super) fn loopback(family: i32) -> IpAddr {
    if family == libc::AF_INET6 {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }
}
