//! Connections to the stasis application interface (docs/API.md): the one kind of
//! socket stasis saves whose peer is outside the job.
//!
//! A process of the job that uses the interface holds a stream UNIX socket connected
//! to the supervising stasis init. The init, which takes the checkpoint, says which
//! sockets are its ends of such connections and which is its listener ([`ApiPeers`]);
//! a socket of the job whose peer is one of those ends, or that waits in the listener's
//! accept queue, is saved as [`FdKind::AppApi`] instead of being refused as connected
//! outside the job. Its queues are not saved: the protocol leaves nothing in flight
//! that matters across a restart (the client asks again, see `stasis_app`).
//!
//! Restore makes a new connected pair for each such description: the process gets one
//! end at its fd number with its flags, the restoring init the other ([`Remade`]), in
//! which the `restarted` event is queued before the process runs, so that it is the
//! first line the process reads.

use stasis_app::protocol::Reply;
use stasis_image::FdKind;
use stasis_sys::unix_diag::UnixSock;
use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

/// The supervising init's side of the interface, for a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct ApiPeers {
    /// Inode of the listening socket.
    pub listener: u64,
    /// Inode of the init's end of each accepted connection, and whether the
    /// application asked for pre-checkpoint events on it.
    pub conns: HashMap<u64, bool>,
}

/// The kind of fd for the socket `ino` of the job, if it is a connection to the
/// interface (`diag`: every UNIX socket, by inode).
pub(crate) fn classify(
    api: &ApiPeers,
    diag: &HashMap<u64, UnixSock>,
    ino: u64,
    flags: i32,
) -> Option<FdKind> {
    let d = diag.get(&ino)?;
    let pre_checkpoint = match api.conns.get(&d.peer) {
        Some(&pre) => pre,
        // Connected, not accepted yet: nothing said on it was read.
        None if diag
            .get(&api.listener)
            .is_some_and(|l| l.icons.contains(&ino)) =>
        {
            false
        }
        None => return None,
    };
    Some(FdKind::AppApi {
        flags,
        pre_checkpoint,
    })
}

/// The restoring init's end of a connection re-made for a restored process.
#[derive(Debug)]
pub struct Remade {
    pub fd: OwnedFd,
    /// The first process holding the other end.
    pub pid: i32,
    /// It had asked for pre-checkpoint events.
    pub pre_checkpoint: bool,
}

/// Makes the connection of fd `num` of process `pid` (saved as `FdKind::AppApi`) again,
/// restored from `checkpoint`: returns the process's end (a raw descriptor the caller
/// owns) and puts the init's, with the `restarted` event queued, in `remade`.
pub fn remake(
    num: i32,
    pid: i32,
    flags: i32,
    pre_checkpoint: bool,
    checkpoint: &std::path::Path,
    remade: &mut Vec<Remade>,
) -> Result<i32, String> {
    let mut sv = [0i32; 2];
    // SAFETY: socketpair fills the array with two new descriptors.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    } != 0
    {
        return Err(format!(
            "fd {num}: socketpair for the stasis interface: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: both were just created and are owned here.
    let (app, init) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
    let event = Reply::Restarted {
        path: checkpoint.to_string_lossy().into_owned(),
    }
    .line();
    // SAFETY: sending a buffer we own on our new socket.
    let n = unsafe {
        libc::send(
            init.as_raw_fd(),
            event.as_ptr().cast(),
            event.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n != event.len() as isize {
        return Err(format!(
            "fd {num}: queueing the restarted event: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fcntl on the socket we just made.
    unsafe { libc::fcntl(app.as_raw_fd(), libc::F_SETFL, flags & libc::O_NONBLOCK) };
    remade.push(Remade {
        fd: init,
        pid,
        pre_checkpoint,
    });
    Ok(app.into_raw_fd())
}
