//! Step 2 of the restore of UNIX sockets: each queue refilled by sending its messages
//! again in order, with their descriptors in flight, from the peer (or stand-in), and
//! for a datagram socket from a socket bound to the name of each datagram's sender
//! (the job's own, or a temporary one).

use super::restore::{abs_name, bind, connect, holder, new_socket, sockaddr};
use stasis_image::{CheckpointReader, UnixSocket};
use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, OwnedFd};

/// Sends one message `chunk` from our socket `fd` (to `to`, else to its peer), with
/// the descriptors `fds` (SCM_RIGHTS) if any. With `wait` false a full queue is an
/// error rather than a wait.
fn send_one(
    fd: i32,
    chunk: &[u8],
    fds: &[i32],
    to: Option<&(libc::sockaddr_un, libc::socklen_t)>,
    wait: bool,
) -> std::io::Result<()> {
    let flags = libc::MSG_NOSIGNAL | if wait { 0 } else { libc::MSG_DONTWAIT };
    let n = crate::sockets::send_with_fds(fd, chunk, fds, to, flags)?;
    if n != chunk.len() {
        return Err(std::io::Error::other(format!(
            "sent {n} of {} bytes",
            chunk.len()
        )));
    }
    Ok(())
}

/// Temporary senders of datagrams whose sender is not a socket of the image (it was
/// closed, or is outside the job), by name; dropped after the refill.
#[derive(Default)]
pub(super) struct Temps {
    by_name: HashMap<String, OwnedFd>,
    /// Socket files made for them, removed after the refill.
    made: Vec<String>,
}

impl Temps {
    /// A datagram socket bound to `name` (relative names in `dir`), or unbound when
    /// `name` is empty or held by a live socket outside the job (that sender cannot
    /// be named again: recvfrom then shows no address).
    fn get(&mut self, name: &str, dir: &str, sock_type: i32) -> std::result::Result<i32, String> {
        if let Some(fd) = self.by_name.get(name) {
            return Ok(fd.as_raw_fd());
        }
        let fd = new_socket(sock_type)?;
        if !name.is_empty() {
            let full = abs_name(name, dir);
            let live = !full.starts_with('@') && {
                // A socket file that something still listens on is not ours to take.
                let probe = new_socket(sock_type)?;
                std::fs::symlink_metadata(&full).is_ok() && connect(&probe, &full).is_ok()
            };
            let existed = std::fs::symlink_metadata(&full).is_ok();
            if live || bind(&fd, &full).is_err() {
                tracing::warn!(
                    "datagrams from {name} come back from an unnamed socket: the name is in use outside the job"
                );
            } else if !existed && !full.starts_with('@') {
                self.made.push(full);
            }
        }
        let raw = fd.as_raw_fd();
        self.by_name.insert(name.to_string(), fd);
        Ok(raw)
    }

    pub(super) fn finish(self) {
        drop(self.by_name);
        for f in self.made {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Sends every queued message again, in order: from the peer (or its stand-in) of a
/// connected socket, else (datagrams to a named socket) from a socket bound to the
/// name of its sender.
pub(super) fn refill(
    image: &CheckpointReader,
    by_id: &HashMap<u64, &UnixSocket>,
    out: &HashMap<u64, OwnedFd>,
    stand_ins: &HashMap<u64, OwnedFd>,
    descs: &HashMap<u64, OwnedFd>,
    temps: &mut Temps,
) -> std::result::Result<(), String> {
    for s in &image.meta.sockets {
        let Some(name) = &s.data_file else { continue };
        let path = image.data_path(name).map_err(|e| e.to_string())?;
        let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let from_peer =
            stand_ins
                .get(&s.id)
                .map(|f| f.as_raw_fd())
                .or_else(|| match by_id.get(&s.peer) {
                    Some(p) if p.peer == s.id => out.get(&p.id).map(|f| f.as_raw_fd()),
                    _ => None,
                });
        let to = if s.name.is_empty() {
            None
        } else {
            Some(sockaddr(&abs_name(&s.name, &s.bound_in))?)
        };
        let count = s.messages.len();
        let mut off = 0usize;
        for (i, &len) in s.messages.iter().enumerate() {
            let chunk = data
                .get(off..off + len as usize)
                .ok_or_else(|| format!("{}: the saved queue is short", path.display()))?;
            off += len as usize;
            let mut fds = Vec::new();
            for m in s.in_flight.iter().filter(|m| m.message == i as u64) {
                for f in &m.fds {
                    let d = descs.get(&f.desc).ok_or_else(|| {
                        format!(
                            "{}: descriptor {} in flight: description {} missing",
                            holder(image, s.id),
                            f.fd,
                            f.desc
                        )
                    })?;
                    fds.push(d.as_raw_fd());
                }
            }
            let sent = match (from_peer, &to) {
                (Some(fd), _) => send_one(fd, chunk, &fds, None, s.sock_type == libc::SOCK_STREAM),
                (None, Some(to)) => {
                    let sender = s.senders.get(i).map(String::as_str).unwrap_or("");
                    let own = image
                        .meta
                        .sockets
                        .iter()
                        .find(|x| {
                            !sender.is_empty() && x.sock_type == s.sock_type && x.name == sender
                        })
                        .and_then(|x| out.get(&x.id))
                        .map(|f| f.as_raw_fd());
                    let fd = match own {
                        Some(fd) => fd,
                        None => temps.get(sender, &s.bound_in, s.sock_type)?,
                    };
                    send_one(fd, chunk, &fds, Some(to), false)
                }
                (None, None) => {
                    return Err(format!(
                        "{}: queued data with no way to resend it",
                        holder(image, s.id)
                    ))
                }
            };
            sent.map_err(|e| {
                format!(
                    "{}: refilling the queue (message {} of {count}): {e}",
                    holder(image, s.id),
                    i + 1
                )
            })?;
        }
    }
    Ok(())
}
