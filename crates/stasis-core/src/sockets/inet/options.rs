//! Socket options saved by name: which ones, where they apply, how they are read
//! and set (a few are not ints in the kernel), and the fd's owner and signal.

use super::super::{getsockopt_int, setsockopt_int};
use std::os::unix::io::{AsRawFd, OwnedFd};

/// fcntl(2) commands the libc crate lacks on this target.
const F_GETOWN_EX: i32 = 16;
const F_GETSIG: i32 = 11;
/// fcntl(2) F_SETSIG.
pub(crate) const F_SETSIG: i32 = 10;

/// A socket option saved by name: where it applies and when it is set at restore.
pub(super) struct Opt {
    pub(super) name: &'static str,
    pub(super) level: i32,
    pub(super) opt: i32,
    /// TCP, UDP, or both.
    pub(super) proto: Option<i32>,
    /// Only for this family (IP_* options on AF_INET, IPV6_* on AF_INET6).
    pub(super) family: Option<i32>,
    /// Set before bind/connect (reuse, v6only, buffer sizes), else once the queues are
    /// refilled.
    pub(super) early: bool,
}

const TCP: Option<i32> = Some(libc::IPPROTO_TCP);
const UDP: Option<i32> = Some(libc::IPPROTO_UDP);
const V4: Option<i32> = Some(libc::AF_INET);
const V6: Option<i32> = Some(libc::AF_INET6);

macro_rules! opt {
    ($name:ident, $level:ident, $proto:expr, $family:expr, $early:expr) => {
        Opt {
            name: stringify!($name),
            level: libc::$level,
            opt: libc::$name,
            proto: $proto,
            family: $family,
            early: $early,
        }
    };
}

/// Every option saved. `SO_LINGER` (seconds, -1 off) and `SO_RCVTIMEO`/`SO_SNDTIMEO`
/// (microseconds) are not ints in the kernel and are converted.
pub(super) const OPTIONS: &[Opt] = &[
    opt!(SO_REUSEADDR, SOL_SOCKET, None, None, true),
    opt!(SO_REUSEPORT, SOL_SOCKET, None, None, true),
    opt!(SO_SNDBUF, SOL_SOCKET, None, None, true),
    opt!(SO_RCVBUF, SOL_SOCKET, None, None, true),
    opt!(SO_BROADCAST, SOL_SOCKET, UDP, None, true),
    opt!(SO_KEEPALIVE, SOL_SOCKET, TCP, None, false),
    opt!(SO_OOBINLINE, SOL_SOCKET, TCP, None, false),
    opt!(SO_PRIORITY, SOL_SOCKET, None, None, false),
    opt!(SO_RCVLOWAT, SOL_SOCKET, None, None, false),
    opt!(SO_LINGER, SOL_SOCKET, TCP, None, false),
    opt!(SO_RCVTIMEO, SOL_SOCKET, None, None, false),
    opt!(SO_SNDTIMEO, SOL_SOCKET, None, None, false),
    opt!(SO_TIMESTAMP, SOL_SOCKET, None, None, false),
    opt!(SO_TIMESTAMPNS, SOL_SOCKET, None, None, false),
    opt!(TCP_NODELAY, IPPROTO_TCP, TCP, None, false),
    opt!(TCP_CORK, IPPROTO_TCP, TCP, None, false),
    opt!(TCP_KEEPIDLE, IPPROTO_TCP, TCP, None, false),
    opt!(TCP_KEEPINTVL, IPPROTO_TCP, TCP, None, false),
    opt!(TCP_KEEPCNT, IPPROTO_TCP, TCP, None, false),
    opt!(TCP_USER_TIMEOUT, IPPROTO_TCP, TCP, None, false),
    opt!(TCP_DEFER_ACCEPT, IPPROTO_TCP, TCP, None, false),
    opt!(TCP_NOTSENT_LOWAT, IPPROTO_TCP, TCP, None, false),
    opt!(TCP_LINGER2, IPPROTO_TCP, TCP, None, false),
    opt!(TCP_SYNCNT, IPPROTO_TCP, TCP, None, false),
    opt!(IP_TOS, IPPROTO_IP, None, V4, false),
    opt!(IP_TTL, IPPROTO_IP, None, V4, false),
    opt!(IP_RECVERR, IPPROTO_IP, None, V4, false),
    opt!(IP_PKTINFO, IPPROTO_IP, UDP, V4, false),
    opt!(IP_RECVTOS, IPPROTO_IP, None, V4, false),
    opt!(IP_RECVTTL, IPPROTO_IP, None, V4, false),
    opt!(IP_MTU_DISCOVER, IPPROTO_IP, None, V4, false),
    opt!(IP_MULTICAST_TTL, IPPROTO_IP, UDP, V4, false),
    opt!(IP_MULTICAST_LOOP, IPPROTO_IP, UDP, V4, false),
    opt!(IP_FREEBIND, IPPROTO_IP, None, V4, true),
    opt!(IPV6_V6ONLY, IPPROTO_IPV6, None, V6, true),
    opt!(IPV6_UNICAST_HOPS, IPPROTO_IPV6, None, V6, false),
    opt!(IPV6_TCLASS, IPPROTO_IPV6, None, V6, false),
    opt!(IPV6_RECVPKTINFO, IPPROTO_IPV6, UDP, V6, false),
    opt!(IPV6_RECVERR, IPPROTO_IPV6, None, V6, false),
    opt!(IPV6_MULTICAST_HOPS, IPPROTO_IPV6, UDP, V6, false),
    opt!(IPV6_MULTICAST_LOOP, IPPROTO_IPV6, UDP, V6, false),
];

/// Reads option `o` of socket `fd` as one number.
pub(super) fn read_option(fd: i32, o: &Opt) -> Option<i64> {
    match o.opt {
        libc::SO_LINGER if o.level == libc::SOL_SOCKET => {
            let mut l = libc::linger {
                l_onoff: 0,
                l_linger: 0,
            };
            let mut len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `l`.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    o.level,
                    o.opt,
                    (&mut l as *mut libc::linger).cast(),
                    &mut len,
                )
            };
            (r == 0).then(|| {
                if l.l_onoff != 0 {
                    i64::from(l.l_linger)
                } else {
                    -1
                }
            })
        }
        libc::SO_RCVTIMEO | libc::SO_SNDTIMEO if o.level == libc::SOL_SOCKET => {
            let mut t = libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            };
            let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `t`.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    o.level,
                    o.opt,
                    (&mut t as *mut libc::timeval).cast(),
                    &mut len,
                )
            };
            (r == 0).then(|| t.tv_sec * 1_000_000 + t.tv_usec)
        }
        _ => getsockopt_int(fd, o.level, o.opt).map(i64::from),
    }
}

/// Sets option `o` of socket `fd` from its number.
pub(super) fn write_option(fd: i32, o: &Opt, v: i64) -> std::io::Result<()> {
    let (ptr, len, _keep): (*const libc::c_void, usize, Box<dyn std::any::Any>) = match o.opt {
        libc::SO_LINGER if o.level == libc::SOL_SOCKET => {
            let l = Box::new(libc::linger {
                l_onoff: i32::from(v >= 0),
                l_linger: v.max(0) as i32,
            });
            (
                (&*l as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>(),
                l,
            )
        }
        libc::SO_RCVTIMEO | libc::SO_SNDTIMEO if o.level == libc::SOL_SOCKET => {
            let t = Box::new(libc::timeval {
                tv_sec: v / 1_000_000,
                tv_usec: v % 1_000_000,
            });
            (
                (&*t as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>(),
                t,
            )
        }
        // The kernel doubles what is asked for: ask for half of what it showed.
        libc::SO_SNDBUF | libc::SO_RCVBUF if o.level == libc::SOL_SOCKET => {
            return setsockopt_int(fd, o.level, o.opt, (v / 2) as i32)
        }
        _ => return setsockopt_int(fd, o.level, o.opt, v as i32),
    };
    // SAFETY: `ptr` points to a live value of `len` bytes (kept alive by `_keep`).
    let r = unsafe { libc::setsockopt(fd, o.level, o.opt, ptr, len as libc::socklen_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) fn option(name: &str) -> Option<&'static Opt> {
    OPTIONS.iter().find(|o| o.name == name)
}

/// The fd's owner (F_GETOWN_EX type and pid) and F_GETSIG signal, when set.
pub fn owner_of(sock: &OwnedFd) -> (Option<(i32, i32)>, i32) {
    #[repr(C)]
    struct FOwnerEx {
        kind: i32,
        pid: i32,
    }
    let mut o = FOwnerEx { kind: 0, pid: 0 };
    // SAFETY: F_GETOWN_EX writes a struct f_owner_ex into `o`.
    let r = unsafe { libc::fcntl(sock.as_raw_fd(), F_GETOWN_EX, &mut o as *mut FOwnerEx) };
    // SAFETY: F_GETSIG takes no argument.
    let sig = unsafe { libc::fcntl(sock.as_raw_fd(), F_GETSIG) };
    (
        (r == 0 && o.pid != 0).then_some((o.kind, o.pid)),
        sig.max(0),
    )
}
