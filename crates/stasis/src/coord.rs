//! Jobs that span several nodes (issue #13, first phase): `stasis coordinator`,
//! `stasis agent`, `stasis checkpoint --coordinator` and the hidden benchmark
//! `stasis coord-bench`, on top of the stasis-coord crate.
//!
//! An agent with a command runs it under `stasis run` (its own init, in a fresh local
//! directory) and speaks for it to the coordinator: each phase of a global checkpoint
//! is a step of one coordinated checkpoint on the init's control socket
//! ([`EnginePart`], `control::Coordinated`). An agent's part can also be simulated
//! (`--simulate`).

use anyhow::{bail, Context, Result};
use stasis_coord::agent::{self, LocalPart, Outcome, Unplugged};
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
        eprintln!(
            "stasis coordinator: listening on {addr}, checkpoints in {}",
            dir.display()
        );
    }
    c.serve()?;
    Ok(ExitCode::SUCCESS)
}

/// How `stasis agent` simulates its local part (hidden test options included).
pub struct Simulation {
    pub enabled: bool,
    pub delays: Vec<String>,
    pub fail: Option<String>,
    pub state_file: Option<PathBuf>,
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

/// A node's part of the job, run under `stasis run --dir RUN_DIR` by the agent: each
/// phase of a global checkpoint is a step of a coordinated checkpoint of that job.
struct EnginePart {
    node: String,
    run_dir: PathBuf,
    private_tmp: bool,
    /// The coordinated checkpoint in progress.
    current: Option<crate::control::Coordinated>,
}

impl EnginePart {
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
        self.current = Some(crate::control::Coordinated::freeze(&self.run_dir)?);
        Ok(())
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
                bail!("{}", r.error)
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
/// socket is named after it; its checkpoints go to the coordinator's directory).
fn run_dir(node: &str) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::var_os("STASIS_AGENT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let d = base.join(format!("stasis-agent.{node}.{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&d)
        .with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// `stasis agent`.
#[allow(clippy::too_many_arguments)]
pub fn agent(
    coordinator: &str,
    node: Option<String>,
    private_tmp: bool,
    sim: Simulation,
    protocol_version: Option<u32>,
    cmd: &[String],
    quiet: bool,
) -> Result<ExitCode> {
    let role = if cmd.is_empty() && !sim.enabled {
        Role::Spare
    } else {
        Role::Agent
    };
    let mut opts = agent::Options::new(role);
    if let Some(n) = node {
        opts.node = n;
    }
    if let Some(v) = protocol_version {
        opts.versions = (v, v);
    }
    let node = opts.node.clone();
    // With CMD, it runs under `stasis run`, which the agent waits for before joining.
    let mut engine = None;
    let mut part: Box<dyn LocalPart + Send> = if sim.enabled {
        Box::new(simulated(&node, &sim)?)
    } else if !cmd.is_empty() {
        let dir = run_dir(&node)?;
        let exe = std::env::current_exe().context("finding the stasis executable")?;
        let mut run = std::process::Command::new(exe);
        run.arg("run")
            .arg("--dir")
            .arg(&dir)
            .arg("--tmp")
            .arg(if private_tmp { "private" } else { "host" });
        if quiet {
            run.arg("--quiet");
        }
        run.arg("--").args(cmd);
        let child = run
            .spawn()
            .with_context(|| format!("cannot run {} under stasis", cmd[0]))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut child = child;
        while !crate::control::is_supervised(&dir) {
            if let Some(st) = child.try_wait().context("waiting for stasis run")? {
                let _ = std::fs::remove_dir(&dir);
                bail!("node {node}: {} ended before it could join ({st})", cmd[0]);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                bail!("node {node}: stasis run did not start within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        engine = Some((child, dir.clone()));
        Box::new(EnginePart {
            node: node.clone(),
            run_dir: dir,
            private_tmp,
            current: None,
        })
    } else {
        Box::new(Unplugged(format!(
            "node {node}: a spare agent (no CMD) holds no part of the job"
        )))
    };
    let conn = match agent::connect(coordinator, &opts) {
        Ok(c) => c,
        Err(e) => {
            if let Some((mut child, dir)) = engine {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(dir);
            }
            return Err(e);
        }
    };
    if !quiet {
        eprintln!(
            "stasis agent: node {node} joined the coordinator at {coordinator} as agent {} (protocol {})",
            conn.agent, conn.version
        );
    }
    if cmd.is_empty() {
        return match conn.serve(part.as_mut()) {
            Outcome::Killed(n) => {
                if !quiet {
                    eprintln!("stasis agent: node {node}: stopped after checkpoint {n}");
                }
                Ok(ExitCode::from(crate::cli::EXIT_CHECKPOINTED))
            }
            Outcome::CoordinatorGone(why) => bail!("node {node}: {why}"),
        };
    }

    // With CMD: it runs as our child (under `stasis run`, or plainly beside a
    // simulated part); the protocol is served beside it.
    let (mut child, run_dir) = match engine {
        Some((child, dir)) => (child, Some(dir)),
        None => (
            std::process::Command::new(&cmd[0])
                .args(&cmd[1..])
                .spawn()
                .with_context(|| format!("cannot run {}", cmd[0]))?,
            None,
        ),
    };
    let supervised = run_dir.is_some();
    let _cleanup = run_dir.map(RemoveOnDrop);
    let pid = child.id();
    enum Ev {
        Exited(std::io::Result<std::process::ExitStatus>),
        Served(Outcome),
    }
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    std::thread::Builder::new()
        .name("agent-child".into())
        .spawn(move || {
            let _ = tx.send(Ev::Exited(child.wait()));
        })
        .context("cannot start a thread")?;
    std::thread::Builder::new()
        .name("agent-serve".into())
        .spawn(move || {
            let _ = tx2.send(Ev::Served(conn.serve(part.as_mut())));
        })
        .context("cannot start a thread")?;
    let mut killed_after = None;
    loop {
        match rx.recv() {
            Ok(Ev::Exited(status)) => {
                let status = status.with_context(|| format!("waiting for {}", cmd[0]))?;
                if let Some(n) = killed_after {
                    if !quiet {
                        eprintln!(
                            "stasis agent: node {node}: {} stopped after checkpoint {n}",
                            cmd[0]
                        );
                    }
                    return Ok(ExitCode::from(crate::cli::EXIT_CHECKPOINTED));
                }
                return Ok(exit_code_of(status));
            }
            Ok(Ev::Served(Outcome::Killed(n))) if supervised => {
                // The init killed the job: `stasis run` exits with 75.
                killed_after = Some(n);
            }
            Ok(Ev::Served(Outcome::Killed(n))) => {
                killed_after = Some(n);
                // SAFETY: kill(2) takes plain integers and touches no memory of ours;
                // the child is not reaped yet (its waiter has not reported), so the pid
                // is still its own.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            Ok(Ev::Served(Outcome::CoordinatorGone(why))) => {
                eprintln!(
                    "stasis agent: warning: node {node}: {why}; {} runs on without checkpoints",
                    cmd[0]
                );
            }
            Err(_) => bail!("node {node}: lost track of {}", cmd[0]),
        }
    }
}

/// Removes a directory when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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
