//! A socket's receive queue read without consuming it (MSG_PEEK walking with
//! SO_PEEK_OFF), with the sender of each datagram and the descriptors in flight
//! (SCM_RIGHTS), which the peek installs in our own table.

use super::MAX_MESSAGES;
use crate::error::{Result, SysContext};
use std::os::unix::io::{FromRawFd, OwnedFd};

/// A socket's receive queue, read without consuming it: the bytes, the length of each
/// message, for datagrams the address each came from, and the descriptors in flight
/// (installed in our own table by the peek) with the index of the message carrying
/// them.
pub(super) struct Queue {
    pub(super) data: Vec<u8>,
    pub(super) messages: Vec<u64>,
    pub(super) senders: Vec<String>,
    pub(super) fds: Vec<(u64, Vec<OwnedFd>)>,
}

/// Reads a socket's receive queue without consuming it.
/// A stream is read with one MSG_PEEK, which reads across its whole queue up to a
/// message carrying descriptors; datagrams, and a stream that comes back short, are
/// walked with SO_PEEK_OFF (the socket's own, shared with the application, put back
/// after). A stream read stops at the end of a message carrying descriptors, and may
/// have begun in earlier messages without: where that message starts cannot be seen,
/// so the bytes of the read are sent again as one message with the descriptors (a
/// reader then gets them with the first of these bytes it reads, not with the first
/// byte of their own message). An empty datagram that was peeked before (by an
/// earlier checkpoint, or by the application with MSG_PEEK) is skipped by every peek
/// at an offset, so it is not seen. On a socket shut down for reading (`rd_shut`: also one whose
/// connected peer was closed) an empty queue reads as 0 bytes, like an empty
/// message: the walk stops there (an empty message at the end of such a queue is not
/// seen).
pub(super) fn peek_queue(
    pid: i32,
    fd: i32,
    s: i32,
    sock_type: i32,
    rd_shut: bool,
) -> Result<Queue> {
    let ctx = || format!("reading the queue of socket fd {fd}");
    let mut buf = vec![0u8; 1 << 18];
    let mut q = Queue {
        data: Vec::new(),
        messages: Vec::new(),
        senders: Vec::new(),
        fds: Vec::new(),
    };
    let stream = sock_type == libc::SOCK_STREAM;
    if stream {
        let mut want = 0i32;
        // SAFETY: FIONREAD writes an int.
        if unsafe { libc::ioctl(s, libc::FIONREAD, &mut want) } == 0 {
            let want = want.max(0) as usize;
            if want == 0 {
                return Ok(q);
            }
            if buf.len() < want {
                buf.resize(want, 0);
            }
            let (n, _, fds) = peek_one(s, &mut buf[..want]).ctx(pid, ctx)?;
            if n == want && fds.is_empty() {
                q.data = buf[..n].to_vec();
                q.messages.push(n as u64);
                return Ok(q);
            }
        }
    }
    let mut walk = |q: &mut Queue| -> std::io::Result<()> {
        // A stream's bytes since the last message with descriptors.
        let mut plain = 0u64;
        let mut complete = false;
        for _ in 0..MAX_MESSAGES {
            let (n, from, fds) = peek_one(s, &mut buf)?;
            if n == usize::MAX {
                complete = true; // nothing more queued
                break;
            }
            if n == 0 && (stream || rd_shut) && fds.is_empty() {
                complete = true;
                break;
            }
            q.data.extend_from_slice(&buf[..n]);
            if !stream {
                if !fds.is_empty() {
                    q.fds.push((q.messages.len() as u64, fds));
                }
                q.messages.push(n as u64);
                if sock_type == libc::SOCK_DGRAM {
                    q.senders.push(from);
                }
                continue;
            }
            if fds.is_empty() {
                plain += n as u64;
                continue;
            }
            // The read ends with the message carrying the descriptors; where that
            // message starts in it cannot be seen (a peek from any earlier byte brings
            // them): the read is sent again as one message with them.
            if plain > 0 {
                q.messages.push(plain);
                plain = 0;
            }
            q.fds.push((q.messages.len() as u64, fds));
            q.messages.push(n as u64);
        }
        if plain > 0 {
            q.messages.push(plain);
        }
        if !complete {
            return Err(std::io::Error::other(format!(
                "more than {MAX_MESSAGES} messages queued"
            )));
        }
        Ok(())
    };
    crate::sockets::with_peek_offset(s, || walk(&mut q))
        .ctx(pid, ctx)?
        .ctx(pid, ctx)?;
    Ok(q)
}

/// The name in a sockaddr_un of length `len` as sock_diag shows names: a path,
/// "@name" for the abstract namespace, empty for an unbound socket.
fn addr_name(a: &libc::sockaddr_un, len: usize) -> String {
    let base = std::mem::size_of::<libc::sa_family_t>();
    if len <= base {
        return String::new();
    }
    let bytes: Vec<u8> = a.sun_path[..(len - base).min(a.sun_path.len())]
        .iter()
        .map(|&c| c as u8)
        .collect();
    match bytes.split_first() {
        Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
        _ => {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        }
    }
}

/// One MSG_PEEK into `buf`: the bytes read (`usize::MAX` when nothing is queued), the
/// sender's address, and the descriptors the message carries (SCM_RIGHTS: the peek
/// installs them in our table).
fn peek_one(s: i32, buf: &mut [u8]) -> std::io::Result<(usize, String, Vec<OwnedFd>)> {
    let mut cbuf = [0u64; 512];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: sockaddr_un and msghdr are plain data; zeroed is a valid empty value.
    let mut from: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_un).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points to live buffers of the sizes given.
    let n = unsafe {
        libc::recvmsg(
            s,
            &mut msg,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok((usize::MAX, String::new(), Vec::new()));
        }
        return Err(e);
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into cbuf; the
    // descriptors a peek of SCM_RIGHTS installed in our table are ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<i32>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other(
            "more descriptors in flight with one message than stasis reads",
        ));
    }
    Ok((n as usize, addr_name(&from, msg.msg_namelen as usize), fds))
}
