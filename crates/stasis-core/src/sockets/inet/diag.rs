//! What a dump learns of the sockets around the job: the kernel's list of every TCP
//! and UDP socket of the network namespace (inet_diag), and which of them the job's
//! processes hold (their /proc/PID/fd).

use crate::error::{Result, SysContext};
use stasis_sys::inet_diag::{self, canonical, state, InetSock};
use std::collections::HashMap;
use std::net::SocketAddr;

/// The kernel's view of the namespace's sockets, read once per checkpoint.
pub(super) struct Diag {
    pub(super) by_ino: HashMap<u64, InetSock>,
    /// TCP sockets by (local, remote), addresses in canonical form.
    pub(super) tcp_by_tuple: HashMap<(SocketAddr, SocketAddr), InetSock>,
    pub(super) listeners: Vec<InetSock>,
}

impl Diag {
    pub(super) fn read(pid: i32) -> Result<Diag> {
        let tcp = inet_diag::dump(libc::IPPROTO_TCP)
            .ctx(pid, || "listing TCP sockets (inet_diag)".into())?;
        let udp = inet_diag::dump(libc::IPPROTO_UDP)
            .ctx(pid, || "listing UDP sockets (inet_diag)".into())?;
        let mut d = Diag {
            by_ino: HashMap::new(),
            tcp_by_tuple: HashMap::new(),
            listeners: Vec::new(),
        };
        for s in tcp {
            if s.state == state::LISTEN {
                d.listeners.push(s.clone());
            } else {
                d.tcp_by_tuple
                    .insert((canonical(s.local), canonical(s.remote)), s.clone());
            }
            if s.ino != 0 {
                d.by_ino.insert(s.ino, s);
            }
        }
        for s in udp.into_iter().filter(|s| s.ino != 0) {
            d.by_ino.insert(s.ino, s);
        }
        Ok(d)
    }
}

/// Every socket inode the processes `job` hold, with a first holder (pid, fd).
pub(super) fn read_holders(job: &[i32]) -> HashMap<u64, (i32, i32)> {
    let mut m = HashMap::new();
    for &pid in job {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in dir.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(t) = std::fs::read_link(e.path()) else {
                continue;
            };
            let t = t.to_string_lossy();
            if let Some(ino) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
            {
                m.entry(ino).or_insert((pid, fd));
            }
        }
    }
    m
}
