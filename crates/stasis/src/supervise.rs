//! `stasis run` and `stasis restart`: the supervisor and the namespace init.
//!
//! ```text
//! stasis (supervisor, your shell's child)         forwards signals, relays exit status
//!   └─ stasis init  PID 1 of a new user+PID+mount namespace, mounts its own /proc,
//!        │          answers `stasis checkpoint DIR` on the control socket, checkpoints
//!        │          and restores (it may choose PIDs in its namespace), reaps
//!        └─ the application  (PID 2 on `run`, its saved PID on `restart`)
//! ```
//!
//! The init runs as root of its user namespace, which is mapped to the invoking user
//! (or, when that user is root, the whole UID range is mapped one to one), so it needs
//! no privilege outside.

use crate::cli::EXIT_CHECKPOINTED;
use crate::control::{self, Reply};
use anyhow::{anyhow, bail, Context, Result};
use stasis_core::dump::{self, DumpOptions};
use stasis_core::files;
use stasis_image::{store, CheckpointReader, Origin};
use stasis_sys::clone::{fork_into_namespaces, Forked};
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixListener;
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

enum Mode {
    Run(Vec<String>),
    Restart(PathBuf),
}

/// `stasis run --dir DIR [--network private] -- CMD...`
pub fn run(dir: &Path, cmd: &[String], private_network: bool) -> Result<ExitCode> {
    store::ensure_dir(dir)?;
    start(
        &control::canonical(dir)?,
        Mode::Run(cmd.to_vec()),
        private_network,
        None,
    )
}

/// Whether the checkpoint at `path` is of a job that had a network namespace of its
/// own (read before the image is verified, only to create the namespaces: a damaged
/// image is refused by the init all the same).
fn image_private_network(path: &Path) -> bool {
    #[derive(serde::Deserialize)]
    struct Network {
        #[serde(default)]
        private_network: bool,
    }
    std::fs::read(path.join("checkpoint.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Network>(&b).ok())
        .is_some_and(|n| n.private_network)
}

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

/// `stasis restart DIR [--from N]`
pub fn restart(dir: &Path, from: Option<&str>, show_progress: bool) -> Result<ExitCode> {
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
    let private_network = image_private_network(&path);
    start(&dir, Mode::Restart(path), private_network, progress)
}

fn sigset(signals: &[i32]) -> libc::sigset_t {
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

fn signalfd(set: &libc::sigset_t) -> Result<std::fs::File> {
    // SAFETY: creating a signalfd for an initialized set.
    let fd = unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        bail!("signalfd: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned here.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

fn read_signal(f: &mut std::fs::File) -> Option<i32> {
    let mut buf = [0u8; 128];
    f.read_exact(&mut buf).ok()?;
    Some(i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]))
}

/// Starts the namespace init for `mode` and supervises it until it exits. With
/// `progress`, a spinner says so on a terminal until the application runs.
fn start(
    dir: &Path,
    mode: Mode,
    private_network: bool,
    progress: Option<String>,
) -> Result<ExitCode> {
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
    if private_network {
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
            let code = init_main(
                dir,
                mode,
                private_network,
                listener,
                status_w,
                sync_r,
                started_w,
            );
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
    finish(msg.trim(), status)
}

fn write_id_maps(pid: i32, uid: u32, gid: u32) -> Result<()> {
    let write = |name: &str, text: &str| {
        std::fs::write(format!("/proc/{pid}/{name}"), text)
            .with_context(|| format!("writing /proc/{pid}/{name} ({text:?})"))
    };
    // Real root maps every ID one to one, so that files of other users keep their
    // owners. Where that is not allowed (root of a user namespace that maps only
    // itself, e.g. inside a container or `unshare -r`), and for everyone else, the
    // invoking user alone becomes root of the new namespace.
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
        write("uid_map", &format!("0 {uid} 1"))?;
    }
    write("gid_map", &format!("0 {gid} 1"))?;
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

/// The init: PID 1 of the namespaces. Returns its exit code.
fn init_main(
    dir: &Path,
    mode: Mode,
    private_network: bool,
    listener: UnixListener,
    mut status: std::fs::File,
    mut sync: std::fs::File,
    started: std::fs::File,
) -> i32 {
    // If the supervisor dies (even by SIGKILL), the init dies, and with it, as PID 1,
    // every process of the namespace. Set before the handshake, so that a supervisor
    // dying earlier is seen as EOF below.
    // SAFETY: prctl(PR_SET_PDEATHSIG) has no memory-safety preconditions.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let mut b = [0u8; 1];
    if sync.read_exact(&mut b).is_err() {
        return 1;
    }
    drop(sync);
    let report = |status: &mut std::fs::File, msg: &str| {
        let _ = status.write_all(msg.as_bytes());
    };
    match init_inner(dir, mode, private_network, &listener, started) {
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
    private_network: bool,
    listener: &UnixListener,
    mut started: std::fs::File,
) -> Result<String> {
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
    let mut all = FORWARDED.to_vec();
    all.push(libc::SIGCHLD);
    let set = sigset(&all);
    let mut sfd = signalfd(&set)?;
    let app = match mode {
        Mode::Run(cmd) => spawn(&cmd)?,
        Mode::Restart(path) => {
            let t0 = std::time::Instant::now();
            let image = CheckpointReader::open(&path)?;
            let verified = t0.elapsed();
            let pid = stasis_core::restore::restore(&image, [Some(0), Some(1), Some(2)])?;
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
    let mut killed_by_checkpoint = false;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on an array of two initialized pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
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
                // SAFETY: forwarding a signal to the application.
                Some(sig) => unsafe {
                    libc::kill(app, sig);
                },
                None => {}
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            if let Ok((stream, _)) = listener.accept() {
                let _ = stream.set_nonblocking(false);
                control::serve_one(stream, |req| {
                    let opts = DumpOptions {
                        kill: req.kill,
                        origin: Origin::Run,
                        stdio: Some(files::own_stdio_ids()),
                        keep: req.keep,
                        incremental: req.incremental,
                        compress: req.compress,
                        own_ipc_namespace: true,
                        own_network_namespace: private_network,
                        tcp_external: req.tcp_external(),
                    };
                    match dump::checkpoint(dir, app, &opts) {
                        Ok(r) => {
                            killed_by_checkpoint |= r.killed;
                            Reply {
                                ok: true,
                                error: String::new(),
                                path: r.path.display().to_string(),
                                summary: control::summarize(&r),
                            }
                        }
                        Err(e) => Reply {
                            ok: false,
                            error: format!("checkpoint failed: {e}; the application keeps running"),
                            path: String::new(),
                            summary: String::new(),
                        },
                    }
                });
            }
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
