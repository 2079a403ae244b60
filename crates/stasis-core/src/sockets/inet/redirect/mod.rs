//! Connections opened, and addresses seen, after a restart onto other nodes.
//!
//! MPI libraries learn their peers' addresses at start-up, connect lazily, and check
//! who connected to them by the address accept(2) gives: after a restart onto nodes
//! with other addresses, a rank opening its first connection to a peer uses the peer's
//! old address, and the peer accepting it must see the rank's old address (OpenMPI
//! drops a connection from an address it does not know). When a part is restarted
//! through a rendezvous directory (see `remote`), each of its processes gets, at the
//! end of its rebuild (while it still has the restorer's capabilities in the job's
//! user namespace), a seccomp filter that sends `connect`, `bind`, `accept`,
//! `accept4`, `getpeername` and `getsockname` (and only them) to us as user
//! notifications ([`install`]). [`serve`] answers them in a thread of the restoring
//! init:
//!
//! * `connect`/`bind` ([`connect`]): to or on an address a node of the job had at
//!   checkpoint time, made by us on the process's own socket with that node's new
//!   address;
//! * `accept`/`accept4`, `getpeername`, `getsockname` ([`names`]): a new address of a
//!   node of the job is reported as the node's old one (an accepted connection is
//!   accepted by us and handed to the process with SECCOMP_IOCTL_NOTIF_ADDFD).
//!
//! Anything else goes on untouched (SECCOMP_USER_NOTIF_FLAG_CONTINUE). Every other
//! system call costs nothing more than a filter of eleven instructions. A checkpoint of
//! the job allows that one filter ([`installed`]). The address map is read from the
//! rendezvous directory: `addr-OLD` holds the new address of OLD.

mod connect;
mod names;

use crate::error::{Result, SysContext};
use crate::inject::{Injector, Scratch};
use std::net::SocketAddr;
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
    super::remote::rendezvous().is_some()
}

/// Whether the processes of this job carry our filter.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// The system calls sent to us.
const NOTIFIED: [i64; 6] = [
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_getpeername,
    libc::SYS_getsockname,
];

/// The filter: the calls of [`NOTIFIED`] to us, everything else allowed.
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
    let n = NOTIFIED.len() as u8;
    let mut p = vec![
        insn(LD_W_ABS, 0, 0, 4), // arch
        insn(JEQ_K, 0, n + 2, AUDIT_ARCH_X86_64),
        insn(LD_W_ABS, 0, 0, 0), // nr
    ];
    for (i, nr) in NOTIFIED.iter().enumerate() {
        let left = n - 1 - i as u8; // comparisons after this one
        let jf = if left == 0 { 1 } else { 0 };
        p.push(insn(JEQ_K, left, jf, *nr as u32));
    }
    p.push(insn(RET_K, 0, 0, SECCOMP_RET_USER_NOTIF));
    p.push(insn(RET_K, 0, 0, SECCOMP_RET_ALLOW));
    p.concat()
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
    let dir = super::remote::rendezvous();
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
pub(super) struct Notif {
    pub id: u64,
    pub pid: u32,
    pub flags: u32,
    pub nr: i32,
    pub arch: u32,
    pub ip: u64,
    pub args: [u64; 6],
}

/// struct seccomp_notif_resp.
#[repr(C)]
struct Resp {
    id: u64,
    val: i64,
    error: i32,
    flags: u32,
}

pub(super) fn reply(listener: i32, id: u64, error: i32, flags: u32) {
    let mut r = Resp {
        id,
        val: 0,
        error,
        flags,
    };
    // SAFETY: the ioctl reads one struct seccomp_notif_resp.
    unsafe { libc::ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND as _, &mut r as *mut Resp) };
}

/// One notification of `listener`, answered (or handed to a thread that answers it).
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
    let Some(dir) = dir else {
        return reply(listener, n.id, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
    };
    let nr = i64::from(n.nr);
    if nr == libc::SYS_connect || nr == libc::SYS_bind {
        connect::handle(listener, &n, dir)
    } else if nr == libc::SYS_accept || nr == libc::SYS_accept4 {
        names::accept(listener, &n, dir)
    } else {
        names::name(listener, &n, dir)
    }
}

/// Whether notification `id` of `listener` still waits for its answer (its process
/// was not interrupted, nor killed).
fn still_valid(listener: i32, id: u64) -> bool {
    let mut id = id;
    // SAFETY: the ioctl reads one u64, the notification's id.
    let r = unsafe {
        libc::ioctl(
            listener,
            SECCOMP_IOCTL_NOTIF_ID_VALID as _,
            &mut id as *mut u64,
        )
    };
    r == 0
}

pub(super) fn dup(fd: i32) -> Option<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC of a descriptor of ours.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    // SAFETY: `d` was just created and is ours alone.
    (d >= 0).then(|| unsafe { OwnedFd::from_raw_fd(d) })
}

/// The IP address at `addr` (`len` bytes) in the memory of process `pid`.
pub(super) fn sockaddr_of(pid: i32, addr: u64, len: u64) -> Option<SocketAddr> {
    if addr == 0 || !(16..=128).contains(&len) {
        return None;
    }
    let mut buf = vec![0u8; len as usize];
    stasis_sys::vm::read(pid, addr, &mut buf)
        .ctx(pid, || "reading a socket address".into())
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

/// A unit test of the filter's shape.
#[cfg(test)]
mod tests {
    #[test]
    fn program_is_eleven_instructions() {
        assert_eq!(super::program().len(), 11 * 8);
    }
}
