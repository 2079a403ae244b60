//! Jobs that span several nodes: `stasis coordinator`, `stasis agent`, `stasis
//! checkpoint --coordinator` and the hidden benchmark `stasis coord-bench`, on top of
//! the stasis-coord crate; `stasis restart --coordinator` and `stasis ssh` are in
//! [`place`].
//!
//! An agent with a command runs it under `stasis run` (its own init, in a fresh local
//! directory) and speaks for it to the coordinator: each phase of a global checkpoint
//! is a step of one coordinated checkpoint on the init's control socket
//! ([`EnginePart`], `control::Coordinated`). An agent's part can also be simulated
//! (`--simulate`).

pub mod place;

use anyhow::{bail, Context, Result};
pub use place::{agents_wait, restart, ssh};
use stasis_coord::agent::{self, LocalPart, Outcome};
use stasis_coord::client::Client;
use stasis_coord::coordinator::{Config, Coordinator};
use stasis_coord::protocol::{self, Role};
use stasis_coord::simulate::{Phase, Simulated};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

/// `stasis coordinator`: serves until killed.
pub fn coordinator(listen: &str, dir: &Path, timeout: Duration, quiet: bool) -> Result<ExitCode> {
    let mut cfg = Config::new(dir);
    cfg.timeout = timeout;
    let c = Coordinator::bind(listen, cfg)?;
    let addr = c.local_addr()?;
    if !quiet {
        // One write: stderr is unbuffered, and `eprintln!` writes each piece of its
        // format apart, so a script reading the address could see half a line.
        let line = format!(
            "stasis coordinator: listening on {addr}, checkpoints in {}\n",
            dir.display()
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }
    // SIGTERM, SIGINT or SIGHUP (a job script ending, Slurm cancelling the job): the
    // checkpoint in progress is finished and its client answered first; a second one
    // stops at once.
    let signals = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    let set = crate::supervise::sigset(&signals);
    // SAFETY: blocking signals in this thread before any other starts (they inherit it).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let mut sfd = crate::supervise::signalfd(&set)?;
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut asked = false;
            while let Some(sig) = crate::supervise::read_signal(&mut sfd) {
                if asked {
                    std::process::exit(128 + sig);
                }
                asked = true;
                if !quiet {
                    eprintln!(
                        "stasis coordinator: stopping once no checkpoint is in progress (again to stop now)"
                    );
                }
                let _ = stop_tx.send(());
            }
        })
        .context("cannot start the coordinator's signal thread")?;
    c.serve_until(Some(stop_rx))?;
    Ok(ExitCode::SUCCESS)
}

/// How `stasis agent` simulates its local part (hidden test options included).
pub struct Simulation {
    pub enabled: bool,
    pub delays: Vec<String>,
    pub fail: Option<String>,
    /// The first this many dumps meet a passing state.
    pub passing: u32,
    pub state_file: Option<PathBuf>,
}

impl Simulation {
    /// No simulation: the part is real.
    pub fn off() -> Simulation {
        Simulation {
            enabled: false,
            delays: Vec::new(),
            fail: None,
            passing: 0,
            state_file: None,
        }
    }
}

/// Parses "300ms", "2s", "1.5" (seconds).
fn parse_short_duration(s: &str) -> Result<Duration> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .with_context(|| format!("{s:?} is not a duration (e.g. 300ms, 2s)"))?;
    Ok(Duration::from_secs_f64(v * scale))
}

fn simulated(node: &str, sim: &Simulation) -> Result<Simulated> {
    let mut part = Simulated::new(node);
    for d in &sim.delays {
        let (phase, dur) = d
            .split_once('=')
            .with_context(|| format!("--simulate-delay {d:?}: expected PHASE=DURATION"))?;
        let phase: Phase = phase.parse().map_err(anyhow::Error::msg)?;
        part.delays.insert(phase, parse_short_duration(dur)?);
    }
    if let Some(f) = &sim.fail {
        part.fail = Some(f.parse().map_err(anyhow::Error::msg)?);
    }
    part.passing_dumps = sim.passing;
    part.state_file = sim.state_file.clone();
    part.start()?;
    Ok(part)
}

fn exit_code_of(status: std::process::ExitStatus) -> ExitCode {
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// How an agent's part of the job is started.
pub enum Launch {
    /// `stasis run` of a command, in `dir` (by default a fresh local directory,
    /// removed at the end).
    Run {
        cmd: Vec<String>,
        dir: Option<PathBuf>,
    },
    /// `stasis restart` of a node part of a global checkpoint, meeting the other
    /// restarted parts in `rendezvous` (to re-make the connections between nodes).
    Restart {
        dir: PathBuf,
        rendezvous: Option<PathBuf>,
    },
}

/// What the agent's threads tell its main thread.
enum Ev {
    /// The part's process (`stasis run`/`restart`, or the plain command beside a
    /// simulated part) exited.
    Exited(std::io::Result<std::process::ExitStatus>),
    /// The part started (after a restore the coordinator asked for).
    Started,
    Served(Outcome),
}

/// Starts a part under stasis and waits until its supervisor answers on its control
/// socket. Returns its process, the directory it supervises (its control socket is
/// named after it) and, for `Run`, the fresh directory to remove at the end.
fn start_part(
    node: &str,
    coordinator: &str,
    launch: &Launch,
    private_tmp: bool,
    quiet: bool,
) -> Result<(std::process::Child, PathBuf, Option<PathBuf>)> {
    let exe = std::env::current_exe().context("finding the stasis executable")?;
    let mut c = std::process::Command::new(exe);
    // The part's processes find their coordinator here (`stasis ssh`).
    c.env("STASIS_COORDINATOR", coordinator);
    if quiet {
        c.arg("--quiet");
    }
    let (control, fresh, what) = match launch {
        Launch::Run { cmd, dir } => {
            let (dir, fresh) = match dir {
                Some(d) => (d.clone(), None),
                None => {
                    let d = run_dir(node)?;
                    (d.clone(), Some(d))
                }
            };
            // Always CMD anew: the part's checkpoints are the coordinator's.
            c.arg("run")
                .arg("--fresh")
                .arg("--dir")
                .arg(&dir)
                .arg("--tmp")
                .arg(if private_tmp { "private" } else { "host" })
                .arg("--")
                .args(cmd);
            (dir, fresh, cmd[0].clone())
        }
        Launch::Restart { dir, rendezvous } => {
            c.arg("restart").arg(dir);
            if let Some(rv) = rendezvous {
                c.env("STASIS_RENDEZVOUS", rv);
            }
            (
                dir.clone(),
                None,
                format!("the restart of {}", dir.display()),
            )
        }
    };
    let cleanup = || {
        if let Some(d) = &fresh {
            let _ = std::fs::remove_dir_all(d);
        }
    };
    let mut child = match c.spawn() {
        Ok(c) => c,
        Err(e) => {
            cleanup();
            return Err(e).with_context(|| format!("node {node}: cannot start {what}"));
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !crate::control::is_supervised(&control) {
        if let Ok(Some(st)) = child.try_wait() {
            cleanup();
            bail!("node {node}: {what} ended before it could take part ({st})");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            cleanup();
            bail!("node {node}: {what} did not start within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, control, fresh))
}

/// Tells the main thread when `child` exits.
fn watch(child: std::process::Child, tx: mpsc::Sender<Ev>) -> Result<()> {
    let mut child = child;
    std::thread::Builder::new()
        .name("agent-child".into())
        .spawn(move || {
            let _ = tx.send(Ev::Exited(child.wait()));
        })
        .context("cannot start a thread")?;
    Ok(())
}

/// A node's part of the job under stasis (`stasis run` or `stasis restart`, our
/// child): each phase of a global checkpoint is a step of a coordinated checkpoint of
/// that job. A spare agent's part starts empty and gets its job from a restore.
struct EnginePart {
    node: String,
    coordinator: String,
    /// The directory its supervisor is named after; None while the agent is spare.
    control: Option<PathBuf>,
    private_tmp: bool,
    quiet: bool,
    /// The coordinated checkpoint in progress.
    current: Option<crate::control::Coordinated>,
    events: mpsc::Sender<Ev>,
    /// The fresh directory of a part started on a spare agent, removed at the end.
    fresh: Option<RemoveOnDrop>,
    /// The addresses of the nodes of the checkpoint in progress.
    nodes: Vec<String>,
}

impl EnginePart {
    /// Starts the part of a spare agent.
    fn run(&mut self, launch: &Launch) -> Result<()> {
        if let Some(c) = &self.control {
            bail!(
                "node {} already runs a part of the job (supervised as {})",
                self.node,
                c.display()
            );
        }
        let (child, control, fresh) = start_part(
            &self.node,
            &self.coordinator,
            launch,
            self.private_tmp,
            self.quiet,
        )?;
        self.control = Some(control);
        self.fresh = fresh.map(RemoveOnDrop);
        let _ = self.events.send(Ev::Started);
        watch(child, self.events.clone())
    }

    fn end(&mut self, go: crate::control::Go) -> Result<()> {
        let c = self
            .current
            .take()
            .with_context(|| format!("node {}: no checkpoint in progress", self.node))?;
        c.finish(go).map(drop)
    }
}

impl LocalPart for EnginePart {
    fn freeze(&mut self, _ckpt: u64) -> Result<()> {
        self.current = None;
        let control = self
            .control
            .as_ref()
            .with_context(|| format!("node {}: no part of the job runs here", self.node))?;
        self.current = Some(crate::control::Coordinated::freeze(control, &self.nodes)?);
        Ok(())
    }

    fn nodes(&mut self, nodes: &[String]) {
        self.nodes = nodes.to_vec();
    }

    fn dump(&mut self, _ckpt: u64, dir: &Path) -> Result<u64> {
        use crate::control::{Go, Heard, Step};
        if self.private_tmp && (dir.starts_with("/tmp") || dir.starts_with("/dev/shm")) {
            bail!(
                "{} is under /tmp or /dev/shm, which the job on node {} sees as its own private ones: give the coordinator a directory elsewhere, or the agent --tmp host",
                dir.display(),
                self.node
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let c = self
            .current
            .as_mut()
            .with_context(|| format!("node {}: not frozen", self.node))?;
        c.send(&Go::Dump {
            dir: dir.display().to_string(),
        })?;
        match c.hear()? {
            Heard::Step(Step::Written { .. }) => Ok(dir_bytes(dir)),
            Heard::Step(s) => bail!("unexpected {s:?} from the job's init"),
            Heard::Reply(r) => {
                self.current = None;
                Err(r.into_error())
            }
        }
    }

    fn resume(&mut self, _ckpt: u64) -> Result<()> {
        self.end(crate::control::Go::Resume)
    }

    fn kill(&mut self, _ckpt: u64) -> Result<()> {
        self.end(crate::control::Go::Kill)
    }

    fn abort(&mut self, _ckpt: u64) -> Result<()> {
        match self.current.take() {
            // The init releases the job (and, after a failure, has already).
            Some(c) => c.finish(crate::control::Go::Abort).map(drop).or(Ok(())),
            None => Ok(()),
        }
    }

    fn restore(&mut self, dir: &Path, rendezvous: Option<&Path>) -> Result<()> {
        if let Some(c) = &self.control {
            bail!(
                "node {} already runs a part of the job (supervised as {})",
                self.node,
                c.display()
            );
        }
        let launch = Launch::Restart {
            dir: dir.to_path_buf(),
            rendezvous: rendezvous.map(Path::to_path_buf),
        };
        self.run(&launch)
    }

    fn start(&mut self, cmd: &str) -> Result<()> {
        let launch = Launch::Run {
            cmd: vec!["bash".into(), "-c".into(), cmd.into()],
            dir: None,
        };
        self.run(&launch)
    }
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// A fresh local directory for the supervisor of the node's part (its control
/// socket is named after it; its checkpoints go to the coordinator's directory). One
/// left by an agent that was killed (and had the same pid) is not reused.
fn run_dir(node: &str) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::var_os("STASIS_AGENT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let name = format!("stasis-agent.{node}.{}", std::process::id());
    let mut n = 0;
    loop {
        let d = match n {
            0 => base.join(&name),
            _ => base.join(format!("{name}-{n}")),
        };
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(e).with_context(|| format!("creating {}", d.display())),
        }
    }
}

/// `stasis agent` (and the local part of `stasis restart --coordinator`).
#[allow(clippy::too_many_arguments)]
pub fn agent(
    coordinator: &str,
    node: Option<String>,
    private_tmp: bool,
    sim: Simulation,
    protocol_version: Option<u32>,
    launch: Option<Launch>,
    quiet: bool,
) -> Result<ExitCode> {
    let role = if launch.is_none() && !sim.enabled {
        Role::Spare
    } else {
        Role::Agent
    };
    let mut opts = agent::Options::new(role);
    if let Some(n) = node {
        opts.node = n;
    }
    opts.addresses = stasis_core::sockets::inet::node_addresses()
        .iter()
        .map(|a| a.to_string())
        .collect();
    // Restarting node part K of a global checkpoint: K-th in the next ones.
    if let Some(Launch::Restart { dir, .. }) = &launch {
        opts.part = stasis_coord::coordinator::part_number(&dir.to_string_lossy());
    }
    if let Some(v) = protocol_version {
        opts.versions = (v, v);
    }
    let node = opts.node.clone();
    // A new job's launcher joins before it starts its command: the command may place
    // parts on other nodes at once (`stasis ssh`), and those come after it (part order
    // is join order). A coordinator's message meanwhile waits in the connection until
    // the part runs. A restarted part joins once it runs again (its place is its part
    // number).
    let early = if !sim.enabled && matches!(launch, Some(Launch::Run { .. })) {
        Some(agent::connect(coordinator, &opts)?)
    } else {
        None
    };
    let (tx, rx) = mpsc::channel();
    // The part's process: under stasis (waited for before serving), or a plain
    // command beside a simulated part.
    let mut child = None;
    let mut supervised = false;
    let mut _cleanup = None;
    let mut part: Box<dyn LocalPart + Send> = if sim.enabled {
        if let Some(Launch::Run { cmd, .. }) = &launch {
            child = Some(
                std::process::Command::new(&cmd[0])
                    .args(&cmd[1..])
                    .spawn()
                    .with_context(|| format!("cannot run {}", cmd[0]))?,
            );
        }
        Box::new(simulated(&node, &sim)?)
    } else {
        let mut control = None;
        if let Some(l) = &launch {
            let (c, dir, fresh) = start_part(&node, coordinator, l, private_tmp, quiet)?;
            child = Some(c);
            control = Some(dir);
            supervised = true;
            _cleanup = fresh.map(RemoveOnDrop);
        }
        Box::new(EnginePart {
            node: node.clone(),
            coordinator: coordinator.to_string(),
            fresh: None,
            nodes: Vec::new(),
            control,
            private_tmp,
            quiet,
            current: None,
            events: tx.clone(),
        })
    };
    let pid = child.as_ref().map(|c| c.id());
    let conn = match early.map_or_else(|| agent::connect(coordinator, &opts), Ok) {
        Ok(c) => c,
        Err(e) => {
            if let Some(mut c) = child {
                let _ = c.kill();
                let _ = c.wait();
            }
            return Err(e);
        }
    };
    if !quiet {
        eprintln!(
            "stasis agent: node {node} joined the coordinator at {coordinator} as {}agent {} (protocol {})",
            if role == Role::Spare { "spare " } else { "" },
            conn.agent,
            conn.version
        );
    }
    let mut running = child.is_some();
    if let Some(c) = child {
        watch(c, tx.clone())?;
    }
    let tx2 = tx.clone();
    std::thread::Builder::new()
        .name("agent-serve".into())
        .spawn(move || {
            let _ = tx2.send(Ev::Served(conn.serve(part.as_mut())));
        })
        .context("cannot start a thread")?;
    drop(tx);
    let what = match &launch {
        Some(Launch::Run { cmd, .. }) => cmd[0].clone(),
        Some(Launch::Restart { dir, .. }) => {
            format!("the part restarted from {}", dir.display())
        }
        None => "the restarted part".into(),
    };
    let mut killed_after = None;
    loop {
        match rx.recv() {
            Ok(Ev::Started) => {
                running = true;
                supervised = true;
            }
            Ok(Ev::Exited(status)) => {
                let status = status.with_context(|| format!("waiting for {what}"))?;
                if let Some(n) = killed_after {
                    if !quiet {
                        eprintln!("stasis agent: node {node}: {what} stopped after checkpoint {n}");
                    }
                    return Ok(ExitCode::from(crate::cli::EXIT_CHECKPOINTED));
                }
                return Ok(exit_code_of(status));
            }
            Ok(Ev::Served(Outcome::Killed(n))) if running => {
                killed_after = Some(n);
                if !supervised {
                    // A plain command beside a simulated part.
                    if let Some(pid) = pid {
                        // SAFETY: kill(2) takes plain integers and touches no memory
                        // of ours; the child is not reaped yet (its waiter has not
                        // reported), so the pid is still its own.
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    }
                }
                // Under stasis the init killed the job: `stasis run` exits with 75.
            }
            Ok(Ev::Served(Outcome::Killed(n))) => {
                if !quiet {
                    eprintln!("stasis agent: node {node}: stopped after checkpoint {n}");
                }
                return Ok(ExitCode::from(crate::cli::EXIT_CHECKPOINTED));
            }
            Ok(Ev::Served(Outcome::CoordinatorGone(why))) if running => {
                eprintln!(
                    "stasis agent: warning: node {node}: {why}; {what} runs on without checkpoints"
                );
            }
            Ok(Ev::Served(Outcome::CoordinatorGone(why))) => bail!("node {node}: {why}"),
            Err(_) => bail!("node {node}: lost track of {what}"),
        }
    }
}

/// `stasis checkpoint --coordinator ADDR [--kill]`.
pub fn checkpoint(coordinator: &str, kill: bool, quiet: bool) -> Result<ExitCode> {
    let report = Client::connect(coordinator)?.checkpoint(kill)?;
    if !quiet {
        eprintln!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `stasis coord-bench`: prints one table row per agent count.
pub fn bench(
    agents: &[usize],
    rounds: usize,
    write: bool,
    dir: Option<PathBuf>,
) -> Result<ExitCode> {
    let base = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("stasis-coord-bench-{}", std::process::id())),
    };
    println!(
        "protocol {}, {} rounds each, part: {}",
        protocol::VERSION,
        rounds,
        if write {
            "writes and syncs 4 KiB"
        } else {
            "does nothing"
        }
    );
    println!(
        "{:>7} {:>10} {:>12} {:>10} {:>10} {:>11} {:>9} {:>11}",
        "agents", "join ms", "median ms", "p95 ms", "max ms", "freeze ms", "dump ms", "publish ms"
    );
    for &n in agents {
        let dir = base.join(format!("n{n}"));
        let s = stasis_coord::bench::run(n, rounds, &dir, write)
            .with_context(|| format!("benchmark with {n} agents"))?;
        println!(
            "{:>7} {:>10.1} {:>12.2} {:>10.2} {:>10.2} {:>11.2} {:>9.2} {:>11.2}",
            s.agents,
            s.join_ms,
            s.median_ms,
            s.p95_ms,
            s.max_ms,
            s.freeze_ms,
            s.dump_ms,
            s.publish_ms
        );
    }
    std::fs::remove_dir_all(&base).with_context(|| format!("cannot remove {}", base.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// Removes a directory when dropped.
pub(crate) struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
