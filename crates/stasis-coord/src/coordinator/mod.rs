//! The coordinator: accepts agents and checkpoint clients, and runs each global
//! checkpoint as a two-phase commit (freeze everywhere, then dump everywhere, then
//! publish by one rename, then resume or kill; abort on any failure or timeout).
//!
//! One thread accepts connections, one thread per connection reads its messages, and
//! one thread (the caller of [`Coordinator::serve`]) owns all state and all writing:
//! every message and every closed connection arrives on one channel, so the state
//! machine (`state`) is plain sequential code.
//!
//! Files: `net` (the accepting and reading threads), `state` (the state machine of
//! rounds and placements), `publish` (checkpoint names, publishing by rename).

mod net;
mod publish;
mod state;

pub use publish::{checkpoint_name, part_number, published};

use anyhow::{Context, Result};
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;
use tracing::warn;

/// How the coordinator runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where global checkpoints go (DIR/checkpoint-NNNNNN/node-K).
    pub dir: PathBuf,
    /// How long every agent has for each phase (freeze, dump, resume/kill, abort).
    pub timeout: Duration,
    /// How long a new connection has to send its `hello`.
    pub hello_timeout: Duration,
}

impl Config {
    pub fn new(dir: impl Into<PathBuf>) -> Config {
        Config {
            dir: dir.into(),
            timeout: Duration::from_secs(120),
            hello_timeout: Duration::from_secs(10),
        }
    }
}

/// A bound coordinator, not yet serving.
pub struct Coordinator {
    listener: TcpListener,
    config: Config,
}

impl Coordinator {
    /// Binds `addr` (e.g. `0.0.0.0:7070`; port 0 picks one) and prepares the checkpoint
    /// directory: created (mode 0700) if missing; partial checkpoints left by a
    /// coordinator that died are removed.
    pub fn bind(addr: &str, config: Config) -> Result<Coordinator> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = &config.dir;
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
        }
        for e in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".checkpoint-") && name.ends_with(".partial") {
                warn!(
                    "removing {}, left by an abandoned checkpoint",
                    e.path().display()
                );
                fs::remove_dir_all(e.path())
                    .with_context(|| format!("cannot remove {}", e.path().display()))?;
            }
        }
        let listener =
            TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        Ok(Coordinator { listener, config })
    }

    /// The address agents and clients connect to.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().context("listening socket")
    }

    /// Serves until the process ends (or the listener fails).
    pub fn serve(self) -> Result<()> {
        self.serve_until(None)
    }

    /// Serves until `stop` receives (or is dropped): then once the checkpoint in
    /// progress, and those asked for, are done (their clients answered).
    pub fn serve_until(self, stop: Option<Receiver<()>>) -> Result<()> {
        let (tx, rx) = channel();
        if let Some(stop) = stop {
            let tx = tx.clone();
            std::thread::Builder::new()
                .name("coord-stop".into())
                .spawn(move || {
                    let _ = stop.recv();
                    let _ = tx.send(net::Event::Stop);
                })
                .context("cannot start the coordinator's stopping thread")?;
        }
        let listener = self.listener;
        let hello_timeout = self.config.hello_timeout;
        std::thread::Builder::new()
            .name("coord-accept".into())
            .spawn(move || net::accept_loop(listener, tx, hello_timeout))
            .context("cannot start the coordinator's accepting thread")?;
        state::State::new(self.config).run(rx);
        Ok(())
    }

    /// Serves in a thread of its own (for tests and the benchmark).
    pub fn spawn(self) -> Result<SocketAddr> {
        let addr = self.local_addr()?;
        std::thread::Builder::new()
            .name("coordinator".into())
            .spawn(move || {
                if let Err(e) = self.serve() {
                    warn!("coordinator: {e:#}");
                }
            })
            .context("cannot start the coordinator thread")?;
        Ok(addr)
    }
}
