//! The application interface's server (docs/API.md), in the init.
//!
//! The init listens on an abstract UNIX socket named after the checkpoint directory
//! (`@stasis-api-HASH`, in the job's network namespace) and passes its name to the
//! application in the environment (`STASIS_API`). Only processes of the job (of the
//! init's PID namespace) are accepted. Every connection is read without blocking
//! from the init's poll loop: `hello`, `getenv` and `sync` are answered at once, a
//! `checkpoint` request is taken up by the loop ([`Server::requested`]), and every
//! checkpoint, whoever asked for it, first sends `event pre-checkpoint N` to the
//! processes that want it and waits for their `ack N` up to the hook timeout
//! ([`Server::before_checkpoint`]); one that does not answer in time is checkpointed
//! anyway, with a warning. Connections re-made by a restore are adopted with their
//! `restarted` event already queued ([`Server::adopt`]).

use anyhow::{anyhow, Context, Result};
use stasis_app::protocol::{self, Reply, Request};
use stasis_core::sockets::appapi::Remade;
use stasis_core::sockets::ApiPeers;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// One application connection.
struct Conn {
    stream: UnixStream,
    /// Inode of our end (what the application's end is connected to).
    ino: u64,
    /// The process that connected (for messages).
    pid: i32,
    /// Bytes read, not yet a whole line.
    buf: Vec<u8>,
    /// It said hello (or was re-made by a restore).
    hello: bool,
    /// It wants pre-checkpoint events.
    pre_checkpoint: bool,
    /// It waits for a checkpoint.
    wants_checkpoint: bool,
    /// The last pre-checkpoint event sent to it, and the last it acknowledged.
    event: u64,
    acked: u64,
    /// The connection ended (or broke the protocol): dropped at the next service.
    closed: bool,
}

impl Conn {
    fn new(stream: UnixStream, pid: i32) -> Result<Conn> {
        stream
            .set_nonblocking(true)
            .context("the application interface's connection")?;
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", stream.as_raw_fd()))
            .map(|m| m.ino())
            .context("the inode of an application interface connection")?;
        Ok(Conn {
            stream,
            ino,
            pid,
            buf: Vec::new(),
            hello: false,
            pre_checkpoint: false,
            wants_checkpoint: false,
            event: 0,
            acked: 0,
            closed: false,
        })
    }

    /// Sends a line without waiting: a process that lets its connection fill up is
    /// not waited for, its connection is closed.
    fn send(&mut self, r: &Reply) {
        if self.closed {
            return;
        }
        let line = r.line();
        // SAFETY: sending a buffer we own on our socket.
        let n = unsafe {
            libc::send(
                self.stream.as_raw_fd(),
                line.as_ptr().cast(),
                line.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n != line.len() as isize {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EPIPE) && e.raw_os_error() != Some(libc::ECONNRESET) {
                eprintln!(
                    "stasis: warning: process {} does not read its connection to the stasis interface ({e}): closed",
                    self.pid
                );
            }
            self.closed = true;
        }
    }

    /// Reads what has come; returns the whole lines (an endless line is dropped as
    /// it comes).
    fn read(&mut self) -> Vec<String> {
        let mut chunk = [0u8; 16384];
        let mut lines = Vec::new();
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.closed = true;
                    break;
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    lines.extend(protocol::take_lines(&mut self.buf));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.closed = true;
                    break;
                }
            }
        }
        lines
    }

    fn handle(&mut self, line: &str) {
        let reply = match Request::parse(line) {
            Err((verb, message)) => Reply::Error { verb, message },
            Ok(Request::Hello {
                version,
                pre_checkpoint,
            }) => {
                if version == 0 {
                    Reply::Error {
                        verb: "hello".into(),
                        message: "protocol version 0 does not exist".into(),
                    }
                } else {
                    self.hello = true;
                    self.pre_checkpoint = pre_checkpoint;
                    Reply::Hello {
                        version: version.min(protocol::VERSION),
                    }
                }
            }
            Ok(_) if !self.hello => Reply::Error {
                verb: line.split(' ').next().unwrap_or_default().into(),
                message: "say hello first".into(),
            },
            Ok(Request::Checkpoint) => {
                self.wants_checkpoint = true;
                return;
            }
            Ok(Request::Ack(n)) => {
                // Only the event sent last counts (an earlier stasis's events have
                // other numbers).
                if n == self.event {
                    self.acked = n;
                }
                return;
            }
            Ok(Request::Sync(n)) => Reply::Synced(n),
            Ok(Request::Getenv(name)) => getenv(&name),
        };
        self.send(&reply);
    }
}

/// The value of an environment variable of ours (the supervising stasis's).
fn getenv(name: &[u8]) -> Reply {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let missing = |message: String| Reply::Error {
        verb: "getenv".into(),
        message,
    };
    if name.is_empty() || name.contains(&b'=') || name.contains(&0) {
        return missing("not a variable name".into());
    }
    match std::env::var_os(std::ffi::OsStr::from_bytes(name)) {
        Some(v) => {
            let r = Reply::Value(v.into_vec());
            if r.line().len() > protocol::MAX_LINE {
                missing("its value is too long for the protocol".into())
            } else {
                r
            }
        }
        None => missing(format!("{} is not set", String::from_utf8_lossy(name))),
    }
}

/// The process (in our PID namespace) at the other end of `s`, 0 if it is outside it.
fn peer_pid(s: &UnixStream) -> i32 {
    crate::control::peer_cred(s).map_or(0, |c| c.pid)
}

/// The server.
pub(super) struct Server {
    listener: UnixListener,
    listener_ino: u64,
    address: String,
    conns: Vec<Conn>,
    /// How long a pre-checkpoint event is waited for.
    timeout: Duration,
    /// The number of the last pre-checkpoint event: they start at the time the
    /// server did (in microseconds), so that a late ack for the event of the stasis
    /// before a restart is not taken for one of ours.
    events: u64,
}

/// Whether process `pid` is stopped (by job control, or traced): its hook cannot run.
fn is_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        })
        .is_some_and(|state| state == 'T' || state == 't')
}

impl Server {
    /// Listens on the interface's socket for the job of `dir` (canonical).
    pub fn listen(dir: &Path, timeout: Duration) -> Result<Server> {
        use std::os::linux::net::SocketAddrExt;
        let h = xxhash_rust::xxh3::xxh3_64(dir.as_os_str().as_encoded_bytes());
        let name = format!("stasis-api-{h:016x}");
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .context("building the application interface's address")?;
        let listener = UnixListener::bind_addr(&addr)
            .map_err(|e| anyhow!("binding the application interface's socket @{name}: {e}"))?;
        listener
            .set_nonblocking(true)
            .context("the application interface's socket")?;
        let listener_ino = std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
            .map(|m| m.ino())
            .context("the inode of the application interface's socket")?;
        Ok(Server {
            listener,
            listener_ino,
            address: format!("@{name}"),
            conns: Vec::new(),
            timeout,
            events: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_micros() as u64),
        })
    }

    /// The value of `STASIS_API` for the job.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Takes over the connections a restore re-made (their `restarted` event queued).
    pub fn adopt(&mut self, remade: Vec<Remade>) {
        for r in remade {
            let Remade {
                fd,
                pid,
                pre_checkpoint,
            } = r;
            let stream = UnixStream::from(fd);
            match Conn::new(stream, pid) {
                Ok(mut c) => {
                    c.hello = true;
                    c.pre_checkpoint = pre_checkpoint;
                    self.conns.push(c);
                }
                Err(e) => eprintln!(
                    "stasis: warning: process {pid}: its connection to the stasis interface: {e:#}"
                ),
            }
        }
    }

    /// The descriptors to poll: the listener and every connection.
    pub fn fds(&self) -> Vec<i32> {
        std::iter::once(self.listener.as_raw_fd())
            .chain(self.conns.iter().map(|c| c.stream.as_raw_fd()))
            .collect()
    }

    /// Accepts whoever connected, reads every connection and answers what can be
    /// answered at once.
    pub fn service(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            let pid = peer_pid(&stream);
            if pid <= 0 {
                // Not a process of the job (another user's, on the host network).
                continue;
            }
            match Conn::new(stream, pid) {
                Ok(c) => self.conns.push(c),
                Err(e) => eprintln!("stasis: warning: process {pid}: {e:#}"),
            }
        }
        for c in &mut self.conns {
            for line in c.read() {
                c.handle(&line);
            }
        }
        self.conns.retain(|c| !c.closed);
    }

    /// A process that asked for a checkpoint, if one waits.
    pub fn requested(&self) -> Option<i32> {
        self.conns
            .iter()
            .find(|c| c.wants_checkpoint)
            .map(|c| c.pid)
    }

    /// Sends `pre-checkpoint` to every process that wants it and waits for their
    /// acknowledgements, up to the hook timeout. Returns a warning for each process
    /// that did not answer in time.
    pub fn before_checkpoint(&mut self) -> Vec<String> {
        self.service();
        self.events += 1;
        let n = self.events;
        let mut warnings = Vec::new();
        for c in self
            .conns
            .iter_mut()
            .filter(|c| c.hello && c.pre_checkpoint)
        {
            if is_stopped(c.pid) {
                warnings.push(format!(
                    "process {} is stopped: its pre-checkpoint hook cannot run before this checkpoint",
                    c.pid
                ));
                continue;
            }
            c.event = n;
            c.send(&Reply::PreCheckpoint(n));
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let waiting: Vec<i32> = self
                .conns
                .iter()
                .filter(|c| c.event == n && c.acked < n && !c.closed)
                .map(|c| c.stream.as_raw_fd())
                .collect();
            let left = deadline.saturating_duration_since(Instant::now());
            if waiting.is_empty() || left.is_zero() {
                break;
            }
            let mut fds: Vec<libc::pollfd> = waiting
                .iter()
                .map(|&fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: poll on initialized pollfds of ours.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            self.service();
        }
        let secs = self.timeout.as_secs_f64();
        warnings.extend(
            self.conns
                .iter()
                .filter(|c| c.event == n && c.acked < n && !c.closed)
                .map(|c| {
                    format!(
                        "process {} did not acknowledge the pre-checkpoint event within {secs:.0} s (its pre-checkpoint hook had not returned; see --hook-timeout): checkpointed anyway",
                        c.pid
                    )
                }),
        );
        warnings
    }

    /// Our side of the interface, for the checkpoint.
    pub fn peers(&self) -> ApiPeers {
        ApiPeers {
            listener: self.listener_ino,
            conns: self
                .conns
                .iter()
                .map(|c| (c.ino, c.hello && c.pre_checkpoint))
                .collect(),
        }
    }

    /// Answers the processes that asked for a checkpoint: it was taken at `path`, or
    /// failed.
    pub fn after_checkpoint(&mut self, result: std::result::Result<&Path, String>) {
        let reply = match result {
            Ok(path) => Reply::Checkpointed {
                path: path.to_string_lossy().into_owned(),
            },
            Err(message) => Reply::Error {
                verb: "checkpoint".into(),
                message,
            },
        };
        for c in self.conns.iter_mut().filter(|c| c.wants_checkpoint) {
            c.wants_checkpoint = false;
            c.send(&reply);
        }
        self.conns.retain(|c| !c.closed);
    }
}
