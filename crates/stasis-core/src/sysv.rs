//! System V IPC (svipc(7)): shared memory segments, semaphore sets and message queues.
//!
//! Under `stasis run` the job has an IPC namespace of its own, so every object in it is
//! the job's. Dump (in that namespace): the objects are listed from /proc/sysvipc; a
//! segment's content is read by attaching it read-only, semaphore values with
//! `semctl(GETALL)`, messages with `msgrcv(MSG_COPY)` (which does not remove them).
//! Restore (in the new job's fresh IPC namespace): each object is created again with
//! its id (`/proc/sys/kernel/*_next_id`, allowed to root of the namespace's user
//! namespace) and key, and filled. Segments are attached again in the processes by an
//! injected `shmat` at the saved address. Semaphore undo records (SEM_UNDO) are not
//! kept.

use crate::error::{Error, Result, SysContext};
use stasis_image::{CheckpointReader, CheckpointWriter, Sysv, SysvMsg, SysvSem, SysvShm};

const MSG_COPY: i32 = 0o40000;

/// The rows of `/proc/sysvipc/NAME`: key, id and permissions (printed in octal),
/// then the numeric column `fourth` (size, nsems, cbytes) and `fifth`.
struct Row {
    key: i32,
    id: i32,
    mode: u32,
    fourth: u64,
    fifth: u64,
}

fn table(name: &str) -> Result<Vec<Row>> {
    let path = format!("/proc/sysvipc/{name}");
    let text = std::fs::read_to_string(&path).ctx(0, || format!("reading {path}"))?;
    text.lines()
        .skip(1)
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let row = (|| {
                Some(Row {
                    key: w.first()?.parse().ok()?,
                    id: w.get(1)?.parse().ok()?,
                    mode: u32::from_str_radix(w.get(2)?, 8).ok()?,
                    fourth: w.get(3)?.parse().ok()?,
                    fifth: w.get(4)?.parse().ok()?,
                })
            })();
            row.ok_or_else(|| Error::Unsupported {
                pid: 0,
                what: format!("an unreadable line of {path}: {l:?}"),
            })
        })
        .collect()
}

/// Saves every System V object of our IPC namespace.
pub fn dump(writer: &mut CheckpointWriter) -> Result<Sysv> {
    let mut out = Sysv::default();
    for row in table("shm")? {
        // key shmid perms size ...
        let (key, id, mode, size) = (row.key, row.id, row.mode, row.fourth);
        // SAFETY: attaching the segment read-only at an address the kernel picks.
        let addr = unsafe { libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY) };
        if addr as isize == -1 {
            return Err(std::io::Error::last_os_error())
                .ctx(0, || format!("attaching System V segment {id}"));
        }
        // SAFETY: the segment is attached for `size` bytes.
        let data = unsafe { std::slice::from_raw_parts(addr as *const u8, size as usize) }.to_vec();
        // SAFETY: detaching what we attached.
        unsafe { libc::shmdt(addr) };
        let name = format!("sysv-shm-{id}.img");
        let mut w = writer.data_file(&name)?;
        w.write_all(&data)?;
        writer.finish_data(w)?;
        out.shm.push(SysvShm {
            key,
            id,
            mode: mode & 0o777,
            size,
            data_file: name,
        });
    }
    for row in table("sem")? {
        // key semid perms nsems ...
        let (key, id, mode, n) = (row.key, row.id, row.mode, row.fourth as usize);
        let mut values = vec![0u16; n];
        // SAFETY: GETALL writes nsems unsigned shorts into `values`.
        if unsafe { libc::semctl(id, 0, libc::GETALL, values.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error())
                .ctx(0, || format!("reading semaphore set {id}"));
        }
        out.sem.push(SysvSem {
            key,
            id,
            mode: mode & 0o777,
            values,
        });
    }
    for row in table("msg")? {
        // key msqid perms cbytes qnum ...
        let (key, id, mode, qnum) = (row.key, row.id, row.mode, row.fifth as usize);
        let mut messages = Vec::new();
        let mut bytes = Vec::new();
        let mut buf = vec![0u8; 8 + (1 << 16)];
        for i in 0..qnum {
            // SAFETY: msgrcv writes an mtype and up to the given size of text into buf;
            // MSG_COPY copies message number `i` without removing it.
            let n = unsafe {
                libc::msgrcv(
                    id,
                    buf.as_mut_ptr().cast(),
                    buf.len() - 8,
                    i as libc::c_long,
                    libc::IPC_NOWAIT | MSG_COPY | libc::MSG_NOERROR,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error())
                    .ctx(0, || format!("reading message queue {id}"));
            }
            let mtype = i64::from_ne_bytes(buf[..8].try_into().unwrap_or_default());
            messages.push((mtype, n as u64));
            bytes.extend_from_slice(&buf[8..8 + n as usize]);
        }
        let data_file = if bytes.is_empty() {
            None
        } else {
            let name = format!("sysv-msg-{id}.img");
            let mut w = writer.data_file(&name)?;
            w.write_all(&bytes)?;
            writer.finish_data(w)?;
            Some(name)
        };
        out.msg.push(SysvMsg {
            key,
            id,
            mode: mode & 0o777,
            messages,
            data_file,
        });
    }
    Ok(out)
}

fn set_next_id(kind: &str, id: i32) -> std::result::Result<(), String> {
    std::fs::write(format!("/proc/sys/kernel/{kind}_next_id"), id.to_string())
        .map_err(|e| format!("choosing System V {kind} id {id}: {e}"))
}

/// Recreates the objects in our (fresh) IPC namespace with their ids.
pub fn restore(image: &CheckpointReader) -> Result<()> {
    let err = |msg: String| Error::Restore {
        pid: image.meta.root_pid,
        msg,
    };
    let sysv = &image.meta.sysv;
    for s in &sysv.shm {
        set_next_id("shm", s.id).map_err(err)?;
        // SAFETY: shmget with plain values.
        let id = unsafe {
            libc::shmget(
                s.key,
                s.size as usize,
                libc::IPC_CREAT | libc::IPC_EXCL | s.mode as i32,
            )
        };
        if id != s.id {
            return Err(err(format!(
                "System V segment {} came back as {id}: {}",
                s.id,
                std::io::Error::last_os_error()
            )));
        }
        let path = image.data_path(&s.data_file)?;
        let data = std::fs::read(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        // SAFETY: attach read-write, copy the saved bytes (at most the segment size), detach.
        unsafe {
            let addr = libc::shmat(id, std::ptr::null(), 0);
            if addr as isize == -1 {
                return Err(err(format!(
                    "attaching segment {id}: {}",
                    std::io::Error::last_os_error()
                )));
            }
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                addr as *mut u8,
                data.len().min(s.size as usize),
            );
            libc::shmdt(addr);
        }
    }
    for s in &sysv.sem {
        set_next_id("sem", s.id).map_err(err)?;
        // SAFETY: semget/semctl with plain values and an array of nsems shorts.
        unsafe {
            let id = libc::semget(
                s.key,
                s.values.len() as i32,
                libc::IPC_CREAT | libc::IPC_EXCL | s.mode as i32,
            );
            if id != s.id {
                return Err(err(format!(
                    "semaphore set {} came back as {id}: {}",
                    s.id,
                    std::io::Error::last_os_error()
                )));
            }
            let mut v = s.values.clone();
            if libc::semctl(id, 0, libc::SETALL, v.as_mut_ptr()) != 0 {
                return Err(err(format!(
                    "setting semaphore set {id}: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
    }
    for q in &sysv.msg {
        set_next_id("msg", q.id).map_err(err)?;
        // SAFETY: msgget with plain values.
        let id = unsafe { libc::msgget(q.key, libc::IPC_CREAT | libc::IPC_EXCL | q.mode as i32) };
        if id != q.id {
            return Err(err(format!(
                "message queue {} came back as {id}: {}",
                q.id,
                std::io::Error::last_os_error()
            )));
        }
        let data = match &q.data_file {
            Some(name) => {
                let path = image.data_path(name)?;
                std::fs::read(&path).map_err(|e| err(format!("{}: {e}", path.display())))?
            }
            None => Vec::new(),
        };
        let mut off = 0usize;
        for &(mtype, len) in &q.messages {
            let bytes = data.get(off..off + len as usize).ok_or_else(|| {
                err(format!(
                    "message queue {id}: the saved messages are longer than their data file"
                ))
            })?;
            let mut buf = Vec::with_capacity(8 + len as usize);
            buf.extend_from_slice(&mtype.to_ne_bytes());
            buf.extend_from_slice(bytes);
            off += len as usize;
            // SAFETY: msgsnd reads an mtype followed by `len` bytes from buf.
            if unsafe { libc::msgsnd(id, buf.as_ptr().cast(), len as usize, libc::IPC_NOWAIT) } != 0
            {
                return Err(err(format!(
                    "refilling message queue {id}: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
    }
    Ok(())
}
