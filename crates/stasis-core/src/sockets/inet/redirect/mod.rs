//! Connections opened after a restart onto other nodes to a peer's old address.
//!
//! MPI libraries learn their peers' addresses at start-up and connect lazily: after a
//! restart onto nodes with other addresses, a rank opening its first connection to a
//! peer uses the peer's old address. When a part is restarted through a rendezvous
//! directory (see `remote`), each of its processes gets, at the end of its rebuild
//! (while it still has the restorer's capabilities in the job's user namespace), a
//! seccomp filter that sends `connect(2)` and `bind(2)` (and only them) to us as user
//! notifications ([`install`]). [`serve`] answers them in a thread of the restoring
//! init: a connect to, or a bind on, an address that a node of the job had at
//! checkpoint time is made by us on the process's own socket (taken with pidfd_getfd:
//! the same open file description, so a non-blocking socket gets EINPROGRESS as it
//! would) with that node's new address, read from the rendezvous directory (an MPI
//! library binds its new sockets to its node's address before connecting); any other
//! goes on untouched (SECCOMP_USER_NOTIF_FLAG_CONTINUE). Every other system call costs
//! nothing more than a filter of seven instructions. A checkpoint of the job allows that one filter
//! ([`installed`]).

use crate::error::{Result, SysContext};
use crate::inject::{Injector, Scratch};
use stasis_sys::inet_diag::canonical;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

const SECCOMP_SET_MODE_FILTER: u64 = 1;
const SECCOMP_FILTER_FLAG_TSYNC: u64 = 1;
const SECCOMP_FILTER_FLAG_NEW_LISTENER: u64 = 1 << 3;
const SECCOMP_FILTER_FLAG_TSYNC_ESRCH: u64 = 1 << 4;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const SECCOMP_USER_NOTIF_FLAG_CONTINUE: u32 = 1;
// _IOWR('!', 0, struct seccomp_notif), _IOWR('!', 1, struct seccomp_notif_resp),
// _IOW('!', 2, __u64)
const SECCOMP_IOCTL_NOTIF_RECV: u64 = 0xc050_2100;
const SECCOMP_IOCTL_NOTIF_SEND: u64 = 0xc018_2101;
const SECCOMP_IOCTL_NOTIF_ID_VALID: u64 = 0x4008_2102;

/// Processes of the job were given the filter (a checkpoint allows it).
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Listeners of the filters installed by this restore, until [`serve`] takes them.
static LISTENERS: Mutex<Vec<OwnedFd>> = Mutex::new(Vec::new());

/// Whether processes restored here get the filter (a restart through a rendezvous).
pub fn wanted() -> bool {
    std::env::var_os("STASIS_RENDEZVOUS").is_some()
}

/// Whether the processes of this job carry our filter.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// The filter: connect(2) and bind(2) to us, everything else allowed.
fn program() -> Vec<u8> {
    let insn = |code: u16, jt: u8, jf: u8, k: u32| {
        let mut v = code.to_le_bytes().to_vec();
        v.extend([jt, jf]);
        v.extend(k.to_le_bytes());
        v
    };
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    [
        insn(LD_W_ABS, 0, 0, 4), // arch
        insn(JEQ_K, 0, 4, AUDIT_ARCH_X86_64),
        insn(LD_W_ABS, 0, 0, 0), // nr
        insn(JEQ_K, 1, 0, libc::SYS_connect as u32),
        insn(JEQ_K, 0, 1, libc::SYS_bind as u32),
        insn(RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
        insn(RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    .concat()
}

/// Gives process `pid` (stopped, `inj` injecting into it, `scratch` a page of its
/// memory) the filter, for all its threads; its listener is kept for [`serve`].
pub fn install(inj: &Injector, pid: i32, scratch: &Scratch) -> Result<()> {
    let prog = program();
    // struct sock_fprog { unsigned short len; struct sock_filter *filter; } then the
    // filter, in the scratch page.
    let filter_at = scratch.addr + 16;
    let mut bytes = ((prog.len() / 8) as u64).to_le_bytes().to_vec();
    bytes.extend(filter_at.to_le_bytes());
    bytes.extend(&prog);
    scratch.write(&bytes)?;
    let flags = SECCOMP_FILTER_FLAG_TSYNC
        | SECCOMP_FILTER_FLAG_NEW_LISTENER
        | SECCOMP_FILTER_FLAG_TSYNC_ESRCH;
    let listener = inj.call_closing(
        "seccomp (the filter redirecting connects to old addresses)",
        libc::SYS_seccomp,
        &[SECCOMP_SET_MODE_FILTER, flags, scratch.addr],
        |fd| crate::proc::borrow_fd(pid, fd),
    )?;
    INSTALLED.store(true, Ordering::Relaxed);
    if let Ok(mut l) = LISTENERS.lock() {
        l.push(listener);
    }
    Ok(())
}

/// Answers the notifications of the filters installed so far, in a thread of ours,
/// until every process holding one is gone.
pub fn serve() {
    let listeners = LISTENERS
        .lock()
        .map(|mut l| std::mem::take(&mut *l))
        .unwrap_or_default();
    if listeners.is_empty() {
        return;
    }
    let dir = std::env::var_os("STASIS_RENDEZVOUS").map(PathBuf::from);
    let spawned = std::thread::Builder::new()
        .name("connect-redirect".into())
        .spawn(move || serve_loop(listeners, dir));
    if let Err(e) = spawned {
        tracing::warn!("cannot start the thread redirecting connects to old addresses: {e}");
    }
}

fn serve_loop(mut listeners: Vec<OwnedFd>, dir: Option<PathBuf>) {
    while !listeners.is_empty() {
        let mut fds: Vec<libc::pollfd> = listeners
            .iter()
            .map(|l| libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll on an array of initialized pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue;
        }
        let mut gone = Vec::new();
        for (i, p) in fds.iter().enumerate() {
            if p.revents & libc::POLLIN != 0 {
                handle(p.fd, dir.as_ref());
            } else if p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                gone.push(i);
            }
        }
        for i in gone.into_iter().rev() {
            listeners.remove(i);
        }
    }
}

/// struct seccomp_notif: id, pid, flags, then struct seccomp_data (nr, arch,
/// instruction_pointer, args[6]).
#[repr(C)]
#[derive(Default)]
struct Notif {
    id: u64,
    pid: u32,
    flags: u32,
    nr: i32,
    arch: u32,
    ip: u64,
    args: [u64; 6],
}

/// struct seccomp_notif_resp.
#[repr(C)]
struct Resp {
    id: u64,
    val: i64,
    error: i32,
    flags: u32,
}

fn reply(listener: i32, id: u64, error: i32, flags: u32) {
    let mut r = Resp {
        id,
        val: 0,
        error,
        flags,
    };
    // SAFETY: the ioctl reads one struct seccomp_notif_resp.
    unsafe { libc::ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND as _, &mut r as *mut Resp) };
}

/// One notification of `listener`: a connect, redirected or let through.
fn handle(listener: i32, dir: Option<&PathBuf>) {
    let mut n = Notif::default();
    // SAFETY: the ioctl writes one struct seccomp_notif into `n`.
    if unsafe {
        libc::ioctl(
            listener,
            SECCOMP_IOCTL_NOTIF_RECV as _,
            &mut n as *mut Notif,
        )
    } != 0
    {
        return;
    }
    let target = sockaddr_of(n.pid as i32, n.args[1], n.args[2]);
    let new = match (target, dir) {
        (Some(t), Some(d)) => moved(d, t),
        _ => None,
    };
    let Some(new) = new else {
        reply(listener, n.id, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
        return;
    };
    let mut id = n.id;
    // SAFETY: the ioctl reads one u64, the notification's id.
    if unsafe {
        libc::ioctl(
            listener,
            SECCOMP_IOCTL_NOTIF_ID_VALID as _,
            &mut id as *mut u64,
        )
    } != 0
    {
        return;
    }
    let (pid, fd, id) = (n.pid as i32, n.args[0] as i32, n.id);
    let bind = n.nr == libc::SYS_bind as i32;
    // A blocking connect would hold up every other notification: in a thread.
    let listener_dup = match dup(listener) {
        Some(l) => l,
        None => return reply(listener, id, -libc::ENOMEM, 0),
    };
    let spawned = std::thread::Builder::new()
        .name("connect".into())
        .spawn(move || {
            let error = match crate::proc::borrow_fd(pid, fd) {
                Ok(sock) => on_behalf(&sock, new, bind),
                Err(_) => -libc::EBADF,
            };
            tracing::debug!(
                "process {pid}: bind or connect of fd {fd} redirected to {new}: {error}"
            );
            reply(listener_dup.as_raw_fd(), id, error, 0);
        });
    if spawned.is_err() {
        reply(listener, id, -libc::EAGAIN, 0);
    }
}

fn dup(fd: i32) -> Option<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC of a descriptor of ours.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    // SAFETY: `d` was just created and is ours alone.
    (d >= 0).then(|| unsafe { OwnedFd::from_raw_fd(d) })
}

/// Connects (or with `bind`, binds) our descriptor of the process's socket to `to`;
/// 0 or a negative errno.
fn on_behalf(sock: &OwnedFd, to: SocketAddr, bind: bool) -> i32 {
    let family = match crate::sockets::sockopt(sock.as_raw_fd(), libc::SO_DOMAIN) {
        0 => libc::AF_INET,
        f => f,
    };
    let to = super::net::addr_for(family, to);
    let r = if bind {
        super::net::bind(sock, to)
    } else {
        super::net::connect(sock, to)
    };
    match r {
        Ok(()) => 0,
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// The IP address a connect or bind of process `pid` names (`addr`, `len` in its memory).
fn sockaddr_of(pid: i32, addr: u64, len: u64) -> Option<SocketAddr> {
    if addr == 0 || !(16..=128).contains(&len) {
        return None;
    }
    let mut buf = vec![0u8; len as usize];
    stasis_sys::vm::read(pid, addr, &mut buf)
        .ctx(pid, || "reading a connect's address".into())
        .ok()?;
    let mut ss: libc::sockaddr_storage =
        // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
        unsafe { std::mem::zeroed() };
    // SAFETY: copying at most sizeof(sockaddr_storage) bytes into it.
    unsafe {
        std::ptr::copy_nonoverlapping(
            buf.as_ptr(),
            (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(),
            buf.len().min(std::mem::size_of::<libc::sockaddr_storage>()),
        )
    };
    super::net::from_sockaddr(&ss)
}

/// Where a node's old address `to` is now (None: not a node of the job, or unmoved).
fn moved(dir: &std::path::Path, to: SocketAddr) -> Option<SocketAddr> {
    let old = canonical(to).ip();
    let new: IpAddr = std::fs::read_to_string(dir.join(format!("addr-{old}")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (super::remote::plain_ip(new) != super::remote::plain_ip(old))
        .then(|| SocketAddr::new(new, to.port()))
}

/// A unit test of the filter's shape.
#[cfg(test)]
mod tests {
    #[test]
    fn program_is_seven_instructions() {
        assert_eq!(super::program().len(), 7 * 8);
    }
}
