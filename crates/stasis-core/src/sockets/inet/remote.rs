//! TCP connections between the nodes of a multi-node job (state `remote`).
//!
//! Dump (a coordinated checkpoint, [`super::TcpExternal::Peer`]): once the node's part
//! is frozen, [`settle_external`] waits until every byte the part sent on a connection
//! whose peer is not on this node is acknowledged by that peer (its kernel holds it,
//! in the receive queue the peer's node saves); only then does the node report frozen.
//! Every node does so before any node reads a socket, so once all are frozen nothing
//! is on its way anywhere: each end's state is its receive queue, read with MSG_PEEK.
//! A connection from another node still in the accept queue of one of the part's
//! listeners cannot be saved (no fd holds it, so its bytes cannot be read): the dump
//! refuses it, naming the listener, and the job runs on (`dump`).
//!
//! Restore ([`remake`]): the connection is made again between the nodes' new
//! addresses, found through a rendezvous directory that the restarts of one global
//! checkpoint share (`STASIS_RENDEZVOUS`, set by `stasis agent`): each node part
//! publishes, for every address its node had at checkpoint time, the address it has
//! now (`node-OLDIP`, holding `NEWIP`; `STASIS_NODE_ADDRESS` or the first non-loopback
//! IPv4 address of the node), and reads its peers'; and, for every address of the
//! job's first start it stands for, the same (`addr-FIRSTIP`, what the processes know
//! and `redirect` reads). Without a rendezvous, addresses stay as they were. Of the two ends,
//! the one with the lower (port, address) accepts (through the job's listener there,
//! else a listener of its own) and the other connects; both go through their
//! connections in one global order (by the pair of old addresses), so no two nodes wait
//! for each other. On the new connection the connecting end names the connection (its
//! old addresses); then each end sends its saved receive queue to the other and sends
//! back what it gets: each receive queue ends up holding exactly its saved bytes, in
//! order, before any process runs.
//!
//! An end whose other end no part holds (its process closed it just before the
//! checkpoint: the end saved here had not read the FIN yet) would wait for a peer that
//! never comes. Before anything waits, [`unheld`] reads the other parts' socket lists
//! from the global checkpoint, and such an end comes back on its own, closed by its
//! peer: its unread bytes, then end of file.

use super::net::*;
use crate::error::{Error, Result};
use stasis_image::InetSocket;
use stasis_sys::inet_diag::{self, canonical, state};
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a node waits for its sent bytes to be acknowledged at a checkpoint.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a restart waits for the other nodes (their addresses, their ends).
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);
/// The rendezvous files of the nodes' addresses at checkpoint time (what the restore
/// reads, re-making connections), and of the addresses of the job's first start (what
/// the processes know, through any number of restarts: what redirection reads). The
/// two differ after a restart onto other nodes, and may name one address differently
/// when a later restart permutes the same nodes again.
const NODE: &str = "node";
const ORIGINAL: &str = "addr";
/// Names a re-made connection (sent first by the connecting end).
const MAGIC: &[u8; 8] = b"STASISX1";

/// Waits until no TCP connection of processes `pids` to another node of the job (an
/// address of `nodes`, not in this network namespace) has bytes sent and not
/// acknowledged (at most `timeout`); an error names the connection otherwise.
pub fn settle_external(pids: &[i32], nodes: &[IpAddr], timeout: Duration) -> Result<()> {
    let ours = super::diag::read_holders(pids);
    if ours.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    loop {
        let socks = inet_diag::dump(libc::IPPROTO_TCP).map_err(|e| Error::Io {
            pid: pids.first().copied().unwrap_or(0),
            context: "listing TCP sockets (inet_diag)".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        // The end of each connection in this network namespace, by its addresses: a
        // peer held by this part is no other node's (one held by another part that
        // shares this node is).
        let ends: HashMap<(SocketAddr, SocketAddr), u64> = socks
            .iter()
            .map(|s| ((canonical(s.local), canonical(s.remote)), s.ino))
            .collect();
        let waiting = socks.iter().find(|s| {
            ours.contains_key(&s.ino)
                && s.state == state::ESTABLISHED
                && s.wqueue > 0
                && is_node(nodes, s.remote.ip())
                && !ends
                    .get(&(canonical(s.remote), canonical(s.local)))
                    .is_some_and(|peer| ours.contains_key(peer))
        });
        let Some(w) = waiting else {
            return Ok(());
        };
        if Instant::now() > deadline {
            return Err(Error::Unsupported {
                pid: ours[&w.ino].0,
                what: format!(
                    "a TCP connection from {} to {} (another node) whose {} bytes sent were not acknowledged within {} s (is the peer's receive buffer full?); it",
                    w.local,
                    w.remote,
                    w.wqueue,
                    timeout.as_secs()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether `ip` (an IPv4 address also when IPv4-mapped) is one of `nodes`.
pub fn is_node(nodes: &[IpAddr], ip: IpAddr) -> bool {
    nodes.iter().any(|n| plain_ip(*n) == plain_ip(ip))
}

/// `ip`, an IPv4 address when it is IPv4-mapped (the form compared).
pub(super) fn plain_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Old addresses to new ones (see the module documentation).
struct AddressMap {
    dir: Option<PathBuf>,
    here: Option<IpAddr>,
    known: HashMap<IpAddr, IpAddr>,
}

impl AddressMap {
    fn from_env() -> AddressMap {
        let here = std::env::var("STASIS_NODE_ADDRESS")
            .ok()
            .and_then(|a| a.parse().ok())
            .or_else(first_address);
        AddressMap {
            dir: rendezvous(),
            here,
            known: HashMap::new(),
        }
    }

    /// This node's new address for its address `old` at checkpoint time, published
    /// for the other parts (`node-OLD`).
    fn own(&mut self, old: IpAddr) -> std::result::Result<IpAddr, String> {
        if let Some(n) = self.known.get(&old) {
            return Ok(*n);
        }
        let new = match (&self.dir, self.here) {
            (Some(_), Some(here)) if !old.is_loopback() && !old.is_unspecified() => here,
            _ => old,
        };
        self.publish(NODE, old, new)?;
        self.known.insert(old, new);
        Ok(new)
    }

    /// Publishes that `old` is `new` now, as `KIND-OLD`.
    fn publish(&self, kind: &str, old: IpAddr, new: IpAddr) -> std::result::Result<(), String> {
        if let Some(dir) = &self.dir {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let tmp = unique_tmp(dir, &format!("{kind}-{old}"));
            let mut f =
                std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
            f.write_all(new.to_string().as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
            let at = dir.join(format!("{kind}-{old}"));
            std::fs::rename(&tmp, &at).map_err(|e| format!("{}: {e}", at.display()))?;
        }
        Ok(())
    }

    /// The new address of another node's old address `old` (waiting for it to be
    /// published).
    fn peer(&mut self, old: IpAddr) -> std::result::Result<IpAddr, String> {
        if let Some(n) = self.known.get(&old) {
            return Ok(*n);
        }
        let Some(dir) = &self.dir else {
            return Ok(old);
        };
        let at = dir.join(format!("{NODE}-{old}"));
        let deadline = Instant::now() + RENDEZVOUS_TIMEOUT;
        loop {
            if let Ok(s) = std::fs::read_to_string(&at) {
                let new: IpAddr = s
                    .trim()
                    .parse()
                    .map_err(|e| format!("{}: {e}", at.display()))?;
                self.known.insert(old, new);
                return Ok(new);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the node that had address {old} did not say where it is now within {} s (is its part restarting? see {})",
                    RENDEZVOUS_TIMEOUT.as_secs(),
                    dir.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// At a restart through a rendezvous: publishes where every address this node part had
/// (`node`, its node's addresses at checkpoint time) is now, and, for the addresses its
/// processes may still know from before earlier restarts (`map`: old, what it became),
/// where those are now.
pub fn publish_addresses(
    node: &[String],
    map: &[[String; 2]],
    ports: &[stasis_image::PortMove],
) -> std::result::Result<(), String> {
    if rendezvous().is_none() {
        return Ok(());
    }
    let mut m = AddressMap::from_env();
    let mut mine = Vec::new();
    for a in node {
        if let Ok(ip) = a.parse::<IpAddr>() {
            let old = canonical(SocketAddr::new(ip, 0)).ip();
            mine.push(old);
            m.own(old)?;
        }
    }
    // The addresses of the job's first start that this part's node addresses stand for
    // (the checkpoint's address map), else the node addresses themselves.
    let mut originals = Vec::new();
    let mut covered = Vec::new();
    for [old, became] in map {
        let (Ok(old), Ok(became)) = (old.parse::<IpAddr>(), became.parse::<IpAddr>()) else {
            continue;
        };
        let became = canonical(SocketAddr::new(became, 0)).ip();
        if mine.contains(&became) {
            let now = m.own(became)?;
            let old = canonical(SocketAddr::new(old, 0)).ip();
            m.publish(ORIGINAL, old, now)?;
            originals.push(old);
            covered.push(became);
        }
    }
    for old in mine.iter().filter(|a| !covered.contains(a)) {
        let now = m.own(*old)?;
        m.publish(ORIGINAL, *old, now)?;
        originals.push(*old);
    }
    super::ports::set_own(originals, mine, ports);
    Ok(())
}

/// The addresses of the job's first start and the address each stands for now, as
/// published in the rendezvous `dir` (`addr-FIRST`, see [`publish_addresses`]).
pub(super) fn first_addresses(dir: &std::path::Path) -> Vec<(IpAddr, IpAddr)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let first = e
                .file_name()
                .to_str()?
                .strip_prefix(&format!("{ORIGINAL}-"))?
                .parse()
                .ok()?;
            let now = std::fs::read_to_string(e.path())
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some((first, now))
        })
        .collect()
}

/// The addresses this job's processes may know (those of its first start) and where
/// they are now: every `addr-FIRST` of the rendezvous this part was restarted
/// through, unchanged ones included (what a checkpoint saves as `address_map`).
pub fn current_address_map() -> Vec<[String; 2]> {
    let Some(dir) = rendezvous() else {
        return Vec::new();
    };
    let mut out: Vec<[String; 2]> = first_addresses(&dir)
        .into_iter()
        .map(|(first, now)| [first.to_string(), now.to_string()])
        .collect();
    out.sort();
    out
}

/// The rendezvous directory this part is being restarted through
/// (`STASIS_RENDEZVOUS`), if any.
pub(super) fn rendezvous() -> Option<PathBuf> {
    std::env::var_os("STASIS_RENDEZVOUS").map(PathBuf::from)
}

/// A temporary name in the rendezvous `dir` for a file to be renamed to `name`,
/// unique across the parts writing there: restorers of parts on one node run in
/// PID namespaces of their own, so their pids alone may be equal.
pub(super) fn unique_tmp(dir: &std::path::Path, name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut r = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `r`.
    unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
    dir.join(format!(
        ".{name}.{}.{:x}.{}",
        std::process::id(),
        u64::from_ne_bytes(r),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// This node's address (`STASIS_NODE_ADDRESS`, else its first non-loopback IPv4
/// address).
pub(super) fn here() -> Option<IpAddr> {
    AddressMap::from_env().here
}

/// The first non-loopback IPv4 address of this node.
fn first_address() -> Option<IpAddr> {
    node_addresses().into_iter().find(|a| a.is_ipv4())
}

/// This node's addresses (every interface's), loopback ones left out.
pub fn node_addresses() -> Vec<IpAddr> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*p };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of its family's size.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                if !ip.is_loopback() {
                    found.push(ip);
                }
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr));
                if !ip.is_loopback() {
                    found.push(ip);
                }
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: freeing the list getifaddrs allocated.
    unsafe { libc::freeifaddrs(ifap) };
    found
}

/// Maps the address of a listener of the job bound to one of this node's old
/// addresses to its new one (None: unchanged).
pub(super) fn listener_address(local: &str) -> std::result::Result<Option<String>, String> {
    if rendezvous().is_none() {
        return Ok(None);
    }
    let Some(a) = parse_addr(local) else {
        return Ok(None);
    };
    if a.ip().is_loopback() || a.ip().is_unspecified() {
        return Ok(None);
    }
    let mut map = AddressMap::from_env();
    let new = map.own(a.ip())?;
    Ok((new != a.ip()).then(|| SocketAddr::new(new, a.port()).to_string()))
}

/// The key both ends of a connection order their connections by.
fn pair_key(a: SocketAddr, b: SocketAddr) -> (String, String) {
    let (a, b) = (canonical(a).to_string(), canonical(b).to_string());
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// Whether the end at `local` (talking to `remote`) accepts.
fn accepts(local: SocketAddr, remote: SocketAddr) -> bool {
    let (l, r) = (canonical(local), canonical(remote));
    (l.port(), l.ip()) < (r.port(), r.ip())
}

/// Reads exactly `buf.len()` bytes from `fd` by `deadline`.
fn read_exact(fd: i32, buf: &mut [u8], deadline: Instant) -> std::result::Result<(), String> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || poll_one(fd, libc::POLLIN, left.as_millis().min(1000) as i32) == 0 {
            if Instant::now() >= deadline {
                return Err("the other node's end did not answer in time".into());
            }
            continue;
        }
        // SAFETY: reading into the unfilled part of `buf`.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n == 0 {
            return Err("the other node's end closed the connection".into());
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.to_string());
        }
        got += n as usize;
    }
    Ok(())
}

fn read_frame(fd: i32, deadline: Instant) -> std::result::Result<Vec<u8>, String> {
    let mut len = [0u8; 8];
    read_exact(fd, &mut len, deadline)?;
    let len = u64::from_le_bytes(len);
    if len > 1 << 30 {
        return Err(format!("a frame of {len} bytes: not a stasis restorer"));
    }
    let mut buf = vec![0u8; len as usize];
    read_exact(fd, &mut buf, deadline)?;
    Ok(buf)
}

fn frame(data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

/// The hello naming a connection: the connecting end's old (local, remote).
fn hello(local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend(frame(
        format!("{}|{}", canonical(local), canonical(remote)).as_bytes(),
    ));
    v
}

fn read_hello(fd: i32, deadline: Instant) -> std::result::Result<(String, String), String> {
    let mut magic = [0u8; 8];
    read_exact(fd, &mut magic, deadline)?;
    if &magic != MAGIC {
        return Err("a connection that is not another stasis restorer's".into());
    }
    let body = String::from_utf8(read_frame(fd, deadline)?).map_err(|e| e.to_string())?;
    let (l, r) = body
        .split_once('|')
        .ok_or_else(|| format!("a malformed hello {body:?}"))?;
    Ok((l.to_string(), r.to_string()))
}

/// On a new connection: sends our saved receive queue, reads the peer's and sends it
/// back; what the peer sends back stays queued for our process.
fn exchange(fd: &OwnedFd, ours: &[u8], deadline: Instant) -> std::result::Result<(), String> {
    let raw = fd.as_raw_fd();
    let out = frame(ours);
    let theirs = std::thread::scope(|sc| {
        let sender = sc.spawn(|| send_all(raw, &out, deadline).map_err(|e| e.to_string()));
        let theirs = read_frame(raw, deadline);
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err("the sending thread panicked".into()));
        sent.and(theirs)
    })?;
    send_all(raw, &theirs, deadline)
        .map_err(|e| format!("sending back {} bytes: {e}", theirs.len()))
}

/// A listener of our own on `at` (a connection whose end here has none of the job's).
fn listen_at(family: i32, at: SocketAddr) -> std::result::Result<OwnedFd, String> {
    let fd = new_socket(family, true)?;
    let _ = crate::sockets::setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    bind(&fd, addr_for(family, at)).map_err(|e| format!("listening on {at}: {e}"))?;
    // SAFETY: listen on our socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
        return Err(format!(
            "listening on {at}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

/// The ids of the connections among `socks` (state `remote`, of the part restored
/// from the checkpoint at `image`) whose other end no other part of the global
/// checkpoint holds: that end's process had closed it when the checkpoint was taken
/// (its FIN came, or was on its way). No part would make such a connection again;
/// it comes back as one whose peer closed ([`as_peer_closed`]).
///
/// The other parts are read from the global checkpoint the image lies in
/// (`GLOBAL/node-K/checkpoint-N`, `GLOBAL/global.json`), their metadata only. A part
/// restored from anywhere else, or whose siblings cannot be read (a warning says so),
/// keeps every connection: each waits for its peer.
pub(super) fn unheld(socks: &[InetSocket], image: &std::path::Path) -> Vec<u64> {
    let key = |s: &InetSocket| {
        Some((
            canonical(parse_addr(&s.local)?),
            canonical(parse_addr(&s.remote)?),
        ))
    };
    let ours: Vec<(u64, (SocketAddr, SocketAddr))> = socks
        .iter()
        .filter(|s| is_tcp(s) && s.state == "remote")
        .filter_map(|s| Some((s.id, key(s)?)))
        .collect();
    if ours.is_empty() {
        return Vec::new();
    }
    let Some(part) = image.parent() else {
        return Vec::new();
    };
    let Some(global) = part.parent().filter(|g| g.join("global.json").is_file()) else {
        return Vec::new();
    };
    let mut held = std::collections::HashSet::new();
    let siblings = match std::fs::read_dir(global) {
        Ok(rd) => rd.flatten().map(|e| e.path()),
        Err(e) => {
            tracing::warn!("cannot list the parts of {}: {e}; every connection to another node waits for its peer", global.display());
            return Vec::new();
        }
    };
    for other in siblings {
        let is_part = other
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("node-"));
        if !is_part || other == part {
            continue;
        }
        let socks = stasis_image::store::list_checkpoints(&other)
            .ok()
            .and_then(|all| all.last().map(|(_, p)| p.clone()))
            .ok_or_else(|| "no checkpoint in it".to_string())
            .and_then(|p| {
                stasis_image::CheckpointReader::read_inet_sockets(&p).map_err(|e| e.to_string())
            });
        match socks {
            Ok(socks) => held.extend(
                socks
                    .iter()
                    .filter(|s| is_tcp(s) && s.state == "remote")
                    .filter_map(key),
            ),
            Err(e) => {
                tracing::warn!("the part {} cannot be read ({e}); every connection to another node waits for its peer", other.display());
                return Vec::new();
            }
        }
    }
    ours.into_iter()
        .filter(|(_, (l, r))| !held.contains(&(*r, *l)))
        .map(|(id, _)| id)
        .collect()
}

/// Connection `s` (state `remote`) as one whose peer closed: it comes back on this
/// node alone, its unread bytes followed by end of file from a temporary peer.
pub(super) fn as_peer_closed(s: &InetSocket) -> InetSocket {
    InetSocket {
        state: "connected".into(),
        peer: 0,
        peer_closed: true,
        shutdown: s.shutdown & !RCV_SHUTDOWN,
        ..s.clone()
    }
}

/// Makes every connection in `socks` (state `remote`) again, its receive queue
/// refilled (`data` gives a socket's saved bytes); `listeners` are the job's
/// listeners already made (address as bound, fd). Returns the restorer's descriptor of
/// each, by id.
pub(super) fn remake(
    socks: &[&InetSocket],
    mut data: impl FnMut(&InetSocket) -> std::result::Result<Vec<u8>, String>,
    listeners: &[(SocketAddr, i32)],
) -> std::result::Result<HashMap<u64, OwnedFd>, String> {
    let mut map = AddressMap::from_env();
    let mut order: Vec<(&InetSocket, SocketAddr, SocketAddr)> = Vec::new();
    for s in socks {
        let (Some(l), Some(r)) = (parse_addr(&s.local), parse_addr(&s.remote)) else {
            return Err(format!(
                "TCP socket {}: a connection to another node without addresses",
                s.id
            ));
        };
        order.push((s, l, r));
    }
    // Our addresses are published before we wait for anyone's.
    for (_, l, _) in &order {
        map.own(canonical(*l).ip())?;
    }
    order.sort_by_key(|(_, l, r)| pair_key(*l, *r));
    let deadline = Instant::now() + RENDEZVOUS_TIMEOUT;
    let mut out = HashMap::new();
    // Listeners of our own (by new address), and connections accepted before their
    // turn (by the connecting end's old (local, remote)).
    let mut own_listeners: HashMap<SocketAddr, OwnedFd> = HashMap::new();
    let mut early: HashMap<(String, String), OwnedFd> = HashMap::new();
    for (s, l, r) in order {
        let what = format!("TCP socket {} ({l} to {r}, another node)", s.id);
        let family = family_of(s);
        let new_l = SocketAddr::new(map.own(canonical(l).ip())?, l.port());
        let new_r = SocketAddr::new(map.peer(canonical(r).ip())?, r.port());
        // Ports moved where parts share a node now (see `ports`).
        let (new_l, new_r) = match &map.dir {
            Some(dir) => (
                SocketAddr::new(new_l.ip(), super::ports::own_port(l.port())),
                SocketAddr::new(
                    new_r.ip(),
                    super::ports::peer_port(
                        dir,
                        super::ports::Keyed::Node,
                        canonical(r).ip(),
                        r.port(),
                    )
                    .map_err(|e| format!("{what}: {e}"))?,
                ),
            ),
            None => (new_l, new_r),
        };
        tracing::debug!(
            "{what}: now {new_l} to {new_r}, {}",
            if accepts(l, r) {
                "accepting"
            } else {
                "connecting"
            }
        );
        let fd = if accepts(l, r) {
            let lfd = match listener_for(listeners, new_l) {
                Some(fd) => fd,
                None => {
                    if let std::collections::hash_map::Entry::Vacant(slot) =
                        own_listeners.entry(new_l)
                    {
                        slot.insert(listen_at(family, new_l).map_err(|e| format!("{what}: {e}"))?);
                    }
                    own_listeners[&new_l].as_raw_fd()
                }
            };
            let want = (canonical(r).to_string(), canonical(l).to_string());
            loop {
                if let Some(fd) = early.remove(&want) {
                    break fd;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero()
                    || poll_one(lfd, libc::POLLIN, left.as_millis().min(1000) as i32) == 0
                {
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "{what}: the other node's end did not connect within {} s",
                            RENDEZVOUS_TIMEOUT.as_secs()
                        ));
                    }
                    continue;
                }
                let fd = crate::sockets::accept(lfd).map_err(|e| format!("{what}: accept: {e}"))?;
                let named =
                    read_hello(fd.as_raw_fd(), deadline).map_err(|e| format!("{what}: {e}"))?;
                if named == want {
                    break fd;
                }
                tracing::debug!(
                    "{what}: accepted {named:?} before its turn (waiting for {want:?})"
                );
                early.insert(named, fd);
            }
        } else {
            let fd = loop {
                let fd = new_socket(family, true)?;
                let _ = crate::sockets::setsockopt_int(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    1,
                );
                if bind(&fd, addr_for(family, new_l)).is_err() {
                    bind(&fd, SocketAddr::new(addr_for(family, new_l).ip(), 0))
                        .map_err(|e| format!("{what}: binding {}: {e}", new_l.ip()))?;
                }
                match connect(&fd, addr_for(family, new_r)) {
                    Ok(()) => break fd,
                    Err(e)
                        if Instant::now() < deadline
                            && matches!(
                                e.raw_os_error(),
                                Some(libc::ECONNREFUSED)
                                    | Some(libc::ETIMEDOUT)
                                    | Some(libc::EHOSTUNREACH)
                                    | Some(libc::ENETUNREACH)
                            ) =>
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => return Err(format!("{what}: connecting to {new_r}: {e}")),
                }
            };
            send_all(fd.as_raw_fd(), &hello(l, r), deadline).map_err(|e| format!("{what}: {e}"))?;
            fd
        };
        super::ports::note_here(local_of(fd.as_raw_fd()));
        let saved = data(s)?;
        tracing::debug!(
            "{what}: made; exchanging receive queues ({} bytes here)",
            saved.len()
        );
        exchange(&fd, &saved, deadline).map_err(|e| format!("{what}: {e}"))?;
        tracing::debug!("{what}: remade");
        out.insert(s.id, fd);
    }
    if let Some((k, _)) = early.into_iter().next() {
        return Err(format!(
            "a connection from another node named {k:?}, which this part does not hold"
        ));
    }
    Ok(out)
}
