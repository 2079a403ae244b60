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

use crate::error::{Error, Result, SysContext};
use crate::inject::{Injector, Scratch};
use crate::memory::{self, MapFds};
use crate::proc::{check_unchanged, ProcDir};
use crate::{files, signals, task, thread};
use procfs::process::MMapPath;
use serde::{Deserialize, Serialize};
use stasis_image::{CheckpointReader, MappingKind, Process, PAGE_SIZE};
use stasis_sys::clone::{fork_with_pid_flags, Forked};
use stasis_sys::ptrace::{self, Stop};
use std::collections::HashMap;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

const GADGET_LEN: u64 = 2 * PAGE_SIZE;
/// How many times (10 ms apart) to retry taking a PID still being released.
pub(crate) const PID_RETRIES: u32 = 200;

/// What the prepared child reports to the restorer.
#[derive(Debug, Serialize, Deserialize)]
struct Prepared {
    gadget: u64,
    exe_fd: i32,
    files: HashMap<String, i32>,
    /// The child's end of the report pipe; it may still be open when we stop it.
    report_fd: i32,
    warnings: Vec<String>,
}

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

/// fork_with_pid, retrying while the PID is still held for a moment by an exiting
/// thread of ours (the checksum workers).
fn fork_retry(pid: i32) -> Result<Forked> {
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

/// Reads a process's "OK {json}" / "ERR message" report from its socket.
fn read_report(sock: i32, pid: i32) -> Result<Prepared> {
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

/// Seizes a prepared process and waits until it is stopped.
fn seize_stopped(pid: i32) -> Result<()> {
    ptrace::seize(
        pid,
        ptrace::O_TRACESYSGOOD | ptrace::O_EXITKILL | ptrace::O_TRACECLONE,
    )
    .ctx(pid, || "seizing the new process".into())?;
    ptrace::interrupt(pid).ctx(pid, || "stopping the new process".into())?;
    loop {
        match ptrace::wait(pid).ctx(pid, || "waiting for the new process".into())? {
            Stop::Event(ptrace::EVENT_STOP, _) => return Ok(()),
            Stop::Exited(_) | Stop::Killed(_) => {
                return Err(Error::Restore {
                    pid,
                    msg: "the new process died while preparing".into(),
                })
            }
            _ => ptrace::cont(pid, 0).ctx(pid, || "resuming the new process".into())?,
        }
    }
}

/// Step 3 and 4 of the module docs, on the stopped child.
fn rebuild(
    child: i32,
    image: &CheckpointReader,
    deps: &[(u64, CheckpointReader)],
    p: &Process,
    prep: &Prepared,
    used: &[(u64, u64)],
) -> Result<()> {
    let inj = Injector::new(child, prep.gadget)?;
    thread::drop_own_rseq(&inj, child)?;

    let keep = |s: u64| s >= prep.gadget && s < prep.gadget + GADGET_LEN;
    let current = ProcDir::new(child)
        .process()?
        .maps()
        .map_err(std::io::Error::other)
        .ctx(child, || "reading the new process's maps".into())?;
    let mut specials = Vec::new();
    for m in current {
        let (s, e) = m.address;
        match &m.pathname {
            MMapPath::Vdso => specials.push((MappingKind::Vdso, s, e)),
            MMapPath::Vvar => specials.push((MappingKind::Vvar, s, e)),
            MMapPath::Other(n) if n.trim_matches(['[', ']']) == "vvar_vclock" => {
                specials.push((MappingKind::VvarVclock, s, e))
            }
            MMapPath::Vsyscall => {}
            _ if keep(s) => {}
            _ => {
                inj.call(
                    &format!("munmap of the restorer's {s:x}-{e:x}"),
                    libc::SYS_munmap,
                    &[s, e - s],
                )?;
            }
        }
    }
    let target = memory::special_areas(&p.mappings);
    // Room for the current block, which is staged there when moved.
    let span = specials.iter().map(|t| t.2).max().unwrap_or(0)
        - specials.iter().map(|t| t.1).min().unwrap_or(0);
    let mut avoid = used.to_vec();
    avoid.extend(specials.iter().map(|s| (s.1, s.2)));
    let free_at =
        memory::find_free(&avoid, span.max(PAGE_SIZE), 0x100000).ok_or_else(|| Error::Restore {
            pid: child,
            msg: "no room to move the vdso".into(),
        })?;
    memory::move_vdso(&inj, child, &specials, &target, free_at)?;

    let fds = MapFds {
        files: prep.files.clone(),
    };
    // This checkpoint's page files (source 0) and those of the earlier checkpoints an
    // incremental one refers to (verified with it), mapped read-only.
    let mut maps: Vec<(u64, &stasis_image::PageFiles, Vec<Option<memmap2::Mmap>>)> = Vec::new();
    let mut images = vec![(0u64, image)];
    images.extend(deps.iter().map(|(seq, dep)| (*seq, dep)));
    for (seq, img) in images {
        let meta = &img.meta;
        let files = &meta
            .processes
            .iter()
            .find(|q| q.pid == p.pid)
            .ok_or_else(|| Error::Restore {
                pid: p.pid,
                msg: format!("checkpoint {} has no pages of this process", meta.sequence),
            })?
            .pages;
        let mut parts = Vec::new();
        for name in &files.parts {
            let path = img.data_path(name)?;
            let f =
                std::fs::File::open(&path).ctx(child, || format!("opening {}", path.display()))?;
            if f.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
                parts.push(None);
                continue;
            }
            // SAFETY: read-only mapping of a verified image file that nobody should
            // modify while we restore; a concurrent truncation would fault, not corrupt
            // memory.
            let map = unsafe { memmap2::Mmap::map(&f) }
                .ctx(child, || format!("mapping {}", path.display()))?;
            parts.push(Some(map));
        }
        maps.push((seq, files, parts));
    }
    let sources: HashMap<u64, memory::PageSource> = maps
        .iter()
        .map(|(seq, files, parts)| {
            let parts = parts.iter().map(|m| m.as_deref().unwrap_or(&[])).collect();
            (*seq, memory::PageSource { files, parts })
        })
        .collect();
    memory::restore_mappings(&inj, child, &p.mappings, &fds, &sources)?;
    if p.settings.mlockall != 0 {
        // MCL_FUTURE alone locks no mapping of now: only those made from here on.
        inj.call(
            &format!("mlockall({:#x})", p.settings.mlockall),
            libc::SYS_mlockall,
            &[p.settings.mlockall as u64],
        )?;
    }
    let scratch = Scratch::at(child, prep.gadget + PAGE_SIZE, PAGE_SIZE);
    task::restore_mm(&inj, child, &p.mm, prep.exe_fd, &scratch)?;
    // The other threads, created by the leader, stopped before their first instruction.
    for t in &p.threads[1..] {
        thread::create(&inj, child, t.tid, &scratch)?;
    }
    thread::restore_all(prep.gadget, &p.threads, &scratch)?;
    for t in &p.threads {
        for w in thread::restore_sched(t) {
            tracing::warn!("{w}");
        }
    }
    let mut helpers: Vec<i32> = prep.files.values().copied().collect();
    helpers.push(prep.exe_fd);
    helpers.sort();
    helpers.dedup();
    for fd in helpers {
        inj.call("close of a restorer fd", libc::SYS_close, &[fd as u64])?;
    }
    // The socket the process reported on.
    inj.raw(libc::SYS_close, &[prep.report_fd as u64])?;
    // POSIX locks, by the process itself once it closes no fd any more (a close of
    // any fd of a file drops them).
    crate::locks::take_posix(&inj, child, p, &scratch)?;
    // Process group: leaders made theirs while preparing; the others join now that
    // every process exists.
    if p.pgid > 0 && p.pgid != p.pid {
        let r = inj.raw(libc::SYS_setpgid, &[0, p.pgid as u64])?;
        if r < 0 {
            tracing::warn!(
                "process {}: could not rejoin process group {}: errno {}",
                p.pid,
                p.pgid,
                -r
            );
        }
    }
    // The foreground group of a terminal of the job, set by the first process of its
    // session that has it as controlling terminal and holds an fd of its slave (or
    // /dev/tty); its SIGTTOU is blocked here.
    for t in image.meta.ptys.iter().filter(|t| t.foreground > 0) {
        fn slave_fd(q: &Process, id: u64) -> Option<&stasis_image::Fd> {
            q.fds.iter().find(|f| {
                matches!(f.kind, stasis_image::FdKind::Pty { pty, master: false, .. } if pty == id)
            })
        }
        // (An image of an older stasis has no `ctty`: its leader then.)
        let setter = image.meta.processes.iter().find(|q| {
            q.sid == t.session
                && (q.ctty == Some(t.id) || (q.ctty.is_none() && q.pid == t.session))
                && slave_fd(q, t.id).is_some()
        });
        let Some(f) = setter
            .filter(|q| q.pid == p.pid)
            .and_then(|q| slave_fd(q, t.id))
        else {
            continue;
        };
        scratch.write(&t.foreground.to_le_bytes())?;
        let r = inj.raw(
            libc::SYS_ioctl,
            &[f.fd as u64, libc::TIOCSPGRP, scratch.addr],
        )?;
        if r < 0 {
            tracing::warn!(
                "process {}: could not give the terminal back to group {}: errno {}",
                p.pid,
                t.foreground,
                -r
            );
        }
    }

    crate::timers::restore(&inj, child, &p.posix_timers, &scratch)?;
    crate::fdowner::restore(&inj, &p.fds, &scratch)?;
    crate::jobctl::settle_parent(&inj, p, &image.meta.processes, &scratch)?;
    for t in &p.threads {
        signals::requeue(&inj, child, Some(t.tid), &t.pending, &scratch)?;
    }
    signals::requeue(&inj, child, None, &p.signals.shared_pending, &scratch)?;
    if let Some(c) = &p.creds {
        crate::creds::restore(&inj, child, c, &scratch)?;
    }
    task::restore_dumpable(&inj, &p.settings)?;
    files::seek_proc_files(&inj, p)?;
    // The last injected syscall removes the gadget itself; the thread is at that
    // syscall's exit stop and gets its own registers before it runs again.
    inj.call(
        "munmap of the restorer gadget",
        libc::SYS_munmap,
        &[prep.gadget, GADGET_LEN],
    )?;
    for t in &p.threads {
        thread::restore_cpu(t.tid, t)?;
    }
    Ok(())
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

/// What every new process needs to prepare itself; each starts as a copy of the
/// restorer (or of its parent), so this is shared by all.
struct Tree<'a> {
    image: &'a CheckpointReader,
    /// The process-side end of each process's socket, by process index.
    socks: Vec<i32>,
    hi: i32,
    gadgets: Vec<u64>,
    /// The restorer's descriptor of each shared memory object, inherited.
    shm: HashMap<u64, i32>,
    /// The restorer's descriptor of a slave of each pseudo-terminal, inherited.
    ttys: HashMap<u64, i32>,
}

impl Tree<'_> {
    /// Runs in new process `idx`: forks its children and zombies, prepares, reports,
    /// and waits to be rebuilt.
    ///
    /// `socks` are the numbers of the processes' sockets here: the inherited ones, or
    /// copies above `hi` kept for processes created later that share our table (a
    /// child sharing its parent's table, clone CLONE_FILES, is forked once the
    /// parent's fds are in place, and sets up no fds of its own).
    fn child_main(&self, idx: usize, mut socks: Vec<i32>) -> ! {
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

/// How long a restored process waits for the processes its pidfds and /proc files
/// refer to to be created.
const LATE_FD_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The fd part of preparing process `idx`: receives its fds, opens its pidfds and
/// /proc files, registers its epoll sets. Returns the shared memory objects it maps,
/// by key, at numbers above `hi`. `for_sharing` are the sockets, above `hi`, of the
/// processes that will share our table. A process that shares its parent's fd table
/// ([`Process::fd_table_of`]) has them already and does nothing here.
fn prepare_fds(
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
fn prepare(
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
