//! Restore of UNIX sockets in the restorer: step 1 ([`create_all`]: listeners,
//! connections, socketpairs, stand-in peers, datagram sockets) and step 3 ([`finish`]:
//! connecting, reconnecting outside, closing stand-ins, options and shutdowns), with
//! the helpers that make, bind and connect sockets.

use super::refill::{refill, Temps};
use stasis_image::{CheckpointReader, FdKind, UnixSocket};
use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

pub(super) fn new_socket(sock_type: i32) -> std::result::Result<OwnedFd, String> {
    // SAFETY: socket() returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, sock_type | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn sockaddr(
    name: &str,
) -> std::result::Result<(libc::sockaddr_un, libc::socklen_t), String> {
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

pub(super) fn bind(fd: &OwnedFd, name: &str) -> std::result::Result<(), String> {
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

pub(super) fn connect(fd: &OwnedFd, name: &str) -> std::result::Result<(), String> {
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
pub(super) fn holder(image: &CheckpointReader, id: u64) -> String {
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
pub(super) fn abs_name(name: &str, dir: &str) -> String {
    if dir.is_empty() || name.starts_with('/') || name.starts_with('@') {
        name.to_string()
    } else {
        format!("{dir}/{name}")
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
                let sfd = crate::sockets::accept(lfd)
                    .map_err(|e| format!("re-accepting on {}: {e}", s.name))?;
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
                    let sfd = crate::sockets::accept(lfd)
                        .map_err(|e| format!("re-accepting on {name}: {e}"))?;
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
            let _ = crate::sockets::setsockopt_int(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PASSCRED,
                1,
            );
        }
        crate::sockets::shutdown(fd, s.shutdown);
    }
    Ok(())
}
