//! Restore side: every TCP and UDP socket of the image made again in the restorer
//! (see the module comment of `inet`).

use super::net::*;
use super::options::{option, write_option};
use super::repair;
use crate::sockets::{setsockopt_int, sockopt};
use stasis_image::{CheckpointReader, InetSocket};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long refilling one connection may take.
const SETTLE_LIMIT: Duration = Duration::from_secs(2);
/// A refill larger than this grows the new connection's buffers first.
const WARM_UP_ABOVE: usize = 64 << 10;

fn apply_options(fd: &OwnedFd, s: &InetSocket, early: bool) {
    for o in &s.options {
        let Some(opt) = option(&o.name).filter(|x| x.early == early) else {
            continue;
        };
        if let Err(e) = write_option(fd.as_raw_fd(), opt, o.value) {
            tracing::warn!(
                "socket {} ({}): {} = {} not restored: {e}",
                s.id,
                s.local,
                o.name,
                o.value
            );
        }
    }
}

fn apply_early_again(fd: &OwnedFd, s: &InetSocket) {
    for o in &s.options {
        if matches!(o.name.as_str(), "SO_SNDBUF" | "SO_RCVBUF") {
            if let Some(opt) = option(&o.name) {
                let _ = write_option(fd.as_raw_fd(), opt, o.value);
            }
        }
    }
}

fn reuse(fd: &OwnedFd, on: bool) {
    let _ = setsockopt_int(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        i32::from(on),
    );
}

/// A socket like `s`, with its early options, bound to its saved address (or to a
/// free port of the same address when `keep_port_if_free` and the port is taken).
fn socket_like(s: &InetSocket, keep_port_if_free: bool) -> std::result::Result<OwnedFd, String> {
    let family = family_of(s);
    let fd = new_socket(family, is_tcp(s))?;
    apply_options(&fd, s, true);
    let Some(local) = parse_addr(&s.local) else {
        return Ok(fd);
    };
    let local = addr_for(family, local);
    // TCP: the job's own old connections may still wait out TIME_WAIT on the port
    // (SO_REUSEADDR binds over those, not over another program's listener); the
    // saved value is set again at the end.
    if keep_port_if_free || is_tcp(s) {
        reuse(&fd, true);
    }
    match bind(&fd, local) {
        Ok(()) => Ok(fd),
        Err(e) if keep_port_if_free => {
            tracing::debug!("socket {}: port {} taken ({e}): another one", s.id, local);
            let fd = new_socket(family, is_tcp(s))?;
            apply_options(&fd, s, true);
            reuse(&fd, true);
            bind(&fd, SocketAddr::new(local.ip(), 0))
                .or_else(|_| bind(&fd, SocketAddr::new(loopback(family), 0)))
                .map_err(|e| format!("binding a socket for {}: {e}", s.local))?;
            Ok(fd)
        }
        Err(e) => Err(format!(
            "cannot bind {} {} again{}: {e}",
            s.protocol.to_uppercase(),
            local,
            if e.raw_os_error() == Some(libc::EADDRINUSE) {
                format!(" (port {} is taken by another program)", local.port())
            } else {
                String::new()
            }
        )),
    }
}

fn accept_within(lfd: i32, what: &str) -> std::result::Result<OwnedFd, String> {
    if poll_one(lfd, libc::POLLIN, 2000) == 0 {
        return Err(format!("{what}: the connection did not arrive"));
    }
    crate::sockets::accept(lfd).map_err(|e| format!("{what}: accept: {e}"))
}

/// Makes a connection from a socket like `client` to the address `server_at`, through
/// `listener` (a listener of the checkpoint) or a temporary listener of ours bound
/// there (on a free port if that one is taken) with the `server`'s early options.
/// Returns (server end, client end).
fn connect_pair(
    server_at: SocketAddr,
    server: Option<&InetSocket>,
    client: &InetSocket,
    listener: Option<i32>,
) -> std::result::Result<(OwnedFd, OwnedFd), String> {
    let what = format!(
        "re-making the TCP connection {} -> {server_at}",
        client.local
    );
    let temp;
    let lfd = match listener {
        Some(l) => l,
        None => {
            let family = match server_at {
                SocketAddr::V4(_) => libc::AF_INET,
                SocketAddr::V6(_) => libc::AF_INET6,
            };
            temp = new_socket(family, true)?;
            if let Some(s) = server {
                apply_options(&temp, s, true);
            }
            reuse(&temp, true);
            bind(&temp, server_at)
                .or_else(|_| bind(&temp, SocketAddr::new(server_at.ip(), 0)))
                .or_else(|_| bind(&temp, SocketAddr::new(loopback(family), 0)))
                .map_err(|e| format!("{what}: binding a listener: {e}"))?;
            // SAFETY: listen on our socket.
            if unsafe { libc::listen(temp.as_raw_fd(), 1) } != 0 {
                return Err(format!(
                    "{what}: listen: {}",
                    std::io::Error::last_os_error()
                ));
            }
            temp.as_raw_fd()
        }
    };
    let mut target = name_of(lfd, false).ok_or_else(|| format!("{what}: no listener address"))?;
    if target.ip().is_unspecified() {
        target.set_ip(server_at.ip());
    }
    let family = family_of(client);
    let target = addr_for(family, target);
    let mut c = socket_like(client, true)?;
    if let Err(e) = connect(&c, target) {
        // The saved 4-tuple may still wait out TIME_WAIT: another local port.
        tracing::debug!("{what}: {e}; from another port");
        c = new_socket(family, true)?;
        apply_options(&c, client, true);
        connect(&c, target).map_err(|e| format!("{what}: {e}"))?;
    }
    let s = accept_within(lfd, &what)?;
    Ok((s, c))
}

/// Grows a new connection's buffers (as autotuning would have for the application)
/// until `receiver` can take `want` bytes: bytes are pushed through it and read out.
fn warm_up(sender: i32, receiver: i32, want: usize) {
    let chunk = vec![0u8; 1 << 16];
    let mut buf = vec![0u8; 1 << 20];
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut pushed = 0usize;
    while Instant::now() < deadline
        && sockopt(receiver, libc::SO_RCVBUF) as usize / 2 < want
        && pushed < (want * 8).max(64 << 20)
    {
        // SAFETY: sending from and receiving into buffers we own.
        unsafe {
            let n = libc::send(
                sender,
                chunk.as_ptr().cast(),
                chunk.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
            if n > 0 {
                pushed += n as usize;
            }
            while libc::recv(
                receiver,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            ) > 0
            {}
        }
    }
    // Nothing of the warm-up may stay behind.
    while (ioctl_int(sender, SIOCOUTQ) > 0 || ioctl_int(receiver, SIOCINQ) > 0)
        && Instant::now() < deadline + SETTLE_LIMIT
    {
        // SAFETY: receiving into a buffer we own.
        while unsafe {
            libc::recv(
                receiver,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
        poll_one(receiver, libc::POLLIN, 1);
    }
}

/// The data files of the image's IP sockets, each read once.
#[derive(Default)]
struct DataFiles(HashMap<String, Vec<u8>>);

impl DataFiles {
    /// The bytes queued in socket `s`.
    fn of(
        &mut self,
        image: &CheckpointReader,
        s: &InetSocket,
    ) -> std::result::Result<Vec<u8>, String> {
        let Some(name) = &s.data_file else {
            return Ok(Vec::new());
        };
        if !self.0.contains_key(name) {
            let path = image.data_path(name).map_err(|e| e.to_string())?;
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            self.0.insert(name.clone(), bytes);
        }
        let all = &self.0[name];
        let len: u64 = s.messages.iter().sum();
        let start = s.data_offset as usize;
        all.get(start..start + len as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| format!("socket {}: its {len} queued bytes lie beyond {name}", s.id))
    }
}

/// Creates every TCP and UDP socket of the image, connected as it was and with its
/// queues refilled. Returns the restorer's descriptor of each, by id.
pub fn create_all(
    socks: &[InetSocket],
    image: &CheckpointReader,
) -> std::result::Result<HashMap<u64, OwnedFd>, String> {
    // Connections to another node whose other end no part of the job holds any more
    // (its process closed it): their peer closed.
    let unheld = super::remote::unheld(socks, image.path());
    let adjusted: Vec<InetSocket>;
    let socks = if unheld.is_empty() {
        socks
    } else {
        adjusted = socks
            .iter()
            .map(|s| {
                if unheld.contains(&s.id) {
                    tracing::debug!(
                        "TCP socket {} ({} to {}): no part holds its other end; it comes back closed by its peer",
                        s.id, s.local, s.remote
                    );
                    super::remote::as_peer_closed(s)
                } else {
                    s.clone()
                }
            })
            .collect();
        &adjusted
    };
    let by_id: HashMap<u64, &InetSocket> = socks.iter().map(|s| (s.id, s)).collect();
    let mut out: HashMap<u64, OwnedFd> = HashMap::new();
    let mut files = DataFiles::default();
    // The temporary peers that send a closed peer's last bytes (then close).
    let mut lonely_peers: HashMap<u64, OwnedFd> = HashMap::new();
    // 1. Listeners, and sockets bound or not but not connected.
    for s in socks {
        match s.state.as_str() {
            "listening" => {
                // On a new node, a listener on one of the node's old addresses
                // listens on its new one (see `remote`).
                let moved;
                let s = match super::remote::listener_address(&s.local)? {
                    Some(local) => {
                        moved = InetSocket { local, ..s.clone() };
                        &moved
                    }
                    None => s,
                };
                // Restarted through a rendezvous, several parts may share this node
                // now: a port another part holds moves (see `ports`).
                let shared = super::remote::rendezvous().is_some();
                let fd = socket_like(s, shared)?;
                if let (Some(saved), Some(now)) = (parse_addr(&s.local), local_of(fd.as_raw_fd())) {
                    super::ports::note_here(Some(now));
                    if shared && saved.port() != 0 && saved.port() != now.port() {
                        tracing::info!(
                            "listener {}: port {} is taken on this node; it listens on {} (the job's processes still see {})",
                            s.id,
                            saved.port(),
                            now.port(),
                            saved.port()
                        );
                        super::ports::record(saved.port(), now.port());
                    }
                }
                // SAFETY: listen on our socket.
                if unsafe { libc::listen(fd.as_raw_fd(), s.backlog as i32) } != 0 {
                    return Err(format!(
                        "listen on {}: {}",
                        s.local,
                        std::io::Error::last_os_error()
                    ));
                }
                out.insert(s.id, fd);
            }
            "bound" | "unbound" => {
                out.insert(s.id, socket_like(s, false)?);
            }
            "connected" if !is_tcp(s) => {
                out.insert(s.id, socket_like(s, true)?);
            }
            _ => {}
        }
    }
    // Where the ports of this part's listeners are now, before waiting for anyone.
    super::ports::publish()?;
    let listeners: Vec<(SocketAddr, i32)> = socks
        .iter()
        .filter(|l| l.state == "listening")
        .filter_map(|l| Some((parse_addr(&l.local)?, out.get(&l.id)?.as_raw_fd())))
        .collect();
    // Connections to other nodes of the job: made again with them (see `remote`).
    let remote: Vec<&InetSocket> = socks
        .iter()
        .filter(|s| is_tcp(s) && s.state == "remote")
        .collect();
    if !remote.is_empty() {
        let listeners_now: Vec<(SocketAddr, i32)> = socks
            .iter()
            .filter(|l| l.state == "listening")
            .filter_map(|l| {
                let fd = out.get(&l.id)?.as_raw_fd();
                Some((local_of(fd)?, fd))
            })
            .collect();
        out.extend(super::remote::remake(
            &remote,
            |s| files.of(image, s),
            &listeners_now,
        )?);
    }
    // 2. Connections with both ends in the checkpoint: repaired exactly where they
    // were saved so, else made again.
    let mut repaired = Vec::new();
    for s in socks
        .iter()
        .filter(|s| is_tcp(s) && s.state == "connected" && s.peer != 0)
    {
        if out.contains_key(&s.id) {
            continue;
        }
        if let Some(r) = &s.repair {
            let peer = by_id.get(&s.peer).and_then(|p| p.repair.as_ref());
            let (r, data) = repair::settled(r, &files.of(image, s)?, peer);
            let fd = repair::restore(s, &r, &data, |fd| apply_options(fd, s, true))?;
            out.insert(s.id, fd);
            repaired.push((s, r, data));
            continue;
        }
        let p = by_id.get(&s.peer).copied().ok_or_else(|| {
            format!(
                "TCP socket {}: its peer {} is missing from the image",
                s.id, s.peer
            )
        })?;
        let (Some(sl), Some(pl)) = (parse_addr(&s.local), parse_addr(&p.local)) else {
            return Err(format!("TCP socket {}: connected without addresses", s.id));
        };
        let (server, client, at, listener) = if let Some(l) = listener_for(&listeners, sl) {
            (s, p, sl, Some(l))
        } else if let Some(l) = listener_for(&listeners, pl) {
            (p, s, pl, Some(l))
        } else if sl.port() <= pl.port() {
            (s, p, sl, None)
        } else {
            (p, s, pl, None)
        };
        let (sfd, cfd) = connect_pair(at, Some(server), client, listener)?;
        out.insert(server.id, sfd);
        out.insert(client.id, cfd);
    }
    // Every repaired end exists: all out of repair mode (an end in repair mode would
    // drop what its peer sends), then the send queues sent.
    for (s, _, _) in &repaired {
        if let Some(fd) = out.get(&s.id) {
            repair::out_of_repair(s, fd)?;
        }
    }
    for (s, r, data) in &repaired {
        if let Some(fd) = out.get(&s.id) {
            repair::send_queue(s, r, data, fd)?;
        }
    }
    // 3. Connections whose peer closed, or to be reset: a temporary peer.
    for s in socks.iter().filter(|s| {
        is_tcp(s)
            && ((s.state == "connected" && s.peer == 0 && s.pending_on == 0) || s.state == "reset")
    }) {
        let remote = parse_addr(&s.remote)
            .ok_or_else(|| format!("TCP socket {}: no remote address", s.id))?;
        let local_ip = parse_addr(&s.local).map(|a| a.ip());
        // Our listener stands in for the peer: on its address when that is local, else
        // on the loopback of its family.
        let at = if s.state == "reset" && local_ip.map(|ip| ip.is_loopback()) != Some(true) {
            SocketAddr::new(loopback(family_of(s)), 0)
        } else {
            remote
        };
        let (other, fd) = connect_pair(addr_for(family_of(s), at), None, s, None)?;
        if s.state == "reset" {
            // SO_LINGER 0: close sends a reset instead of a FIN.
            let _ = write_option(
                other.as_raw_fd(),
                option("SO_LINGER").ok_or("SO_LINGER")?,
                0,
            );
            drop(other);
            poll_one(fd.as_raw_fd(), libc::POLLERR | libc::POLLHUP, 1000);
        } else {
            lonely_peers.insert(s.id, other);
        }
        out.insert(s.id, fd);
    }
    // 4. Connections not accepted yet: made last, left in their listener's queue.
    for s in socks.iter().filter(|s| is_tcp(s) && s.pending_on != 0) {
        let remote = parse_addr(&s.remote)
            .ok_or_else(|| format!("TCP socket {}: no remote address", s.id))?;
        let target = match by_id.get(&s.pending_on).and_then(|l| out.get(&l.id)) {
            Some(l) => {
                let mut a = name_of(l.as_raw_fd(), false).unwrap_or(remote);
                if a.ip().is_unspecified() {
                    a.set_ip(remote.ip());
                }
                a
            }
            None => remote,
        };
        let fd = socket_like(s, true)?;
        connect(&fd, addr_for(family_of(s), target))
            .map_err(|e| format!("re-making the pending TCP connection to {target}: {e}"))?;
        out.insert(s.id, fd);
    }
    // 5. Refill the queues.
    for s in socks {
        let data = files.of(image, s)?;
        if is_tcp(s) {
            let Some(recv) = out.get(&s.id).map(|f| f.as_raw_fd()) else {
                continue;
            };
            // Refilled already: exactly (repair), or through the connection itself
            // (another node's end).
            if s.repair.is_some() || s.state == "remote" {
                continue;
            }
            let sender = if s.peer != 0 {
                out.get(&s.peer).map(|f| f.as_raw_fd())
            } else {
                lonely_peers.get(&s.id).map(|f| f.as_raw_fd())
            };
            if data.is_empty() {
                continue;
            }
            let sender = sender.ok_or_else(|| {
                format!(
                    "TCP socket {}: {} queued bytes with no way to resend them",
                    s.id,
                    data.len()
                )
            })?;
            if data.len() > WARM_UP_ABOVE {
                warm_up(sender, recv, data.len());
            }
            send_all(sender, &data, Instant::now() + SETTLE_LIMIT).map_err(|e| {
                format!(
                    "requeueing the bytes of TCP socket {} ({}): {e}",
                    s.id, s.local
                )
            })?;
        } else {
            refill_datagrams(s, &data, socks, &out)?;
        }
    }
    // A closed peer's last bytes are followed by its end of file.
    for (_, other) in lonely_peers {
        // SAFETY: shutdown on our socket.
        unsafe { libc::shutdown(other.as_raw_fd(), libc::SHUT_WR) };
    }
    // 6. UDP connections, shutdowns, the remaining options.
    for s in socks {
        let Some(fd) = out.get(&s.id) else { continue };
        if !is_tcp(s) && s.state == "connected" {
            if let Some(r) = parse_addr(&s.remote) {
                connect(fd, addr_for(family_of(s), r))
                    .map_err(|e| format!("connecting UDP socket {} to {r}: {e}", s.local))?;
            }
        }
        crate::sockets::shutdown(fd, s.shutdown);
        reuse(
            fd,
            s.options
                .iter()
                .any(|o| o.name == "SO_REUSEADDR" && o.value != 0),
        );
        apply_options(fd, s, false);
        if s.state == "connected" && is_tcp(s) {
            // An accepted end got its listener's options: its own early ones again
            // (those that still apply to a connected socket).
            apply_early_again(fd, s);
        }
    }
    Ok(out)
}

/// Sends a UDP socket's saved datagrams to it again, each from its sender's address
/// where that can be had (a socket of the checkpoint bound there, or a temporary one).
fn refill_datagrams(
    s: &InetSocket,
    data: &[u8],
    socks: &[InetSocket],
    out: &HashMap<u64, OwnedFd>,
) -> std::result::Result<(), String> {
    if s.messages.is_empty() {
        return Ok(());
    }
    let family = family_of(s);
    let Some(fd) = out.get(&s.id) else {
        return Ok(());
    };
    let mut to = name_of(fd.as_raw_fd(), false)
        .ok_or_else(|| format!("UDP socket {}: unbound, with datagrams queued", s.id))?;
    if to.ip().is_unspecified() {
        to.set_ip(loopback(family));
    }
    let mut temps: HashMap<SocketAddr, OwnedFd> = HashMap::new();
    let mut off = 0usize;
    for (i, &len) in s.messages.iter().enumerate() {
        let chunk = data
            .get(off..off + len as usize)
            .ok_or_else(|| format!("UDP socket {}: datagram {i} beyond its data file", s.id))?;
        off += len as usize;
        let from = s.sources.get(i).and_then(|a| parse_addr(a));
        // A socket of the checkpoint bound to the sender's address sends it itself.
        let own = from.and_then(|f| {
            socks.iter().find_map(|o| {
                let a = parse_addr(&o.local)?;
                (!is_tcp(o) && o.remote.is_empty() && binds(a, f))
                    .then(|| out.get(&o.id).map(|x| x.as_raw_fd()))
                    .flatten()
            })
        });
        let sender = match own {
            Some(fd) => fd,
            None => {
                let key = from.unwrap_or(SocketAddr::new(loopback(family), 0));
                let t = match temps.entry(key) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let t = new_socket(family, false)?;
                        reuse(&t, true);
                        if let Some(f) = from {
                            if bind(&t, addr_for(family, f)).is_err() {
                                tracing::debug!("UDP socket {}: cannot send from {f}", s.id);
                            }
                        }
                        v.insert(t)
                    }
                };
                t.as_raw_fd()
            }
        };
        let (ss, slen) = to_sockaddr(addr_for(family, to));
        // SAFETY: sending a buffer we own to an address we built.
        let n = unsafe {
            libc::sendto(
                sender,
                chunk.as_ptr().cast(),
                chunk.len(),
                libc::MSG_NOSIGNAL,
                (&ss as *const libc::sockaddr_storage).cast(),
                slen,
            )
        };
        if n != chunk.len() as isize {
            return Err(format!(
                "requeueing datagram {i} of UDP socket {}: {}",
                s.local,
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}
