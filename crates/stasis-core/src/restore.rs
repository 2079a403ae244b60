//! Restore orchestration.
//!
//! 1. Verify the image (checksums) and the environment (mapped files unchanged, same
//!    architecture) before anything is created.
//! 2. Fork a child with the saved PID (`clone3` + `set_tid`). In ordinary Rust it
//!    recreates its fds, cwd, umask, rlimits, timers and signal dispositions, opens the
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
use stasis_sys::clone::{fork_with_pid, Forked};
use stasis_sys::ptrace::{self, Stop};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::io::FromRawFd;

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
    if meta.processes.len() != 1 || meta.processes[0].threads.is_empty() {
        return Err(Error::Restore {
            pid,
            msg: "the image holds several processes, which this version cannot restore".into(),
        });
    }
    let p = &meta.processes[0];
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
    image.data_path(&p.pages_file)?;
    Ok(())
}

/// Restores the single process of `image` as a child of the caller, which must be able
/// to choose PIDs (PID 1 of a PID namespace owned by its user namespace).
/// `stdio` are the caller's descriptors to bind the saved outside stdio to.
/// Returns the PID of the restored process, running.
pub fn restore(image: &CheckpointReader, stdio: [Option<i32>; 3]) -> Result<i32> {
    precheck(image)?;
    let p = &image.meta.processes[0];
    let pid = p.pid;

    // Where the gadget and the vdso's stopover go: holes of both the saved layout and
    // our own (the child starts as a copy of us).
    let mut used: Vec<(u64, u64)> = p.mappings.iter().map(|m| (m.start, m.end)).collect();
    let own = own_layout()?;
    used.extend(own.iter().map(|o| (o.1, o.2)));
    let gadget = memory::find_free(&used, GADGET_LEN, 0x100000).ok_or_else(|| Error::Restore {
        pid,
        msg: "no room for the restorer in the address space".into(),
    })?;
    used.push((gadget, gadget + GADGET_LEN));

    let mut pipe = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(stasis_sys::SysError::last("pipe2", 0))
            .ctx(pid, || "creating the restore pipe".into());
    }
    // Above every fd the process will have and every fd we hold now (pipe included).
    let max_fd = p
        .fds
        .iter()
        .map(|f| f.fd)
        .max()
        .unwrap_or(2)
        .max(max_open_fd());
    let hi = max_fd + 1;

    // The PID may still be held for a moment by a thread of ours that just exited
    // (the checksum workers): retry while it is released.
    let mut tries = 0;
    let forked = loop {
        // SAFETY: the caller is single-threaded at this point (worker threads have
        // been joined); the child only runs `child_main`, which never returns.
        match unsafe { fork_with_pid(pid) } {
            Err(e) if e.errno == libc::EEXIST && tries < PID_RETRIES => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => break r,
        }
    }
    .ctx(pid, || {
        format!("creating process {pid} (clone3 with set_tid; is the PID in use?)")
    })?;
    let child = match forked {
        Forked::Child => {
            // SAFETY: closing the read end in the child, which owns its copy.
            unsafe { libc::close(pipe[0]) };
            child_main(image, p, stdio, hi, gadget, pipe[1])
        }
        Forked::Parent(c) => c,
    };
    // SAFETY: we own the write end in the parent and close our copy of it.
    unsafe { libc::close(pipe[1]) };
    let guard = KillOnDrop(child);
    ptrace::seize(
        child,
        ptrace::O_TRACESYSGOOD | ptrace::O_EXITKILL | ptrace::O_TRACECLONE,
    )
    .ctx(pid, || "seizing the new process".into())?;
    // SAFETY: pipe[0] is ours; the File takes ownership.
    let mut rd = unsafe { std::fs::File::from_raw_fd(pipe[0]) };
    // One line, not EOF: a stray copy of the write end must not make us wait forever.
    let mut msg = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut rd), &mut msg)
        .ctx(pid, || "reading the restore pipe".into())?;
    let prepared: Prepared = match msg.strip_prefix("OK ") {
        Some(json) => serde_json::from_str(json).map_err(|e| Error::Restore {
            pid,
            msg: format!("bad message from the new process: {e}"),
        })?,
        None => {
            return Err(Error::Restore {
                pid,
                msg: msg
                    .strip_prefix("ERR ")
                    .unwrap_or("the new process died while preparing")
                    .to_string(),
            })
        }
    };
    for w in &prepared.warnings {
        tracing::warn!("process {pid}: {w}");
    }
    ptrace::interrupt(child).ctx(pid, || "stopping the new process".into())?;
    loop {
        match ptrace::wait(child).ctx(pid, || "waiting for the new process".into())? {
            Stop::Event(ptrace::EVENT_STOP, _) => break,
            Stop::Exited(_) | Stop::Killed(_) => {
                return Err(Error::Restore {
                    pid,
                    msg: "the new process died while preparing".into(),
                })
            }
            _ => ptrace::cont(child, 0).ctx(pid, || "resuming the new process".into())?,
        }
    }

    rebuild(child, image, p, &prepared, &used)?;
    std::mem::forget(guard);
    Ok(child)
}

/// Step 3 and 4 of the module docs, on the stopped child.
fn rebuild(
    child: i32,
    image: &CheckpointReader,
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
    let span = target.iter().map(|t| t.2).max().unwrap_or(0)
        - target.iter().map(|t| t.1).min().unwrap_or(0);
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
    let pages_path = image.data_path(&p.pages_file)?;
    let pages_file = std::fs::File::open(&pages_path)
        .ctx(child, || format!("opening {}", pages_path.display()))?;
    let map;
    let pages: &[u8] = if pages_file.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
        &[]
    } else {
        // SAFETY: read-only mapping of a verified image file that nobody should modify
        // while we restore; a concurrent truncation would fault, not corrupt memory.
        map = unsafe { memmap2::Mmap::map(&pages_file) }
            .ctx(child, || format!("mapping {}", pages_path.display()))?;
        &map[..]
    };
    memory::restore_mappings(&inj, child, &p.mappings, &fds, pages)?;
    let scratch = Scratch::at(child, prep.gadget + PAGE_SIZE);
    task::restore_mm(&inj, child, &p.mm, prep.exe_fd, &scratch)?;
    // The other threads, created by the leader, stopped before their first instruction.
    for t in &p.threads[1..] {
        thread::create(&inj, child, t.tid, &scratch)?;
    }
    for t in &p.threads {
        let tinj = Injector::new(t.tid, prep.gadget)?;
        thread::restore_registrations(&tinj, t, &scratch)?;
        thread::restore_comm(&tinj, t, &scratch)?;
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
    // The child closes its report pipe after writing, but we may have stopped it first.
    inj.raw(libc::SYS_close, &[prep.report_fd as u64])?;
    for t in &p.threads {
        signals::requeue(&inj, child, Some(t.tid), &t.pending, &scratch)?;
    }
    signals::requeue(&inj, child, None, &p.signals.shared_pending, &scratch)?;
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
    // Start the other threads first, the leader last.
    for t in p.threads.iter().rev() {
        ptrace::detach(t.tid, 0).ctx(t.tid, || "starting the restored thread".into())?;
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
    std::fs::write(path, data).map_err(|e| format!("recreating shared mapped file {path}: {e}"))?;
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

/// Runs in the new process: prepares it, reports, and waits to be rebuilt.
fn child_main(
    image: &CheckpointReader,
    p: &Process,
    stdio: [Option<i32>; 3],
    hi: i32,
    gadget: u64,
    mut report: i32,
) -> ! {
    let msg = match prepare(image, p, stdio, hi, gadget, &mut report) {
        Ok(prep) => format!("OK {}", serde_json::to_string(&prep).unwrap_or_default()),
        Err(e) => format!("ERR {e}"),
    };
    // SAFETY: `report` is the pipe's write end, owned by this process.
    let mut w = unsafe { std::fs::File::from_raw_fd(report) };
    let _ = w.write_all(format!("{}\n", msg.replace('\n', " ")).as_bytes());
    drop(w);
    if !msg.starts_with("OK") {
        // SAFETY: _exit is always safe to call.
        unsafe { libc::_exit(1) };
    }
    loop {
        // SAFETY: pause has no preconditions; the restorer stops us here.
        unsafe { libc::pause() };
    }
}

fn prepare(
    image: &CheckpointReader,
    p: &Process,
    stdio: [Option<i32>; 3],
    hi: i32,
    gadget: u64,
    report: &mut i32,
) -> std::result::Result<Prepared, String> {
    // SAFETY: plain libc calls on our own process; sigset is initialized by sigfillset.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        libc::setsid();
    }
    // Keep our stdio and the report pipe above every fd the process will have.
    let dup_high = |fd: i32| -> Option<i32> {
        // SAFETY: F_DUPFD on a descriptor we may or may not have; failure means closed.
        let r = unsafe { libc::fcntl(fd, libc::F_DUPFD, hi) };
        (r >= 0).then_some(r)
    };
    let ours = [
        stdio[0].and_then(dup_high),
        stdio[1].and_then(dup_high),
        stdio[2].and_then(dup_high),
    ];
    // The report pipe moves up too; child_main writes to and closes the moved copy.
    let moved = dup_high(*report).ok_or("cannot move the report pipe")?;
    // SAFETY: closing the original, low-numbered copy of the pipe; `moved` replaces it.
    unsafe { libc::close(*report) };
    *report = moved;
    // SAFETY: closes every descriptor below `hi`; ours are all at or above it.
    unsafe { libc::syscall(libc::SYS_close_range, 0u32, (hi - 1) as u32, 0u32) };
    files::restore_fds(&p.fds, &ours, image)?;
    for fd in ours.into_iter().flatten() {
        // SAFETY: closing our own temporary copy.
        unsafe { libc::close(fd) };
    }
    let exe_fd = files::open_high(&p.exe.path, libc::O_RDONLY, hi)?;
    let mut map_files = HashMap::new();
    for m in &p.mappings {
        if let MappingKind::File { file, .. } = &m.kind {
            let rw = m.shared && m.prot & libc::PROT_WRITE as u32 != 0;
            let flags = if rw { libc::O_RDWR } else { libc::O_RDONLY };
            if !map_files.contains_key(&file.path) {
                map_files.insert(file.path.clone(), files::open_high(&file.path, flags, hi)?);
            }
        }
    }
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
        report_fd: *report,
        warnings,
    })
}
