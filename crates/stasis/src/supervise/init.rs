//! The namespace init: PID 1 of the job's namespaces. It starts the application (or
//! restores it from a checkpoint), reaps, passes signals on, answers `stasis
//! checkpoint DIR` on the control socket and the applications on the application
//! interface ([`super::api`]), and takes the checkpoints `stasis run` asks for by
//! itself: every `--interval`, and on the `--checkpoint-on` signal. Every checkpoint
//! runs the applications' pre-checkpoint hooks first.

use super::{api, read_signal, signalfd, sigset, JobOptions, Mode, FORWARDED};
use crate::control::{self, Reply};
use anyhow::{bail, Context, Result};
use stasis_core::dump::{self, DumpOptions, DumpReport};
use stasis_core::files;
use stasis_image::{CheckpointReader, Origin};
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Brings the loopback interface of a new network namespace up.
fn loopback_up() -> Result<()> {
    // SAFETY: a socket for the interface ioctls, closed below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroed is a valid empty value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, c) in ifr.ifr_name.iter_mut().zip(b"lo") {
        *d = *c as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the flags of `ifr`.
    let r = unsafe {
        if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            -1
        } else {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr)
        }
    };
    let e = std::io::Error::last_os_error();
    // SAFETY: closing the socket created above.
    unsafe { libc::close(s) };
    if r != 0 {
        bail!("bringing up the loopback interface of the job's network namespace: {e}");
    }
    Ok(())
}

/// How the init checkpoints its job.
fn options(
    job: &JobOptions,
    kill: bool,
    incremental: bool,
    compress: stasis_image::Compression,
    tcp_external: stasis_core::sockets::TcpExternal,
) -> DumpOptions {
    DumpOptions {
        kill,
        origin: Origin::Run,
        stdio: Some(files::own_stdio_ids()),
        keep: job.keep,
        incremental,
        compress,
        own_ipc_namespace: true,
        own_network_namespace: job.private_network,
        tcp_external,
        unix_external_reconnect: job.unix_external_reconnect,
        private_tmp: job.private_tmp,
        app_api: None,
        stdio_files: Vec::new(),
        fault: None,
        barrier: None,
        peer_nodes: Vec::new(),
    }
}

/// Takes a checkpoint of the job `app` into `dir`: the applications' pre-checkpoint
/// hooks run first (a warning, on our standard error and returned, for each that does
/// not return in time), then those that asked for it get the result.
fn take(
    api: &mut api::Server,
    view: &DirView,
    dir: &Path,
    app: i32,
    mut o: DumpOptions,
) -> (stasis_core::Result<DumpReport>, Vec<String>) {
    let warnings = api.before_checkpoint();
    for w in &warnings {
        eprintln!("stasis: warning: {w}");
    }
    o.app_api = Some(api.peers());
    let r = dump::checkpoint(dir, app, &o).map(|mut r| {
        r.path = view.shown(&r.path);
        r
    });
    api.after_checkpoint(match &r {
        Ok(r) => Ok(r.path.as_path()),
        Err(e) => Err(format!(
            "checkpoint failed: {}",
            view.shown_text(&e.to_string())
        )),
    });
    (r, warnings)
}

/// The first of `candidates` (newest first) that verifies; the others are passed over
/// with a warning naming what is wrong.
fn open_first_intact(candidates: &[PathBuf]) -> Result<(PathBuf, CheckpointReader)> {
    let mut last = None;
    for (i, path) in candidates.iter().enumerate() {
        match CheckpointReader::open(path) {
            Ok(image) => return Ok((path.clone(), image)),
            Err(e) if i + 1 < candidates.len() => {
                eprintln!(
                    "stasis: warning: {} cannot be restored ({e}); trying the one before it",
                    path.display()
                );
                last = Some(e);
            }
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e.into()),
        None => bail!("no checkpoint to restart from"),
    }
}

/// The checkpoint directory as the init reaches it. With a private /tmp and /dev/shm
/// mounted over the host's, a DIR under them is reached through a descriptor opened
/// before (`/proc/self/fd/N/...`); messages show the real path.
struct DirView {
    real: PathBuf,
    here: PathBuf,
    _fd: Option<std::os::unix::io::OwnedFd>,
}

impl DirView {
    fn open(dir: &Path, private_tmp: bool) -> Result<DirView> {
        let hidden = private_tmp
            && stasis_core::tmpdirs::DIRS
                .iter()
                .any(|d| dir.starts_with(d));
        if !hidden {
            return Ok(DirView {
                real: dir.to_path_buf(),
                here: dir.to_path_buf(),
                _fd: None,
            });
        }
        let f = std::fs::File::open(dir)
            .with_context(|| format!("opening the checkpoint directory {}", dir.display()))?;
        let fd: std::os::unix::io::OwnedFd = f.into();
        Ok(DirView {
            real: dir.to_path_buf(),
            here: PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            _fd: Some(fd),
        })
    }

    fn here(&self) -> &Path {
        &self.here
    }

    /// `p` (under the real path) as the init reaches it.
    fn to_here(&self, p: &Path) -> PathBuf {
        p.strip_prefix(&self.real)
            .map_or_else(|_| p.to_path_buf(), |rest| self.here.join(rest))
    }

    /// `p` (as the init reaches it) as the user knows it.
    fn shown(&self, p: &Path) -> PathBuf {
        p.strip_prefix(&self.here)
            .map_or_else(|_| p.to_path_buf(), |rest| self.real.join(rest))
    }

    fn shown_text(&self, text: &str) -> String {
        text.replace(&*self.here.to_string_lossy(), &self.real.to_string_lossy())
    }
}

/// Mounts the job's own /tmp and /dev/shm (`--tmp private`). For `stasis run`, the
/// working directory and the command must not be under them: the application would
/// start with the host's, and a restart could not find them.
fn private_tmp(mode: &Mode) -> Result<()> {
    let under = |p: &Path| stasis_core::tmpdirs::DIRS.iter().find(|d| p.starts_with(d));
    if let Mode::Run(cmd) = mode {
        let cwd = std::env::current_dir().context("the working directory")?;
        if let Some(d) = under(&cwd) {
            bail!(
                "the working directory {} is under {d}, which is private to the job (stasis run --tmp private, the default): start the job from another directory, or keep the host's {d} with --tmp host",
                cwd.display()
            );
        }
        if let Some(d) = cmd.first().and_then(|c| under(&cwd.join(c))) {
            bail!(
                "the command {} is under {d}, which is private to the job (stasis run --tmp private, the default): put it elsewhere, or keep the host's {d} with --tmp host",
                cmd[0]
            );
        }
    }
    stasis_core::tmpdirs::mount_private()?;
    Ok(())
}

/// A periodic timer (timerfd).
struct Timer {
    fd: std::os::unix::io::OwnedFd,
}

impl Timer {
    fn every(period: std::time::Duration) -> Result<Timer> {
        use std::os::unix::io::FromRawFd;
        // SAFETY: timerfd_create returns a new descriptor or -1.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            )
        };
        if fd < 0 {
            bail!("timerfd_create: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned here.
        let fd = unsafe { std::os::unix::io::OwnedFd::from_raw_fd(fd) };
        let ts = libc::timespec {
            tv_sec: period.as_secs() as libc::time_t,
            tv_nsec: period.subsec_nanos() as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: arming our timerfd with a valid itimerspec.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
            bail!("timerfd_settime: {}", std::io::Error::last_os_error());
        }
        Ok(Timer { fd })
    }

    /// Consumes the expirations (a checkpoint longer than the period counts once).
    fn expired(&self) {
        let mut n = [0u8; 8];
        // SAFETY: reading the 8-byte expiration count into a buffer we own.
        unsafe { libc::read(self.fd.as_raw_fd(), n.as_mut_ptr().cast(), 8) };
    }
}

/// The init: PID 1 of the namespaces. Waits until the supervisor has written its user
/// and group ID maps, then executes stasis again as the init proper (see [`reexec`]);
/// returns (an exit code) only if that fails.
pub(super) fn init_main(
    dir: &Path,
    mode: Mode,
    opts: &JobOptions,
    listener: UnixListener,
    mut status: std::fs::File,
    mut sync: std::fs::File,
    started: std::fs::File,
) -> i32 {
    // If the supervisor dies (even by SIGKILL), the init dies, and with it, as PID 1,
    // every process of the namespace. Set before the handshake, so that a supervisor
    // dying earlier is seen as EOF below; kept across the execution.
    // SAFETY: prctl(PR_SET_PDEATHSIG) has no memory-safety preconditions.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let mut b = [0u8; 1];
    if sync.read_exact(&mut b).is_err() {
        return 1;
    }
    drop(sync);
    // The init runs as the user's own ID: its capabilities in the namespace must be
    // made ambient to survive the execution.
    if let Err(e) = stasis_sys::caps::keep_across_exec() {
        eprintln!("stasis: error: keeping the namespace init's capabilities: {e}");
        let _ = status.write_all(b"error");
        return 1;
    }
    let e = reexec(dir, mode, opts, &listener, &status, &started);
    eprintln!("stasis: error: starting the namespace init: {e:#}");
    let _ = status.write_all(b"error");
    1
}

/// What the init is started with, passed over its execution (see [`reexec`]). Paths
/// as bytes: they need not be UTF-8.
#[derive(serde::Serialize, serde::Deserialize)]
struct InitArgs {
    dir: Vec<u8>,
    /// The command of `stasis run`, or
    run: Option<Vec<String>>,
    /// the checkpoints to restart from, newest first.
    restart: Vec<Vec<u8>>,
    opts: JobOptions,
    /// Descriptors of the control socket, the status pipe and the started pipe.
    fds: [i32; 3],
}

/// Executes stasis again (`stasis __init ARGS`, [`resume`]) in the namespaces, now that
/// the init is root of its user namespace. The memory of a process belongs to the
/// user namespace it was executed in, and a process that is not dumpable
/// (PR_SET_DUMPABLE 0) may be traced, and its /proc files read, only by a holder of
/// CAP_SYS_PTRACE there. Restored processes are forks of the init and keep its
/// memory's namespace: this makes it the job's, where the init holds every capability,
/// instead of the host's (the supervisor's memory, forked), where it holds none. The
/// application of `stasis run` is executed in the namespace anyway.
fn reexec(
    dir: &Path,
    mode: Mode,
    opts: &JobOptions,
    listener: &UnixListener,
    status: &std::fs::File,
    started: &std::fs::File,
) -> anyhow::Error {
    use std::os::unix::ffi::OsStrExt;
    let bytes = |p: &Path| p.as_os_str().as_bytes().to_vec();
    let (run, restart) = match mode {
        Mode::Run(cmd) => (Some(cmd), Vec::new()),
        Mode::Restart(paths) => (None, paths.iter().map(|p| bytes(p)).collect()),
    };
    let fds = [
        listener.as_raw_fd(),
        status.as_raw_fd(),
        started.as_raw_fd(),
    ];
    let args = InitArgs {
        dir: bytes(dir),
        run,
        restart,
        opts: opts.clone(),
        fds,
    };
    let json = match serde_json::to_string(&args) {
        Ok(j) => j,
        Err(e) => return anyhow::anyhow!("encoding its arguments: {e}"),
    };
    for fd in fds {
        // SAFETY: clearing FD_CLOEXEC on descriptors we own, so that they are inherited.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return anyhow::anyhow!("fcntl: {}", std::io::Error::last_os_error());
        }
    }
    // The same verbosity (STASIS_LOG, if set, is inherited).
    let level = tracing::level_filters::LevelFilter::current();
    let verbosity = if level <= tracing::level_filters::LevelFilter::ERROR {
        "-q"
    } else if level >= tracing::level_filters::LevelFilter::DEBUG {
        "-vv"
    } else if level >= tracing::level_filters::LevelFilter::INFO {
        "-v"
    } else {
        ""
    };
    let mut argv: Vec<CString> = vec![c"stasis".into()];
    argv.extend(CString::new(verbosity).ok().filter(|v| !v.is_empty()));
    argv.push(c"__init".into());
    match CString::new(json) {
        Ok(j) => argv.push(j),
        Err(e) => return anyhow::anyhow!("encoding its arguments: {e}"),
    }
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: a NUL-terminated path and argument vector of valid C strings, alive
    // across the call; the environment is ours.
    unsafe { libc::execv(c"/proc/self/exe".as_ptr(), ptrs.as_ptr()) };
    anyhow::anyhow!(
        "executing /proc/self/exe: {}",
        std::io::Error::last_os_error()
    )
}

/// `stasis __init ARGS`: the init, executed again by [`init_main`]. Returns its exit
/// code.
pub fn resume(args: &str) -> i32 {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::FromRawFd;
    let args: InitArgs = match serde_json::from_str(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("stasis: error: `stasis __init` is stasis's own (bad arguments: {e})");
            return 1;
        }
    };
    let path = |b: &[u8]| PathBuf::from(std::ffi::OsStr::from_bytes(b));
    for fd in args.fds {
        // SAFETY: setting FD_CLOEXEC on descriptors passed to us; not inherited further.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: the descriptors our pre-execution self passed on, open and ours alone.
    let (listener, mut status, started) = unsafe {
        (
            UnixListener::from_raw_fd(args.fds[0]),
            std::fs::File::from_raw_fd(args.fds[1]),
            std::fs::File::from_raw_fd(args.fds[2]),
        )
    };
    let mode = match args.run {
        Some(cmd) => Mode::Run(cmd),
        None => Mode::Restart(args.restart.iter().map(|p| path(p)).collect()),
    };
    let report = |status: &mut std::fs::File, msg: &str| {
        let _ = status.write_all(msg.as_bytes());
    };
    match init_inner(&path(&args.dir), mode, &args.opts, &listener, started) {
        Ok(msg) => {
            report(&mut status, &msg);
            0
        }
        Err(e) => {
            eprintln!("stasis: error: {e:#}");
            report(&mut status, "error");
            1
        }
    }
}

fn init_inner(
    dir: &Path,
    mode: Mode,
    opts: &JobOptions,
    listener: &UnixListener,
    mut started: std::fs::File,
) -> Result<String> {
    let private_network = opts.private_network;
    // SAFETY: setsid and mount with valid C strings.
    unsafe {
        // Out of the terminal's foreground group: terminal signals reach the supervisor,
        // which forwards them once.
        libc::setsid();
        let proc_ = c"proc";
        if libc::mount(
            proc_.as_ptr(),
            c"/proc".as_ptr(),
            proc_.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            bail!(
                "mounting /proc for the new PID namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    if private_network {
        loopback_up()?;
    }
    let view = DirView::open(dir, opts.private_tmp)?;
    let dir = view.here();
    if opts.private_tmp {
        private_tmp(&mode)?;
    }
    let mut all = FORWARDED.to_vec();
    all.push(libc::SIGCHLD);
    let set = sigset(&all);
    let mut sfd = signalfd(&set)?;
    let mut api = api::Server::listen(&view.real, opts.hook_timeout)?;
    // The application finds the interface in its environment (and so do restored
    // processes started under an earlier stasis of the same directory).
    std::env::set_var(stasis_app::protocol::ENV, api.address());
    let mut stdio_files = Vec::new();
    let app = match mode {
        Mode::Run(cmd) => spawn(&cmd)?,
        Mode::Restart(candidates) => {
            let t0 = std::time::Instant::now();
            let candidates: Vec<PathBuf> = candidates.iter().map(|c| view.to_here(c)).collect();
            let (path, mut image) = open_first_intact(&candidates)?;
            if opts.stdio_inherit {
                files::inherit_stdio(&mut image.meta);
            }
            for w in files::inherit_unopenable_stdio(&mut image.meta) {
                eprintln!("stasis: warning: {w}");
            }
            stdio_files = files::stdio_files_of(&image.meta);
            let path = view.shown(&path);
            let verified = t0.elapsed();
            let dirs = &image.meta.private_dirs;
            if !dirs.is_empty() {
                if !opts.private_tmp {
                    bail!("{} was taken with a private /tmp and /dev/shm, which this restart did not mount", path.display());
                }
                stasis_core::tmpdirs::recreate(&image, dirs)?;
            }
            let mut remade = Vec::new();
            let pid =
                stasis_core::restore::restore(&image, [Some(0), Some(1), Some(2)], &mut remade)?;
            api.adopt(remade);
            let p = &image.meta.processes[0];
            tracing::info!(
                "restored process {pid} ({} threads) from {} in {:.1} ms (verify {:.1} ms, rebuild {:.1} ms)",
                p.threads.len(),
                path.display(),
                t0.elapsed().as_secs_f64() * 1e3,
                verified.as_secs_f64() * 1e3,
                (t0.elapsed() - verified).as_secs_f64() * 1e3
            );
            pid
        }
    };
    let _ = started.write_all(b"r");
    drop(started);
    listener.set_nonblocking(true).context("control socket")?;
    let timer = opts.interval.map(Timer::every).transpose()?;
    let mut killed_by_checkpoint = false;
    // The checkpoints stasis takes by itself (a timer, a signal, an application's
    // request) are reported on its standard error; those asked for with `stasis
    // checkpoint` to the asker.
    let auto = |api: &mut api::Server, kill: bool, why: &str| {
        let mut o = options(
            opts,
            kill,
            opts.incremental,
            stasis_image::Compression::None,
            if opts.tcp_external_reset {
                stasis_core::sockets::TcpExternal::Reset
            } else {
                stasis_core::sockets::TcpExternal::Refuse
            },
        );
        o.stdio_files = stdio_files.clone();
        match take(api, &view, dir, app, o) {
            (Ok(r), _) => {
                eprintln!("{} ({why})", control::summarize(&r));
                r.killed
            }
            (Err(e), _) => {
                eprintln!(
                    "stasis: {why}: checkpoint failed: {}; the application keeps running",
                    view.shown_text(&e.to_string())
                );
                false
            }
        }
    };
    loop {
        let mut fds: Vec<libc::pollfd> = [
            sfd.as_raw_fd(),
            listener.as_raw_fd(),
            timer.as_ref().map_or(-1, |t| t.fd.as_raw_fd()),
        ]
        .into_iter()
        .chain(api.fds())
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
        // SAFETY: poll on an array of initialized pollfds (a negative fd is ignored).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            match read_signal(&mut sfd) {
                Some(libc::SIGCHLD) => {
                    if let Some(st) = reap(app) {
                        return Ok(describe_exit(st, killed_by_checkpoint));
                    }
                }
                Some(sig) if Some(sig) == opts.checkpoint_on => {
                    killed_by_checkpoint |= auto(&mut api, true, &format!("on signal {sig}"));
                }
                // SAFETY: forwarding a signal to the application.
                Some(sig) => unsafe {
                    libc::kill(app, sig);
                },
                None => {}
            }
        }
        if fds[2].revents & libc::POLLIN != 0 {
            if let Some(t) = &timer {
                t.expired();
                auto(&mut api, false, "periodic");
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            if let Ok((stream, _)) = listener.accept() {
                let _ = stream.set_nonblocking(false);
                control::serve_one(stream, |req, stream| {
                    let mut o = options(
                        opts,
                        req.kill,
                        req.incremental,
                        req.compress,
                        req.tcp_external(),
                    );
                    o.keep = req.keep;
                    o.unix_external_reconnect |= req.unix_external_reconnect;
                    o.stdio_files = stdio_files.clone();
                    o.fault = req.fault.clone();
                    if req.coordinated {
                        // Connections to other nodes' parts are the job's own.
                        o.tcp_external = stasis_core::sockets::TcpExternal::Peer;
                        o.peer_nodes = req.peers.iter().filter_map(|a| a.parse().ok()).collect();
                        match control::StreamBarrier::new(stream) {
                            Ok(b) => o.barrier = Some(std::sync::Arc::new(b)),
                            Err(e) => return Reply::failure(format!("control socket: {e}")),
                        }
                    }
                    match take(&mut api, &view, dir, app, o) {
                        (Ok(r), warnings) => {
                            killed_by_checkpoint |= r.killed;
                            let mut summary: String = warnings
                                .iter()
                                .map(|w| format!("stasis: warning: {w}\n"))
                                .collect();
                            summary.push_str(&control::summarize(&r));
                            Reply {
                                ok: true,
                                path: r.path.display().to_string(),
                                summary,
                                ..Reply::default()
                            }
                        }
                        (Err(e), _) => Reply {
                            passing: matches!(e, stasis_core::Error::Transient { .. }),
                            ..Reply::failure(format!(
                                "checkpoint failed: {}; the application keeps running",
                                view.shown_text(&e.to_string())
                            ))
                        },
                    }
                });
            }
        }
        if fds[3..].iter().any(|f| f.revents != 0) {
            api.service();
        }
        if let Some(pid) = api.requested() {
            killed_by_checkpoint |= auto(&mut api, false, &format!("asked for by process {pid}"));
        }
    }
}

/// Reaps children; returns the application's wait status once it has ended. Also
/// sees our tracees (a thread a failed checkpoint could not resume because it had not
/// stopped in time): those that stopped are resumed.
fn reap(app: i32) -> Option<i32> {
    stasis_core::freeze::settle();
    let mut result = None;
    loop {
        let mut st = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let r = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        if r <= 0 {
            return result;
        }
        if libc::WIFSTOPPED(st) {
            // Only a tracee reports a stop to us (no WUNTRACED).
            stasis_core::freeze::resume_reported(r, st);
            continue;
        }
        stasis_core::snapshot::forget_reaped(r);
        stasis_core::snapshot::forget_left(r);
        if r == app && (libc::WIFEXITED(st) || libc::WIFSIGNALED(st)) {
            result = Some(st);
        }
    }
}

fn describe_exit(st: i32, killed_by_checkpoint: bool) -> String {
    if libc::WIFEXITED(st) {
        format!("exit {}", libc::WEXITSTATUS(st))
    } else if killed_by_checkpoint && libc::WTERMSIG(st) == libc::SIGKILL {
        "checkpointed".into()
    } else {
        format!("signal {}", libc::WTERMSIG(st))
    }
}

/// Starts the application of `stasis run`.
fn spawn(cmd: &[String]) -> Result<i32> {
    let args: Vec<CString> = cmd
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<std::result::Result<_, _>>()
        .context("command contains a NUL byte")?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: the init is single-threaded; the child only calls async-signal-safe
    // functions before exec (argv was built before the fork).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the child: new session, clean signal mask, exec.
        unsafe {
            libc::setsid();
            // The application gets no capability the init holds (unless it runs as
            // root of the namespace, as real root's job does).
            let _ = stasis_sys::caps::drop_inheritable();
            let empty = sigset(&[]);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Descriptors inherited from outside other than stdio are not passed on:
            // they could not be given back on restart.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            libc::execvp(argv[0], argv.as_ptr());
            let msg = b"stasis: cannot execute the command\n";
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(127);
        }
    }
    Ok(pid)
}
