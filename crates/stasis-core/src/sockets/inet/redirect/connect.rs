//! `connect(2)` and `bind(2)` to or on a node's old address, made with its new one.
//!
//! The call is made by us on the process's own socket (taken with pidfd_getfd: the
//! same open file description, so a non-blocking socket gets EINPROGRESS as it would),
//! in a thread of its own (a blocking connect would hold up every other notification).
//! An MPI library binds its new sockets to its node's address before connecting, so a
//! bind is redirected as a connect is.

use super::{dup, reply, sockaddr_of, still_valid, Notif, SECCOMP_USER_NOTIF_FLAG_CONTINUE};
use stasis_sys::inet_diag::canonical;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::path::Path;

/// Answers notification `n` (a connect or a bind) of `listener`.
pub(super) fn handle(listener: i32, n: &Notif, dir: &Path) {
    let bind = i64::from(n.nr) == libc::SYS_bind;
    let Some((target, moved)) =
        sockaddr_of(n.pid as i32, n.args[1], n.args[2]).and_then(|t| Some((t, now_at(dir, t)?)))
    else {
        return reply(listener, n.id, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
    };
    // The port too, for a connect (a listener there may have moved, see `ports`);
    // None: that node's part has not said yet (waited for in the thread).
    let old_ip = canonical(target).ip();
    let port = if bind {
        Some(target.port())
    } else {
        super::super::ports::known_port(
            dir,
            super::super::ports::Keyed::Original,
            old_ip,
            target.port(),
        )
    };
    if port.map(|p| SocketAddr::new(moved.ip(), p)) == Some(target) {
        // A node that did not move: the connect goes on as it is, once noted.
        if !bind {
            if let Ok(sock) = crate::proc::borrow_fd(n.pid as i32, n.args[0] as i32) {
                super::names::note_source(dir, &sock, family_of(&sock));
            }
        }
        return reply(listener, n.id, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
    }
    if !still_valid(listener, n.id) {
        return;
    }
    let (pid, fd, id) = (n.pid as i32, n.args[0] as i32, n.id);
    let dir = dir.to_path_buf();
    let listener_dup = match dup(listener) {
        Some(l) => l,
        None => return reply(listener, id, -libc::ENOMEM, 0),
    };
    let spawned = std::thread::Builder::new()
        .name("connect".into())
        .spawn(move || {
            let port = match port {
                Some(p) => Ok(p),
                None => super::super::ports::peer_port(
                    &dir,
                    super::super::ports::Keyed::Original,
                    old_ip,
                    target.port(),
                ),
            };
            let new = SocketAddr::new(moved.ip(), port.as_ref().map_or(target.port(), |p| *p));
            let error = match (port, crate::proc::borrow_fd(pid, fd)) {
                (Err(e), _) => {
                    tracing::warn!("process {pid}: connect of fd {fd} to {target}: {e}");
                    -libc::ECONNREFUSED
                }
                (Ok(_), Ok(sock)) => {
                    if !bind {
                        super::names::note_source(&dir, &sock, family_of(&sock));
                    }
                    on_behalf(&sock, new, bind)
                }
                (Ok(_), Err(_)) => -libc::EBADF,
            };
            tracing::debug!(
                "process {pid}: bind or connect of fd {fd} to {target} redirected to {new}: {error}"
            );
            reply(listener_dup.as_raw_fd(), id, error, 0);
        });
    if spawned.is_err() {
        reply(listener, id, -libc::EAGAIN, 0);
    }
}

/// Connects (or with `bind`, binds) our descriptor of the process's socket to `to`;
/// 0 or a negative errno.
fn on_behalf(sock: &OwnedFd, to: SocketAddr, bind: bool) -> i32 {
    let to = super::super::net::addr_for(family_of(sock), to);
    let r = if bind {
        super::super::net::bind(sock, to)
    } else {
        super::super::net::connect(sock, to)
    };
    match r {
        Ok(()) => 0,
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// The socket's family (AF_INET when it cannot be read).
fn family_of(sock: &OwnedFd) -> i32 {
    match crate::sockets::sockopt(sock.as_raw_fd(), libc::SO_DOMAIN) {
        0 => libc::AF_INET,
        f => f,
    }
}

/// Where a node's old address `to` is now, port unchanged (None: not an address of a
/// node of the job).
pub(super) fn now_at(dir: &Path, to: SocketAddr) -> Option<SocketAddr> {
    let old = canonical(to).ip();
    let new: IpAddr = std::fs::read_to_string(dir.join(format!("addr-{old}")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(
        if super::super::remote::plain_ip(new) == super::super::remote::plain_ip(old) {
            to
        } else {
            SocketAddr::new(new, to.port())
        },
    )
}
