//! Forking the restored tree: each new process is forked with its saved PID (retried
//! while the PID is still being released), forks its own children and zombies in turn,
//! then prepares itself and reports to the restorer.

use super::prepare::{prepare, prepare_fds};
use super::PID_RETRIES;
use crate::error::{Result, SysContext};
use stasis_image::{CheckpointReader, Process};
use stasis_sys::clone::{fork_with_pid_flags, Forked};
use std::collections::HashMap;

/// fork_with_pid, retrying while the PID is still held for a moment by an exiting
/// thread of ours (the checksum workers).
pub(super) fn fork_retry(pid: i32) -> Result<Forked> {
    fork_retry_flags(pid, 0)
}

/// [`fork_retry`] with clone flags (CLONE_FILES).
fn fork_retry_flags(pid: i32, flags: u64) -> Result<Forked> {
    let mut tries = 0;
    loop {
        // SAFETY: the caller is single-threaded at this point (worker threads have
        // been joined); a child only runs `Tree::child_main`, which never returns.
        match unsafe { fork_with_pid_flags(pid, flags) } {
            Err(e) if e.errno == libc::EEXIST && tries < PID_RETRIES => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => {
                return r.ctx(pid, || {
                    format!("creating process {pid} (clone3 with set_tid; is the PID in use?)")
                })
            }
        }
    }
}

/// What every new process needs to prepare itself; each starts as a copy of the
/// restorer (or of its parent), so this is shared by all.
pub(super) struct Tree<'a> {
    pub(super) image: &'a CheckpointReader,
    /// The process-side end of each process's socket, by process index.
    pub(super) socks: Vec<i32>,
    pub(super) hi: i32,
    pub(super) gadgets: Vec<u64>,
    /// The restorer's descriptor of each shared memory object, inherited.
    pub(super) shm: HashMap<u64, i32>,
    /// The restorer's descriptor of a slave of each pseudo-terminal, inherited.
    pub(super) ttys: HashMap<u64, i32>,
}

impl Tree<'_> {
    /// Runs in new process `idx`: forks its children and zombies, prepares, reports,
    /// and waits to be rebuilt.
    ///
    /// `socks` are the numbers of the processes' sockets here: the inherited ones, or
    /// copies above `hi` kept for processes created later that share our table (a
    /// child sharing its parent's table, clone CLONE_FILES, is forked once the
    /// parent's fds are in place, and sets up no fds of its own).
    pub(super) fn child_main(&self, idx: usize, mut socks: Vec<i32>) -> ! {
        let procs = &self.image.meta.processes;
        let p = &procs[idx];
        let follower = p.fd_table_of.is_some();
        let mut sock = socks[idx];
        let mut ctty_err = None;
        // SAFETY: plain libc calls on our own process; the set is initialized by
        // sigfillset.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
            // A session or group id of 0 is one led from outside the checkpointing
            // PID namespace (a container's `docker exec`): the process stays in the
            // session and group it inherits, as its saved parent's did.
            if p.sid == p.pid {
                libc::setsid();
                // Its controlling terminal, before the members of its session are
                // forked (they inherit it).
                if let Some(&s) = p.ctty.and_then(|id| self.ttys.get(&id)) {
                    if libc::ioctl(s, libc::TIOCSCTTY, 0) != 0 {
                        ctty_err = Some(std::io::Error::last_os_error());
                    }
                }
            } else if p.pgid == p.pid {
                libc::setpgid(0, 0);
            } else if p.pgid > 0 {
                // Join now if the group's leader exists already (an ancestor or an
                // earlier sibling); otherwise the rebuild does it.
                libc::setpgid(0, p.pgid);
            }
        }
        let mut result = match ctty_err {
            Some(e) => Err(format!("taking its controlling terminal back: {e}")),
            None => Ok(()),
        };
        let mut zombies = false;
        for z in self.image.meta.zombies.iter().filter(|z| z.ppid == p.pid) {
            match fork_retry(z.pid) {
                Ok(Forked::Child) => become_zombie(z.status),
                Ok(Forked::Parent(_)) => {
                    zombies = true;
                    // Wait until it is a zombie, without reaping it.
                    // SAFETY: waitid with WNOWAIT on our own child; siginfo is plain data.
                    unsafe {
                        let mut info: libc::siginfo_t = std::mem::zeroed();
                        libc::waitid(
                            libc::P_PID,
                            z.pid as libc::id_t,
                            &mut info,
                            libc::WEXITED | libc::WNOWAIT,
                        );
                    }
                }
                Err(e) => result = Err(e.to_string()),
            }
        }
        if zombies {
            // The application got its SIGCHLD for these long ago: drop the new ones
            // (signals are blocked here; pending ones saved in the image come later).
            // SAFETY: dequeuing pending SIGCHLDs of our own process without waiting.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGCHLD);
                let zero = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                while libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) > 0 {}
            }
        }
        let children: Vec<usize> = procs
            .iter()
            .enumerate()
            .filter(|(i, c)| c.ppid == p.pid && *i != idx)
            .map(|(i, _)| i)
            .collect();
        let (sharing, own): (Vec<usize>, Vec<usize>) = children
            .iter()
            .partition(|&&i| procs[i].fd_table_of == Some(p.pid));
        for &i in &own {
            match fork_retry(procs[i].pid) {
                Ok(Forked::Child) => self.child_main(i, socks.clone()),
                Ok(Forked::Parent(_)) => {}
                Err(e) => result = Err(e.to_string()),
            }
        }
        if follower {
            // Our table is our parent's, which closed every socket but those of the
            // processes below us (kept above `hi`): those of the children just forked
            // are theirs now.
            for &i in &own {
                for j in subtree(procs, i) {
                    // SAFETY: closing a kept copy of a socket end in our table.
                    unsafe { libc::close(socks[j]) };
                }
            }
        } else {
            // The sockets of the processes below the children that will share our
            // table are kept above `hi` (our fds go below it); the other processes'
            // ends are not ours to keep.
            let mut kept: HashMap<usize, i32> = HashMap::new();
            for &i in &sharing {
                for j in subtree(procs, i) {
                    // SAFETY: F_DUPFD of an inherited descriptor.
                    let k = unsafe { libc::fcntl(socks[j], libc::F_DUPFD_CLOEXEC, self.hi) };
                    if k < 0 {
                        result = Err(format!(
                            "keeping the restore socket of process {}: {}",
                            procs[j].pid,
                            std::io::Error::last_os_error()
                        ));
                    }
                    kept.insert(j, k);
                }
            }
            for (i, &s) in socks.iter().enumerate() {
                if i != idx {
                    // SAFETY: closing other processes' socket ends inherited from our parent.
                    unsafe { libc::close(s) };
                }
            }
            for (j, k) in kept {
                socks[j] = k;
            }
        }
        let for_sharing: Vec<i32> = sharing
            .iter()
            .flat_map(|&i| subtree(procs, i))
            .map(|j| socks[j])
            .collect();
        let fds_ready = result.and_then(|()| {
            prepare_fds(self.image, idx, self.hi, &self.shm, &mut sock, &for_sharing)
        });
        if fds_ready.is_ok() {
            for &i in &sharing {
                match fork_retry_flags(procs[i].pid, libc::CLONE_FILES as u64) {
                    Ok(Forked::Child) => self.child_main(i, socks.clone()),
                    Ok(Forked::Parent(_)) => {}
                    Err(e) => {
                        // The restorer learns it from the missing reports: the sockets
                        // kept for them go.
                        tracing::debug!("{e}");
                        for j in subtree(procs, i) {
                            // SAFETY: closing a kept copy of a socket end in our table.
                            unsafe { libc::close(socks[j]) };
                        }
                    }
                }
            }
        }
        let msg = match fds_ready
            .and_then(|map_files| prepare(p, self.hi, self.gadgets[idx], &mut sock, map_files))
        {
            Ok(prep) => format!("OK {}", serde_json::to_string(&prep).unwrap_or_default()),
            Err(e) => format!("ERR {e}"),
        };
        // SAFETY: sending on our own socket.
        unsafe { libc::send(sock, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL) };
        if !msg.starts_with("OK") {
            // SAFETY: _exit is always safe to call.
            unsafe { libc::_exit(1) };
        }
        loop {
            // SAFETY: pause has no preconditions; the restorer stops us here.
            unsafe { libc::pause() };
        }
    }
}

/// Exits at once with the saved wait status, leaving a zombie for the parent.
fn become_zombie(status: i32) -> ! {
    // SAFETY: plain libc calls in a child that exits right away.
    unsafe {
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            let nocore = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &nocore);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::raise(sig);
        }
        libc::_exit(libc::WEXITSTATUS(status))
    }
}

/// Process `idx` and the processes below it.
fn subtree(procs: &[Process], idx: usize) -> Vec<usize> {
    let mut out = vec![idx];
    let mut k = 0;
    while k < out.len() {
        let pid = procs[out[k]].pid;
        out.extend(
            procs
                .iter()
                .enumerate()
                .filter(|(i, c)| c.ppid == pid && !out.contains(i))
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
        );
        k += 1;
    }
    out
}
