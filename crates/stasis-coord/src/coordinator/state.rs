//! The coordinator's state machine: the agents and clients, the global checkpoint in
//! progress (its round: freeze, dump, publish, resume/kill, or abort) and the
//! placements of a multi-node restart. One thread runs it; everything arrives as an
//! [`Event`](super::net::Event).

use super::net::Event;
use super::publish::{partial_name, publish, published};
use super::Config;
use crate::protocol::{self, Msg, Role};
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

struct Peer {
    role: Role,
    /// The protocol version it speaks.
    version: u32,
    /// "agent 3 (node n1, pid 1234)"
    name: String,
    node: String,
    /// Its place among the parts of a checkpoint: (the part it restarted, else
    /// u32::MAX; the order it became an agent in).
    order: (u32, u32),
    /// Its node's addresses.
    addresses: Vec<String>,
    writer: TcpStream,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Freezing,
    Dumping,
    Finishing,
    Aborting,
}

impl Phase {
    fn verb(self) -> &'static str {
        match self {
            Phase::Freezing => "freeze",
            Phase::Dumping => "dump",
            Phase::Finishing => "resume",
            Phase::Aborting => "abort",
        }
    }
}

pub(super) struct Round {
    pub(super) ckpt: u64,
    pub(super) kill: bool,
    client: u64,
    /// The agents of this checkpoint, in part order (node-0, node-1, ...).
    pub(super) members: Vec<u64>,
    pub(super) nodes: Vec<String>,
    phase: Phase,
    waiting: BTreeSet<u64>,
    deadline: Instant,
    started: Instant,
    frozen_at: Option<Instant>,
    dumped_at: Option<Instant>,
    published_at: Option<Instant>,
    pub(super) staging: PathBuf,
    published: Option<PathBuf>,
    pub(super) bytes: BTreeMap<u64, u64>,
    /// Why it is being abandoned.
    reason: Option<String>,
    /// Abandoned because a part met a passing state (it is tried again).
    passing: bool,
    /// 1 for the first try of a client's checkpoint, then one more per retry.
    attempt: u32,
    /// When its first try started.
    first_started: Instant,
    warnings: Vec<String>,
}

/// How many times a checkpoint abandoned on a passing state of the job (a part
/// answered `failed` with `passing`) is tried in all, and the wait before the n-th
/// retry: 50 ms, doubling up to 2 s (about 5 s in all, the job running meanwhile).
pub(super) const PASSING_ATTEMPTS: u32 = 8;

fn retry_delay(retry: u32) -> Duration {
    Duration::from_millis((50u64 << retry.saturating_sub(1).min(6)).min(2000))
}

/// A client's checkpoint to be tried again at `at` (see [`PASSING_ATTEMPTS`]).
struct Retry {
    client: u64,
    kill: bool,
    attempt: u32,
    first_started: Instant,
    at: Instant,
}

pub(super) struct State {
    config: Config,
    peers: BTreeMap<u64, Peer>,
    next_index: u32,
    queue: VecDeque<(u64, bool)>,
    round: Option<Round>,
    /// A checkpoint abandoned on a passing state, waiting to be tried again (before
    /// anything queued).
    retry: Option<Retry>,
    /// Spare agents restarting a node part, and the client that asked for it.
    placing: BTreeMap<u64, u64>,
    /// Asked to stop: exits once no checkpoint is in progress or asked for.
    stopping: bool,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl State {
    pub(super) fn new(config: Config) -> State {
        State {
            config,
            peers: BTreeMap::new(),
            next_index: 0,
            queue: VecDeque::new(),
            round: None,
            retry: None,
            placing: BTreeMap::new(),
            stopping: false,
        }
    }

    pub(super) fn run(mut self, rx: Receiver<Event>) {
        loop {
            if self.round.is_none() {
                if let Some(Retry {
                    client,
                    kill,
                    attempt,
                    first_started,
                    ..
                }) = self.retry.take_if(|r| r.at <= Instant::now())
                {
                    self.start(client, kill, attempt, first_started);
                    continue;
                }
                if self.retry.is_none() {
                    if let Some((client, kill)) = self.queue.pop_front() {
                        self.start(client, kill, 1, Instant::now());
                        continue;
                    }
                    if self.stopping {
                        info!("coordinator: stopping (no checkpoint in progress)");
                        return;
                    }
                }
            }
            let now = Instant::now();
            let wait = match (&self.round, &self.retry) {
                (Some(r), _) => r.deadline.saturating_duration_since(now),
                (None, Some(retry)) => retry.at.saturating_duration_since(now),
                (None, None) => Duration::from_secs(3600),
            };
            match rx.recv_timeout(wait) {
                Ok(ev) => self.event(ev),
                Err(RecvTimeoutError::Timeout) => self.check_deadline(),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn send(&mut self, conn: u64, msg: &Msg) -> bool {
        let Some(p) = self.peers.get_mut(&conn) else {
            return false;
        };
        match protocol::send(&mut p.writer, msg) {
            Ok(()) => true,
            Err(e) => {
                warn!("coordinator: cannot send {} to {}: {e}", msg.kind(), p.name);
                false
            }
        }
    }

    fn name(&self, conn: u64) -> String {
        self.peers
            .get(&conn)
            .map(|p| p.name.clone())
            .unwrap_or_else(|| format!("connection {conn}"))
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Joined {
                conn,
                role,
                node,
                pid,
                part,
                addresses,
                version,
                writer,
            } => {
                let index = if role == Role::Client {
                    0
                } else {
                    self.next_index += 1;
                    self.next_index - 1
                };
                let name = match role {
                    Role::Agent => format!("agent {index} (node {node}, pid {pid})"),
                    Role::Spare => format!("spare agent {index} (node {node}, pid {pid})"),
                    Role::Client => format!("client (node {node}, pid {pid})"),
                };
                if role != Role::Client {
                    info!("coordinator: {name} joined");
                }
                self.peers.insert(
                    conn,
                    Peer {
                        role,
                        version,
                        name,
                        node,
                        order: (part.unwrap_or(u32::MAX), index),
                        addresses,
                        writer,
                    },
                );
                let timeout_ms = self.config.timeout.as_millis() as u64;
                if !self.send(
                    conn,
                    &Msg::Welcome {
                        version,
                        agent: index,
                        timeout_ms,
                    },
                ) {
                    self.closed(conn, "could not be welcomed".into());
                }
            }
            Event::Msg { conn, msg } => self.message(conn, msg),
            Event::Closed { conn, why } => self.closed(conn, why),
            Event::Stop => self.stopping = true,
        }
    }

    fn closed(&mut self, conn: u64, why: String) {
        let name = self.name(conn);
        let Some(peer) = self.peers.remove(&conn) else {
            return;
        };
        if peer.role != Role::Client {
            info!("coordinator: {name} left: {why}");
        }
        // A client that went away before its turn asked for nothing.
        self.queue.retain(|(c, _)| *c != conn);
        if self.retry.as_ref().is_some_and(|r| r.client == conn) {
            self.retry = None;
        }
        if let Some(client) = self.placing.remove(&conn) {
            self.reply(
                client,
                &Msg::Error {
                    reason: format!("{name} was lost while restarting its part ({why})"),
                },
            );
        }
        let Some(r) = self.round.as_mut() else {
            return;
        };
        if !r.members.contains(&conn) {
            return;
        }
        match r.phase {
            Phase::Freezing | Phase::Dumping => {
                let verb = r.phase.verb();
                self.abort(format!(
                    "{name} was lost during {verb} ({why}); has its agent or node died?"
                ));
            }
            Phase::Finishing | Phase::Aborting => {
                if r.waiting.remove(&conn) {
                    r.warnings.push(format!(
                        "{name} was lost before confirming {} ({why})",
                        r.phase.verb()
                    ));
                }
                self.progress();
            }
        }
    }

    fn message(&mut self, conn: u64, msg: Msg) {
        let role = match self.peers.get(&conn) {
            Some(p) => p.role,
            None => return,
        };
        if let Msg::Checkpoint { kill } = msg {
            if role != Role::Client {
                warn!(
                    "coordinator: {} asked for a checkpoint; ignored",
                    self.name(conn)
                );
                return;
            }
            self.queue.push_back((conn, kill));
            return;
        }
        if let Msg::Place {
            node,
            dir,
            cmd,
            rendezvous,
        } = msg
        {
            if role == Role::Client {
                self.place(conn, node, dir, cmd, rendezvous);
            }
            return;
        }
        if let Msg::Restored { dir } | Msg::RestoreFailed { dir, .. } = &msg {
            let Some(client) = self.placing.remove(&conn) else {
                return;
            };
            let reply = match &msg {
                Msg::RestoreFailed { error, .. } => Msg::Error {
                    reason: format!("{}: restarting {dir}: {error}", self.name(conn)),
                },
                _ => {
                    let Some(p) = self.peers.get_mut(&conn) else {
                        return;
                    };
                    p.role = Role::Agent;
                    p.name = p.name.replacen("spare agent", "agent", 1);
                    // After the agents already in the job, unless it restarted part K
                    // of a checkpoint: then K-th.
                    let part = super::part_number(dir);
                    p.order = (part.unwrap_or(u32::MAX), self.next_index);
                    self.next_index += 1;
                    info!("coordinator: {} runs the part of {dir} now", p.name);
                    Msg::Placed {
                        node: p.node.clone(),
                    }
                }
            };
            self.reply(client, &reply);
            return;
        }
        let name = self.name(conn);
        let Some(r) = self.round.as_mut() else {
            debug!(
                "coordinator: {} from {name} outside a checkpoint; ignored",
                msg.kind()
            );
            return;
        };
        if msg.ckpt() != Some(r.ckpt) || !r.members.contains(&conn) {
            debug!("coordinator: stale {} from {name}; ignored", msg.kind());
            return;
        }
        match (r.phase, &msg) {
            (Phase::Freezing, Msg::Frozen { .. })
            | (Phase::Finishing, Msg::Resumed { .. } | Msg::Killed { .. })
            | (Phase::Aborting, Msg::Aborted { .. } | Msg::Failed { .. }) => {
                r.waiting.remove(&conn);
            }
            (Phase::Dumping, Msg::Dumped { bytes, .. }) => {
                r.bytes.insert(conn, *bytes);
                r.waiting.remove(&conn);
            }
            (Phase::Freezing | Phase::Dumping, Msg::Failed { error, passing, .. }) => {
                r.passing = *passing;
                let verb = r.phase.verb();
                let ckpt = r.ckpt;
                self.abort(format!(
                    "{name} could not {verb} for checkpoint {ckpt}: {error}"
                ));
                return;
            }
            (Phase::Finishing, Msg::Failed { error, .. }) => {
                r.warnings.push(format!("{name}: {error}"));
                r.waiting.remove(&conn);
            }
            _ => {
                warn!(
                    "coordinator: unexpected {} from {name} during {}; ignored",
                    msg.kind(),
                    r.phase.verb()
                );
                return;
            }
        }
        self.progress();
    }

    /// A client asks for the node part in `dir` to be restarted on `node`, by the
    /// spare agent there.
    fn place(&mut self, client: u64, node: String, dir: String, cmd: String, rendezvous: String) {
        if self.round.is_some() || self.retry.is_some() || !self.queue.is_empty() {
            self.reply(
                client,
                &Msg::Error {
                    reason: "a checkpoint is in progress; restart once it is done".into(),
                },
            );
            return;
        }
        let spare = self
            .peers
            .iter()
            .find(|(c, p)| p.role == Role::Spare && p.node == node && !self.placing.contains_key(c))
            .map(|(c, p)| (*c, p.version));
        let reason = match spare {
            None => Some(format!(
                "no spare agent on node {node}: start `stasis agent --coordinator ADDR` there first (as a batch system's prolog or srun would)"
            )),
            Some((_, v)) if v < 2 => Some(format!(
                "the agent on node {node} speaks protocol version {v}, which cannot restart parts; use the same stasis release on every node"
            )),
            Some(_) => None,
        };
        if let Some(reason) = reason {
            self.reply(client, &Msg::Error { reason });
            return;
        }
        let Some((spare, _)) = spare else {
            return;
        };
        info!("coordinator: restarting {dir} on node {node}");
        if self.send(
            spare,
            &Msg::Restore {
                dir: dir.clone(),
                cmd,
                rendezvous,
            },
        ) {
            self.placing.insert(spare, client);
        } else {
            self.reply(
                client,
                &Msg::Error {
                    reason: format!("cannot reach the spare agent on node {node}"),
                },
            );
        }
    }

    fn next_number(&self) -> Result<u64> {
        let dir = &self.config.dir;
        let mut n = published(dir)?.last().copied().unwrap_or(0);
        // Numbers are never reused, even of abandoned ones still being removed.
        for e in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let name = e
                .with_context(|| format!("cannot list {}", dir.display()))?
                .file_name();
            if let Some(m) = name
                .to_str()
                .and_then(|s| s.strip_prefix(".checkpoint-"))
                .and_then(|s| s.strip_suffix(".partial"))
                .and_then(|s| s.parse::<u64>().ok())
            {
                n = n.max(m);
            }
        }
        Ok(n + 1)
    }

    /// Starts try `attempt` (from 1; the first started at `first_started`) of the
    /// checkpoint `client` asked for.
    fn start(&mut self, client: u64, kill: bool, attempt: u32, first_started: Instant) {
        let mut members: Vec<((u32, u32), u64)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.role == Role::Agent)
            .map(|(c, p)| (p.order, *c))
            .collect();
        members.sort_unstable();
        let members: Vec<u64> = members.into_iter().map(|(_, c)| c).collect();
        if members.is_empty() {
            self.reply(
                client,
                &Msg::Error {
                    reason: "no agent holding a part of the job has joined this coordinator".into(),
                },
            );
            return;
        }
        let ckpt = match self.next_number() {
            Ok(n) => n,
            Err(e) => {
                self.reply(
                    client,
                    &Msg::Error {
                        reason: format!("{e:#}"),
                    },
                );
                return;
            }
        };
        let staging = self.config.dir.join(partial_name(ckpt));
        if let Err(e) = fs::create_dir(&staging) {
            let reason = format!("cannot create {}: {e}", staging.display());
            self.reply(client, &Msg::Error { reason });
            return;
        }
        let nodes = members.iter().map(|c| self.peers[c].node.clone()).collect();
        info!(
            "coordinator: checkpoint {ckpt}: freezing {} agents{}",
            members.len(),
            if kill { " (then killing)" } else { "" }
        );
        let now = Instant::now();
        self.round = Some(Round {
            ckpt,
            kill,
            client,
            waiting: members.iter().copied().collect(),
            members: members.clone(),
            nodes,
            phase: Phase::Freezing,
            deadline: now + self.config.timeout,
            started: now,
            frozen_at: None,
            dumped_at: None,
            published_at: None,
            staging,
            published: None,
            bytes: BTreeMap::new(),
            reason: None,
            passing: false,
            attempt,
            first_started,
            warnings: Vec::new(),
        });
        let mut nodes_addrs: Vec<String> = members
            .iter()
            .filter_map(|c| self.peers.get(c))
            .flat_map(|p| p.addresses.iter().cloned())
            .collect();
        nodes_addrs.sort();
        nodes_addrs.dedup();
        for c in members {
            if !self.send(
                c,
                &Msg::Freeze {
                    ckpt,
                    nodes: nodes_addrs.clone(),
                },
            ) {
                let name = self.name(c);
                self.abort(format!("cannot send freeze to {name}"));
                return;
            }
        }
    }

    /// Moves the round on once nobody is waited for.
    fn progress(&mut self) {
        let Some(r) = self.round.as_mut() else {
            return;
        };
        if !r.waiting.is_empty() {
            return;
        }
        let ckpt = r.ckpt;
        match r.phase {
            Phase::Freezing => {
                r.frozen_at = Some(Instant::now());
                r.phase = Phase::Dumping;
                r.waiting = r.members.iter().copied().collect();
                r.deadline = Instant::now() + self.config.timeout;
                let sends: Vec<(u64, Msg)> = r
                    .members
                    .iter()
                    .enumerate()
                    .map(|(k, c)| {
                        let dir = r.staging.join(format!("node-{k}"));
                        let dir = dir.to_string_lossy().into_owned();
                        (*c, Msg::Dump { ckpt, dir })
                    })
                    .collect();
                info!("coordinator: checkpoint {ckpt}: all frozen, dumping");
                for (c, m) in sends {
                    if !self.send(c, &m) {
                        let name = self.name(c);
                        self.abort(format!("cannot send dump to {name}"));
                        return;
                    }
                }
            }
            Phase::Dumping => {
                r.dumped_at = Some(Instant::now());
                match publish(&self.config.dir, r) {
                    Ok(path) => {
                        r.published_at = Some(Instant::now());
                        info!(
                            "coordinator: checkpoint {ckpt}: published {}",
                            path.display()
                        );
                        r.published = Some(path);
                    }
                    Err(e) => {
                        self.abort(format!("cannot publish checkpoint {ckpt}: {e:#}"));
                        return;
                    }
                }
                r.phase = Phase::Finishing;
                r.waiting = r.members.iter().copied().collect();
                r.deadline = Instant::now() + self.config.timeout;
                let msg = if r.kill {
                    Msg::Kill { ckpt }
                } else {
                    Msg::Resume { ckpt }
                };
                let members = r.members.clone();
                for c in members {
                    if !self.send(c, &msg) {
                        let name = self.name(c);
                        if let Some(r) = self.round.as_mut() {
                            r.waiting.remove(&c);
                            r.warnings
                                .push(format!("cannot send {} to {name}", msg.kind()));
                        }
                    }
                }
                self.progress();
            }
            Phase::Finishing | Phase::Aborting => self.finish(),
        }
    }

    fn check_deadline(&mut self) {
        let Some(r) = self.round.as_ref() else {
            return;
        };
        if Instant::now() < r.deadline {
            return;
        }
        let waiting: Vec<u64> = r.waiting.iter().copied().collect();
        let late: Vec<String> = waiting.iter().map(|c| self.name(*c)).collect();
        let late = late.join(", ");
        let secs = self.config.timeout.as_secs_f64();
        let r = self.round.as_mut().expect("round checked above");
        match r.phase {
            Phase::Freezing | Phase::Dumping => {
                let verb = r.phase.verb();
                let ckpt = r.ckpt;
                self.abort(format!(
                    "{late} did not {verb} for checkpoint {ckpt} within {secs:.1} s (the coordinator's --timeout)"
                ));
            }
            Phase::Finishing | Phase::Aborting => {
                r.warnings.push(format!(
                    "{late} did not confirm {} within {secs:.1} s",
                    r.phase.verb()
                ));
                r.waiting.clear();
                self.finish();
            }
        }
    }

    /// Abandons the current round: every member still there is told to abort (and
    /// resumes), the partial checkpoint is removed, the client is answered once the
    /// aborts are confirmed (or timed out).
    fn abort(&mut self, reason: String) {
        let Some(r) = self.round.as_mut() else {
            return;
        };
        let ckpt = r.ckpt;
        warn!("coordinator: checkpoint {ckpt} abandoned: {reason}");
        r.reason = Some(reason);
        r.phase = Phase::Aborting;
        r.deadline = Instant::now() + self.config.timeout;
        r.waiting.clear();
        if let Err(e) = fs::remove_dir_all(&r.staging) {
            if e.kind() != std::io::ErrorKind::NotFound {
                r.warnings
                    .push(format!("cannot remove {}: {e}", r.staging.display()));
            }
        }
        let members = r.members.clone();
        for c in members {
            if self.peers.contains_key(&c) && self.send(c, &Msg::Abort { ckpt }) {
                if let Some(r) = self.round.as_mut() {
                    r.waiting.insert(c);
                }
            }
        }
        self.progress();
    }

    fn finish(&mut self) {
        let Some(r) = self.round.take() else {
            return;
        };
        let msg = match (&r.reason, &r.published) {
            (None, Some(path)) => {
                let frozen = r.frozen_at.unwrap_or(r.started);
                let dumped = r.dumped_at.unwrap_or(frozen);
                let published = r.published_at.unwrap_or(dumped);
                for w in &r.warnings {
                    warn!("coordinator: checkpoint {}: {w}", r.ckpt);
                }
                Msg::Done {
                    ckpt: r.ckpt,
                    path: path.to_string_lossy().into_owned(),
                    nodes: r.nodes.clone(),
                    freeze_ms: ms(frozen - r.started),
                    dump_ms: ms(dumped - frozen),
                    publish_ms: ms(published - dumped),
                    total_ms: ms(r.started.elapsed()),
                    warnings: r.warnings.clone(),
                }
            }
            (reason, _) => {
                // Removed again: a member that was still writing its part when the
                // round was abandoned has finished by the time it confirmed the abort.
                if let Err(e) = fs::remove_dir_all(&r.staging) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        warn!("coordinator: cannot remove {}: {e}", r.staging.display());
                    }
                }
                if r.passing && r.attempt < PASSING_ATTEMPTS && self.peers.contains_key(&r.client) {
                    let delay = retry_delay(r.attempt);
                    for w in &r.warnings {
                        warn!("coordinator: checkpoint {}: {w}", r.ckpt);
                    }
                    warn!(
                        "coordinator: checkpoint {} met a passing state of the job; trying again in {} ms (try {} of {PASSING_ATTEMPTS})",
                        r.ckpt,
                        delay.as_millis(),
                        r.attempt + 1
                    );
                    self.retry = Some(Retry {
                        client: r.client,
                        kill: r.kill,
                        attempt: r.attempt + 1,
                        first_started: r.first_started,
                        at: Instant::now() + delay,
                    });
                    return;
                }
                let mut reason = format!(
                    "checkpoint {} abandoned, nothing published, the job runs on: {}",
                    r.ckpt,
                    reason.as_deref().unwrap_or("unknown reason")
                );
                if r.passing && r.attempt > 1 {
                    reason.push_str(&format!(
                        " (tried {} times over {:.1} s, each meeting a passing state of the job)",
                        r.attempt,
                        r.first_started.elapsed().as_secs_f64()
                    ));
                }
                for w in &r.warnings {
                    reason.push_str(&format!("; {w}"));
                }
                Msg::Error { reason }
            }
        };
        self.reply(r.client, &msg);
    }

    fn reply(&mut self, client: u64, msg: &Msg) {
        if !self.send(client, msg) {
            debug!("coordinator: the client that asked for the checkpoint is gone");
        }
    }
}
