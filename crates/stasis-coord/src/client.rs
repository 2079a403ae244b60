//! The client side: ask the coordinator for a global checkpoint.

use crate::agent::hostname;
use crate::protocol::{self, Msg, Role};
use anyhow::{bail, Context, Result};
use std::io::BufReader;
use std::net::TcpStream;
use std::time::Duration;

/// A published global checkpoint, as the coordinator reports it.
#[derive(Clone, Debug)]
pub struct Report {
    pub ckpt: u64,
    pub path: String,
    pub nodes: Vec<String>,
    pub freeze_ms: f64,
    pub dump_ms: f64,
    pub publish_ms: f64,
    pub total_ms: f64,
    pub warnings: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint {} of {} node{} published in {} (freeze {:.1} ms, dump {:.1} ms, publish {:.1} ms, total {:.1} ms)",
            self.ckpt,
            self.nodes.len(),
            if self.nodes.len() == 1 { "" } else { "s" },
            self.path,
            self.freeze_ms,
            self.dump_ms,
            self.publish_ms,
            self.total_ms
        )?;
        for w in &self.warnings {
            write!(f, "\nwarning: {w}")?;
        }
        Ok(())
    }
}

/// A client connection (one may ask for several checkpoints, one after the other).
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    peer: String,
}

impl Client {
    pub fn connect(addr: &str) -> Result<Client> {
        Client::connect_with(addr, (protocol::MIN_VERSION, protocol::VERSION))
    }

    /// Connects, retrying while the connection is refused (the coordinator not
    /// listening yet: started in the background by the same job script) for up to
    /// `wait`.
    pub fn connect_waiting(addr: &str, wait: Duration) -> Result<Client> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match Client::connect(addr) {
                Err(e)
                    if std::time::Instant::now() < deadline
                        && e.chain().any(|c| {
                            c.downcast_ref::<std::io::Error>()
                                .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
                        }) =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                r => return r,
            }
        }
    }

    /// Connects offering the protocol versions `versions` (min, max).
    pub fn connect_with(addr: &str, versions: (u32, u32)) -> Result<Client> {
        let peer = format!("the coordinator at {addr}");
        let stream =
            TcpStream::connect(addr).with_context(|| format!("cannot connect to {peer}"))?;
        let _ = stream.set_nodelay(true);
        let mut writer = stream.try_clone().context("socket")?;
        let _ = writer.set_write_timeout(Some(Duration::from_secs(10)));
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let mut reader = BufReader::new(stream);
        protocol::send(
            &mut writer,
            &Msg::Hello {
                version: versions.1,
                min_version: versions.0,
                role: Role::Client,
                node: hostname(),
                pid: std::process::id(),
                part: None,
                addresses: Vec::new(),
            },
        )
        .with_context(|| format!("cannot send hello to {peer}"))?;
        match protocol::recv(&mut reader, &peer)? {
            Some(Msg::Welcome { .. }) => {}
            Some(Msg::Refused { reason }) => bail!("{peer} refused: {reason}"),
            Some(m) => bail!("{peer} answered hello with {}", m.kind()),
            None => bail!("{peer} closed the connection during the handshake"),
        }
        // The answer comes when the checkpoint is done or abandoned: the coordinator
        // bounds that by its phase timeouts.
        let _ = reader.get_ref().set_read_timeout(None);
        Ok(Client {
            reader,
            writer,
            peer,
        })
    }

    /// Takes one global checkpoint (then kills the job with `kill`).
    pub fn checkpoint(&mut self, kill: bool) -> Result<Report> {
        protocol::send(&mut self.writer, &Msg::Checkpoint { kill })
            .with_context(|| format!("cannot send the request to {}", self.peer))?;
        match protocol::recv(&mut self.reader, &self.peer)? {
            Some(Msg::Done {
                ckpt,
                path,
                nodes,
                freeze_ms,
                dump_ms,
                publish_ms,
                total_ms,
                warnings,
            }) => Ok(Report {
                ckpt,
                path,
                nodes,
                freeze_ms,
                dump_ms,
                publish_ms,
                total_ms,
                warnings,
            }),
            Some(Msg::Error { reason }) => bail!("{reason}"),
            Some(m) => bail!("{} answered the request with {}", self.peer, m.kind()),
            None => bail!("{} closed the connection before answering", self.peer),
        }
    }

    /// Has the spare agent of `node` restart the node part in `dir` (protocol 2).
    pub fn place(&mut self, node: &str, dir: &str, rendezvous: &str) -> Result<()> {
        self.place_msg(Msg::Place {
            node: node.to_string(),
            dir: dir.to_string(),
            cmd: String::new(),
            rendezvous: rendezvous.to_string(),
        })
    }

    /// Has the spare agent of `node` start `cmd` (a command line for `bash -c`) as a
    /// new part of the job (protocol 2; `stasis ssh`).
    pub fn start_on(&mut self, node: &str, cmd: &str) -> Result<()> {
        self.place_msg(Msg::Place {
            node: node.to_string(),
            dir: String::new(),
            cmd: cmd.to_string(),
            rendezvous: String::new(),
        })
    }

    fn place_msg(&mut self, msg: Msg) -> Result<()> {
        protocol::send(&mut self.writer, &msg)
            .with_context(|| format!("cannot send the request to {}", self.peer))?;
        match protocol::recv(&mut self.reader, &self.peer)? {
            Some(Msg::Placed { .. }) => Ok(()),
            Some(Msg::Error { reason }) => bail!("{reason}"),
            Some(m) => bail!("{} answered the request with {}", self.peer, m.kind()),
            None => bail!("{} closed the connection before answering", self.peer),
        }
    }
}
