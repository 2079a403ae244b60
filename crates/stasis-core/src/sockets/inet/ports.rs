//! Listener ports moved at a restart that puts several node parts on one node.
//!
//! Parts that ran on different nodes may listen on the same port (OpenMPI's TCP
//! transport takes the first free port from 1024 on every node). Restarted on one
//! node, the second part's listener cannot have its port back: it listens on a free
//! one instead ([`record`]), and every old address of the part says so in the
//! rendezvous: `ports-FIRSTIP` (the job's first addresses, which the processes know)
//! and `nports-NODEIP` (its node's at checkpoint time, which the restore knows) hold
//! one line `OLDPORT NEWPORT` per moved port, written once the part's listeners exist
//! and before it waits for anyone ([`publish`]; empty when nothing moved). Whoever
//! then connects to OLDIP:OLDPORT (the re-making of connections between nodes, a
//! redirected connect of the job) reads the file of that address, waiting for it
//! ([`peer_port`]); the names the processes
//! see go the other way ([`old_port`], [`own_old_port`]). Processes keep the ports
//! they learnt at the job's start through any number of restarts: a checkpoint
//! carries the moves it was restarted with (`port_map`), and a restart publishes
//! where each of those ports is now.

use super::remote::plain_ip;
use stasis_image::PortMove;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a connect waits for the part of a node to say where its ports are.
const WAIT: Duration = Duration::from_secs(120);

/// This restore's moves: (old port, new port).
static MOVES: Mutex<Vec<(u16, u16)>> = Mutex::new(Vec::new());
/// What this part stands for: the addresses of the job's first start, its node's
/// addresses at checkpoint time, and the moves its checkpoint carried (set by
/// `publish_addresses`, published by [`publish`]).
struct Own {
    originals: Vec<IpAddr>,
    node: Vec<IpAddr>,
    carried: Vec<PortMove>,
}
static OWN: Mutex<Own> = Mutex::new(Own {
    originals: Vec::new(),
    node: Vec::new(),
    carried: Vec::new(),
});

/// Sets what [`publish`] publishes besides this restore's moves.
pub(super) fn set_own(originals: Vec<IpAddr>, node: Vec<IpAddr>, carried: &[PortMove]) {
    if let Ok(mut o) = OWN.lock() {
        *o = Own {
            originals,
            node,
            carried: carried.to_vec(),
        };
    }
}

/// Records that a listener of this part on `old` listens on `new` now.
pub(super) fn record(old: u16, new: u16) {
    if let Ok(mut m) = MOVES.lock() {
        m.push((old, new));
    }
}

/// The addresses of the job's first start this part stands for.
pub(super) fn own_olds() -> Vec<IpAddr> {
    OWN.lock().map(|o| o.originals.clone()).unwrap_or_default()
}

/// The rendezvous file naming the old address of whatever is at `ip`, `port`.
fn note_file(dir: &Path, ip: IpAddr, port: u16) -> std::path::PathBuf {
    dir.join(format!("src-{}-{port}", plain_ip(ip)))
}

/// Notes in the rendezvous that `local` (a listener, or the local end of a
/// connection, of this part, at the node's new address) stands for this part's first
/// old address: several parts restarted on one node share its address, and a peer
/// accepting from, or connected to, `local` tells them apart by it. A local address
/// of any IP is noted at the node's address.
pub(super) fn note_local(dir: &Path, local: std::net::SocketAddr) {
    let Some(own) = own_olds().first().copied() else {
        return;
    };
    let ip = match plain_ip(local.ip()) {
        ip if ip.is_unspecified() => match super::remote::here() {
            Some(h) => plain_ip(h),
            None => return,
        },
        ip => ip,
    };
    let at = note_file(dir, ip, local.port());
    let tmp = super::remote::unique_tmp(dir, &format!("src-{ip}-{}", local.port()));
    if std::fs::write(&tmp, own.to_string()).is_ok() && std::fs::rename(&tmp, &at).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The old address noted for `ip`, `port` (see [`note_local`]).
pub(super) fn noted(dir: &Path, ip: IpAddr, port: u16) -> Option<IpAddr> {
    std::fs::read_to_string(note_file(dir, ip, port))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Notes `local` in the rendezvous of this restart, if any (see [`note_local`]).
pub(super) fn note_here(local: Option<std::net::SocketAddr>) {
    if let (Some(dir), Some(l)) = (super::remote::rendezvous(), local) {
        note_local(&dir, l);
    }
}

fn moves() -> Vec<(u16, u16)> {
    MOVES.lock().map(|m| m.clone()).unwrap_or_default()
}

/// Where this part's port `port` is now.
pub(super) fn own_port(port: u16) -> u16 {
    now_of(&moves(), port)
}

/// Where `port` is now, by the moves `lines` (old port, new port).
fn now_of(lines: &[(u16, u16)], port: u16) -> u16 {
    lines
        .iter()
        .find(|(o, _)| *o == port)
        .map_or(port, |(_, n)| *n)
}

/// The port a process of this part knows for its own port `port` (None: unmoved).
pub(super) fn own_old_port(port: u16) -> Option<u16> {
    moves().iter().find(|(_, n)| *n == port).map(|(o, _)| *o)
}

/// Which addresses a ports file is keyed by: those of the job's first start (what
/// the processes know) or the nodes' at checkpoint time (what the restore knows).
#[derive(Clone, Copy)]
pub(super) enum Keyed {
    Original,
    Node,
}

fn file(dir: &Path, keyed: Keyed, ip: IpAddr) -> std::path::PathBuf {
    dir.join(format!("{}-{}", prefix(keyed), plain_ip(ip)))
}

fn prefix(keyed: Keyed) -> &'static str {
    match keyed {
        Keyed::Original => "ports",
        Keyed::Node => "nports",
    }
}

/// Writes `ports-OLDIP` for each address of the job's first start this part stands
/// for (this restore's moves, and the ports known from before earlier restarts where
/// they are now) and `nports-NODEIP` for each of its node's addresses at checkpoint
/// time (this restore's moves); nothing without a rendezvous.
pub(super) fn publish() -> std::result::Result<(), String> {
    let Some(dir) = super::remote::rendezvous() else {
        return Ok(());
    };
    let dir = dir.as_path();
    let (originals, node, carried) = OWN
        .lock()
        .map(|o| (o.originals.clone(), o.node.clone(), o.carried.clone()))
        .unwrap_or_default();
    let moves = moves();
    let write = |keyed: Keyed, ip: IpAddr, lines: &[(u16, u16)]| {
        let text: String = lines.iter().map(|(o, n)| format!("{o} {n}\n")).collect();
        let at = file(dir, keyed, ip);
        let tmp = super::remote::unique_tmp(dir, &format!("{}-{}", prefix(keyed), plain_ip(ip)));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &at))
            .map_err(|e| format!("{}: {e}", at.display()))
    };
    for ip in &originals {
        let mut lines: Vec<(u16, u16)> = moves.clone();
        for c in &carried {
            if c.address.parse::<IpAddr>().map(plain_ip) == Ok(plain_ip(*ip)) {
                lines.push((c.port, own_port(c.now)));
            }
        }
        write(Keyed::Original, *ip, &lines)?;
    }
    for ip in &node {
        write(Keyed::Node, *ip, &moves)?;
    }
    Ok(())
}

fn read(dir: &Path, keyed: Keyed, ip: IpAddr) -> Option<Vec<(u16, u16)>> {
    let text = std::fs::read_to_string(file(dir, keyed, ip)).ok()?;
    Some(
        text.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace().map(|p| p.parse::<u16>().ok());
                Some((w.next()??, w.next()??))
            })
            .collect(),
    )
}

/// Where port `port` of the node that had address `old` is now, waiting for that
/// node's part to say (its file names every moved port).
pub(super) fn peer_port(
    dir: &Path,
    keyed: Keyed,
    old: IpAddr,
    port: u16,
) -> std::result::Result<u16, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(now) = known_port(dir, keyed, old, port) {
            return Ok(now);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the part of the node that had address {old} did not say where its ports are within {} s (see {})",
                WAIT.as_secs(),
                dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where port `port` of the node that had address `old` is now (None: that node's
/// part has not said yet).
pub(super) fn known_port(dir: &Path, keyed: Keyed, old: IpAddr, port: u16) -> Option<u16> {
    Some(now_of(&read(dir, keyed, old)?, port))
}

/// The port the job's processes know for port `now` of the node that had address
/// `old` (None: unmoved, or not known yet).
pub(super) fn old_port(dir: &Path, old: IpAddr, now: u16) -> Option<u16> {
    read(dir, Keyed::Original, old)?
        .iter()
        .find(|(_, n)| *n == now)
        .map(|(o, _)| *o)
}

/// The ports the job's processes may know that are elsewhere now, from the rendezvous
/// this part was restarted through (what a checkpoint saves as `port_map`).
pub fn current_port_map() -> Vec<PortMove> {
    let Some(dir) = super::remote::rendezvous() else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<PortMove> = rd
        .flatten()
        .filter_map(|e| {
            let ip: IpAddr = e
                .file_name()
                .to_str()?
                .strip_prefix("ports-")?
                .parse()
                .ok()?;
            Some((ip, read(&dir, Keyed::Original, ip)?))
        })
        .flat_map(|(ip, lines)| {
            lines
                .into_iter()
                .filter(|(o, n)| o != n)
                .map(move |(port, now)| PortMove {
                    address: ip.to_string(),
                    port,
                    now,
                })
        })
        .collect();
    out.sort_by(|a, b| (&a.address, a.port).cmp(&(&b.address, b.port)));
    out
}
