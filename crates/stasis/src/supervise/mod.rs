//! `stasis run` and `stasis restart`: the supervisor and the namespace init.
//!
//! ```text
//! stasis (supervisor, your shell's child)         forwards signals, relays exit status
//!   └─ stasis init  PID 1 of a new user+PID+mount namespace, mounts its own /proc,
//!        │          answers `stasis checkpoint DIR` on the control socket and the
//!        │          application interface (api.rs), checkpoints
//!        │          and restores (it may choose PIDs in its namespace), reaps
//!        └─ the application  (PID 2 on `run`, its saved PID on `restart`)
//! ```
//!
//! The init runs as the invoking user's own ID in its user namespace, which maps only
//! that user to itself (or, when that user is root, the whole UID range one to one),
//! and holds the namespace's capabilities as its creator, so it needs no privilege
//! outside.

use crate::cli::EXIT_CHECKPOINTED;
use crate::control;
use anyhow::{anyhow, bail, Context, Result};
use stasis_image::store;
use stasis_sys::clone::{fork_into_namespaces, Forked};
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Signals the supervisor passes on to the application.
const FORWARDED: &[i32] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

mod api;
mod init;

/// What a job is started from.
enum Mode {
    /// A command (`stasis run`).
    Run(Vec<String>),
    /// Checkpoints, newest first: the first that verifies is restored (a damaged one
    /// is passed over with a warning).
    Restart(Vec<PathBuf>),
}

/// What `stasis run` asks of the job besides running it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobOptions {
    /// A network namespace of the job's own (`--network private`).
    pub private_network: bool,
    /// A /tmp and /dev/shm of the job's own (`--tmp private`).
    #[serde(default)]
    pub private_tmp: bool,
    /// `restart --stdio inherit`: standard streams saved as files are bound to the
    /// restart's own.
    #[serde(default)]
    pub stdio_inherit: bool,
    /// Checkpoint every so often while the job runs (`--interval`).
    pub interval: Option<std::time::Duration>,
    /// The automatic checkpoints store only what changed (`--incremental`).
    pub incremental: bool,
    /// Checkpoints to keep after an automatic one (`--keep`).
    pub keep: usize,
    /// On this signal: checkpoint, stop the job and exit 75 (`--checkpoint-on`).
    pub checkpoint_on: Option<i32>,
    /// After such a checkpoint, requeue the Slurm job (`--requeue`).
    pub requeue: bool,
    /// The automatic checkpoints save TCP connections to peers outside the job as
    /// reset (`--tcp-external=reset`), else refuse them.
    #[serde(default)]
    pub tcp_external_reset: bool,
    /// Every checkpoint of the job saves UNIX sockets connected to sockets outside it
    /// to connect again to the same name at restore (`--unix-external=reconnect`),
    /// else refuses them.
    #[serde(default)]
    pub unix_external_reconnect: bool,
    /// How long a checkpoint waits for the applications' pre-checkpoint hooks
    /// (`--hook-timeout`).
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout: std::time::Duration,
}

/// The default of `--hook-timeout`.
pub const DEFAULT_HOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn default_hook_timeout() -> std::time::Duration {
    DEFAULT_HOOK_TIMEOUT
}

impl Default for JobOptions {
    fn default() -> JobOptions {
        JobOptions {
            private_network: false,
            private_tmp: false,
            stdio_inherit: false,
            interval: None,
            incremental: false,
            keep: 3,
            checkpoint_on: None,
            requeue: false,
            tcp_external_reset: false,
            unix_external_reconnect: false,
            hook_timeout: DEFAULT_HOOK_TIMEOUT,
        }
    }
}

/// `stasis run --dir DIR [options] -- CMD...`. When DIR holds a complete checkpoint
/// (and not `fresh`), the job is resumed from the newest one instead.
pub fn run(dir: &Path, cmd: &[String], mut opts: JobOptions, fresh: bool) -> Result<ExitCode> {
    store::ensure_dir(dir)?;
    let dir = control::canonical(dir)?;
    if !fresh {
        let newest_first: Vec<PathBuf> = store::list_checkpoints(&dir)?
            .into_iter()
            .rev()
            .map(|c| c.1)
            .collect();
        if let Some(newest) = newest_first.first() {
            eprintln!(
                "stasis: {} holds checkpoints: resuming from {} (`stasis run --fresh` starts the command anew)",
                dir.display(),
                newest.display()
            );
            let (net, tmp) = image_private(newest);
            opts.private_network = net;
            opts.private_tmp = tmp;
            return start(&dir, Mode::Restart(newest_first), opts, None);
        }
    }
    start(&dir, Mode::Run(cmd.to_vec()), opts, None)
}

/// Whether the checkpoint at `path` is of a job that had a network namespace of its
/// own, and a private /tmp and /dev/shm (read before the image is verified, only to
/// set up the namespaces: a damaged image is refused by the init all the same).
fn image_private(path: &Path) -> (bool, bool) {
    #[derive(serde::Deserialize)]
    struct Private {
        #[serde(default)]
        private_network: bool,
        #[serde(default)]
        private_dirs: Vec<serde::de::IgnoredAny>,
    }
    std::fs::read(path.join("checkpoint.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Private>(&b).ok())
        .map_or((false, false), |p| {
            (p.private_network, !p.private_dirs.is_empty())
        })
}

/// `stasis restart DIR [--from N] [--hook-timeout D]`
pub fn restart(
    dir: &Path,
    from: Option<&str>,
    hook_timeout: std::time::Duration,
    stdio_inherit: bool,
    show_progress: bool,
) -> Result<ExitCode> {
    let dir = control::canonical(dir)?;
    let all = store::list_checkpoints(&dir)?;
    let path = match from {
        None => all
            .last()
            .map(|c| c.1.clone())
            .ok_or_else(|| anyhow!("no complete checkpoint in {}", dir.display()))?,
        Some(f) => {
            let want: u64 = f
                .trim_start_matches("checkpoint-")
                .parse()
                .map_err(|_| anyhow!("--from expects a checkpoint number, got {f:?}"))?;
            all.iter()
                .find(|c| c.0 == want)
                .map(|c| c.1.clone())
                .ok_or_else(|| anyhow!("no checkpoint {want} in {}", dir.display()))?
        }
    };
    let progress = show_progress.then(|| format!("restarting from {}", path.display()));
    let (private_network, private_tmp) = image_private(&path);
    let opts = JobOptions {
        private_network,
        private_tmp,
        hook_timeout,
        stdio_inherit,
        ..JobOptions::default()
    };
    start(&dir, Mode::Restart(vec![path]), opts, progress)
}

/// `stasis __init ARGS` (internal): the namespace init, executed again by itself.
pub fn init_resume(args: &str) -> ExitCode {
    ExitCode::from(init::resume(args) as u8)
}

pub(crate) fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset initializes the set; sigaddset with valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn pipe() -> Result<(std::fs::File, std::fs::File)> {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `p`.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(p[0]),
            std::fs::File::from_raw_fd(p[1]),
        )
    })
}

pub(crate) fn signalfd(set: &libc::sigset_t) -> Result<std::fs::File> {
    // SAFETY: creating a signalfd for an initialized set.
    let fd = unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        bail!("signalfd: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned here.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

pub(crate) fn read_signal(f: &mut std::fs::File) -> Option<i32> {
    let mut buf = [0u8; 128];
    f.read_exact(&mut buf).ok()?;
    Some(i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]))
}

/// Starts the namespace init for `mode` and supervises it until it exits. With
/// `progress`, a spinner says so on a terminal until the application runs.
fn start(dir: &Path, mode: Mode, opts: JobOptions, progress: Option<String>) -> Result<ExitCode> {
    let listener = control::listen(dir)?;
    let mut all = FORWARDED.to_vec();
    all.push(libc::SIGCHLD);
    let set = sigset(&all);
    // SAFETY: blocking signals of this (single-threaded) process.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let (status_r, status_w) = pipe()?;
    let (sync_r, sync_w) = pipe()?;
    let (started_r, started_w) = pipe()?;
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // A user namespace (no privilege needed), a PID namespace (PIDs kept on restart),
    // a mount namespace (its own /proc) and an IPC namespace (System V objects are the
    // job's own, saved with it).
    // With --network private, a network namespace too (only loopback; owned by the user
    // namespace, so the init may repair TCP connections in it).
    let mut flags =
        (libc::CLONE_NEWUSER | libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC) as u64;
    if opts.private_network {
        flags |= libc::CLONE_NEWNET as u64;
    }
    // SAFETY: stasis is single-threaded here; the child runs init_main and exits.
    let forked = unsafe { fork_into_namespaces(flags) }.map_err(|e| {
        anyhow!("cannot create the user and PID namespaces: {e} (are unprivileged user namespaces disabled? see /proc/sys/user/max_user_namespaces)")
    })?;
    let init = match forked {
        Forked::Child => {
            drop(status_r);
            drop(sync_w);
            drop(started_r);
            let code = init::init_main(dir, mode, &opts, listener, status_w, sync_r, started_w);
            // SAFETY: leaving the init without running the supervisor's destructors.
            unsafe { libc::_exit(code) }
        }
        Forked::Parent(p) => p,
    };
    drop(status_w);
    drop(sync_r);
    drop(started_w);
    drop(listener);
    if let Err(e) = write_id_maps(init, uid, gid) {
        // SAFETY: killing our own child.
        unsafe { libc::kill(init, libc::SIGKILL) };
        return Err(e);
    }
    let mut sync_w = sync_w;
    sync_w
        .write_all(b"g")
        .context("starting the namespace init")?;
    drop(sync_w);

    let mut sfd = signalfd(&set)?;
    let mut spinner = progress.map(|what| control::Progress::start(what, true));
    let mut started_r = started_r;
    let status = loop {
        let mut st = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let r = unsafe { libc::waitpid(init, &mut st, libc::WNOHANG) };
        if r == init {
            break st;
        }
        let mut fds = [
            libc::pollfd {
                fd: sfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: started_r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let n = if spinner.is_some() { 2 } else { 1 };
        // SAFETY: poll on `n` initialized pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), n, -1) } < 0 {
            continue; // EINTR
        }
        if fds[1].revents != 0 {
            // The init says the application runs (or is gone): no more spinner.
            let mut b = [0u8; 1];
            let _ = started_r.read(&mut b);
            if let Some(p) = spinner.take() {
                p.finish();
            }
        }
        if fds[0].revents & libc::POLLIN != 0 {
            match read_signal(&mut sfd) {
                Some(libc::SIGCHLD) | None => {}
                // SAFETY: sending a signal to our child.
                Some(sig) => unsafe {
                    libc::kill(init, sig);
                },
            }
        }
    };
    if let Some(p) = spinner.take() {
        p.finish();
    }
    let mut msg = String::new();
    let mut status_r = status_r;
    let _ = status_r.read_to_string(&mut msg);
    if opts.requeue && msg.trim() == "checkpointed" {
        requeue();
    }
    finish(msg.trim(), status)
}

/// `scontrol requeue $SLURM_JOB_ID`, once the job is checkpointed and stopped.
fn requeue() {
    let Ok(id) = std::env::var("SLURM_JOB_ID") else {
        eprintln!("stasis: --requeue: not inside a Slurm job (no SLURM_JOB_ID): nothing requeued");
        return;
    };
    let msg = match std::process::Command::new("scontrol")
        .args(["requeue", &id])
        .status()
    {
        Ok(st) if st.success() => format!("stasis: Slurm job {id} requeued\n"),
        Ok(st) => format!("stasis: `scontrol requeue {id}` failed ({st})\n"),
        Err(e) => format!("stasis: cannot run `scontrol requeue {id}`: {e}\n"),
    };
    // One write: Slurm appends its own line to the same file at this moment.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
}

/// A signal named like `USR1`, `SIGUSR1` or `10`, one stasis passes on (and so can
/// act upon): INT, TERM, HUP, QUIT, USR1, USR2.
pub fn parse_signal(s: &str) -> std::result::Result<i32, String> {
    let name = s.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let sig = match name {
        "INT" => libc::SIGINT,
        "TERM" => libc::SIGTERM,
        "HUP" => libc::SIGHUP,
        "QUIT" => libc::SIGQUIT,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        n => n
            .parse::<i32>()
            .map_err(|_| format!("unknown signal {s:?}"))?,
    };
    if !FORWARDED.contains(&sig) || sig == libc::SIGWINCH {
        return Err(format!(
            "signal {s:?}: use one of INT, TERM, HUP, QUIT, USR1, USR2"
        ));
    }
    Ok(sig)
}

/// A duration like `90`, `90s`, `30m`, `2h` or `1d` (no unit: seconds).
pub fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    let t = s.trim();
    let (num, unit) = t.split_at(
        t.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 30m, 2h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        u => return Err(format!("{s:?}: unknown unit {u:?} (s, m, h, d)")),
    };
    if !(secs >= 1.0 && secs.is_finite()) {
        return Err(format!("{s:?}: at least one second"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn write_id_maps(pid: i32, uid: u32, gid: u32) -> Result<()> {
    let write = |name: &str, text: &str| {
        std::fs::write(format!("/proc/{pid}/{name}"), text)
            .with_context(|| format!("writing /proc/{pid}/{name} ({text:?})"))
    };
    // Real root maps every ID one to one, so that files of other users keep their
    // owners. Where that is not allowed (root of a user namespace that maps only
    // itself, e.g. inside a container or `unshare -r`), and for everyone else, the
    // invoking user's own IDs alone are mapped, to themselves: the job sees the user
    // it runs as (mpirun does not take itself for root, files are named after the
    // right UID). The init holds the namespace's capabilities as its creator.
    if uid == 0
        && write("uid_map", "0 0 4294967295").is_ok()
        && write("gid_map", "0 0 4294967295").is_ok()
    {
        return Ok(());
    }
    // gid_map needs setgroups denied unless we hold CAP_SETGID over the parent
    // namespace; after a successful full uid_map the single gid line below still works.
    let _ = write("setgroups", "deny");
    if std::fs::read_to_string(format!("/proc/{pid}/uid_map")).is_ok_and(|m| m.trim().is_empty()) {
        write("uid_map", &format!("{uid} {uid} 1"))?;
    }
    write("gid_map", &format!("{gid} {gid} 1"))?;
    Ok(())
}

/// Turns the init's report into our own exit.
fn finish(msg: &str, init_status: i32) -> Result<ExitCode> {
    let mut words = msg.split_whitespace();
    match (
        words.next(),
        words.next().and_then(|w| w.parse::<i32>().ok()),
    ) {
        (Some("exit"), Some(code)) => Ok(ExitCode::from(code as u8)),
        (Some("signal"), Some(sig)) => {
            die_by_signal(sig);
            Ok(ExitCode::from((128 + sig) as u8))
        }
        (Some("checkpointed"), _) => Ok(ExitCode::from(EXIT_CHECKPOINTED)),
        _ => {
            if libc::WIFEXITED(init_status) && libc::WEXITSTATUS(init_status) != 0 {
                Ok(ExitCode::from(libc::WEXITSTATUS(init_status) as u8))
            } else {
                bail!("the stasis init ended unexpectedly (status {init_status:#x})")
            }
        }
    }
}

fn die_by_signal(sig: i32) {
    // SAFETY: resetting our own disposition, disabling core dumps and raising the
    // signal the application died of, so our parent sees the same death.
    unsafe {
        let nocore = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &nocore);
        libc::signal(sig, libc::SIG_DFL);
        let set = sigset(&[sig]);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
    }
}
