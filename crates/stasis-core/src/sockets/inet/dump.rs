//! Dump side: the TCP and UDP sockets of the job, their state and the bytes on their way
//! to them (see the module comment of `inet`).

use super::diag::{read_holders, Diag};
use super::net::*;
use super::options::{read_option, OPTIONS};
use super::TcpExternal;
use crate::error::{Error, Result, SysContext};
use crate::sockets::{getsockopt_int, setsockopt_int, sockopt};
use stasis_image::{CheckpointWriter, InetSocket, SocketOption};
use stasis_sys::inet_diag::{canonical, state, InetSock};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// The data file holding every IP socket's queued bytes.
const DATA_FILE: &str = "inet.img";
const MAX_DATAGRAMS: usize = 1 << 16;
/// How long settling one connection may take.
const SETTLE_LIMIT: Duration = Duration::from_secs(2);

/// Collects the TCP and UDP sockets of a checkpoint.
#[derive(Default)]
pub struct Collector {
    job: Vec<i32>,
    external: TcpExternal,
    /// Every socket inode the job's processes hold, with a first holder (pid, fd).
    holders: Option<std::rc::Rc<HashMap<u64, (i32, i32)>>>,
    diag: Option<Diag>,
    /// Option values of a new socket, by (family, type, protocol).
    defaults: HashMap<(i32, i32, i32), Vec<Option<i64>>>,
    socks: Vec<InetSocket>,
    saved: HashSet<u64>,
    /// The bytes queued in every socket, in the order saved (`inet.img`).
    blob: Vec<u8>,
    /// Sockets put in repair mode (dups of the job's), by inode, until `end_repair`.
    in_repair: Repairing,
    /// net.core.wmem_max and rmem_max: the largest buffers an application may ask for.
    buf_max: Option<(i64, i64)>,
    /// Established connections are read with TCP_REPAIR (the job's own network
    /// namespace).
    repair: bool,
    /// Bytes a receiver cannot take in yet may be drained through our memory.
    drain: bool,
    /// With `TcpExternal::Peer`: the addresses of the job's nodes.
    peer_nodes: Vec<std::net::IpAddr>,
    /// The holders and the kernel's view read in a thread from the start (see `new`).
    early: Option<std::thread::JoinHandle<Early>>,
}

/// What a collector's thread reads as soon as it is made: the job's sockets and, if
/// it holds any, the kernel's list of TCP and UDP sockets (inet_diag walks the
/// whole connection hash table, 7-12 ms with a few GiB of memory, whatever the
/// namespace holds: too long to wait for while the job is frozen).
type Early = (HashMap<u64, (i32, i32)>, Option<Result<Diag>>);

impl Collector {
    /// A collector for one checkpoint of the processes `job`. `drain`: a connection
    /// whose sender still holds bytes the receiver cannot take in yet may be saved by
    /// draining the receiver through our memory and sending everything back (see
    /// `settle`). Only where our death ends the job anyway (stasis init): killed in
    /// between, we would take the drained bytes with us.
    ///
    /// The job is frozen: what the collector will need is read at once, in a thread.
    pub fn new(job: Vec<i32>, external: TcpExternal, repair: bool, drain: bool) -> Collector {
        let pids = job.clone();
        let early = std::thread::spawn(move || {
            let holders = read_holders(&pids);
            let diag =
                (!holders.is_empty()).then(|| Diag::read(pids.first().copied().unwrap_or(0)));
            (holders, diag)
        });
        Collector {
            job,
            external,
            repair,
            drain,
            early: Some(early),
            ..Collector::default()
        }
    }

    /// Takes what the thread of `new` read (once). What it could not read is read
    /// again where needed, and fails there with the process that needed it.
    fn take_early(&mut self) {
        let Some(Ok((holders, diag))) = self.early.take().map(|h| h.join()) else {
            return;
        };
        self.holders
            .get_or_insert_with(|| std::rc::Rc::new(holders));
        if let (None, Some(Ok(d))) = (&self.diag, diag) {
            self.diag = Some(d);
        }
    }

    /// See [`crate::sockets::Collector::set_peer_nodes`].
    pub fn set_peer_nodes(&mut self, nodes: Vec<std::net::IpAddr>) {
        self.peer_nodes = nodes;
    }

    /// Puts socket `ino` (fd `fd` of `pid`, of which `ours` is a borrowed descriptor
    /// if we hold one) in repair mode, once; a descriptor of it is kept to take it
    /// out again.
    fn enter_repair(&mut self, pid: i32, fd: i32, ino: u64, ours: Option<i32>) -> Result<()> {
        if self.in_repair.0.contains_key(&ino) {
            return Ok(());
        }
        let kept = match ours {
            Some(r) => {
                // SAFETY: F_DUPFD_CLOEXEC of a descriptor we hold: a new one or -1.
                let dup = unsafe { libc::fcntl(r, libc::F_DUPFD_CLOEXEC, 0) };
                if dup < 0 {
                    return Err(std::io::Error::last_os_error())
                        .ctx(pid, || format!("fd {fd}: duplicating a borrowed socket"));
                }
                // SAFETY: `dup` was just created and is owned here.
                unsafe { OwnedFd::from_raw_fd(dup) }
            }
            None => crate::proc::borrow_fd(pid, fd)?,
        };
        let reuse = sockopt(kept.as_raw_fd(), libc::SO_REUSEADDR);
        super::repair::enter(kept.as_raw_fd()).ctx(pid, || format!("fd {fd}: TCP_REPAIR"))?;
        self.in_repair.0.insert(ino, (kept, reuse));
        Ok(())
    }

    /// Takes every socket out of repair mode (before the processes run again).
    pub fn end_repair(&mut self) {
        self.in_repair = Repairing::default();
    }

    /// Every socket the job holds (read once per checkpoint; shared, not copied).
    fn holders(&mut self) -> std::rc::Rc<HashMap<u64, (i32, i32)>> {
        self.take_early();
        let job = &self.job;
        let h = self
            .holders
            .get_or_insert_with(|| std::rc::Rc::new(read_holders(job)));
        h.clone()
    }

    fn defaults(&mut self, family: i32, ty: i32, proto: i32) -> &Vec<Option<i64>> {
        self.defaults.entry((family, ty, proto)).or_insert_with(|| {
            // SAFETY: socket() returns a new descriptor or -1.
            let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, proto) };
            if fd < 0 {
                return vec![None; OPTIONS.len()];
            }
            // SAFETY: fd was just created and is owned here.
            let fresh = unsafe { OwnedFd::from_raw_fd(fd) };
            OPTIONS
                .iter()
                .map(|o| read_option(fresh.as_raw_fd(), o))
                .collect()
        })
    }

    /// Saves the TCP or UDP socket `sock` (fd `fd` of process `pid`, borrowed), once.
    pub fn dump_fd(&mut self, pid: i32, fd: i32, ino: u64, sock: &OwnedFd) -> Result<u64> {
        if self.saved.contains(&ino) {
            return Ok(ino);
        }
        let s = sock.as_raw_fd();
        let family = sockopt(s, libc::SO_DOMAIN);
        let ty = sockopt(s, libc::SO_TYPE);
        let proto = sockopt(s, libc::SO_PROTOCOL);
        let unsupported = |what: String| Error::Unsupported {
            pid,
            what: format!("fd {fd}, {what}"),
        };
        match (ty, proto) {
            (libc::SOCK_STREAM, libc::IPPROTO_TCP) | (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => {}
            (libc::SOCK_RAW, p) => {
                return Err(unsupported(format!("a raw IP socket (protocol {p})")))
            }
            (libc::SOCK_DGRAM, libc::IPPROTO_ICMP | libc::IPPROTO_ICMPV6) => {
                return Err(unsupported("an ICMP (ping) socket".into()))
            }
            (_, p) => {
                return Err(unsupported(format!(
                    "an IP socket of type {ty} and protocol {p} (only TCP and UDP are saved)"
                )))
            }
        }
        self.take_early();
        if self.diag.is_none() {
            self.diag = Some(Diag::read(pid)?);
        }
        let defaults = self.defaults(family, ty, proto).clone();
        let buf_max = *self.buf_max.get_or_insert_with(|| {
            (
                sysctl("/proc/sys/net/core/wmem_max", 0, 212992),
                sysctl("/proc/sys/net/core/rmem_max", 0, 212992),
            )
        });
        let options = OPTIONS
            .iter()
            .zip(defaults)
            .filter(|(o, _)| {
                o.proto.is_none_or(|p| p == proto) && o.family.is_none_or(|f| f == family)
            })
            .filter_map(|(o, def)| {
                let v = match self.in_repair.0.get(&ino) {
                    // In repair mode (its peer was read first): as the application set it.
                    Some((_, reuse)) if o.name == "SO_REUSEADDR" => i64::from(*reuse),
                    _ => read_option(s, o)?,
                };
                // A buffer larger than an application may ask for grew by autotuning:
                // left to grow again.
                let autotuned = match o.name {
                    "SO_SNDBUF" => v > 2 * buf_max.0,
                    "SO_RCVBUF" => v > 2 * buf_max.1,
                    _ => false,
                };
                (Some(v) != def && !autotuned).then(|| SocketOption {
                    name: o.name.to_string(),
                    value: v,
                })
            })
            .collect();
        let local = local_of(s);
        let remote = name_of(s, true);
        let mut entry = InetSocket {
            id: ino,
            family: family_name(family).to_string(),
            protocol: if proto == libc::IPPROTO_TCP {
                "tcp"
            } else {
                "udp"
            }
            .to_string(),
            state: String::new(),
            local: local.map(|a| a.to_string()).unwrap_or_default(),
            remote: remote.map(|a| a.to_string()).unwrap_or_default(),
            peer: 0,
            pending_on: 0,
            peer_closed: false,
            backlog: 0,
            shutdown: 0,
            options,
            data_file: None,
            messages: Vec::new(),
            sources: Vec::new(),
            repair: None,
            data_offset: 0,
        };
        let data = if proto == libc::IPPROTO_TCP {
            self.dump_tcp(pid, fd, s, &mut entry)?
        } else {
            self.dump_udp(pid, fd, s, &mut entry)?
        };
        if !data.is_empty() {
            // Kept here and written once, with every other socket's, after the
            // processes run again (`finish`).
            entry.data_file = Some(DATA_FILE.to_string());
            entry.data_offset = self.blob.len() as u64;
            self.blob.extend_from_slice(&data);
            if entry.messages.is_empty() {
                entry.messages.push(data.len() as u64);
            }
        }
        self.socks.push(entry);
        self.saved.insert(ino);
        Ok(ino)
    }

    /// In a node's part of a multi-node job: refuses (for now: the checkpoint is tried
    /// again later) a connection from another node's part waiting in the accept queue
    /// of listener `e`. Neither end could be saved: no fd holds this one, so its bytes
    /// cannot be read, and the other node saves its end as a connection this part does
    /// not hold. One from this part itself is saved on the client's side (pending).
    fn refuse_unaccepted_from_nodes(&mut self, pid: i32, fd: i32, e: &InetSocket) -> Result<()> {
        let Some(at) = parse_addr(&e.local) else {
            return Ok(());
        };
        let holders = self.holders();
        let Some(d) = self.diag.as_ref() else {
            return Ok(());
        };
        let waiting = d.tcp_by_tuple.values().find(|c| {
            c.ino == 0
                && matches!(c.state, state::ESTABLISHED | state::CLOSE_WAIT)
                && binds(at, c.local)
                && super::remote::is_node(&self.peer_nodes, c.remote.ip())
                && !d
                    .tcp_by_tuple
                    .get(&(canonical(c.remote), canonical(c.local)))
                    .is_some_and(|client| holders.contains_key(&client.ino))
        });
        match waiting {
            Some(c) => Err(Error::Transient {
                pid,
                what: format!(
                    "fd {fd}, the TCP listener on {}, has a connection from {} (another node of the job) it has not accepted yet; it cannot be saved",
                    e.local, c.remote
                ),
            }),
            None => Ok(()),
        }
    }

    /// Fills in a TCP socket's state and returns the bytes on their way to it.
    fn dump_tcp(&mut self, pid: i32, fd: i32, s: i32, e: &mut InetSocket) -> Result<Vec<u8>> {
        let st = tcp_state(s);
        let diag = self
            .diag
            .as_ref()
            .and_then(|d| d.by_ino.get(&e.id))
            .cloned();
        match st {
            state::LISTEN => {
                e.state = "listening".into();
                e.backlog = diag.map_or(libc::SOMAXCONN as u32, |d| d.wqueue);
                if self.external == TcpExternal::Peer {
                    self.refuse_unaccepted_from_nodes(pid, fd, e)?;
                }
                return Ok(Vec::new());
            }
            state::CLOSE => {
                // Never connected, or a connection that ended (reset, both ends
                // closed): either way an unconnected socket, bound or not.
                e.state = if e.local.is_empty() {
                    "unbound"
                } else {
                    "bound"
                }
                .into();
                e.remote.clear();
                return Ok(Vec::new());
            }
            state::SYN_SENT | state::SYN_RECV => {
                return Err(Error::Transient {
                    pid,
                    what: format!(
                        "fd {fd}, a TCP connection to {} is still being set up",
                        e.remote
                    ),
                })
            }
            _ => {}
        }
        e.state = "connected".into();
        let (Some(local), Some(remote)) = (parse_addr(&e.local), parse_addr(&e.remote)) else {
            return Err(Error::Unsupported {
                pid,
                what: format!("fd {fd}, a connected TCP socket without addresses"),
            });
        };
        let own_shutdown = diag.as_ref().map_or(0, |d| d.shutdown);
        let holders = self.holders();
        let d = self.diag.as_ref().ok_or_else(|| Error::Unsupported {
            pid,
            what: "socket list".into(),
        })?;
        let peer = d
            .tcp_by_tuple
            .get(&(canonical(remote), canonical(local)))
            .cloned();
        let listener_of = |p: &InetSock| {
            d.listeners
                .iter()
                .find(|l| l.ino != 0 && binds(l.local, p.local))
                .map(|l| l.ino)
        };
        match peer {
            Some(p) if p.ino != 0 && holders.contains_key(&p.ino) => {
                e.peer = p.ino;
                // The FIN that ended our receiving side came from the peer.
                e.shutdown = if p.shutdown & SEND_SHUTDOWN != 0 {
                    own_shutdown & !RCV_SHUTDOWN
                } else {
                    own_shutdown
                };
                if self.repair && st == state::ESTABLISHED && p.state == state::ESTABLISHED {
                    // Both ends stop sending before either is read (they stay so
                    // until every socket is saved: `end_repair`).
                    self.enter_repair(pid, fd, e.id, Some(s))?;
                    let (hpid, hfd) = holders[&p.ino];
                    self.enter_repair(hpid, hfd, p.ino, None)?;
                    let (r, data) = super::repair::dump(pid, fd, s)?;
                    e.repair = Some(r);
                    return Ok(data);
                }
                if p.wqueue == 0 {
                    return peek_stream(pid, fd, s);
                }
                if p.shutdown & SEND_SHUTDOWN != 0 {
                    return Err(Error::Transient {
                        pid,
                        what: format!("fd {fd}, a TCP connection from {remote} whose sender closed with bytes the receiver cannot take in yet"),
                    });
                }
                let in_flight = ioctl_int(s, SIOCINQ).max(0) as u64 + u64::from(p.wqueue);
                // A receive buffer the application set is set again before the
                // connection is made: the receiver takes in half of it at least.
                let pinned = e
                    .options
                    .iter()
                    .find(|o| o.name == "SO_RCVBUF")
                    .map_or(0, |o| o.value.max(0) as u64 / 2);
                let limit = requeue_limit() + pinned;
                if in_flight > limit {
                    return Err(Error::Transient {
                        pid,
                        what: format!(
                            "fd {fd}, a TCP connection from {remote} holds {:.1} MiB in flight, more than a restart can put back into a new connection ({:.1} MiB: net.ipv4.tcp_wmem's largest send buffer and half a receive buffer)",
                            in_flight as f64 / 1048576.0,
                            limit as f64 / 1048576.0
                        ),
                    });
                }
                if !self.drain {
                    return Err(Error::Transient {
                        pid,
                        what: format!(
                            "fd {fd}, a TCP connection from {remote} whose sender holds bytes the receiver cannot take in yet (`checkpoint --pid` does not move them through its own memory, where a kill of stasis would lose them; under `stasis run` they are saved)"
                        ),
                    });
                }
                let (hpid, hfd) = holders[&p.ino];
                let sender = crate::proc::borrow_fd(hpid, hfd)?;
                settle(pid, fd, s, sender.as_raw_fd())
            }
            Some(p)
                if p.ino == 0
                    && matches!(p.state, state::ESTABLISHED | state::SYN_RECV)
                    && listener_of(&p).is_some_and(|l| holders.contains_key(&l)) =>
            {
                // The server end waits in the accept queue of a listener of ours.
                if p.rqueue > 0 {
                    return Err(Error::Transient {
                        pid,
                        what: format!("fd {fd}, a TCP connection to {remote} not yet accepted already carries data the server has not accepted (it cannot be saved)"),
                    });
                }
                e.pending_on = listener_of(&p).unwrap_or(0);
                e.shutdown = own_shutdown;
                peek_stream(pid, fd, s)
            }
            Some(p) if p.ino == 0 => {
                // The peer's process closed it (or it waits out TIME_WAIT).
                if p.wqueue > 0 {
                    return Err(Error::Transient {
                        pid,
                        what: format!("fd {fd}, a TCP connection from {remote}, closed by its peer, still has bytes on the way"),
                    });
                }
                e.peer_closed = true;
                e.shutdown = own_shutdown & !RCV_SHUTDOWN;
                peek_stream(pid, fd, s)
            }
            _ => match self.external {
                TcpExternal::Refuse => Err(Error::Unsupported {
                    pid,
                    what: format!(
                        "fd {fd}, a TCP connection from {local} to {remote}, outside the checkpoint (`--tcp-external=reset` saves it to come back reset),"
                    ),
                }),
                TcpExternal::Reset => {
                    e.state = "reset".into();
                    Ok(Vec::new())
                }
                TcpExternal::Peer if !super::remote::is_node(&self.peer_nodes, remote.ip()) => {
                    Err(Error::Unsupported {
                        pid,
                        what: format!(
                            "fd {fd}, a TCP connection from {local} to {remote}, which is neither in this part of the job nor on a node of the job,"
                        ),
                    })
                }
                TcpExternal::Peer => {
                    // Settled before the freeze was confirmed: nothing on its way.
                    let unacked = diag.as_ref().map_or(0, |d| d.wqueue);
                    if unacked > 0 {
                        return Err(Error::Unsupported {
                            pid,
                            what: format!("fd {fd}, a TCP connection from {local} to {remote} (another node) with {unacked} bytes its peer has not acknowledged"),
                        });
                    }
                    e.state = "remote".into();
                    e.shutdown = own_shutdown;
                    peek_stream(pid, fd, s)
                }
            },
        }
    }

    /// Fills in a UDP socket's state and returns its queued datagrams.
    fn dump_udp(&mut self, pid: i32, fd: i32, s: i32, e: &mut InetSocket) -> Result<Vec<u8>> {
        e.state = if !e.remote.is_empty() {
            "connected"
        } else if !e.local.is_empty() {
            "bound"
        } else {
            "unbound"
        }
        .into();
        e.shutdown = self
            .diag
            .as_ref()
            .and_then(|d| d.by_ino.get(&e.id))
            .map_or(0, |d| d.shutdown);
        let (data, lens, sources) = peek_datagrams(pid, fd, s)?;
        e.messages = lens;
        e.sources = sources.iter().map(|a| a.to_string()).collect();
        Ok(data)
    }

    /// The sockets saved, their queued bytes written into `inet.img`. A listener's
    /// pending connection from outside the checkpoint cannot come back: refused (or
    /// dropped with `--tcp-external=reset`).
    pub fn finish(self, writer: &mut CheckpointWriter) -> Result<Vec<InetSocket>> {
        if !self.blob.is_empty() {
            let mut w = writer.data_file(DATA_FILE)?;
            w.write_all(&self.blob)?;
            writer.finish_data(w)?;
        }
        if let Some(d) = &self.diag {
            let holders = self.holders.clone().unwrap_or_default();
            for l in self.socks.iter().filter(|s| s.state == "listening") {
                let Some(addr) = parse_addr(&l.local) else {
                    continue;
                };
                let pending_from_outside = d.tcp_by_tuple.values().find(|c| {
                    c.ino == 0
                        && matches!(c.state, state::ESTABLISHED | state::SYN_RECV)
                        && c.local.port() == addr.port()
                        && (addr.ip().is_unspecified()
                            || canonical(c.local).ip() == canonical(addr).ip())
                        && !d
                            .tcp_by_tuple
                            .get(&(canonical(c.remote), canonical(c.local)))
                            .is_some_and(|client| holders.contains_key(&client.ino))
                });
                if let Some(c) = pending_from_outside {
                    if self.external == TcpExternal::Refuse {
                        let (pid, fd) = holders.get(&l.id).copied().unwrap_or((0, -1));
                        return Err(Error::Unsupported {
                            pid,
                            what: format!(
                                "fd {fd}, a TCP listener on {} with a connection from {} (outside the checkpoint) not yet accepted",
                                l.local, c.remote
                            ),
                        });
                    }
                }
            }
        }
        Ok(self.socks)
    }
}

/// The most bytes in flight one direction of a connection may hold: what a new
/// connection surely takes in (the largest send buffer, `net.ipv4.tcp_wmem`'s third
/// value, and half a default receive buffer, `net.ipv4.tcp_rmem`'s second).
fn requeue_limit() -> u64 {
    (sysctl("/proc/sys/net/ipv4/tcp_wmem", 2, 4 << 20)
        + sysctl("/proc/sys/net/ipv4/tcp_rmem", 1, 128 << 10) / 2) as u64
}

/// Field `i` of a numeric sysctl file, or `default`.
fn sysctl(path: &str, i: usize, default: i64) -> i64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.split_whitespace().nth(i).and_then(|v| v.parse().ok()))
        .unwrap_or(default)
}

/// Reads a TCP receive queue without consuming it: one MSG_PEEK reads across all of
/// it; SO_PEEK_OFF (the socket's, shared with the application) is used only should
/// that come back short.
fn peek_stream(pid: i32, fd: i32, s: i32) -> Result<Vec<u8>> {
    let want = ioctl_int(s, SIOCINQ).max(0) as usize;
    if want == 0 {
        return Ok(Vec::new());
    }
    let mut data = vec![0u8; want];
    let recv_at = |data: &mut [u8], got: usize| {
        // SAFETY: receiving into the part of `data` not yet filled.
        let n = unsafe {
            libc::recv(
                s,
                data[got..].as_mut_ptr().cast(),
                want - got,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    };
    let ctx = || format!("reading the receive queue of TCP socket fd {fd}");
    let mut got = recv_at(&mut data, 0).ctx(pid, ctx)?;
    if got < want {
        got = 0;
        let walked = crate::sockets::with_peek_offset(s, || loop {
            match recv_at(&mut data, got) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    got += n;
                    if got >= want {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            }
        });
        match walked {
            Ok(r) => r.ctx(pid, ctx)?,
            // No peek offset: what the one peek read is all there is.
            Err(_) => got = recv_at(&mut data, 0).ctx(pid, ctx)?,
        }
    }
    if got != want {
        return Err(Error::Transient {
            pid,
            what: format!(
                "fd {fd}, a TCP receive queue that changed while read ({got} of {want} bytes)"
            ),
        });
    }
    Ok(data)
}

/// The peer `sender` still holds bytes for the receiver `s`: drains `s` until they
/// have all flowed in, then sends everything back through `sender` (the receiver's
/// process and its peer are frozen: nothing else reads or writes). Returns the bytes.
fn settle(pid: i32, fd: i32, s: i32, sender: i32) -> Result<Vec<u8>> {
    let corked = getsockopt_int(sender, libc::IPPROTO_TCP, libc::TCP_CORK) == Some(1);
    if corked {
        // Uncorking pushes out what the cork held back.
        let _ = setsockopt_int(sender, libc::IPPROTO_TCP, libc::TCP_CORK, 0);
    }
    let mut data = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let deadline = Instant::now() + SETTLE_LIMIT;
    let mut settled = false;
    loop {
        // SAFETY: receiving into a buffer we own.
        let n = unsafe { libc::recv(s, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            data.extend_from_slice(&buf[..n as usize]);
            continue;
        }
        if n == 0 || ioctl_int(sender, SIOCOUTQ) == 0 {
            settled = true;
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        poll_one(s, libc::POLLIN, 5);
    }
    let put_back = send_all(sender, &data, Instant::now() + SETTLE_LIMIT);
    if corked {
        let _ = setsockopt_int(sender, libc::IPPROTO_TCP, libc::TCP_CORK, 1);
    }
    if let Err(e) = put_back {
        tracing::error!("process {pid}: fd {fd}: {e}: bytes of this TCP connection were lost");
        return Err(e).ctx(pid, || {
            format!("fd {fd}: putting the bytes of a TCP connection back into it")
        });
    }
    if !settled {
        return Err(Error::Transient {
            pid,
            what: format!("fd {fd}, a TCP connection whose bytes in flight did not settle"),
        });
    }
    Ok(data)
}

/// Reads a UDP socket's datagrams without consuming them: (bytes, lengths, senders).
type Datagrams = (Vec<u8>, Vec<u64>, Vec<SocketAddr>);

fn peek_datagrams(pid: i32, fd: i32, s: i32) -> Result<Datagrams> {
    // Nothing queued: the socket's peek offset is not touched. (Asked with poll: a
    // peek without the offset would mark the first datagram peeked, and an empty one
    // so marked is passed over by the walk below.)
    let mut p = libc::pollfd {
        fd: s,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one initialized pollfd, without waiting.
    if unsafe { libc::poll(&mut p, 1, 0) } == 0 {
        return Ok((Vec::new(), Vec::new(), Vec::new()));
    }
    let mut out: Datagrams = (Vec::new(), Vec::new(), Vec::new());
    let mut buf = vec![0u8; 1 << 16];
    let walk = || {
        for _ in 0..MAX_DATAGRAMS {
            // SAFETY: sockaddr_storage is plain data; zeroed is a valid empty value.
            let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr is plain data; zeroed is a valid empty value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&mut from as *mut libc::sockaddr_storage).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            // SAFETY: msg points to live buffers of the sizes given.
            let n = unsafe { libc::recvmsg(s, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    return Ok(());
                }
                return Err(e).ctx(pid, || format!("reading the queue of UDP socket fd {fd}"));
            }
            out.0.extend_from_slice(&buf[..n as usize]);
            out.1.push(n as u64);
            out.2.push(
                from_sockaddr(&from)
                    .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
            );
        }
        Ok(())
    };
    crate::sockets::with_peek_offset(s, walk)
        .ctx(pid, || format!("reading the queue of UDP socket fd {fd}"))??;
    Ok(out)
}

/// Sockets in repair mode, by inode: taken out of it when dropped (on any error path
/// too, before the processes run again).
#[derive(Default)]
/// Each with its SO_REUSEADDR as the application left it (repair mode overrides it,
/// leaving it clears it: it is set back).
struct Repairing(HashMap<u64, (OwnedFd, i32)>);

impl Drop for Repairing {
    fn drop(&mut self) {
        for (_, (fd, reuse)) in self.0.drain() {
            super::repair::leave(fd.as_raw_fd());
            let _ = setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, reuse);
        }
    }
}
