//! The rebuild of one prepared process by injected syscalls: seized at its stop, its
//! memory replaced by the saved mappings and pages, its mm fields, threads, signals,
//! credentials and registers put back (steps 3 and 4 of the restore).

use super::prepare::Prepared;
use super::GADGET_LEN;
use crate::error::{Error, Result, SysContext};
use crate::inject::{Injector, Scratch};
use crate::memory::{self, MapFds};
use crate::proc::ProcDir;
use crate::{files, signals, task, thread};
use procfs::process::MMapPath;
use stasis_image::{CheckpointReader, MappingKind, Process, PAGE_SIZE};
use stasis_sys::ptrace::{self, Stop};
use std::collections::HashMap;

/// Seizes a prepared process and waits until it is stopped.
pub(super) fn seize_stopped(pid: i32) -> Result<()> {
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
pub(super) fn rebuild(
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
    // While it still has our capabilities in the job's user namespace.
    if crate::sockets::inet::redirect::wanted() {
        crate::sockets::inet::redirect::install(&inj, child, &scratch)?;
    }
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
