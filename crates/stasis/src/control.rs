//! The control socket between `stasis checkpoint DIR` and the stasis init that supervises
//! the application of DIR.
//!
//! It is an abstract UNIX socket named after the canonical path of DIR (so it works on
//! any file system and any path length). The init accepts only peers of the same user.
//! One request, one reply, each a line of JSON.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use stasis_core::dump::{self, DumpOptions, DumpReport};
use stasis_image::Origin;
use std::io::{BufRead, BufReader, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// A checkpoint request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub kill: bool,
    pub keep: usize,
    #[serde(default)]
    pub incremental: bool,
    #[serde(default)]
    pub compress: stasis_image::Compression,
    /// Save TCP connections to peers outside the job as reset (else refuse them).
    #[serde(default)]
    pub tcp_external_reset: bool,
    /// Save UNIX sockets connected to sockets outside the job to connect again to the
    /// same name at restore (else refuse them).
    #[serde(default)]
    pub unix_external_reconnect: bool,
    /// Faults to inject into this checkpoint, for tests: the asker's
    /// `STASIS_FAULT_*` environment (see `stasis_sys::fault`).
    #[serde(default)]
    pub fault: Option<stasis_sys::fault::Plan>,
    /// A checkpoint of this node's part of a multi-node job, driven step by step by
    /// the node's `stasis agent` (see [`Step`] and [`Go`]).
    #[serde(default)]
    pub coordinated: bool,
    /// With `coordinated`: the addresses of the job's nodes (TCP connections to them
    /// are between its parts).
    #[serde(default)]
    pub peers: Vec<String>,
}

/// What the init tells the agent during a coordinated checkpoint (a line of JSON each,
/// before the final [`Reply`]).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// The job is frozen: the init waits for [`Go::Dump`] or [`Go::Abort`].
    Frozen,
    /// The job is written into `path` and synced: the init waits for [`Go::Resume`],
    /// [`Go::Kill`] or [`Go::Abort`].
    Written { path: String },
}

/// What the agent answers to a [`Step`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "go", rename_all = "snake_case")]
pub enum Go {
    /// Write the part into `dir`.
    Dump {
        dir: String,
    },
    Resume,
    Kill,
    /// The checkpoint is abandoned: the job runs on.
    Abort,
}

/// The init's side of a coordinated checkpoint: the two waits of
/// [`stasis_core::dump::Barrier`] spoken over the control connection.
#[derive(Debug)]
pub struct StreamBarrier {
    stream: UnixStream,
    reader: std::sync::Mutex<BufReader<UnixStream>>,
}

impl StreamBarrier {
    pub fn new(stream: &UnixStream) -> std::io::Result<StreamBarrier> {
        Ok(StreamBarrier {
            stream: stream.try_clone()?,
            reader: std::sync::Mutex::new(BufReader::new(stream.try_clone()?)),
        })
    }

    fn ask(&self, step: &Step) -> stasis_core::Result<Go> {
        let abandoned = |why: String| stasis_core::Error::Abandoned { why };
        let mut line = serde_json::to_string(step).map_err(|e| abandoned(e.to_string()))?;
        line.push('\n');
        (&self.stream)
            .write_all(line.as_bytes())
            .map_err(|e| abandoned(format!("the node's agent went away ({e})")))?;
        let mut answer = String::new();
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| abandoned("internal: control reader poisoned".into()))?;
        match reader.read_line(&mut answer) {
            Ok(0) => Err(abandoned("the node's agent went away".into())),
            Err(e) => Err(abandoned(format!("the node's agent went away ({e})"))),
            Ok(_) => serde_json::from_str::<Go>(&answer)
                .map_err(|e| abandoned(format!("bad answer from the node's agent: {e}"))),
        }
    }
}

impl stasis_core::dump::Barrier for StreamBarrier {
    fn frozen(&self) -> stasis_core::Result<PathBuf> {
        match self.ask(&Step::Frozen)? {
            Go::Dump { dir } => Ok(PathBuf::from(dir)),
            Go::Abort => Err(stasis_core::Error::Abandoned {
                why: "by the coordinator".into(),
            }),
            other => Err(stasis_core::Error::Abandoned {
                why: format!("the node's agent answered {other:?} to frozen"),
            }),
        }
    }

    fn written(&self, path: &Path) -> stasis_core::Result<bool> {
        let step = Step::Written {
            path: path.display().to_string(),
        };
        match self.ask(&step)? {
            Go::Resume => Ok(false),
            Go::Kill => Ok(true),
            Go::Abort => Err(stasis_core::Error::Abandoned {
                why: "by the coordinator".into(),
            }),
            other => Err(stasis_core::Error::Abandoned {
                why: format!("the node's agent answered {other:?} to written"),
            }),
        }
    }
}

/// The agent's side of a coordinated checkpoint of the job supervised in a
/// directory (see [`Step`]).
pub struct Coordinated {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

/// One line from the init during a coordinated checkpoint: a step, or the final reply.
pub enum Heard {
    Step(Step),
    Reply(Reply),
}

impl Coordinated {
    /// Asks the supervisor of `dir` to freeze its job for a coordinated checkpoint;
    /// returns once it is frozen.
    pub fn freeze(dir: &Path, peers: &[String]) -> Result<Coordinated> {
        let addr = address(dir)?;
        let stream = UnixStream::connect_addr(&addr).map_err(|e| {
            anyhow!(
                "no `stasis run` is supervising {} ({e}): did the node's part exit?",
                dir.display()
            )
        })?;
        let reader = BufReader::new(stream.try_clone().context("control socket")?);
        let mut c = Coordinated { stream, reader };
        let req = Request {
            kill: false,
            keep: 0,
            incremental: false,
            compress: stasis_image::Compression::None,
            tcp_external_reset: false,
            fault: None,
            coordinated: true,
            unix_external_reconnect: false,
            peers: peers.to_vec(),
        };
        c.send(&req)?;
        match c.hear()? {
            Heard::Step(Step::Frozen) => Ok(c),
            Heard::Step(s) => bail!("unexpected {s:?} from the job's init while freezing"),
            Heard::Reply(r) => Err(r.into_error()),
        }
    }

    /// Sends one line.
    pub fn send(&mut self, what: &impl Serialize) -> Result<()> {
        let mut line = serde_json::to_string(what)?;
        line.push('\n');
        self.stream
            .write_all(line.as_bytes())
            .context("the job's init went away")
    }

    /// Reads one line.
    pub fn hear(&mut self) -> Result<Heard> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("reading from the job's init")?;
        if n == 0 {
            bail!("the job's init closed the connection (did the application exit?)");
        }
        if let Ok(step) = serde_json::from_str::<Step>(&line) {
            return Ok(Heard::Step(step));
        }
        let r: Reply = serde_json::from_str(&line).context("parsing the init's answer")?;
        Ok(Heard::Reply(r))
    }

    /// Sends `go` and waits for the final reply (an error if the checkpoint failed).
    pub fn finish(mut self, go: Go) -> Result<Reply> {
        self.send(&go)?;
        match self.hear()? {
            Heard::Reply(r) if r.ok => Ok(r),
            Heard::Reply(r) => bail!("{}", r.error),
            Heard::Step(s) => bail!("unexpected {s:?} from the job's init"),
        }
    }
}

impl Request {
    /// What to do with TCP connections to peers outside the job.
    pub fn tcp_external(&self) -> stasis_core::sockets::TcpExternal {
        if self.tcp_external_reset {
            stasis_core::sockets::TcpExternal::Reset
        } else {
            stasis_core::sockets::TcpExternal::Refuse
        }
    }
}

/// The reply.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub error: String,
    /// The checkpoint failed on a passing state of the job (see
    /// `stasis_core::Error::Transient`): it may succeed a moment later.
    #[serde(default)]
    pub passing: bool,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub summary: String,
}

impl Reply {
    /// A failure that is not a passing state.
    pub fn failure(error: String) -> Reply {
        Reply {
            error,
            ..Reply::default()
        }
    }

    /// The failure this reply reports, as an agent passes it on (a passing one as
    /// [`stasis_coord::agent::Passing`], which the coordinator tries again).
    pub fn into_error(self) -> anyhow::Error {
        if self.passing {
            stasis_coord::agent::Passing(self.error).into()
        } else {
            anyhow!(self.error)
        }
    }
}

/// Canonical form of a checkpoint directory (it must exist).
pub fn canonical(dir: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(dir).with_context(|| format!("checkpoint directory {}", dir.display()))
}

fn address(dir: &Path) -> Result<SocketAddr> {
    let canon = canonical(dir)?;
    let h = xxhash_rust::xxh3::xxh3_64(canon.as_os_str().as_encoded_bytes());
    let name = format!("stasis-{h:016x}");
    SocketAddr::from_abstract_name(name.as_bytes()).context("building the control socket address")
}

/// Whether a `stasis run`/`restart` supervises `dir` now (its control socket answers).
pub fn is_supervised(dir: &Path) -> bool {
    address(dir).is_ok_and(|a| UnixStream::connect_addr(&a).is_ok())
}

/// Binds the control socket of `dir`; fails if another stasis already supervises it.
pub fn listen(dir: &Path) -> Result<UnixListener> {
    let addr = address(dir)?;
    UnixListener::bind_addr(&addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow!(
                "another `stasis run` or `stasis restart` is already using {}",
                dir.display()
            )
        } else {
            anyhow!("binding the control socket of {}: {e}", dir.display())
        }
    })
}

/// The credentials (pid, uid, gid) of the peer of a connected socket, as seen in our
/// namespaces (SO_PEERCRED).
pub fn peer_cred(s: &UnixStream) -> Option<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred)
}

/// UID of the peer of a connected socket, as seen in our user namespace.
pub fn peer_uid(s: &UnixStream) -> Option<u32> {
    peer_cred(s).map(|c| c.uid)
}

/// Client side: asks the supervisor of `dir` for a checkpoint.
pub fn request_checkpoint(dir: &Path, req: &Request, show_progress: bool) -> Result<String> {
    let addr = address(dir)?;
    // A checkpoint already being written holds the directory lock: this one is taken
    // after it (the supervisor also waits, for a request that slips in between).
    drop(stasis_image::DirLock::acquire_waiting(
        dir,
        stasis_core::dump::LOCK_WAIT,
        || {
            if show_progress {
                eprintln!(
                    "stasis: a checkpoint of {} is in progress: waiting for it",
                    dir.display()
                );
            }
        },
    )?);
    let mut s = UnixStream::connect_addr(&addr).map_err(|e| {
        anyhow!(
            "no `stasis run` or `stasis restart` is supervising {} ({e}); to checkpoint a process not started by stasis use --pid PID --dir DIR",
            dir.display()
        )
    })?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    // A supervisor that refuses us (another user's job) answers and closes without
    // reading: its answer is read even when sending failed.
    let sent = s.write_all(line.as_bytes());
    let progress = Progress::start(format!("checkpointing {}", dir.display()), show_progress);
    let mut reply = String::new();
    let read = BufReader::new(&s).read_line(&mut reply);
    progress.finish();
    if reply.is_empty() {
        sent.context("sending the checkpoint request")?;
    }
    read.context("reading the checkpoint reply")?;
    if reply.is_empty() {
        bail!("the supervisor closed the connection without answering (did the application exit?)");
    }
    let r: Reply = serde_json::from_str(&reply).context("parsing the checkpoint reply")?;
    if !r.ok {
        bail!("{}", r.error);
    }
    Ok(r.summary)
}

/// Server side: answers one connection with `handle`.
pub fn serve_one(stream: UnixStream, handle: impl FnOnce(Request, &UnixStream) -> Reply) {
    // The init runs as the invoking user's own ID in its user namespace (root's: 0).
    // SAFETY: geteuid has no preconditions.
    let my_uid = unsafe { libc::geteuid() };
    if peer_uid(&stream) != Some(my_uid) {
        let _ = reply(
            &stream,
            &Reply::failure("permission denied: not the owner of this job".into()),
        );
        return;
    }
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return;
    }
    let r = match serde_json::from_str::<Request>(&line) {
        Ok(req) => {
            // A checkpoint whose asker goes away (killed, interrupted) is abandoned at
            // its next step, unless already published.
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let watcher = stream.try_clone().ok().map(|s| {
                let done = done.clone();
                std::thread::spawn(move || watch_hangup(&s, &done))
            });
            let r = handle(req, &stream);
            done.store(true, std::sync::atomic::Ordering::Release);
            if let Some(w) = watcher {
                let _ = w.join();
            }
            r
        }
        Err(e) => Reply::failure(format!("bad request: {e}")),
    };
    let _ = reply(&stream, &r);
}

/// Until `done`: when the peer of `s` hangs up, the checkpoint in progress is
/// cancelled (see `stasis_sys::fault::cancel`).
fn watch_hangup(s: &UnixStream, done: &std::sync::atomic::AtomicBool) {
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        let mut p = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll on one initialized pollfd.
        let n = unsafe { libc::poll(&mut p, 1, 50) };
        if n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            stasis_sys::fault::cancel(
                "the `stasis checkpoint` that asked for it went away".to_string(),
            );
            return;
        }
    }
}

fn reply(mut s: &UnixStream, r: &Reply) -> std::io::Result<()> {
    let mut line =
        serde_json::to_string(r).unwrap_or_else(|_| "{\"ok\":false,\"error\":\"internal\"}".into());
    line.push('\n');
    s.write_all(line.as_bytes())
}

/// Human summary of a successful checkpoint.
pub fn summarize(r: &DumpReport) -> String {
    let t = &r.timings;
    format!(
        "stasis: checkpoint {} written ({:.1} MiB of memory; {}; {}, sync {:.1} ms){}",
        r.path.display(),
        t.pages_bytes as f64 / (1 << 20) as f64,
        pause_summary(t),
        copy_summary(t),
        t.sync_us as f64 / 1000.0,
        if r.killed {
            "; application stopped"
        } else {
            ""
        }
    )
}

/// How long the application was paused, and for what, for humans.
pub fn pause_summary(t: &stasis_image::Timings) -> String {
    let snapshot = if t.snapshot {
        format!(", snapshot {:.1} ms", t.snapshot_us as f64 / 1000.0)
    } else {
        String::new()
    };
    format!(
        "paused {:.1} ms of which freeze {:.1} ms{snapshot}",
        (t.freeze_us + t.dump_us) as f64 / 1000.0,
        t.freeze_us as f64 / 1000.0,
    )
}

/// How the pages were copied, and how long it took, for humans.
pub fn copy_summary(t: &stasis_image::Timings) -> String {
    let ms = t.copy_us as f64 / 1000.0;
    match (t.snapshot, t.one_copy) {
        (true, true) => format!("pages written by the snapshot (one copy) in {ms:.1} ms"),
        (true, false) => format!("pages copied from the snapshot in {ms:.1} ms"),
        (false, _) if t.frozen_copy => format!(
            "the {:.1} MiB written since the last checkpoint copied while frozen (sooner than forking a snapshot)",
            t.pages_bytes as f64 / 1048576.0
        ),
        (false, _) => "pages copied while frozen (copy-on-write snapshots are taken only under `stasis run`/`restart`, and not for a tree that is to be killed)".to_string(),
    }
}

/// `stasis checkpoint --pid PID --dir DIR`: checkpoint a process we did not start.
pub fn checkpoint_pid(dir: &Path, pid: i32, req: &Request, show_progress: bool) -> Result<String> {
    stasis_image::store::ensure_dir(dir)?;
    let opts = DumpOptions {
        kill: req.kill,
        origin: Origin::Attached,
        stdio: None,
        keep: req.keep,
        incremental: req.incremental,
        compress: req.compress,
        own_ipc_namespace: false,
        own_network_namespace: false,
        private_tmp: false,
        tcp_external: req.tcp_external(),
        unix_external_reconnect: req.unix_external_reconnect,
        app_api: None,
        stdio_files: Vec::new(),
        fault: req.fault.clone(),
        barrier: None,
        peer_nodes: Vec::new(),
    };
    let progress = Progress::start(format!("checkpointing process {pid}"), show_progress);
    let report = dump::checkpoint(&canonical(dir)?, pid, &opts);
    progress.finish();
    let report = report?;
    Ok(summarize(&report))
}

/// A spinner with the elapsed time on stderr, shown only when stderr is a terminal
/// and the operation takes more than a second (STASIS_PROGRESS_AFTER_MS changes the
/// delay).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    /// Starts the (initially hidden) spinner; `enabled` is false with --quiet.
    pub fn start(what: String, enabled: bool) -> Progress {
        use std::io::IsTerminal;
        if !enabled || !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::hidden());
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(what);
        let later = bar.clone();
        let delay = std::env::var("STASIS_PROGRESS_AFTER_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(delay));
            if !later.is_finished() {
                later.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                later.tick();
                later.enable_steady_tick(std::time::Duration::from_millis(120));
            }
        });
        Progress { bar: Some(bar) }
    }

    /// Removes the spinner.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
