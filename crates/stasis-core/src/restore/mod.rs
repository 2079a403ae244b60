//! Restore orchestration.
//!
//! 1. Verify the image (checksums) and the environment (mapped files unchanged, same
//!    architecture) before anything is created.
//! 2. Fork a child with the saved PID (`clone3` + `set_tid`; with CLONE_FILES, once
//!    the parent's fds are in place, for a child that shared its parent's fd table).
//!    In ordinary Rust it recreates its fds (received from the restorer; pidfds and
//!    /proc files opened by itself once their processes exist; epoll sets registered),
//!    cwd, umask, rlimits, timers and signal dispositions, opens the
//!    page file and mapped files at high fd numbers, maps a two-page "gadget" (one
//!    `syscall` instruction plus a scratch page) where the saved layout has a hole, and
//!    waits, all signals blocked.
//! 3. Seize it and, through injected syscalls: unregister its own rseq, unmap all of
//!    its memory but the gadget and the vdso block, move the vdso block to its saved
//!    place, recreate every mapping and `pread` its pages in place, PR_SET_MM_MAP,
//!    re-register rseq/robust list/tid address/altstack, close the helper fds, queue the
//!    pending signals, and finally unmap the gadget, stopping at that syscall's exit so
//!    no code of the old address space runs again.
//! 4. Load registers, extended state and signal mask; detach. The process continues.
//!
//! The code is in one file per step:
//!
//! - this file: the checks before anything is created ([`precheck`]) and the
//!   orchestration of a restore ([`restore`](fn@restore));
//! - [`tree`]: forking the tree with the saved PIDs, each new process running
//!   `child_main` (its children, zombies, then its own preparation);
//! - [`prepare`]: what each new process does for itself in ordinary Rust (its fds,
//!   cwd, limits, timers, dispositions, the gadget) and its report to the restorer;
//! - [`rebuild`]: the rebuild of each prepared process by injected syscalls.

mod prepare;
mod rebuild;
mod tree;

use prepare::read_report;
use rebuild::{rebuild, seize_stopped};
use tree::{fork_retry, Tree};

use crate::error::{Error, Result, SysContext};
use crate::files;
use crate::memory;
use crate::proc::check_unchanged;
use stasis_image::{CheckpointReader, MappingKind, Process, PAGE_SIZE};
use stasis_sys::clone::Forked;
use stasis_sys::ptrace;
use std::collections::HashMap;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

const GADGET_LEN: u64 = 2 * PAGE_SIZE;
/// How many times (10 ms apart) to retry taking a PID still being released.
pub(crate) const PID_RETRIES: u32 = 200;

/// Checks what can be checked before creating anything.
pub fn precheck(image: &CheckpointReader) -> Result<()> {
    let meta = &image.meta;
    let pid = meta.root_pid;
    if meta.arch != stasis_sys::arch::ARCH_NAME {
        return Err(Error::Restore {
            pid,
            msg: format!(
                "the image is for {}, this machine is {}",
                meta.arch,
                stasis_sys::arch::ARCH_NAME
            ),
        });
    }
    if meta.page_size != stasis_sys::page_size() as u64 {
        return Err(Error::Restore {
            pid,
            msg: format!(
                "the image has {}-byte pages, this machine {}",
                meta.page_size,
                stasis_sys::page_size()
            ),
        });
    }
    if meta.processes.is_empty() || meta.processes.iter().any(|p| p.threads.is_empty()) {
        return Err(Error::Restore {
            pid,
            msg: "the image holds no process or a process without threads".into(),
        });
    }
    for p in &meta.processes {
        precheck_process(image, p)?;
    }
    Ok(())
}

fn precheck_process(image: &CheckpointReader, p: &Process) -> Result<()> {
    for m in &p.mappings {
        match &m.kind {
            // A shared mapping's data is the file itself, which the process (or its
            // peers) keep writing: it must exist and not have shrunk.
            MappingKind::File { file, .. } if m.shared => {
                if let (Err(_), Some(saved)) = (std::fs::metadata(&file.path), &m.content_file) {
                    recreate_shared_file(image, &file.path, saved)
                        .map_err(|msg| Error::Restore { pid: p.pid, msg })?;
                }
                let size = std::fs::metadata(&file.path)
                    .map(|md| md.len())
                    .map_err(|e| Error::Restore {
                        pid: p.pid,
                        msg: format!("shared mapped file {}: {e}", file.path),
                    })?;
                if size < file.size {
                    return Err(Error::Restore {
                        pid: p.pid,
                        msg: format!(
                            "shared mapped file {} shrank since the checkpoint ({} -> {size} bytes)",
                            file.path, file.size
                        ),
                    });
                }
            }
            MappingKind::File { file, .. } => {
                check_unchanged(file).map_err(|msg| Error::Restore {
                    pid: p.pid,
                    msg: format!("mapped file {msg}"),
                })?
            }
            _ => {}
        }
    }
    for name in &p.pages.parts {
        image.data_path(name)?;
    }
    Ok(())
}

/// Restores the processes of `image` (a tree, or several trees whose roots become
/// children of the caller), which must be able to choose PIDs (PID 1 of a PID
/// namespace owned by its user namespace). `stdio` are the caller's descriptors to bind
/// the saved outside stdio to; the caller's ends of the processes' re-made connections
/// to the application interface (each with its `restarted` event queued) go to `api`.
/// Returns the PID of the root process, running.
pub fn restore(
    image: &CheckpointReader,
    stdio: [Option<i32>; 3],
    api: &mut Vec<crate::sockets::appapi::Remade>,
) -> Result<i32> {
    precheck(image)?;
    let deps = open_dependencies(image)?;
    let meta = &image.meta;
    let procs = &meta.processes;
    let root_pid = meta.root_pid;
    let restore_err = |msg: String| Error::Restore { pid: root_pid, msg };

    // Shared memory objects and every open file description, once; the descriptions
    // are passed to the processes over their sockets, the objects inherited.
    crate::sysv::restore(image)?;
    let shm_objs = crate::shm::create_objects(image).map_err(restore_err)?;
    // A node's part restarted onto another node says where its addresses are now
    // before it waits for anyone's (see `sockets::inet::remote`).
    crate::sockets::inet::publish_addresses(
        &meta.node_addresses,
        &meta.address_map,
        &meta.port_map,
    )
    .map_err(restore_err)?;
    let (mut socket_fds, unix_pending) = crate::sockets::create_all(image).map_err(restore_err)?;
    // A slave of each pseudo-terminal stays open here until the processes are forked
    // (session leaders take their controlling terminal from it).
    let mut ttys: HashMap<u64, OwnedFd> = HashMap::new();
    let descs = files::open_descriptions(
        meta,
        image,
        &stdio,
        &shm_objs,
        &mut socket_fds,
        api,
        &mut ttys,
    )
    .map_err(restore_err)?;
    drop(socket_fds);
    // UNIX sockets' queues, whose messages may carry any description.
    crate::sockets::unix::finish(image, unix_pending, &descs).map_err(restore_err)?;
    // OFD and flock locks belong to the descriptions: taken once, here.
    crate::locks::take_shared(meta, &descs)?;
    let mut socks = Vec::with_capacity(procs.len());
    for p in procs {
        let mut sv = [0i32; 2];
        // SAFETY: socketpair fills the array with two new descriptors.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        } != 0
        {
            return Err(stasis_sys::SysError::last("socketpair", 0))
                .ctx(p.pid, || "creating the restore socket".into());
        }
        // SAFETY: both descriptors were just created and are owned here.
        socks.push(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) });
    }

    // Where each process's gadget and vdso stopover go: holes of both its saved layout
    // and ours (each process starts as a copy of us).
    let own = own_layout()?;
    let mut gadgets = Vec::with_capacity(procs.len());
    let mut used_by = Vec::with_capacity(procs.len());
    for p in procs {
        let mut used: Vec<(u64, u64)> = p.mappings.iter().map(|m| (m.start, m.end)).collect();
        used.extend(own.iter().map(|o| (o.1, o.2)));
        let g = memory::find_free(&used, GADGET_LEN, 0x100000).ok_or_else(|| Error::Restore {
            pid: p.pid,
            msg: "no room for the restorer in the address space".into(),
        })?;
        used.push((g, g + GADGET_LEN));
        gadgets.push(g);
        used_by.push(used);
    }
    // Above every fd any process will have and every fd we hold now.
    let max_fd = procs
        .iter()
        .flat_map(|p| p.fds.iter().map(|f| f.fd))
        .max()
        .unwrap_or(2)
        .max(max_open_fd());
    let tree = Tree {
        image,
        socks: socks.iter().map(|s| s.1.as_raw_fd()).collect(),
        hi: max_fd + 1,
        gadgets: gadgets.clone(),
        shm: shm_objs
            .iter()
            .map(|(id, fd)| (*id, fd.as_raw_fd()))
            .collect(),
        ttys: ttys.iter().map(|(id, fd)| (*id, fd.as_raw_fd())).collect(),
    };

    // Roots (processes whose parent is not in the image) are our children; each
    // process forks its own children while preparing.
    let pids: std::collections::HashSet<i32> = procs.iter().map(|p| p.pid).collect();
    let mut guards = Vec::new();
    for (i, p) in procs.iter().enumerate() {
        if pids.contains(&p.ppid) {
            continue;
        }
        match fork_retry(p.pid)? {
            Forked::Child => tree.child_main(i, tree.socks.clone()),
            Forked::Parent(c) => guards.push(KillOnDrop(c)),
        }
    }
    // Our copies of the processes' ends close here.
    let parent_ends: Vec<OwnedFd> = socks.into_iter().map(|(ours, _theirs)| ours).collect();
    // A process sharing its parent's fd table gets none: its parent's are its own.
    for (i, p) in procs.iter().enumerate() {
        if p.fd_table_of.is_some() {
            continue;
        }
        files::send_fds(parent_ends[i].as_raw_fd(), &p.fds, &descs)
            .map_err(|msg| Error::Restore { pid: p.pid, msg })?;
    }
    // The inotify instances, emptied once every process is rebuilt (see below).
    let inotify: Vec<OwnedFd> = procs
        .iter()
        .flat_map(|p| p.fds.iter())
        .filter(|f| matches!(f.kind, stasis_image::FdKind::Inotify { .. }))
        .filter_map(|f| descs.get(&f.desc)?.try_clone().ok())
        .collect();
    drop(descs);
    let mut prepared = Vec::with_capacity(procs.len());
    for (i, p) in procs.iter().enumerate() {
        let prep = read_report(parent_ends[i].as_raw_fd(), p.pid)?;
        for w in &prep.warnings {
            tracing::warn!("process {}: {w}", p.pid);
        }
        prepared.push(prep);
    }
    // Every process has mapped its shared memory: our copies of the objects go now,
    // not once the processes run (closing the last writable description of a deleted
    // file recreated here is an event for an inotify watch on it).
    drop(tree);
    drop(shm_objs);
    for p in procs {
        seize_stopped(p.pid)?;
    }
    // Those stopped by job control stop again now, before their parents are rebuilt.
    for p in procs {
        crate::jobctl::stop_again(p, procs)?;
    }
    for (i, p) in procs.iter().enumerate() {
        rebuild(p.pid, image, &deps, p, &prepared[i], &used_by[i])?;
    }
    crate::sockets::inet::redirect::serve();
    // Nothing was queued in an inotify instance at checkpoint time (a queued event
    // refuses it): what the rebuild caused (files recreated, our descriptors closed)
    // is dropped before any process runs.
    for fd in &inotify {
        drain_events(fd.as_raw_fd());
    }
    // Start children before parents.
    for p in procs.iter().rev() {
        for t in p.threads.iter().rev() {
            ptrace::detach(t.tid, 0).ctx(t.tid, || "starting the restored thread".into())?;
        }
    }
    for g in guards {
        std::mem::forget(g);
    }
    Ok(root_pid)
}

/// Reads and drops every event queued in inotify instance `fd` (without changing its
/// flags: poll says whether a read would block).
fn drain_events(fd: i32) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one initialized pollfd, without waiting.
        if unsafe { libc::poll(&mut p, 1, 0) } <= 0 {
            return;
        }
        // SAFETY: reading into our buffer.
        if unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } <= 0 {
            return;
        }
    }
}

/// Opens and fully verifies the earlier checkpoints an incremental checkpoint refers
/// to (they live beside it in the same directory).
fn open_dependencies(image: &CheckpointReader) -> Result<Vec<(u64, CheckpointReader)>> {
    let root = image.path().parent().unwrap_or(std::path::Path::new("."));
    let mut out = Vec::new();
    for &seq in &image.meta.depends_on {
        let path = stasis_image::store::checkpoint_path(root, seq);
        if !path.exists() {
            return Err(Error::Restore {
                pid: image.meta.root_pid,
                msg: format!(
                    "this incremental checkpoint needs {}, which is missing",
                    path.display()
                ),
            });
        }
        out.push((seq, CheckpointReader::open(&path)?));
    }
    Ok(out)
}

/// Recreates a missing shared mapped file from the content saved at checkpoint time.
fn recreate_shared_file(
    image: &CheckpointReader,
    path: &str,
    saved: &str,
) -> std::result::Result<(), String> {
    let src = image.data_path(saved).map_err(|e| e.to_string())?;
    let data = std::fs::read(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    if let Some(dir) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("recreating {}: {e}", dir.display()))?;
    }
    // Owner-only: the content may be private (the JVM's perf data file is 0600).
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(&data))
        .map_err(|e| format!("recreating shared mapped file {path}: {e}"))?;
    tracing::info!("recreated the missing shared mapped file {path} from the checkpoint");
    Ok(())
}

struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill and waitpid have no memory-safety preconditions.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), libc::__WALL);
        }
    }
}

fn own_layout() -> Result<Vec<(String, u64, u64)>> {
    let me = procfs::process::Process::myself()
        .and_then(|p| p.maps())
        .map_err(std::io::Error::other)
        .ctx(0, || "reading /proc/self/maps".into())?;
    Ok(me
        .into_iter()
        .map(|m| (format!("{:?}", m.pathname), m.address.0, m.address.1))
        .collect())
}

fn max_open_fd() -> i32 {
    std::fs::read_dir("/proc/self/fd")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .max()
                .unwrap_or(2)
        })
        .unwrap_or(1024)
}
