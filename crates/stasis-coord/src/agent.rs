//! The agent side: connects to the coordinator and drives the node's local part of the
//! job through the phases of every global checkpoint.
//!
//! The checkpoint engine plugs in through [`LocalPart`]; in this phase only a simulated
//! part exists ([`crate::simulate::Simulated`]).

use crate::protocol::{self, Msg, Role};
use anyhow::{bail, Context, Result};
use std::io::BufReader;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;
use tracing::{info, warn};

/// The node's part of the job, as the agent drives it. Every call is made from the
/// agent's thread, one at a time. An error leaves the part running (the agent calls
/// `abort` after a failed `freeze` or `dump`, so an implementation may leave that to
/// it).
pub trait LocalPart {
    /// Stops every process of the part (nothing runs until resume, kill or abort).
    fn freeze(&mut self, ckpt: u64) -> Result<()>;
    /// The addresses of every node of the checkpoint about to be frozen (TCP
    /// connections to them are between parts of the job).
    fn nodes(&mut self, nodes: &[String]) {
        let _ = nodes;
    }
    /// Writes the frozen part into `dir` (which it creates) and syncs it; returns the
    /// bytes written.
    fn dump(&mut self, ckpt: u64, dir: &Path) -> Result<u64>;
    /// The checkpoint is published: let the part run on.
    fn resume(&mut self, ckpt: u64) -> Result<()>;
    /// The checkpoint is published: kill the part.
    fn kill(&mut self, ckpt: u64) -> Result<()>;
    /// The checkpoint is abandoned (by the coordinator, or by the agent when the
    /// coordinator went silent): let the part run on, whatever phase it is in; what
    /// `dump` wrote may be left (the coordinator removes the partial checkpoint).
    fn abort(&mut self, ckpt: u64) -> Result<()>;
    /// A spare agent's node is given the node part in `dir` to restart (protocol 2),
    /// meeting the other restarted parts in `rendezvous`: once it runs, the agent
    /// takes part in checkpoints.
    /// A spare agent's node is given a command line (for `bash -c`) to start as a new
    /// part of the job (protocol 2, `stasis ssh`): the agent then takes part in
    /// checkpoints.
    fn start(&mut self, cmd: &str) -> Result<()> {
        bail!("cannot start {cmd:?} here: this agent has no engine")
    }
    fn restore(&mut self, dir: &Path, rendezvous: Option<&Path>) -> Result<()> {
        let _ = rendezvous;
        bail!(
            "cannot restart {} here: this agent has no engine",
            dir.display()
        )
    }
}

/// The error of a [`LocalPart`] step that met a passing state of the part (one that
/// cannot be saved now but may be a moment later): the coordinator tries the
/// checkpoint again.
#[derive(Debug)]
pub struct Passing(pub String);

impl std::fmt::Display for Passing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Passing {}

/// `failed` for a step of checkpoint `ckpt` that failed with `e` (passing when `e` is
/// a [`Passing`]).
fn failed(ckpt: u64, error: String, e: &anyhow::Error) -> Msg {
    Msg::Failed {
        ckpt,
        error,
        passing: e.downcast_ref::<Passing>().is_some(),
    }
}

/// A part that refuses to be checkpointed (an agent without an engine).
pub struct Unplugged(pub String);

impl LocalPart for Unplugged {
    fn freeze(&mut self, _: u64) -> Result<()> {
        bail!("{}", self.0)
    }
    fn dump(&mut self, _: u64, _: &Path) -> Result<u64> {
        bail!("{}", self.0)
    }
    fn resume(&mut self, _: u64) -> Result<()> {
        Ok(())
    }
    fn kill(&mut self, _: u64) -> Result<()> {
        bail!("{}", self.0)
    }
    fn abort(&mut self, _: u64) -> Result<()> {
        Ok(())
    }
}

/// How an agent introduces itself.
#[derive(Clone, Debug)]
pub struct Options {
    /// The node's name (its hostname by default).
    pub node: String,
    pub role: Role,
    /// The protocol versions offered (min, max); normally protocol::MIN_VERSION..VERSION.
    pub versions: (u32, u32),
    /// How long to try to reach the coordinator (it may still be starting).
    pub connect_timeout: Duration,
    /// The node part of a global checkpoint this agent restarts (its place in the
    /// next global checkpoints).
    pub part: Option<u32>,
    /// This node's addresses (sent in `hello`).
    pub addresses: Vec<String>,
}

impl Options {
    pub fn new(role: Role) -> Options {
        Options {
            node: hostname(),
            role,
            versions: (protocol::MIN_VERSION, protocol::VERSION),
            connect_timeout: Duration::from_secs(30),
            part: None,
            addresses: Vec::new(),
        }
    }
}

/// This machine's (this UTS namespace's) host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// A connection to the coordinator after a successful handshake.
pub struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// "the coordinator at ADDR"
    peer: String,
    /// The version spoken.
    pub version: u32,
    /// The number the coordinator gave this agent.
    pub agent: u32,
    /// The coordinator's per-phase timeout.
    pub timeout: Duration,
    node: String,
}

/// Connects to `addr` (retrying while refused, up to `opts.connect_timeout`) and
/// shakes hands. A refusal (version mismatch) is an error with the coordinator's reason.
pub fn connect(addr: &str, opts: &Options) -> Result<Connection> {
    let peer = format!("the coordinator at {addr}");
    let deadline = std::time::Instant::now() + opts.connect_timeout;
    let stream = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot connect to {peer}")),
        }
    };
    let _ = stream.set_nodelay(true);
    let mut writer = stream
        .try_clone()
        .with_context(|| format!("connection to {peer}"))?;
    let _ = writer.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(stream);
    protocol::send(
        &mut writer,
        &Msg::Hello {
            version: opts.versions.1,
            min_version: opts.versions.0,
            role: opts.role,
            node: opts.node.clone(),
            pid: std::process::id(),
            part: opts.part,
            addresses: opts.addresses.clone(),
        },
    )
    .with_context(|| format!("cannot send hello to {peer}"))?;
    match protocol::recv(&mut reader, &peer)? {
        Some(Msg::Welcome {
            version,
            agent,
            timeout_ms,
        }) => {
            let _ = reader.get_ref().set_read_timeout(None);
            Ok(Connection {
                reader,
                writer,
                peer,
                version,
                agent,
                timeout: Duration::from_millis(timeout_ms),
                node: opts.node.clone(),
            })
        }
        Some(Msg::Refused { reason }) => bail!("{peer} refused this agent: {reason}"),
        Some(other) => bail!("{peer} answered hello with {}", other.kind()),
        None => bail!("{peer} closed the connection during the handshake"),
    }
}

/// How serving ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The part was killed after checkpoint N was published (exit with 75).
    Killed(u64),
    /// The coordinator closed the connection or could not be read (the part runs).
    CoordinatorGone(String),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Local {
    Running,
    Frozen(u64),
    Dumped(u64),
}

impl Connection {
    /// The longest the part stays frozen (or dumped, waiting for resume) without a word
    /// from the coordinator: its freeze and dump phases, plus a margin. After that the
    /// agent abandons the checkpoint itself and lets the part run on.
    pub fn hold_limit(&self) -> Duration {
        self.timeout * 2 + Duration::from_secs(5)
    }

    fn send(&mut self, msg: &Msg) -> Result<()> {
        protocol::send(&mut self.writer, msg)
            .with_context(|| format!("cannot send {} to {}", msg.kind(), self.peer))
    }

    /// Serves checkpoints until the part is killed or the coordinator goes away. The
    /// part is never left frozen: when the coordinator is lost or silent for longer
    /// than [`Connection::hold_limit`], the part is resumed (`abort`).
    pub fn serve(mut self, part: &mut dyn LocalPart) -> Outcome {
        let me = format!("agent {} (node {})", self.agent, self.node);
        let mut local = Local::Running;
        let mut abandoned: Option<u64> = None;
        loop {
            let hold = match local {
                Local::Running => None,
                _ => Some(self.hold_limit()),
            };
            let _ = self.reader.get_ref().set_read_timeout(hold);
            let msg = match protocol::recv(&mut self.reader, &self.peer) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    release(part, local, &me);
                    return Outcome::CoordinatorGone(format!(
                        "{} closed the connection",
                        self.peer
                    ));
                }
                Err(e) => {
                    let timed_out = e.chain().any(|c| {
                        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                            matches!(
                                io.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            )
                        })
                    });
                    if timed_out {
                        if let Local::Frozen(n) | Local::Dumped(n) = local {
                            warn!(
                                "{me}: no word from {} for {:.0} s during checkpoint {n}; abandoning it and letting the job run on",
                                self.peer,
                                self.hold_limit().as_secs_f64()
                            );
                            release(part, local, &me);
                            local = Local::Running;
                            abandoned = Some(n);
                            continue;
                        }
                    }
                    release(part, local, &me);
                    return Outcome::CoordinatorGone(format!("{e:#}"));
                }
            };
            let reply = match msg {
                Msg::Freeze { ckpt, nodes } => {
                    part.nodes(&nodes);
                    if local != Local::Running {
                        Msg::Failed {
                            ckpt,
                            error: format!("{me} is still in another checkpoint ({local:?})"),
                            passing: false,
                        }
                    } else {
                        info!("{me}: freezing for checkpoint {ckpt}");
                        match part.freeze(ckpt) {
                            Ok(()) => {
                                local = Local::Frozen(ckpt);
                                Msg::Frozen { ckpt }
                            }
                            Err(e) => {
                                let _ = part.abort(ckpt);
                                failed(ckpt, format!("{me}: {e:#}"), &e)
                            }
                        }
                    }
                }
                Msg::Dump { ckpt, dir } => {
                    if local != Local::Frozen(ckpt) {
                        let why = if abandoned == Some(ckpt) {
                            "abandoned it after waiting too long for the coordinator".to_string()
                        } else {
                            format!("is not frozen for it ({local:?})")
                        };
                        Msg::Failed {
                            ckpt,
                            error: format!("{me} {why}"),
                            passing: false,
                        }
                    } else {
                        info!("{me}: dumping checkpoint {ckpt} into {dir}");
                        match part.dump(ckpt, Path::new(&dir)) {
                            Ok(bytes) => {
                                local = Local::Dumped(ckpt);
                                Msg::Dumped { ckpt, bytes }
                            }
                            Err(e) => {
                                let _ = part.abort(ckpt);
                                local = Local::Running;
                                failed(ckpt, format!("{me}: writing {dir}: {e:#}"), &e)
                            }
                        }
                    }
                }
                Msg::Resume { ckpt } => {
                    let r = if local == Local::Dumped(ckpt) {
                        part.resume(ckpt)
                    } else {
                        Ok(()) // already running (it abandoned the wait itself)
                    };
                    local = Local::Running;
                    match r {
                        Ok(()) => Msg::Resumed { ckpt },
                        Err(e) => Msg::Failed {
                            ckpt,
                            error: format!("{me}: resuming: {e:#}"),
                            passing: false,
                        },
                    }
                }
                Msg::Kill { ckpt } => {
                    if local != Local::Dumped(ckpt) {
                        Msg::Failed {
                            ckpt,
                            error: format!("{me} was told to kill but is not dumped ({local:?})"),
                            passing: false,
                        }
                    } else {
                        match part.kill(ckpt) {
                            Ok(()) => {
                                let _ = self.send(&Msg::Killed { ckpt });
                                return Outcome::Killed(ckpt);
                            }
                            Err(e) => {
                                let _ = part.abort(ckpt);
                                local = Local::Running;
                                Msg::Failed {
                                    ckpt,
                                    error: format!("{me}: killing: {e:#}"),
                                    passing: false,
                                }
                            }
                        }
                    }
                }
                Msg::Abort { ckpt } => {
                    if matches!(local, Local::Frozen(n) | Local::Dumped(n) if n == ckpt) {
                        info!("{me}: checkpoint {ckpt} abandoned, resuming");
                        if let Err(e) = part.abort(ckpt) {
                            warn!("{me}: resuming after checkpoint {ckpt} was abandoned: {e:#}");
                        }
                        local = Local::Running;
                    }
                    Msg::Aborted { ckpt }
                }
                Msg::Restore {
                    dir,
                    cmd,
                    rendezvous,
                } => {
                    if local != Local::Running {
                        Msg::RestoreFailed {
                            dir,
                            error: format!("{me} is in a checkpoint ({local:?})"),
                        }
                    } else {
                        if cmd.is_empty() {
                            info!("{me}: restarting the part in {dir}");
                        } else {
                            info!("{me}: starting {cmd:?} as a part of the job");
                        }
                        let rv = (!rendezvous.is_empty()).then(|| Path::new(&rendezvous));
                        let r = if cmd.is_empty() {
                            part.restore(Path::new(&dir), rv)
                        } else {
                            part.start(&cmd)
                        };
                        match r {
                            Ok(()) => Msg::Restored { dir },
                            Err(e) => Msg::RestoreFailed {
                                dir,
                                error: format!("{e:#}"),
                            },
                        }
                    }
                }
                other => {
                    warn!(
                        "{me}: unexpected {} from {}; ignored",
                        other.kind(),
                        self.peer
                    );
                    continue;
                }
            };
            if let Err(e) = self.send(&reply) {
                release(part, local, &me);
                return Outcome::CoordinatorGone(format!("{e:#}"));
            }
        }
    }
}

/// Lets a frozen or dumped part run on.
fn release(part: &mut dyn LocalPart, local: Local, me: &str) {
    if let Local::Frozen(n) | Local::Dumped(n) = local {
        if let Err(e) = part.abort(n) {
            warn!("{me}: resuming after checkpoint {n} was abandoned: {e:#}");
        }
    }
}
