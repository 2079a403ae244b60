//! What each new process does for itself in ordinary Rust before it is rebuilt: its
//! fds (received from the restorer; pidfds and /proc files opened once their processes
//! exist; epoll sets registered), cwd, umask, rlimits, timers and signal dispositions,
//! the page file and mapped files at high fd numbers, the gadget; then its report to
//! the restorer ([`read_report`] on the restorer's side).

use super::GADGET_LEN;
use crate::error::{Error, Result};
use crate::memory;
use crate::{files, signals, task};
use serde::{Deserialize, Serialize};
use stasis_image::{CheckpointReader, MappingKind, Process, PAGE_SIZE};
use std::collections::HashMap;

/// What the prepared child reports to the restorer.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Prepared {
    pub(super) gadget: u64,
    pub(super) exe_fd: i32,
    pub(super) files: HashMap<String, i32>,
    /// The child's end of the report pipe; it may still be open when we stop it.
    pub(super) report_fd: i32,
    pub(super) warnings: Vec<String>,
}

/// Reads a process's "OK {json}" / "ERR message" report from its socket.
pub(super) fn read_report(sock: i32, pid: i32) -> Result<Prepared> {
    let mut buf = vec![0u8; 1 << 20];
    // SAFETY: recv into a buffer of the size given.
    let n = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n <= 0 {
        return Err(Error::Restore {
            pid,
            msg: "the new process died while preparing".into(),
        });
    }
    let msg = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
    match msg.strip_prefix("OK ") {
        Some(json) => serde_json::from_str(json).map_err(|e| Error::Restore {
            pid,
            msg: format!("bad message from the new process: {e}"),
        }),
        None => Err(Error::Restore {
            pid,
            msg: msg.strip_prefix("ERR ").unwrap_or(&msg).to_string(),
        }),
    }
}

/// How long a restored process waits for the processes its pidfds and /proc files
/// refer to to be created.
const LATE_FD_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The fd part of preparing process `idx`: receives its fds, opens its pidfds and
/// /proc files, registers its epoll sets. Returns the shared memory objects it maps,
/// by key, at numbers above `hi`. `for_sharing` are the sockets, above `hi`, of the
/// processes that will share our table. A process that shares its parent's fd table
/// ([`Process::fd_table_of`]) has them already and does nothing here.
pub(super) fn prepare_fds(
    image: &CheckpointReader,
    idx: usize,
    hi: i32,
    shm: &HashMap<u64, i32>,
    sock: &mut i32,
    for_sharing: &[i32],
) -> std::result::Result<HashMap<String, i32>, String> {
    let procs = &image.meta.processes;
    let p = &procs[idx];
    if p.fd_table_of.is_some() {
        if p.mappings
            .iter()
            .any(|m| matches!(m.kind, MappingKind::SharedMemory { .. }))
        {
            return Err("a process sharing its parent's fd table (clone CLONE_FILES) and mapping a memfd is not supported".into());
        }
        return Ok(HashMap::new());
    }
    // The shared memory objects this process maps, moved above `hi` before the
    // low descriptors go.
    let mut map_files = HashMap::new();
    for m in &p.mappings {
        if let MappingKind::SharedMemory { id, .. } = m.kind {
            let key = memory::shm_key(id);
            if map_files.contains_key(&key) {
                continue;
            }
            let fd = *shm
                .get(&id)
                .ok_or_else(|| format!("shared memory {id} missing"))?;
            // SAFETY: F_DUPFD on an inherited descriptor of ours.
            let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, hi) };
            if high < 0 {
                return Err(format!(
                    "shared memory {id}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            map_files.insert(key, high);
        }
    }
    // Our socket moves above every fd the process will have; then everything else
    // goes and the process's own fds arrive over the socket.
    // SAFETY: F_DUPFD/close on our own descriptors.
    let moved = unsafe { libc::fcntl(*sock, libc::F_DUPFD_CLOEXEC, hi) };
    if moved < 0 {
        return Err(format!(
            "cannot move the restore socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: closing the original copy, replaced by `moved`.
    unsafe { libc::close(*sock) };
    *sock = moved;
    // Every other descriptor goes: those below `hi`, and those above it that a
    // parent sharing its table with another child kept for it, but the sockets kept
    // for the children that will share ours (`for_sharing`).
    let mut keep: Vec<i32> = map_files.values().copied().collect();
    keep.push(*sock);
    keep.extend_from_slice(for_sharing);
    keep.sort_unstable();
    let mut from = 0u32;
    for k in keep {
        if k as u32 > from {
            // SAFETY: closes descriptors of ours that nothing here uses.
            unsafe { libc::syscall(libc::SYS_close_range, from, k as u32 - 1, 0u32) };
        }
        from = k as u32 + 1;
    }
    // SAFETY: as above, up to the highest possible number.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
    let temps = files::receive_fds(*sock, hi)?;
    files::open_late(&p.fds, LATE_FD_WAIT)?;
    // A session leader takes its controlling terminal back.
    for t in image.meta.ptys.iter().filter(|t| t.session == p.pid) {
        if let Some(f) = p.fds.iter().find(|f| matches!(f.kind, stasis_image::FdKind::Pty { pty, master: false, .. } if pty == t.id)) {
            // SAFETY: TIOCSCTTY on our own fd, as session leader without a terminal.
            if unsafe { libc::ioctl(f.fd, libc::TIOCSCTTY, 0) } != 0 {
                return Err(format!("fd {}: taking the controlling terminal back: {}", f.fd, std::io::Error::last_os_error()));
            }
        }
    }
    // An epoll set shared by several processes is registered by the first of them
    // that has its own fd table.
    let registers = |desc: u64| {
        !procs[..idx]
            .iter()
            .any(|q| q.fd_table_of.is_none() && q.fds.iter().any(|f| f.desc == desc))
    };
    let registered = crate::eventfds::register_epoll(&p.fds, registers, &temps, hi);
    for t in temps.values() {
        // SAFETY: closing the temporary descriptors of watched files.
        unsafe { libc::close(*t) };
    }
    registered?;
    Ok(map_files)
}

/// The rest of preparing a process, once its fds are in place (`map_files`: the
/// shared memory objects it maps, from [`prepare_fds`]).
pub(super) fn prepare(
    p: &Process,
    hi: i32,
    gadget: u64,
    sock: &mut i32,
    mut map_files: HashMap<String, i32>,
) -> std::result::Result<Prepared, String> {
    let exe_fd = files::open_high(&p.exe.path, libc::O_RDONLY, hi)?;
    for m in &p.mappings {
        if let MappingKind::File { file, .. } = &m.kind {
            let rw = m.shared && m.prot & libc::PROT_WRITE as u32 != 0;
            let flags = if rw { libc::O_RDWR } else { libc::O_RDONLY };
            if !map_files.contains_key(&file.path) {
                map_files.insert(file.path.clone(), files::open_high(&file.path, flags, hi)?);
            }
        }
    }
    // Locks held through a mapping: taken on the file the mapping is made from, which
    // it then keeps (the fd is closed once mapped).
    crate::locks::take_mapped(p, &map_files)?;
    signals::restore_actions(&p.signals)?;
    // SAFETY: maps two fresh pages at an address the restorer checked is free in both
    // layouts (NOREPLACE refuses anything else).
    let g = unsafe {
        libc::mmap(
            gadget as *mut libc::c_void,
            GADGET_LEN as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if g as u64 != gadget {
        return Err(format!(
            "cannot map the restorer gadget at {gadget:x}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `g` points to two writable pages we just mapped.
    unsafe {
        std::ptr::copy_nonoverlapping(
            stasis_sys::arch::SYSCALL_INSN.as_ptr(),
            g as *mut u8,
            stasis_sys::arch::SYSCALL_INSN.len(),
        );
        libc::mprotect(g, PAGE_SIZE as usize, libc::PROT_READ | libc::PROT_EXEC);
    }
    let warnings = task::restore_attrs(p)?;
    Ok(Prepared {
        gadget,
        exe_fd,
        files: map_files,
        report_fd: *sock,
        warnings,
    })
}
